"""Looking at runs: a PNG of the training curves, and TensorBoard logging beside metrics.jsonl.

    python -m minigrace.plot runs/a                    # → runs/a/curves.png
    python -m minigrace.plot runs/a runs/b --out ab.png  # several runs overlaid

The harness writes RUN/curves.png at the end of every run (`write_run_plot`), and with
--report-to tensorboard also logs every metrics row to TensorBoard (`TensorBoardLog`), under the same
names as metrics.jsonl. matplotlib and tensorboard are optional extras:
pip install "minigrace[plot,tensorboard]".

One panel per metric, x = step: the reward and each reward component, emb_cross_cos_mean (the
collapse signal: the mean cosine between rationales of different texts, with its value at the start
dashed, since what matters is whether it climbs towards 1), response length and truncation, clip
fraction and KL, and each held-out eval_* metric (step 0 is the eval before training).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

PLOT_NAME = "curves.png"
PANEL_COLUMNS, PANEL_SIZE, DPI = 4, (4.0, 2.8), 100  # inches per panel

# Panels in reading order; the reward components and eval_* metrics are found in the rows.
TRAIN_PANELS = ["emb_cross_cos_mean", "response_len_mean", "truncated_frac", "clip_frac", "kl"]
Y_LABELS = {
    "reward_mean": "total reward", "emb_cross_cos_mean": "cosine, different texts",
    "response_len_mean": "tokens", "truncated_frac": "fraction hitting max_new_tokens",
    "clip_frac": "fraction of tokens clipped", "kl": "KL to the reference",
}


@dataclass
class Run:
    name: str
    series: dict[str, dict[int, float]]  # metric → {step: value}; later rows win (a resume rewrites steps)
    skipped: list[int] = field(default_factory=list)  # steps whose update was skipped (non-finite values)
    config: dict = field(default_factory=dict)


def read_run(run_dir: str) -> Run:
    """A run's metrics.jsonl (and config.json when there is one) as series per metric."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass run directories (python train.py --out DIR writes one)")
    series: dict[str, dict[int, float]] = {}
    skipped = set()
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a last line cut short by a crash
            step = row.get("step")
            if not isinstance(step, int):
                continue
            if "skipped" in row:
                skipped.add(step)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    series.setdefault(key, {})[step] = float(value)
    config = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as fh:
            config = json.load(fh)
    return Run(os.path.basename(os.path.normpath(run_dir)), series, sorted(skipped), config)


