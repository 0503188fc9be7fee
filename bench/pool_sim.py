"""Benchmark minigrace's kernels at GRACE shapes: eager torch reference vs torch.compile vs Triton.

    python bench/pool_sim.py            # GRACE shapes on CUDA; the small preset on CPU
    python bench/pool_sim.py --quick    # small CPU-friendly shapes on any device

Kernels: masked_mean_pool (dense mask, and masked_mean_pool_span), grace_reward (all components), and
group_advantage. Columns:
  e2e ms     the whole call as the trainer makes it (checks, allocations, launches): triton.testing.do_bench
             on CUDA (CUDA events around each call), a perf_counter loop on CPU; median and p20-p80
  kernel ms  GPU time only: CUDA events around replays of a CUDA graph of the call (no host overhead)
  launches   kernels (and memsets) one call puts on the GPU (torch.profiler)
  %peak      bytes / kernel time / the GPU's HBM peak, for the pool only (where bytes dominate)
  x roof     kernel time / the analytic roofline time of the shape (below)
Each compile row times a static kernel: torch._dynamo.reset() per case, dynamic=False. The Triton
column needs CUDA (the interpreter is never timed).

Roofline: the bytes each kernel must move at the shape (inputs read once, outputs written once) and the
FLOPs it must do, and the time they take at the GPU's peak (bandwidth, dense tensor-core rate; 3xTF32
for fp32 dot products). Under LAUNCH_US the bound is the launch itself ("launch"). On CPU
the roofline of the GRACE shapes is printed for the reference GPUs, so a reader without a GPU sees the
limit each GPU row has to be compared with.

Targets (issues #14 and #22, judged only on a GPU at the GRACE shapes; a CPU run reports "n/a", never a PASS):
  masked_mean_pool N=512 T=2048 H=1536 bf16: Triton kernel time >= 85% of HBM peak (mask and span entries)
  grace_reward P=64 G=8 H=1536 (fp32, as the trainer passes it): <= 2 launches (tiles + finish), e2e >= 3x eager,
      >= 1.0x compile. Estimate (H100, from the sm_90 build): 128 programs x 48 K steps x 263 instructions per
      warp, ~8-12 us of kernel time, L2 traffic 25 MB (~5 us); two launches ~20-25 us e2e from Python.
  group_advantage N=512 G=8: 1 launch, no host sync, e2e >= 3x eager, >= 1.0x compile (a launch-bound op:
      Inductor fuses the reference into one kernel too, so >= 1.5x compile is not reachable)
"""
import argparse
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/pool_sim.py` from anywhere

import torch

from bench.common import check_out, device_name, fmt, summarize, time_fn, write_json
from minigrace.kernels import (RewardWeights, grace_reward, grace_reward_reference, group_advantage,
                               group_advantage_reference, masked_mean_pool, masked_mean_pool_reference,
                               masked_mean_pool_span)

# (device-name pattern, label, HBM GB/s, dense bf16 TFLOP/s, dense tf32 TFLOP/s), first match wins.
# Vendor datasheets. "GH200" holds "H200" and "H100 NVL" holds "H100": the patterns keep them apart.
GPUS = [
    (r"GH200.*(144|HBM3e)", "GH200 144GB HBM3e", 4900, 989, 494),
    (r"GH200", "GH200 96GB HBM3", 4000, 989, 494),
    (r"(?<!G)H200 NVL", "H200 NVL", 4800, 835, 418),
    (r"(?<!G)H200", "H200 SXM", 4800, 989, 494),
    (r"H100 NVL", "H100 NVL", 3900, 835, 418),
    (r"H100.*PCIe", "H100 PCIe", 2000, 756, 378),
    (r"H100", "H100 SXM", 3350, 989, 494),
    (r"A100.*PCIe", "A100 PCIe 80GB", 1935, 312, 156),
    (r"A100", "A100 SXM 80GB", 2039, 312, 156),
]
ROOFLINE_GPUS = ["H200", "H100 80GB HBM3"]  # printed on CPU (device names as torch reports them)
LAUNCH_US = 2.0  # below this, a launch and its ramp-up, not bytes or FLOPs, set a kernel's time
GRACE_POOL, GRACE_REWARD, GRACE_ADVANTAGE = (512, 2048, 1536), (64, 8, 1536), (512, 8)
MAX_LAUNCHES = {"grace_reward": 2, "group_advantage": 1}  # kernels one call may put on the GPU (targets)


def gpu_spec(name):
    for pattern, label, gbps, bf16, tf32 in GPUS:
        if re.search(pattern, name, re.I):
            return dict(gpu=label, hbm_gbps=gbps, bf16_tflops=bf16, tf32_tflops=tf32)
    return None


def roofline(case, spec):
    """Time at peak for the case's bytes and FLOPs: fp32 dot products run as 3xTF32 (3 tensor-core passes)."""
    if spec is None:
        return None
    tflops = spec["bf16_tflops"] if case["dot_dtype"] != torch.float32 else spec["tf32_tflops"] / 3
    us_bytes, us_flops = case["bytes"] / (spec["hbm_gbps"] * 1e3), case["flops"] / (tflops * 1e6)
    us = max(us_bytes, us_flops)
    bound = "launch" if us < LAUNCH_US else "bytes" if us_bytes >= us_flops else "flops"
    return dict(gpu=spec["gpu"], bytes=case["bytes"], flops=case["flops"], us_bytes=us_bytes, us_flops=us_flops,
                us=us, bound=bound)


# ----------------------------------------------------------------------------- cases
def pool_case(N, T, H, dtype, device, make_tensors=True):
    # pooled span = after a 40-token system prefix, up to a random end (as rollouts of random length)
    g = torch.Generator().manual_seed(N + T + H)
    start = torch.full((N,), min(40, T // 4))
    end = torch.randint(T // 2, T + 1, (N,), generator=g)
    pooled = int((end - start).sum())
    size = torch.finfo(dtype).bits // 8
    case = dict(name="masked_mean_pool", shape=f"N={N} T={T} H={H} {str(dtype)[6:]}", dot_dtype=dtype,
                bytes=pooled * H * size + N * T + 3 * N * H * 4,  # pooled tokens, mask, fp32 out (+ normalize r/w)
                flops=pooled * H, target=(N, T, H) == GRACE_POOL and dtype == torch.bfloat16)
    if not make_tensors:
        return case
    hidden = torch.randn(N, T, H, device=device, dtype=dtype)  # made on the device: 6 GiB at the largest shape
    start, end = start.to(device), end.to(device)
    t = torch.arange(T, device=device)
    pool_mask = (t >= start[:, None]) & (t < end[:, None])
    return dict(case, reference=lambda: masked_mean_pool_reference(hidden, pool_mask),
                compiled_fn=masked_mean_pool_reference, args=(hidden, pool_mask),
                triton=lambda: masked_mean_pool(hidden, pool_mask),
                triton_span=lambda: masked_mean_pool_span(hidden, start, end))


def reward_case(P, G, H, dtype, device, make_tensors=True):
    N, size = P * G, torch.finfo(dtype).bits // 8
    case = dict(name="grace_reward", shape=f"P={P} G={G} H={H} {str(dtype)[6:]}", dot_dtype=dtype,
                bytes=(N + 2 * P) * H * size + 6 * N * 4,  # docs, group queries, negatives; 6 fp32 outputs
                # the similarities the formulas need: doc-doc in groups, doc-query (one product serves the
                # discriminative and, with one query per group, the supervised query-doc maxima)
                flops=2 * H * (N * G + N * P),
                target=(P, G, H) == GRACE_REWARD and dtype == torch.float32)
    if not make_tensors:
        return case
    docs, queries, negatives = (torch.randn(rows, H, device=device, dtype=dtype) for rows in (N, P, P))
    args = (docs, queries, negatives, G, 0.1, RewardWeights(discriminative=0.1))
    return dict(case, reference=lambda: grace_reward_reference(*args), compiled_fn=grace_reward_reference, args=args,
                triton=lambda: grace_reward(*args))


def advantage_case(N, G, scale_std, device, make_tensors=True):
    case = dict(name="group_advantage", shape=f"N={N} G={G}" + (" std" if scale_std else ""), dot_dtype=None,
                bytes=N * 4 * 2, flops=5 * N, target=(N, G) == GRACE_ADVANTAGE and not scale_std)
    if not make_tensors:
        return case
    rewards = torch.randn(N, device=device)
    return dict(case, reference=lambda: group_advantage_reference(rewards, G, scale_std=scale_std),
                compiled_fn=lambda r: group_advantage_reference(r, G, scale_std=scale_std), args=(rewards,),
                triton=lambda: group_advantage(rewards, G, scale_std=scale_std))


def build_cases(quick, device, make_tensors=True, targets_only=False):
    bf16, fp32 = torch.bfloat16, torch.float32
    if targets_only:  # the three GRACE target shapes (bench/gpu_check.py)
        pool, reward, advantage = [GRACE_POOL], [(*GRACE_REWARD, fp32)], [(*GRACE_ADVANTAGE, False)]
    elif quick:
        pool = [(16, T, H) for T in (128, 256) for H in (256, 384)]
        reward = [(8, 4, H, dtype) for H in (256, 384) for dtype in (fp32, bf16)]
        advantage = [(64, 8, False), (64, 8, True)]
    else:
        pool = [(512, T, H) for T in (512, 2048) for H in (1536, 3072)]
        reward = [(64, 8, H, dtype) for H in (1536, 3072) for dtype in (fp32, bf16)] + [(8, 64, 1536, fp32)]
        advantage = [(512, 8, False), (512, 8, True)]
    for N, T, H in pool:
        yield lambda N=N, T=T, H=H: pool_case(N, T, H, bf16, device, make_tensors)
    for P, G, H, dtype in reward:
        yield lambda P=P, G=G, H=H, dtype=dtype: reward_case(P, G, H, dtype, device, make_tensors)
    for N, G, scale_std in advantage:
        yield lambda N=N, G=G, s=scale_std: advantage_case(N, G, s, device, make_tensors)


# ----------------------------------------------------------------------------- measuring
@contextmanager
def kernels_env(mode):
    old = os.environ.get("MINIGRACE_KERNELS")
    os.environ["MINIGRACE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINIGRACE_KERNELS"]
        else:
            os.environ["MINIGRACE_KERNELS"] = old


def time_e2e(fn, device):
    """(median, p20, p80) ms of whole calls."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    t = summarize([s * 1e3 for s in time_fn(fn, warmup=2, reps=15)])
    return t["median"], t["p20"], t["p80"]


def time_kernel(fn):
    """GPU-only ms per call: CUDA-graph replays between CUDA events (the call's host work is not replayed).
    None when the call cannot be captured in a graph."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # e.g. a host sync inside the call
        print(f"  (kernel time not measured: {type(e).__name__}: {str(e).splitlines()[0][:80]})")
        return None


def count_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def extra_memory_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def max_abs_error(out, ref):
    if isinstance(out, tuple):  # grace_reward: (total, parts)
        return max([max_abs_error(out[0], ref[0])] + [max_abs_error(out[1][k], ref[1][k]) for k in ref[1]])
    return (out.float() - ref.float()).abs().max().item()


def implementations(case, triton_ok):
    """[(impl, fn, compile info or None)] and the rows of those that could not run."""
    impls, failed = [("eager", case["reference"], None)], []
    try:
        torch._dynamo.reset()  # a fresh static compile per case: no recompiles, no dynamic shapes carried over
        compiled = torch.compile(case["compiled_fn"], dynamic=False)
        breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
        seconds = time_fn(lambda: compiled(*case["args"]), warmup=0, reps=1)[0]  # compile + first run
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
        impls.append(("compile", lambda: compiled(*case["args"]), dict(compile_s=seconds, graph_breaks=breaks)))
    except Exception as e:  # e.g. no C++ compiler: report, do not crash
        failed.append(dict(impl="compile", error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
    for impl in ("triton", "triton_span"):
        if impl in case and triton_ok:
            impls.append((impl, case[impl], None))
        elif impl in case:
            failed.append(dict(impl=impl, error="needs CUDA (not timed on CPU; the interpreter is never timed)"))
    return impls, failed


def run_case(case, device, triton_ok, spec):
    on_gpu = device == "cuda"
    roof = roofline(case, spec)
    with torch.no_grad():
        reference = case["reference"]()
        impls, rows = implementations(case, triton_ok)
        for impl, fn, compile_info in impls:
            try:
                with kernels_env("triton" if impl.startswith("triton") else "torch"):
                    err = max_abs_error(fn(), reference)
                    median, p20, p80 = time_e2e(fn, device)
                    kernel_ms = time_kernel(fn) if on_gpu else None
                    row = dict(impl=impl, ms=median, p20_ms=p20, p80_ms=p80, kernel_ms=kernel_ms,
                               launches=count_launches(fn) if on_gpu else None,
                               extra_mb=extra_memory_mb(fn) if on_gpu else None, max_abs_err=err)
                    row.update(compile_info or {})
            except Exception as e:
                rows.append(dict(impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
                continue
            bytes_bound = case["name"] == "masked_mean_pool"
            row["pct_peak"] = (100 * case["bytes"] / (kernel_ms * 1e-3) / (spec["hbm_gbps"] * 1e9)
                               if kernel_ms and spec and bytes_bound else None)
            row["x_roofline"] = kernel_ms * 1e3 / roof["us"] if kernel_ms and roof else None
            rows.append(row)
    by_impl = {r["impl"]: r for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r:
            for base in ("eager", "compile"):
                r[f"speedup_vs_{base}"] = by_impl[base]["ms"] / r["ms"] if base in by_impl else None
        r.update(kernel=case["name"], shape=case["shape"], bytes=case["bytes"], flops=case["flops"])
    order = {"eager": 0, "compile": 1, "triton": 2, "triton_span": 3}
    return sorted(rows, key=lambda r: order[r["impl"]]), roof


def judge(case, rows, on_gpu):
    """PASS/FAIL of the issue's target for a target case (None for other cases)."""
    if not case["target"]:
        return None
    tritons = [r for r in rows if r["impl"].startswith("triton")]
    if not on_gpu or not tritons or any("ms" not in r for r in tritons):
        return dict(kernel=case["name"], shape=case["shape"], result="n/a",
                    why="needs a GPU run with the Triton column (a PASS is only ever from a GPU)")
    checks = {}
    for r in tritons:
        if case["name"] == "masked_mean_pool":
            checks[f"{r['impl']} %peak >= 85"] = (r["pct_peak"] or 0) >= 85
        else:
            max_launches = MAX_LAUNCHES[case["name"]]
            checks[f"{r['impl']} launches <= {max_launches}"] = (r["launches"] or 99) <= max_launches
            checks[f"{r['impl']} x eager >= 3"] = (r["speedup_vs_eager"] or 0) >= 3
            checks[f"{r['impl']} x compile >= 1.0"] = (r["speedup_vs_compile"] or 0) >= 1.0
    return dict(kernel=case["name"], shape=case["shape"], result="PASS" if all(checks.values()) else "FAIL",
                checks=checks)


# ----------------------------------------------------------------------------- output
def print_roofline_table(device_names):
    """Roofline of the GRACE shapes on GPUs this run does not have (a CPU run)."""
    print("\nroofline at the GRACE shapes (analytic: bytes and FLOPs at peak; a measured GPU row is compared "
          "with these)")
    print(f"{'gpu':<18} {'kernel':<17} {'shape':<26} {'MB':>9} {'GFLOP':>9} {'us bytes':>9} {'us flops':>9} "
          f"{'bound':>6}")
    table = []
    for name in device_names:
        spec = gpu_spec(name)
        for make_case in build_cases(quick=False, device="cpu", make_tensors=False):
            case = make_case()
            roof = roofline(case, spec)
            table.append(dict(roof, kernel=case["name"], shape=case["shape"]))
            print(f"{roof['gpu']:<18} {case['name']:<17} {case['shape']:<26} {roof['bytes'] / 1e6:>9.4g} "
                  f"{roof['flops'] / 1e9:>9.4g} {roof['us_bytes']:>9.4g} {roof['us_flops']:>9.4g} {roof['bound']:>6}")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (automatic on CPU)")
    parser.add_argument("--targets-only", action="store_true",
                        help="only the three GRACE target shapes (pool, reward, advantage); needs CUDA")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/pool_sim-<device>.json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for --device cpu (default 1: stable medians on a shared machine; "
                             "0 = torch's default)")
    args = parser.parse_args()
    check_out(parser, args.out)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks are counted in the JSON instead
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    on_gpu = args.device == "cuda"
    quick = args.quick or not on_gpu
    try:
        import triton  # noqa: F401

        triton_ok = on_gpu
    except ImportError:
        triton_ok = False
    name = device_name(args.device)
    spec = gpu_spec(name) if on_gpu else None
    print(f"device: {name} | torch {torch.__version__} | preset: {'quick' if quick else 'GRACE'}"
          + (f" | {spec['gpu']}: {spec['hbm_gbps']} GB/s, {spec['bf16_tflops']} bf16 TFLOP/s" if spec else "")
          + ("" if on_gpu else f" | {torch.get_num_threads()} CPU threads"))
    if not triton_ok:
        print("Triton column: needs CUDA" + ("" if on_gpu else " (this is a CPU run)")
              + " - shown as n/a, no number is made up.")

    header = (f"{'kernel':<17} {'shape':<26} {'impl':<11} {'e2e ms':>9} {'p20-p80 ms':>17} {'kernel ms':>9} "
              f"{'launch':>6} {'%peak':>6} {'x roof':>7} {'x eager':>7} {'x comp':>7} {'max abs err':>11}")
    print(header)
    print("-" * len(header))
    rows, roofs, targets = [], [], []
    for make_case in build_cases(quick, args.device, targets_only=args.targets_only and on_gpu):
        case = make_case()
        case_rows, roof = run_case(case, args.device, triton_ok, spec)
        rows += case_rows
        if roof:
            roofs.append(dict(roof, kernel=case["name"], shape=case["shape"]))
        for r in case_rows:
            if "error" in r:
                print(f"{case['name']:<17} {case['shape']:<26} {r['impl']:<11} n/a: {r['error']}")
                continue
            print(f"{case['name']:<17} {case['shape']:<26} {r['impl']:<11} {r['ms']:>9.4f} "
                  f"{r['p20_ms']:>8.4f}-{r['p80_ms']:<8.4f} {fmt(r['kernel_ms'], '.4f'):>9} "
                  f"{fmt(r['launches'], 'd'):>6} {fmt(r['pct_peak'], '.1f'):>6} {fmt(r['x_roofline'], '.1f'):>7} "
                  f"{fmt(r['speedup_vs_eager'], '.2f'):>7} {fmt(r['speedup_vs_compile'], '.2f'):>7} "
                  f"{r['max_abs_err']:>11.2e}")
        if roof:
            print(f"{'':<17} {'':<26} {'roofline':<11} {roof['us'] / 1e3:>9.4f}  ({roof['gpu']}: "
                  f"{roof['bytes'] / 1e6:.4g} MB, {roof['flops'] / 1e9:.4g} GFLOP, {roof['bound']}-bound)")
        verdict = judge(case, case_rows, on_gpu)
        if verdict:
            targets.append(verdict)
        del case
        if on_gpu:
            torch.cuda.empty_cache()

    if quick:  # the GRACE shapes were not measured: show their limits (on this GPU, or the reference ones)
        roofs = print_roofline_table([name] if spec else ROOFLINE_GPUS)
        for t in ("masked_mean_pool", "grace_reward", "group_advantage"):
            if not any(v["kernel"] == t for v in targets):
                targets.append(dict(kernel=t, result="n/a", why="the GRACE shapes were not measured on a GPU"))
    print("\ntargets (issues #14, #22):")
    for t in targets:
        print(f"  {t['kernel']:<17} {t.get('shape', ''):<26} {t['result']}"
              + (f"  {t['checks']}" if "checks" in t else f"  ({t['why']})"))

    meta = dict(preset="quick" if quick else "grace", gpu_spec=spec,
                timing=("e2e: triton.testing.do_bench; kernel: do_bench_cudagraph (CUDA events around graph replays)"
                        if on_gpu else "e2e: time.perf_counter, 2 warm-up + 15 runs; kernel: n/a on CPU"),
                extra_mb="torch.cuda.max_memory_allocated delta" if on_gpu else "n/a on CPU")
    out = write_json("pool_sim", args.device, meta, dict(rows=rows, roofline=roofs, targets=targets), args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
