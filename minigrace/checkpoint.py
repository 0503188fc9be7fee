"""Checkpoints: atomic save, load, resume.

A checkpoint directory holds the model (safetensors, loadable by `from_pretrained`), the tokenizer,
and `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step). It is written to a
temporary sibling directory and renamed into place, so a crash mid-write leaves the previous
checkpoint untouched and never a half-written one. `manifest.json` lists every file's SHA-256:
`verify_checkpoint` re-reads them, and `prune_checkpoints` deletes older checkpoints only after the
newest one verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


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
    # Hash (and fsync) every file, so the checkpoint can be verified before anything older is deleted.
    files = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
    write_json(os.path.join(tmp, MANIFEST), {name: sha256(os.path.join(tmp, name), sync=True) for name in files})
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
    """The newest complete step checkpoint in a run directory."""
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def sha256(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(fh.fileno())  # on disk before the rename that publishes it
    return digest.hexdigest()


def verify_checkpoint(path: str) -> None:
    """Raise ValueError unless every file in the manifest is present with its hash, and the weights and
    trainer state load."""
    from safetensors import safe_open

    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: no readable {MANIFEST} ({e})") from None
    for name, expected in manifest.items():
        file = os.path.join(path, name)
        if not os.path.exists(file) or sha256(file) != expected:
            raise ValueError(f"{path}: {name} is missing or does not match its hash")
    for name in manifest:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as weights:
                for key in weights.keys():
                    weights.get_slice(key)  # parses every tensor header
    if STATE_FILE in manifest:
        load_trainer_state(path)


def step_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoint-NNNNNN directories, oldest first (temporary ones are ignored)."""
    found = []
    for name in os.listdir(run_dir):
        full = os.path.join(run_dir, name)
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() \
                and os.path.exists(os.path.join(full, STATE_FILE)):
            found.append((int(name[len("checkpoint-"):]), full))
    return sorted(found)


def prune_checkpoints(run_dir: str, keep_last: int) -> list[str]:
    """Verify the newest step checkpoint, then delete all but the newest `keep_last` (0 keeps all).
    Returns the deleted paths. A newest checkpoint that fails verification deletes nothing."""
    found = step_checkpoints(run_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    verify_checkpoint(found[-1][1])
    old = [path for _, path in found[:-keep_last]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