def panel_keys(runs: list[Run]) -> list[str]:
    """The metrics to draw, in reading order, among those some run logged."""
    present = list(dict.fromkeys(key for run in runs for key in run.series))  # first-logged order
    components = [k for k in present if k.startswith("reward_") and k not in ("reward_mean", "reward_std")]
    evals = [k for k in present if k.startswith("eval_")]
    return [k for k in ["reward_mean", *components, *TRAIN_PANELS, *evals] if k in present]


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~1/15 of the run: the trend through RL noise."""
    window = len(values) // 15
    if window < 2:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[str], out_path: str) -> str:
    """Draw the curves of one or more runs (overlaid, one colour each) into a PNG; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    runs = [read_run(d) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):  # same basename twice: tell them apart by path
        for run, d in zip(runs, run_dirs):
            run.name = os.path.normpath(d)
    keys = panel_keys(runs)
    if not keys:
        raise ValueError(f"no metrics to plot in {', '.join(run_dirs)} (metrics.jsonl has no numeric rows yet)")
    steps = [s for run in runs for key in keys for s in run.series.get(key, {})]
    x_range = (min(steps) - 0.5, max(steps) + 0.5)  # one x range for all panels: eval steps line up
    rows = math.ceil(len(keys) / PANEL_COLUMNS)
    fig = Figure(figsize=(PANEL_SIZE[0] * PANEL_COLUMNS, PANEL_SIZE[1] * rows + 0.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, PANEL_COLUMNS, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for i, run in enumerate(runs):
            points = sorted(run.series.get(key, {}).items())
            if not points:
                continue
            steps, values = zip(*points)
            color = f"C{i % 10}"
            if key.startswith("eval_"):
                ax.plot(steps, values, "o-", color=color, markersize=4)
            elif len(values) >= 30:  # raw faintly, the trend solid
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(list(values)), color=color, linewidth=1.5)
            else:
                ax.plot(steps, values, ".-", color=color, markersize=3)
            if key == "emb_cross_cos_mean":
                ax.axhline(values[0], color=color, linestyle="--", linewidth=1)
            if key == "reward_mean":
                for step in run.skipped:
                    ax.axvline(step, color="red", alpha=0.4, linewidth=0.8)
        ax.set_title(key, fontsize=10)
        ax.set_xlim(*x_range)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(Y_LABELS.get(key, "held-out" if key.startswith("eval_") else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        notes = []
        if key == "emb_cross_cos_mean":
            notes.append(Line2D([], [], color="gray", linestyle="--", label="at the first step (→1: collapse)"))
        if key == "reward_mean" and any(run.skipped for run in runs):
            notes.append(Line2D([], [], color="red", alpha=0.4, label="skipped step"))
        if notes:
            ax.legend(handles=notes, fontsize=7, loc="best")
    for ax in axes[len(keys):]:
        ax.set_visible(False)

    if len(runs) == 1:
        cfg = runs[0].config
        detail = ", ".join(f"{k} {cfg[k]}" for k in ("model", "data", "reward") if k in cfg)
        fig.suptitle(f"GRACE training curves: {runs[0].name}" + (f" ({detail})" if detail else ""))
    else:
        fig.suptitle(f"GRACE training curves: {len(runs)} runs")
        fig.legend(handles=[Line2D([], [], color=f"C{i % 10}", label=r.name) for i, r in enumerate(runs)],
                   loc="outside lower center", ncol=min(len(runs), 4), fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
    return out_path


def write_run_plot(run_dir: str) -> str | None:
    """RUN/curves.png at the end of a run; None, with a one-line note, if it cannot be drawn (the run
    itself is already saved: a missing plot is no reason to fail it)."""
    out_path = os.path.join(run_dir, PLOT_NAME)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"note: no {out_path}: matplotlib is not installed (pip install \"minigrace[plot]\")")
        return None
    try:
        return plot_runs([run_dir], out_path)
    except Exception as e:  # noqa: BLE001 - a plot must never cost a finished run
        print(f"note: could not draw {out_path}: {type(e).__name__}: {e}")
        return None


# -----------------------------------------------------------------------------
# TensorBoard (--report-to tensorboard)


class TensorBoardLog:
    """Every metrics row as TensorBoard scalars, named as in metrics.jsonl, x = row["step"].

    Event files go into the run directory itself, so `tensorboard --logdir runs/` lists one run per
    directory (a resumed run adds a new event file there; TensorBoard reads them together)."""

    def __init__(self, run_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--report-to tensorboard needs the tensorboard package: "
                              "pip install \"minigrace[tensorboard]\" (or pip install tensorboard)") from e
        self.writer = SummaryWriter(log_dir=run_dir, flush_secs=30)

    def log(self, row: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


# -----------------------------------------------------------------------------


def out_problem(path: str) -> str | None:
    """Why the image `path` (--out) could not be written, or None."""
    from matplotlib.backend_bases import FigureCanvasBase

    if os.path.isdir(path):
        return f"is a directory: pass the image file to write, e.g. {os.path.join(path, PLOT_NAME)}"
    if os.path.splitext(path)[1][1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        return f"not an image file name: pass a .png path, e.g. {PLOT_NAME}"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"{parent} is a file, not a directory: pass a path in a directory"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m minigrace.plot",
        description="Draw the training curves of one or more runs (overlaid, one colour each) into a PNG: "
                    "reward and its components, emb_cross_cos_mean (collapse), response length and truncation, "
                    "clip fraction, KL and the held-out eval_* metrics, over steps.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each holds a metrics.jsonl)")
    parser.add_argument("--out", help=f"PNG to write (default: RUN/{PLOT_NAME} for one run, ./{PLOT_NAME} for several)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("drawing needs matplotlib: pip install \"minigrace[plot]\"")
    for run_dir in args.runs:
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            what = ("does not exist" if not os.path.exists(run_dir) else "is a file, not a run directory"
                    if os.path.isfile(run_dir) else "holds no metrics.jsonl")
            parser.error(f"{run_dir} {what}: pass run directories (python train.py --out DIR)")
    out = args.out or (os.path.join(args.runs[0], PLOT_NAME) if len(args.runs) == 1 else PLOT_NAME)
    if out_problem(out):
        parser.error(f"--out {out}: {out_problem(out)}")
    try:
        path = plot_runs(args.runs, out)
    except ValueError as e:  # nothing to plot yet
        parser.error(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
