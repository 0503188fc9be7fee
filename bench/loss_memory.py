"""Peak memory and time of the policy loss at Qwen2.5's vocabulary: minigrace vs full logits vs Liger.

    python bench/loss_memory.py                    # CPU: 2k, 4k, 8k tokens (about 20 min on 2 cores)
    python bench/loss_memory.py --quick            # 1k and 2k tokens
    python bench/loss_memory.py --tokens 8192,32768 --methods minigrace,liger

What is measured: from the policy's last hidden states [B, T+1, H] (a leaf tensor standing for the
output of `policy_forward`) and the lm_head weight [V, H], one forward + backward of the clipped
policy loss, giving d loss / d hidden and d loss / d weight. Three implementations of the same loss:

  naive      logits = hidden @ W.T for every token ([B, T, V]), log_softmax, gather, clipped loss
  minigrace  minigrace.loss.response_logprobs (token chunks, each checkpointed) + policy_loss
  liger      liger_kernel's LigerFusedLinearGRPOLoss (beta=0, loss_type="dapo" = token mean), if installed

Every (token count, method) runs in a fresh child process, so one measurement cannot inherit another's
memory. Peak memory = on CPU, the child's peak RSS during the runs minus its RSS just before (inputs
excluded, the gradients it produces included); on CUDA, max_memory_allocated minus memory_allocated
before. Each child saves its loss and gradients; the table compares them with the naive reference.
A configuration whose estimated naive peak exceeds the free memory is skipped, not crashed.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/loss_memory.py` from anywhere

import torch
import torch.nn.functional as F

from bench.common import check_out
from bench.common import (PeakRSS, available_memory, device_name, emit, fmt, mib, run_child, summarize,
                          write_json)

METHODS = ("naive", "minigrace", "liger")


# ----------------------------------------------------------------------------- inputs and the three losses
def make_inputs(tokens: int, seq_len: int, vocab: int, hidden_size: int, dtype, device, seed: int = 0) -> dict:
    """B = tokens / seq_len rows of seq_len response tokens (+ one prompt column that predicts the first)."""
    rows = max(1, tokens // seq_len)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq_len + 1, hidden_size, generator=g)
    # Small weights keep the logits near uniform, so log p ≈ -log V and the ratio to old_logprobs
    # (≈ -log V too) lands both inside and outside the clip range [0.8, 1.2].
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.005
    ids = torch.randint(0, vocab, (rows, seq_len + 1), generator=g)
    response_mask = torch.ones(rows, seq_len + 1, dtype=torch.bool)
    response_mask[:, 0] = False  # column 0 is the prompt's last token: it predicts the first response token
    old_logprobs = (-math.log(vocab) + 0.1 * torch.randn(rows, seq_len + 1, generator=g)) * response_mask
    advantages = torch.randn(rows, generator=g)
    to = dict(device=device)
    return dict(hidden=hidden.to(dtype=dtype, **to).requires_grad_(), weight=weight.to(dtype=dtype, **to).requires_grad_(),
                ids=ids.to(**to), response_mask=response_mask.to(**to), old_logprobs=old_logprobs.to(**to),
                advantages=advantages.to(**to))


def naive_logprobs(hidden, weight, ids):
    """Full logits: [B, T, V] for every position, log_softmax, gather the next token."""
    logits = (hidden[:, :-1] @ weight.T).float()  # [B, T, V]
    logprobs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return F.pad(logprobs, (1, 0))  # [B, T+1], column 0 predicts nothing


def make_loss(method: str, x: dict, clip_eps: float, chunk: int, compiled: bool):
    """A closure computing the loss (a scalar) of `method` from x's tensors."""
    from minigrace.loss import policy_loss, response_logprobs

    mask, token_count = x["response_mask"], int(x["response_mask"].sum())

    def clipped(logprobs):
        return policy_loss(logprobs, x["old_logprobs"], x["advantages"], mask, clip_eps, token_count)[0]

    if method == "naive":
        return lambda: clipped(naive_logprobs(x["hidden"], x["weight"], x["ids"]))
    if method == "minigrace":
        return lambda: clipped(response_logprobs(x["hidden"], x["weight"], x["ids"], mask, chunk))
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # beta=0: no reference model (as GRACE); "dapo" normalizes by all tokens of the batch = token mean.
        fused = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=clip_eps, epsilon_high=clip_eps,
                                         loss_type="dapo", compiled=compiled, chunk_size=1)
        return lambda: fused(x["hidden"][:, :-1], x["weight"], x["ids"][:, 1:], mask[:, 1:].long(), x["advantages"],
                             old_per_token_logps=x["old_logprobs"][:, 1:])[0]
    raise ValueError(method)


