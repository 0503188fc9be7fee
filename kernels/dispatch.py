"""Pick the kernel backend: Triton on CUDA tensors, plain torch otherwise.

MINIGRACE_KERNELS=auto (default) | torch | triton
  auto   -> "triton" iff every tensor is on CUDA and triton imports, else "torch"
  torch  -> always the torch reference
  triton -> always Triton (on CPU tensors only under TRITON_INTERPRET=1, set before import)
"""
import os
from types import SimpleNamespace

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
