"""plot.py: a real short run's curves as a PNG (one run, several overlaid, matplotlib missing) and its
metrics rows as TensorBoard scalars with the same names."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="the plot extra: pip install -e '.[plot]'")

from minigrace.config import parse_args
from minigrace.plot import PLOT_NAME, TensorBoardLog, main, panel_keys, read_run, write_run_plot
from minigrace.train import main as train

C0 = (31, 119, 180)  # matplotlib's first colour (#1f77b4): the run's curves


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    """A real 3-step run of the tiny model (test_train.py's short flags)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("plot") / "run"
    cfg, _ = parse_args(["--max-steps", "3", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "4",
                         "--eval-size", "12", "--out", str(out), "--report-to", "tensorboard"])
    train(cfg)
    torch.set_num_threads(threads)
    return str(out)


def rows_of(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_a_run_gets_its_plot(run_dir):
    keys = panel_keys([read_run(run_dir)])
    assert keys[0] == "reward_mean" and keys.index("emb_cross_cos_mean") > keys.index("reward_positive")
    assert {"response_len_mean", "truncated_frac", "clip_frac", "kl", "eval_ndcg@10"} <= set(keys)
    logged = {k for row in rows_of(run_dir) for k in row}
    components = {k for k in logged if k.startswith("reward_")} - {"reward_mean", "reward_std"}
    assert components and components <= set(keys)  # every reward component has its panel
    assert {k for k in logged if k.startswith("eval_")} <= set(keys)

    path = os.path.join(run_dir, PLOT_NAME)
    assert os.path.isfile(path)  # the run drew it at its end
    assert write_run_plot(run_dir) == path  # and it redraws on demand
    image = Image.open(path).convert("RGB")
    rows = -(-len(keys) // 4)  # 4 panels a row, 400 x 280 px each, + 80 px for the title
    assert image.size == (1600, 280 * rows + 80)
    colours = image.getcolors(maxcolors=1 << 20)
    assert sum(n for n, c in colours if c == C0) > 1000  # the curves were drawn


def test_several_runs_overlaid_from_the_command_line(run_dir, tmp_path, capsys):
    other = tmp_path / "run"  # same basename: the legend tells the two apart by path
    other.mkdir()
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), other)
    out = tmp_path / "both.png"
    assert main([run_dir, str(other), "--out", str(out)]) == str(out)
    assert capsys.readouterr().out.strip() == str(out)
    image = Image.open(out).convert("RGB")
    assert image.width == 1600
    second = (255, 127, 14)  # matplotlib's second colour (#ff7f0e)
    assert sum(n for n, c in image.getcolors(maxcolors=1 << 20) if c == second) > 1000
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "missing does not exist: pass run directories" in capsys.readouterr().err


def test_without_matplotlib_a_run_notes_it_in_one_line(run_dir, tmp_path):
    """`sys.modules["matplotlib"] = None` makes `import matplotlib` fail, as if it were not installed."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), copy)
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from minigrace.plot import write_run_plot\n"
            f"assert write_run_plot({str(copy)!r}) is None\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0] and "minigrace[plot]" in lines[0]
    assert not (copy / PLOT_NAME).exists()


@pytest.mark.parametrize("written_by", ["the run", "TensorBoardLog"])
def test_tensorboard_scalars_have_the_metrics_jsonl_names(run_dir, tmp_path, written_by):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    rows, log_dir = rows_of(run_dir), run_dir  # the run logged with --report-to tensorboard
    if written_by == "TensorBoardLog":
        log_dir = str(tmp_path)
        log = TensorBoardLog(log_dir)
        for row in rows:
            log.log(row)
        log.close()
    events = accumulator.EventAccumulator(log_dir)
    events.Reload()
    expected = {}  # name → {step: value}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                expected.setdefault(k, {})[row["step"]] = v
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged == pytest.approx(by_step, rel=1e-6, abs=1e-12)


def test_tensorboard_missing_names_the_flag_and_the_extra(tmp_path):
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from minigrace.plot import TensorBoardLog\n"
            f"TensorBoardLog({str(tmp_path)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ImportError: --report-to tensorboard needs the tensorboard package" in done.stderr
    assert "minigrace[tensorboard]" in done.stderr


def test_read_run_keeps_the_last_row_of_a_step_and_marks_skipped_steps(tmp_path):
    """A resumed run re-logs the steps after its checkpoint; a skipped step logs why (non-finite
    values: NaN is no point on a curve); a crash can cut the last line short."""
    lines = ['{"step": 0, "eval_ndcg@10": 0.5}', '{"step": 1, "reward_mean": 1.0}', '{"step": 2, "reward_mean": 2.0}',
             '{"step": 2, "reward_mean": 2.5}', '{"step": 3, "skipped": "reward", "reward_mean": NaN}',
             '{"step": 4, "reward_mean": 4.0, "kl": 0.1}', '{"step": 5, "rew']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    run = read_run(str(tmp_path))
    assert run.series == {"eval_ndcg@10": {0: 0.5}, "reward_mean": {1: 1.0, 2: 2.5, 4: 4.0}, "kl": {4: 0.1}}
    assert run.skipped == [3]
    assert panel_keys([run]) == ["reward_mean", "kl", "eval_ndcg@10"]
