"""Benchmark minigrace's kernels at GRACE shapes: eager torch reference vs torch.compile vs Triton.

    python bench/pool_sim.py            # GRACE shapes on CUDA; the small preset on CPU
    python bench/pool_sim.py --quick    # small CPU-friendly shapes on any device

Kernels: masked_mean_pool (+ L2 norm), grace_reward (all components), group_advantage (with and without
a [N, T] token mask). Each implementation is timed the same way: warm-up, then the median and p20/p80 of
repeated runs (triton.testing.do_bench on GPU, a time.perf_counter loop on CPU). GB/s counts the bytes
that must move (read once + written once); extra memory = peak allocated during one call minus what was
allocated before it (output included). The Triton column needs CUDA: the interpreter is never timed.
"""
import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from minigrace.kernels import (RewardWeights, grace_reward, grace_reward_reference, group_advantage,
                               group_advantage_reference, masked_mean_pool, masked_mean_pool_reference)

PEAK_GBPS = {"H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100 80GB": 2039}  # "H100" = SXM (HBM3)


def peak_bandwidth(device_name):
    for key, gbps in PEAK_GBPS.items():  # most specific first
        if all(word in device_name for word in key.split()):
            return gbps
    return None


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"cpu {model}"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- timing
def time_cpu(fn, warmup=2, reps=15):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


def time_cuda(fn):
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def extra_memory_mb(fn, device):
    if device != "cuda":
        return None  # not measured on CPU (no allocator statistics)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


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


def max_abs_error(out, ref):
    if isinstance(out, tuple):  # grace_reward: (total, parts)
        return max([max_abs_error(out[0], ref[0])] + [max_abs_error(out[1][k], ref[1][k]) for k in ref[1]])
    return (out.float() - ref.float()).abs().max().item()