# ----------------------------------------------------------------------------- child: one configuration
def child(args) -> None:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    x = make_inputs(args.token_list[0], args.seq_len, args.vocab, args.hidden, dtype, device)
    try:
        loss_fn = make_loss(args.child, x, args.clip_eps, args.chunk, args.compiled)
    except ImportError as e:
        emit({"error": f"not installed: {e}"})
        return
    params = (x["hidden"], x["weight"])

    def run(fn):
        for p in params:
            p.grad = None  # fresh gradients every run: their memory counts in the peak
        loss = fn()
        loss.backward()
        return loss

    def timed(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = run(fn)
            end.record()
            torch.cuda.synchronize()
            return loss, start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        loss = run(fn)
        return loss, time.perf_counter() - t0

    # Prime the code path on 16 tokens first (lazy imports, kernel selection, Liger's compile), so the
    # measured peak is the loss's own memory, not one-off setup; then the full-size warm-up runs.
    primer = dict(x, hidden=x["hidden"][:1, :17].detach().clone().requires_grad_(), ids=x["ids"][:1, :17],
                  response_mask=x["response_mask"][:1, :17], old_logprobs=x["old_logprobs"][:1, :17],
                  advantages=x["advantages"][:1])
    make_loss(args.child, primer, args.clip_eps, args.chunk, args.compiled)().backward()
    for _ in range(args.warmup):
        run(loss_fn)
    for p in params:
        p.grad = None
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        for _ in range(args.reps):
            loss, seconds = timed(loss_fn)
            times.append(seconds)
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated - allocated before"
    else:
        peak, method = rss.delta, rss.method
    if args.save:
        torch.save({"loss": loss.detach().float().cpu(), "grad_hidden": x["hidden"].grad.float().cpu(),
                    "grad_weight": x["weight"].grad.float().cpu()}, args.save)
    emit(dict(peak_bytes=peak, memory_method=method, times_s=times, loss=float(loss)))


# ----------------------------------------------------------------------------- parent: all configurations
def naive_estimate(tokens: int, vocab: int, hidden: int, bytes_per: int) -> int:
    """Bytes the full-logits loss needs at its peak: ~3 [M, V] fp32 buffers (log_softmax output, its
    gradient, the logits' gradient) + the weight's gradient + the inputs already allocated."""
    return 3 * tokens * vocab * 4 + 2 * vocab * hidden * bytes_per + 2 * tokens * hidden * bytes_per


def compare(saved: dict, reference: str) -> dict:
    """Max abs differences of each method's loss and gradients from the reference method's."""
    ref = torch.load(saved[reference], mmap=True)
    out = {}
    for method, path in saved.items():
        got = torch.load(path, mmap=True)
        out[method] = {f"diff_{k}": float((got[k] - ref[k]).abs().max()) for k in ("loss", "grad_hidden", "grad_weight")}
        out[method]["reference"] = reference
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None,
                   help="comma-separated B*T token counts (default: 2048,4096,8192 on CPU; "
                        "2048,4096,8192,16384,32768 on CUDA)")
    p.add_argument("--quick", action="store_true", help="1024,2048 tokens, one run each")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--vocab", type=int, default=151936, help="V (Qwen2.5: 151936)")
    p.add_argument("--hidden", type=int, default=1536, help="H (Qwen2.5-1.5B: 1536)")
    p.add_argument("--seq-len", type=int, default=1024, help="response tokens per row; B = tokens / seq-len")
    p.add_argument("--chunk", type=int, default=1024, help="minigrace's logprob_chunk (tokens per chunk)")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="hidden and weight dtype (default: bf16 on CUDA, fp32 on CPU as minigrace trains there)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per config (default: 1 on CUDA, 0 on CPU)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per config (default: 5 on CUDA; 1 on CPU, where one 8k-token run takes minutes)")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                   help="Liger's torch.compile of its loss math (default: on for CUDA, off on CPU)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/loss_memory-<device>.json)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    if args.reps is None:
        args.reps = 5 if cuda else 1
    if args.compiled is None:
        args.compiled = cuda
    if args.tokens is None:
        args.tokens = "1024,2048" if args.quick else ("2048,4096,8192,16384,32768" if cuda else "2048,4096,8192")
    try:
        args.token_list = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens {args.tokens}: expected comma-separated whole numbers, e.g. 2048,4096")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {METHODS}")
    if any(t < 1 for t in args.token_list):
        p.error("--tokens must be positive")
    check_out(p, args.out)
    return args


