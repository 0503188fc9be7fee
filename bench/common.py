"""Small helpers shared by the benchmarks: device names, timing summaries, peak memory, child processes, JSON.

Peak memory on CPU is the peak resident set size (RSS) of a process. Each measured configuration runs in
a fresh child process; the child resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`,
Linux ≥ 4.0) once its inputs exist, runs, and reads VmHWM from /proc/self/status. Where the reset is not
allowed, it falls back to getrusage's ru_maxrss (peak since the process started) minus the RSS before.
On CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- device
def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA, 'cpu AMD EPYC' on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"cpu {model}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: str) -> dict:
    """What a reader needs to compare numbers: device, library versions, threads, load."""
    versions = {"torch": torch.__version__}
    for pkg in ("transformers", "trl", "liger_kernel"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            versions[pkg] = None
    return dict(device=device_name(device), **versions, cpu_threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), load_avg_at_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                python=platform.python_version())


# ----------------------------------------------------------------------------- timing
def summarize(times: list[float]) -> dict:
    """median, p20, p80 (and n) of a list of durations; with < 5 samples p20/p80 are min/max."""
    if not times:
        return dict(median=None, p20=None, p80=None, n=0)
    if len(times) < 5:
        return dict(median=statistics.median(times), p20=min(times), p80=max(times), n=len(times))
    q = statistics.quantiles(times, n=10)  # deciles: q[1] = p20, q[7] = p80
    return dict(median=statistics.median(times), p20=q[1], p80=q[7], n=len(times))


def time_fn(fn, warmup: int = 1, reps: int = 5, sync=None) -> list[float]:
    """Seconds per call of fn() after `warmup` untimed calls."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: best effort
    return kib * 1024


class PeakRSS:
    """Peak RSS of this process from now on: `with PeakRSS() as m: ...; m.peak, m.delta` (bytes).

    Resets the kernel's high-water mark on entry (clear_refs 5); `method` says how it was measured."""

    def __enter__(self):
        self.before = rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs reset (peak RSS of a fresh child process)"
        except OSError:
            self.method = "ru_maxrss (peak since child start) - RSS before"
        return self

    def read(self) -> int:
        kib = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if kib is None:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return kib * 1024

    def __exit__(self, *exc):
        self.peak = self.read()
        self.delta = self.peak - self.before
        return False


def process_peak_rss() -> int:
    """Peak RSS of this process since it started (ru_maxrss; kB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> int | None:
    try:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- child processes
RESULT_TAG = "BENCH_RESULT_JSON:"


def emit(result: dict) -> None:
    """Child side: print the result on one tagged line (everything else on stdout is passed through)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh process; return its emitted result, or {"error": ...}."""
    cmd = [sys.executable, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"error": f"{why}: {tail[:300]}", "stderr_tail": proc.stderr[-3000:]}


# ----------------------------------------------------------------------------- checking the command line
def check_out(parser, out: str | None) -> None:
    """parser.error at once for an --out JSON path that could not be written when the benchmark ends."""
    if not out:
        return
    if os.path.isdir(out):
        parser.error(f"--out {out} is a directory: pass the JSON file to write, e.g. {Path(out) / 'results.json'}")
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"--out {out}: {parent} is a file, not a directory: pass a path in a directory")


def check_models(parser, flag: str, names: list[str]) -> None:
    """parser.error at once for a model name that would not load (minigrace.models.check_model)."""
    from minigrace.checkpoint import CheckpointError
    from minigrace.models import ModelNotAvailable, check_model

    for name in names:
        try:
            check_model(name)
        except (ModelNotAvailable, CheckpointError) as e:
            parser.error(f"{flag}: {e}")


# ----------------------------------------------------------------------------- output
def write_json(name: str, device: str, meta: dict, results, out: str | None = None) -> Path:
    """bench/results/<name>-<device slug>.json (or `out`)."""
    path = Path(out) if out else RESULTS / f"{name}-{slug(device_name(device))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta={**environment(device), **meta}, results=results), indent=1) + "\n")
    return path


def mib(n_bytes) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)
