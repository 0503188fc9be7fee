"""LoRA: train low-rank adapters (peft) instead of every weight.

With `--lora-r R` every target linear W gets a trainable update (α/R)·B·A (A [R, in], B [out, R],
B = 0 at the start), and the base weights are frozen. Only the adapters have gradients and AdamW
states, and the frozen base is also the KL reference: the same model with its adapters switched off
(`model.disable_adapter()`), so no second copy is ever loaded.

A checkpoint directory of a LoRA run holds the adapter (peft's adapter_config.json +
adapter_model.safetensors, a few MB) instead of the full weights; `load_model(dir)` (so `Encoder`
and `python -m minigrace.eval`) loads the base it names and merges the adapter into it. The final
checkpoint also holds `merged/`, a plain transformers model with the adapter merged in.
"""
from __future__ import annotations

import torch

from .models import load_merged


BASE_DTYPES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_dtype(compute_dtype: torch.dtype | None) -> str:
    """The --dtype name to load the frozen base in: the compute dtype under autocast (bf16 weights are what
    its matmuls read: autocast would otherwise recast every fp32 base weight in every forward, and the frozen
    base needs no fp32 master copy), fp32 without autocast. The adapters stay fp32 (peft upcasts them), so
    the trained weights and their AdamW state are fp32 either way."""
    return BASE_DTYPES[compute_dtype]


def add_adapters(model, cfg, resume_from: str | None = None):
    """The HF model → a peft model with fresh adapters (or the adapters saved in `resume_from`)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    targets = "all-linear" if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_merged(adapter_dir: str, out_dir: str) -> str:
    """Write the merged model (+ tokenizer) of an adapter checkpoint to `out_dir`; loadable without peft."""
    model, tokenizer = load_merged(adapter_dir, device="cpu", dtype="fp32", for_training=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def trainable_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))