# ----------------------------------------------------------------------------- cases
def pool_case(N, T, H, dtype, device):
    hidden = torch.randn(N, T, H, device=device, dtype=dtype)  # made on the device: 6 GiB at the largest shape
    # pooled span = after a 40-token system prefix, up to a random end (as rollouts of random length)
    start = min(40, T // 4)
    end = torch.randint(T // 2, T + 1, (N,))
    t = torch.arange(T)
    pool_mask = ((t >= start) & (t[None, :] < end[:, None])).to(device)
    pooled = int(pool_mask.sum())
    bytes_moved = pooled * H * hidden.element_size() + pool_mask.numel() + N * H * hidden.element_size()
    return dict(
        name="masked_mean_pool", shape=f"N={N} T={T} H={H} {str(dtype)[6:]}", bytes=bytes_moved,
        eager=lambda: masked_mean_pool_reference(hidden, pool_mask),
        compiled_fn=masked_mean_pool_reference, args=(hidden, pool_mask),
        triton=lambda: masked_mean_pool(hidden, pool_mask),
    )


def reward_case(P, G, H, dtype, device):
    docs = torch.randn(P * G, H, device=device, dtype=dtype)
    queries = torch.randn(P, H, device=device, dtype=dtype)
    negatives = torch.randn(P, H, device=device, dtype=dtype)
    args = (docs, queries, negatives, G, 0.1, RewardWeights(discriminative=0.1))
    bytes_moved = (docs.numel() + queries.numel() + negatives.numel()) * docs.element_size() + 6 * P * G * 4
    return dict(
        name="grace_reward", shape=f"P={P} G={G} H={H} {str(dtype)[6:]}", bytes=bytes_moved,
        eager=lambda: grace_reward_reference(*args), compiled_fn=grace_reward_reference, args=args,
        triton=lambda: grace_reward(*args),
    )


def advantage_case(N, G, T, device):
    rewards = torch.randn(N, device=device)
    token_mask = None if T is None else torch.rand(N, T, device=device) > 0.3
    kwargs = dict(scale_std=True, token_mask=token_mask)
    bytes_moved = N * 4 * 2 + (0 if T is None else N * T * (1 + 4))  # rewards in + adv out (+ mask in, [N, T] out)
    return dict(
        name="group_advantage", shape=f"N={N} G={G}" + ("" if T is None else f" T={T} (token mask)"),
        bytes=bytes_moved,
        eager=lambda: group_advantage_reference(rewards, G, **kwargs),
        compiled_fn=lambda r, g: group_advantage_reference(r, g, **kwargs), args=(rewards, G),
        triton=lambda: group_advantage(rewards, G, **kwargs),
    )


def build_cases(quick, device):
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    if quick:
        pool = [(16, T, H) for T in (128, 256) for H in (256, 384)]
        reward = [(8, 4, H) for H in (256, 384)]
        advantage = [(64, 8, None), (64, 8, 256)]
    else:
        pool = [(512, T, H) for T in (512, 2048) for H in (1536, 2048, 3072)]
        reward = [(64, 8, H) for H in (1536, 2048, 3072)]
        advantage = [(512, 8, None), (512, 8, 2048)]
    for N, T, H in pool:
        yield lambda N=N, T=T, H=H: pool_case(N, T, H, bf16, device)
    for P, G, H in reward:
        yield lambda P=P, G=G, H=H: reward_case(P, G, H, bf16, device)
    for N, G, T in advantage:
        yield lambda N=N, G=G, T=T: advantage_case(N, G, T, device)


# ----------------------------------------------------------------------------- run
def run_case(case, device, triton_ok):
    timer = time_cuda if device == "cuda" else time_cpu
    rows = []
    with torch.no_grad():
        reference = case["eager"]()
        impls = [("eager", case["eager"], None)]
        try:
            compiled = torch.compile(case["compiled_fn"])
            breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
            t0 = time.perf_counter()
            compiled(*case["args"])  # compile (+ first run)
            compile_s = time.perf_counter() - t0
            graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
            impls.append(("compile", lambda: compiled(*case["args"]), (compile_s, graph_breaks)))
        except Exception as e:  # e.g. no C++ compiler: report, do not crash
            rows.append(dict(impl="compile", error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        if triton_ok:
            impls.append(("triton", case["triton"], None))
        else:
            rows.append(dict(impl="triton", error="needs CUDA (not timed on CPU; the interpreter is never timed)"))
        for impl, fn, compile_info in impls:
            try:
                with kernels_env("triton" if impl == "triton" else "torch"):
                    err = max_abs_error(fn(), reference)
                    median, p20, p80 = timer(fn)
                    mem = extra_memory_mb(fn, device)
            except Exception as e:
                rows.append(dict(impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
                continue
            rows.append(dict(impl=impl, ms=median, p20_ms=p20, p80_ms=p80, gbps=case["bytes"] / median / 1e6,
                             extra_mb=mem, max_abs_err=err))
            if compile_info:
                rows[-1].update(compile_s=compile_info[0], graph_breaks=compile_info[1])
    by_impl = {r["impl"]: r for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r:
            for base in ("eager", "compile"):
                r[f"speedup_vs_{base}"] = by_impl[base]["ms"] / r["ms"] if base in by_impl else None
    order = {"eager": 0, "compile": 1, "triton": 2}
    return sorted(rows, key=lambda r: order[r["impl"]])


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (automatic on CPU)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/pool_sim-<device>.json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for --device cpu (default 1: stable medians on a shared machine; "
                             "0 = torch's default)")
    args = parser.parse_args()
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks are counted in the JSON instead
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    quick = args.quick or args.device == "cpu"
    try:
        import triton  # noqa: F401

        triton_ok = args.device == "cuda"
    except ImportError:
        triton_ok = False
    name = device_name(args.device)
    peak = peak_bandwidth(name) if args.device == "cuda" else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device: {name} | torch {torch.__version__} | preset: {'quick' if quick else 'GRACE'}"
          + (f" | peak {peak} GB/s" if peak else "")
          + (f" | {torch.get_num_threads()} CPU threads, load avg {load:.2f}" if args.device == "cpu" else ""))
    if not triton_ok:
        print("Triton column: needs CUDA" + ("" if args.device == "cuda" else " (this is a CPU run)")
              + " - shown as n/a, no number is made up.")

    header = (f"{'kernel':<17} {'shape':<32} {'impl':<8} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>8} "
              f"{'%peak':>6} {'extra MB':>9} {'x eager':>8} {'x compile':>9} {'max abs err':>11}")
    print(header)
    print("-" * len(header))
    results = []
    for make_case in build_cases(quick, args.device):
        case = make_case()
        for r in run_case(case, args.device, triton_ok):
            r.update(kernel=case["name"], shape=case["shape"], bytes=case["bytes"])
            r["pct_peak"] = 100 * r["gbps"] / peak if peak and "gbps" in r else None
            results.append(r)
            if "error" in r:
                print(f"{case['name']:<17} {case['shape']:<32} {r['impl']:<8} n/a: {r['error']}")
                continue
            print(f"{case['name']:<17} {case['shape']:<32} {r['impl']:<8} {r['ms']:>10.4f} "
                  f"{r['p20_ms']:>8.4f}-{r['p80_ms']:<8.4f} {r['gbps']:>8.2f} {fmt(r['pct_peak'], '.1f'):>6} "
                  f"{fmt(r['extra_mb'], '.1f', 'n/a'):>9} {fmt(r['speedup_vs_eager'], '.2f'):>8} "
                  f"{fmt(r['speedup_vs_compile'], '.2f'):>9} {r['max_abs_err']:>11.2e}")
        del case
        if args.device == "cuda":
            torch.cuda.empty_cache()

    out = Path(args.out or Path(__file__).parent / "results" / f"pool_sim-{slug(name)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, preset="quick" if quick else "grace", peak_gbps=peak,
                cpu_threads=torch.get_num_threads(), load_avg_at_start=load,
                timing="triton.testing.do_bench" if args.device == "cuda" else "time.perf_counter, 2 warm-up + 15 runs",
                extra_mb="torch.cuda.max_memory_allocated delta" if args.device == "cuda" else "n/a on CPU")
    out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
