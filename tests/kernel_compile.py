"""Shared by the kernel tests: compile Triton kernels for a real GPU target without a GPU."""
import os
import subprocess
import sys

import pytest


def compile_for_sm90(module, builds):
    """Compile kernels to sm_90 cubins in a subprocess without TRITON_INTERPRET: checks the real GPU code
    path (which the interpreter never exercises) on a machine without a GPU. builds: [(kernel, types, constexprs)]."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    script = f"""
import importlib, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
module = importlib.import_module({module!r})
for kernel, types, consts in {builds!r}:
    fn = getattr(module, kernel)
    sig = {{a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
