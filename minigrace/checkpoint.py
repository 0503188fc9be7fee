"""Checkpoints: atomic save, load, resume.

A checkpoint directory holds the model (safetensors, loadable by `from_pretrained`), the tokenizer,
and `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step). It is written to a
temporary sibling directory and renamed into place, so a crash mid-write leaves the previous
checkpoint untouched and never a half-written one.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model, tokenizer, trainer_state: dict | None = None, state_dict: dict | None = None,
                    merge_adapter: bool = False) -> str:
    """Write model + tokenizer (+ trainer state) to `path` atomically. Returns `path`.

    state_dict: the full weights when `model` is sharded (parallel.full_state_dicts). A peft model
    writes its adapter only; merge_adapter also writes `<path>/merged`, the merged plain model."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if merge_adapter:
        from .lora import save_merged
        save_merged(tmp, os.path.join(tmp, "merged"))
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(path):  # e.g. checkpoint-final of an earlier attempt: replace it
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete step checkpoint in a run directory (temporary ones are ignored)."""
    steps = []
    for name in os.listdir(run_dir):
        full = os.path.join(run_dir, name)
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() \
                and os.path.exists(os.path.join(full, STATE_FILE)):
            steps.append((int(name[len("checkpoint-"):]), full))
    return max(steps)[1] if steps else None


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(run_dir)
                   if n.startswith("checkpoint-") and n.split("-")[1].isdigit())
    for step in steps[:-keep_last]:
        shutil.rmtree(os.path.join(run_dir, f"checkpoint-{step:06d}"), ignore_errors=True)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
