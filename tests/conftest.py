"""Test setup: Triton's interpreter on CPU, offline hub, one cached tiny model for the session."""
import os

# Must be set before any @triton.jit decorator runs (i.e. before kernels are imported). On a GPU machine,
# MINIGRACE_TEST_DEVICE=cuda runs the kernel tests compiled instead (bench/gpu_check.sh does).
if os.environ.get("MINIGRACE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model and tokenizer (built once and cached under $MINIGRACE_CACHE)."""
    from minigrace.worlds.builtin import load_tiny

    return load_tiny()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matmuls are too small to gain from threads, and on a busy 2-core machine
    two OpenMP threads spin-wait each other (measured: 7x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
