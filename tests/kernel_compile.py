"""Shared by the kernel tests: compile Triton kernels for sm_90 without a GPU, exactly as the launcher would;
DEVICE, where the tests put their tensors (MINIGRACE_TEST_DEVICE, default cpu: the interpreter; cuda: the
compiled kernels); spy_guard, to see which device a launch is guarded with.

The test process runs Triton's interpreter, so each compile runs in a subprocess without TRITON_INTERPRET.
Arguments go through the launcher's own specialization (triton's binder): sizes and strides divisible by
16, unit strides and 16-byte-aligned pointers are specialized as they would be at launch, so the code
(vector widths, registers) is the code a GPU would run. Each compiled kernel's resource usage is read
from its cubin with cuobjdump (which ships with triton): registers per thread, local memory per thread
(LOCAL: spill slots and stack; 0 means no spills), static shared memory.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device(os.environ.get("MINIGRACE_TEST_DEVICE", "cpu"))

_SCRIPT = r"""
import importlib, json, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
cuobjdump = re.sub(r"ptxas$", "cuobjdump", triton.knobs.nvidia.ptxas.path)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "u8": torch.uint8,
          "i32": torch.int32, "i64": torch.int64}


def example(value):  # "*bf16" -> a 16-byte-aligned bf16 pointer (a meta tensor: a dtype and an address 0)
    if isinstance(value, str) and value.startswith("*"):
        return torch.empty(0, dtype=DTYPES[value[1:]], device="meta")
    return value


def compile_one(fn, args, options):
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage))
    return dict(regs=int(res["REG"]), local_bytes=int(res["LOCAL"]), stack_bytes=int(res.get("STACK", 0)),
                shared_bytes=kernel.metadata.shared, ptx=kernel.asm["ptx"])


results = []
for module, name, args, options, label in json.loads(sys.stdin.read()):
    obj = getattr(importlib.import_module(module), name)
    args = {k: example(v) for k, v in args.items()}
    # an autotuned kernel is compiled once per config, with that config's constexprs and warps
    configs = obj.configs if isinstance(obj, Autotuner) else [None]
    fn = obj.fn if isinstance(obj, Autotuner) else obj
    for config in configs:
        extra = {} if config is None else dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        given = {**args, **options, **extra}  # kernel arguments and launch options (num_warps, ...), as at launch
        usage = compile_one(fn, {k: v for k, v in given.items() if k in fn.arg_names},
                            {k: v for k, v in given.items() if k not in fn.arg_names})
        results.append(dict(label=label, kernel=name, config=extra, **usage))
print("RESULTS:" + json.dumps(results))
"""


def compile_for_sm90(builds):
    """builds: [(module, kernel name, {arg: example value}, {num_warps/num_stages}, label)].

    Example values: "*bf16"/"*fp32"/"*u8"/... for a 16-byte-aligned pointer, None for an unused pointer,
    ints and floats as the launcher would see them, constexprs by value. Returns one dict per compiled
    kernel (per autotune config): label, kernel, config, regs, local_bytes, stack_bytes, shared_bytes, ptx."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(builds), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS:"))
    return json.loads(line[len("RESULTS:"):])


def assert_no_spills(results, max_regs=255):
    """Every compiled kernel fits the register file: no local memory (spills), at most max_regs registers."""
    for r in results:
        where = f"{r['label']} {r['kernel']} {r['config']}"
        assert r["local_bytes"] == 0, f"{where}: {r['local_bytes']} bytes of local memory per thread (spills)"
        assert 0 < r["regs"] <= max_regs, f"{where}: {r['regs']} registers"


def spy_guard(monkeypatch, module):
    """Replace module.device_guard by a recorder of the devices it is called with."""
    seen = []
    real_guard = module.device_guard

    def guard(tensor):
        seen.append(tensor.device)
        return real_guard(tensor)

    monkeypatch.setattr(module, "device_guard", guard)
    return seen