def child_argv(args, method: str, tokens: int, save: str) -> list[str]:
    return [__file__, "--child", method, "--tokens", str(tokens), "--save", save, "--vocab", str(args.vocab),
            "--hidden", str(args.hidden), "--seq-len", str(args.seq_len), "--chunk", str(args.chunk),
            "--clip-eps", str(args.clip_eps), "--device", args.device, "--dtype", args.dtype,
            "--warmup", str(args.warmup), "--reps", str(args.reps),
            "--compiled" if args.compiled else "--no-compiled"]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    bytes_per = 2 if args.dtype == "bf16" else 4
    print(f"device: {device_name(args.device)} | torch {torch.__version__} | V={args.vocab} H={args.hidden} "
          f"{args.dtype} | rows of {args.seq_len} tokens | minigrace chunk {args.chunk} | "
          f"{args.warmup} warm-up + {args.reps} timed run(s) per config, each config in a fresh process")
    mem_note = ("CUDA: torch.cuda.max_memory_allocated during the runs minus memory_allocated before" if args.device == "cuda"
                else "CPU: peak RSS of a fresh child process during the runs minus its RSS before "
                     "(VmHWM reset via /proc/self/clear_refs); inputs excluded, gradients included")
    print(f"peak memory: {mem_note}")
    header = (f"{'tokens':>7} {'method':<10} {'peak MiB':>9} {'x naive':>8} {'median s':>9} {'p20-p80 s':>15} "
              f"{'tok/s':>8} {'loss':>10} {'|dloss|':>8} {'|dgrad_h|':>9} {'|dgrad_W|':>9}")
    print(header)
    print("-" * len(header))
    results = []
    for tokens in args.token_list:
        rows, saved = {}, {}
        with tempfile.TemporaryDirectory(prefix="loss_memory-") as tmp:
            for method in args.method_list:
                row = dict(tokens=tokens, method=method, rows=max(1, tokens // args.seq_len), seq_len=args.seq_len)
                free = available_memory() if args.device == "cpu" else torch.cuda.mem_get_info()[0]
                need = naive_estimate(tokens, args.vocab, args.hidden, bytes_per) if method == "naive" else 0
                if free is not None and need > 0.9 * free:
                    row["error"] = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                else:
                    save = str(Path(tmp) / f"{method}.pt")
                    row.update(run_child(child_argv(args, method, tokens, save), timeout=args.timeout))
                    if "error" not in row:
                        saved[method] = save
                        t = summarize(row.pop("times_s"))
                        row.update(median_s=t["median"], p20_s=t["p20"], p80_s=t["p80"], n_runs=t["n"],
                                   tokens_per_s=tokens / t["median"] if t["median"] else None)
                rows[method] = row
            reference = "naive" if "naive" in saved else next(iter(saved), None)
            if reference:
                for method, diffs in compare(saved, reference).items():
                    rows[method].update(diffs)
        base = rows.get("naive", {}).get("peak_bytes")
        for method, row in rows.items():
            row["peak_mib"] = mib(row.get("peak_bytes"))
            row["peak_vs_naive"] = row["peak_bytes"] / base if base and row.get("peak_bytes") else None
            results.append(row)
            if "error" in row:
                print(f"{tokens:>7} {method:<10} n/a: {row['error']}")
                continue
            print(f"{tokens:>7} {method:<10} {row['peak_mib']:>9.0f} {fmt(row['peak_vs_naive'], '.3f'):>8} "
                  f"{row['median_s']:>9.2f} {row['p20_s']:>7.2f}-{row['p80_s']:<7.2f} {row['tokens_per_s']:>8.0f} "
                  f"{row['loss']:>10.5f} {fmt(row.get('diff_loss'), '.1e'):>8} "
                  f"{fmt(row.get('diff_grad_hidden'), '.1e'):>9} {fmt(row.get('diff_grad_weight'), '.1e'):>9}")

    target = next((r for r in results if r["tokens"] == 8192 and r["method"] == "minigrace"), None)
    verdict = None
    if target and target.get("peak_vs_naive") is not None:
        verdict = target["peak_vs_naive"] <= 0.3
        print(f"\ntarget: minigrace peak ≤ 0.3x naive at 8192 tokens: {target['peak_vs_naive']:.3f}x → "
              f"{'met' if verdict else 'missed'}")
    meta = dict(vocab=args.vocab, hidden=args.hidden, dtype=args.dtype, seq_len=args.seq_len, chunk=args.chunk,
                clip_eps=args.clip_eps, warmup=args.warmup, reps=args.reps, liger_compiled=args.compiled,
                memory_method=mem_note, reference="naive (full logits); diffs are max abs differences from it",
                target_minigrace_le_0_3x_naive_at_8k=verdict)
    path = write_json("loss_memory", args.device, meta, results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
