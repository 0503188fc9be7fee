"""Pick the kernel backend (Triton on CUDA tensors, plain torch otherwise) and launch on the right GPU.

MINIGRACE_KERNELS=auto (default) | torch | triton
  auto   -> "triton" iff every tensor is on CUDA and triton imports, else "torch"
  torch  -> always the torch reference
  triton -> always Triton (on CPU tensors only under TRITON_INTERPRET=1, set before import)
"""
import contextlib
import os
from types import SimpleNamespace

import torch

try:  # the package must import (and the torch path must work) without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = SimpleNamespace(constexpr=None)  # enough for kernel signatures to be defined
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_MODES = ("auto", "torch", "triton")


def jit(fn):
    """triton.jit when triton is installed; otherwise leave the (never launched) function alone."""
    return triton.jit(fn) if HAS_TRITON else fn


def autotune(configs, key):
    """triton.autotune over configs [(constexpr kwargs, num_warps)], keyed on the argument names `key`.

    Under the interpreter only the first config runs (nothing to time there, and it is never benchmarked)."""
    if not HAS_TRITON:
        return lambda fn: fn
    first_only = {"early_config_prune": lambda cfgs, *args, **kwargs: cfgs[:1]} if INTERPRET else None
    return triton.autotune([triton.Config(kwargs, num_warps=warps) for kwargs, warps in configs], key=key,
                           prune_configs_by=first_only)


def device_guard(tensor):
    """Context in which to launch a kernel on `tensor`: its own GPU, not the current one.

    Triton launches on torch.cuda.current_device(); tensors on another GPU (--device cuda:1) would be
    read with that device's pointers from GPU 0."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def kernel_backend(*tensors) -> str:
    """Return "triton" or "torch" for these tensors (None entries are ignored)."""
    mode = os.environ.get("MINIGRACE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MINIGRACE_KERNELS={mode!r}: expected one of {_MODES}")
    if mode == "torch":
        return "torch"
    tensors = [t for t in tensors if t is not None]
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if mode == "auto":
        return "triton" if on_cuda and HAS_TRITON else "torch"
    if not HAS_TRITON:
        raise RuntimeError("MINIGRACE_KERNELS=triton but `import triton` failed; install triton or use auto/torch")
    if not on_cuda and not INTERPRET:
        raise RuntimeError(
            "MINIGRACE_KERNELS=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before minigrace.kernels is imported (or use MINIGRACE_KERNELS=auto/torch)"
        )
    return "triton"


def next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()
