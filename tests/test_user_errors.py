"""Every user mistake gets one line (issue #21): a wrong path, file or flag given to train.py,
`python -m minigrace.eval`, `python -m minigrace.plot`, the bench scripts or the Encoder ends in one
line on stderr that names the mistake and its fix, exit 2, and nothing written; no traceback.

Each mistake is caught before any model loads, so each test takes a moment. The CLIs run as a user
runs them, with the working directory a fresh folder: whatever they would write lands there."""
import json
import os
import runpy
import subprocess
import sys

import pytest

from minigrace.models import ModelNotAvailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def files_under(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), folder) for d, dirs, names in os.walk(folder) for n in dirs + names}


def one_line(stderr: str) -> str:
    """The message: the last non-empty line of stderr; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()][-1]


def run_cli(workdir, *argv) -> str:
    """Run a command in `workdir` as a user would → its one-line error (exit 2, nothing written)."""
    before = files_under(workdir)
    done = subprocess.run([sys.executable, *argv], cwd=workdir, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert files_under(workdir) == before
    return one_line(done.stderr)


@pytest.fixture
def mistakes(tmp_path):
    """A folder of the things users pass by mistake."""
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a run directory\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "wrong_columns.jsonl").write_text('{"title": "a", "body": "b"}\n')
    (tmp_path / "broken.yaml").write_text("lr: [1, 2\n")
    (tmp_path / "broken.json").write_text('{"lr": 1e-3,}')
    (tmp_path / "unknown_key.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    model = tmp_path / "model"  # enough of a model directory to pass the checks made before loading
    model.mkdir()
    (model / "config.json").write_text("{}")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# train.py: --config mistakes (parse_args, before anything else)


@pytest.mark.parametrize("config, message", [
    ("broken.yaml", "broken.yaml:2:1: not valid YAML (expected ',' or ']', but got '<stream end>'): fix the file"),
    ("broken.json", "broken.json:1:13: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("missing.yaml", "missing.yaml does not exist: pass a YAML or JSON file"),
    ("empty_dir", "empty_dir is a directory: pass a YAML or JSON file"),
    ("unknown_key.yaml", "unknown config field(s) ['learning_rate']: the fields are the flags of"),
    ("list.yaml", "list.yaml: expected a mapping of field: value, got list"),
])
def test_train_config_mistakes(mistakes, config, message, capsys):
    from minigrace.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(mistakes / config)])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("train.py: error: --config: ") and message in line


def test_train_config_mistake_from_the_shell(mistakes):
    line = run_cli(mistakes, os.path.join(ROOT, "train.py"), "--config", "broken.yaml")
    assert line == ("train.py: error: --config: broken.yaml:2:1: not valid YAML (expected ',' or ']', but got "
                    "'<stream end>'): fix the file")


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--resume", "empty_dir"], "--resume empty_dir: not a run directory (no config.json in it)"),
    (["--resume", "bad_run"], "--resume bad_run: its config.json is not valid JSON"),
])
def test_train_flag_mistakes(mistakes, argv, message, capsys, monkeypatch):
    from minigrace.config import parse_args

    (mistakes / "bad_run").mkdir()
    (mistakes / "bad_run" / "config.json").write_text("{oops")
    monkeypatch.chdir(mistakes)
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in one_line(capsys.readouterr().err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_train_cuda_without_cuda(capsys):
    from minigrace.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert one_line(capsys.readouterr().err).endswith("--device: CUDA is not available on this machine (use --device cpu)")


# ---------------------------------------------------------------------------------------------
# train.py: --data, --eval-data, --model, --out (checked before the run directory is created)


@pytest.fixture
def train_cli(monkeypatch, capsys):
    """train.py's own main(), in this process, in the mistakes folder: (argv) → its one-line error."""
    train_main = runpy.run_path(os.path.join(ROOT, "train.py"), run_name="train_cli")["main"]

    def run(folder, *argv):
        monkeypatch.chdir(folder)
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])
        before = files_under(folder)
        assert train_main() == 2
        assert files_under(folder) == before  # no run directory, no config.json, no lock file
        return one_line(capsys.readouterr().err)
    return run


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "error: --data missing.jsonl: no such file or directory; expected a .jsonl"),
    (["--data", "empty_dir"], "error: --data empty_dir: a directory, but not one saved by datasets' save_to_disk"),
    (["--data", "empty.jsonl"], "error: --data empty.jsonl: no training data (no rows at all, or only blank lines)"),
    (["--data", "broken.yaml"], "error: --data broken.yaml: unknown file type '.yaml'; expected a .jsonl"),
    (["--data", "wrong_columns.jsonl"], "error: --data wrong_columns.jsonl: no row has the columns mode='auto' "
                                        "needs; columns seen: ['body', 'title']"),
    (["--data", "notes.txt", "--mode", "supervised"], "error: --data notes.txt: a text file holds one unsupervised"),
    (["--eval-data", "empty.jsonl"], "error: --eval-data empty.jsonl: no training data"),
    (["--model", "empty_dir"], "error: model 'empty_dir' is a directory with no model in it (no config.json): "
                               "pass a saved model directory"),
    (["--model", "notes.txt"], "error: model 'notes.txt' is a file, not a model"),
    (["--model", "./nowhere"], "error: unknown model './nowhere', not a local directory: pass an alias"),
    (["--model", "nobody/no-such-model"], "error: model 'nobody/no-such-model' is not available offline"),
    (["--model", "model", "--out", "notes.txt"], "error: --out notes.txt is a file, not a directory: pass a new or "
                                                 "existing run directory"),
    (["--model", "model", "--out", "notes.txt/run"], "error: --out notes.txt/run: cannot create the run directory"),
])
def test_train_path_mistakes(mistakes, train_cli, argv, message):
    assert train_cli(mistakes, *argv).startswith(message)


def test_train_path_mistake_from_the_shell(mistakes):
    line = run_cli(mistakes, os.path.join(ROOT, "train.py"), "--model", "model", "--out", "notes.txt")
    assert line == "error: --out notes.txt is a file, not a directory: pass a new or existing run directory"


# ---------------------------------------------------------------------------------------------
# python -m minigrace.eval


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing"], "error: unknown model 'missing', not a local directory: pass an alias"),
    (["--model", "empty_dir"], "error: model 'empty_dir' is a directory with no model in it"),
    (["--model", "model", "--device", "gpu"], "error: --device gpu: expected auto, cpu, cuda or cuda:N"),
    (["--model", "model", "--out", "notes.txt"], "error: --out notes.txt is a file, not a directory"),
    (["--model", "model", "--tasks", "NoSuchTask"], "error: --tasks NoSuchTask: none of them can run (task "
                                                    "NoSuchTask: mteb"),
])
def test_eval_mistakes(mistakes, argv, message, capsys, monkeypatch):
    from minigrace.eval import main

    monkeypatch.chdir(mistakes)
    before = files_under(mistakes)
    assert main(argv) == 2
    assert files_under(mistakes) == before  # no runs/eval-<timestamp>
    line = one_line(capsys.readouterr().err)
    assert line.startswith(message)


def test_eval_mistake_from_the_shell(mistakes):
    assert run_cli(mistakes, "-m", "minigrace.eval", "--model", "empty_dir").startswith(
        "error: model 'empty_dir' is a directory with no model in it")


# ---------------------------------------------------------------------------------------------
# python -m minigrace.plot


@pytest.mark.parametrize("argv, message", [
    (["missing"], "missing does not exist: pass run directories"),
    (["empty_dir"], "empty_dir holds no metrics.jsonl: pass run directories"),
    (["run/metrics.jsonl"], "run/metrics.jsonl is a file, not a run directory: pass run directories"),
    (["no_rows"], "no metrics to plot in no_rows (metrics.jsonl has no numeric rows yet)"),
    (["run", "--out", "empty_dir"], "--out empty_dir: is a directory: pass the image file to write"),
    (["run", "--out", "plot.txt"], "--out plot.txt: not an image file name: pass a .png path"),
    (["run", "--out", "notes.txt/plot.png"], "--out notes.txt/plot.png: "),
])
def test_plot_mistakes(mistakes, argv, message, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from minigrace.plot import main

    for run, rows in (("run", [{"step": 1, "reward_mean": 0.5}]), ("no_rows", [])):
        (mistakes / run).mkdir()
        (mistakes / run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(mistakes)
    before = files_under(mistakes)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert files_under(mistakes) == before
    line = one_line(capsys.readouterr().err)
    assert line.startswith("python -m minigrace.plot: error: " + message), line


def test_plot_mistake_from_the_shell(mistakes):
    pytest.importorskip("matplotlib")
    assert run_cli(mistakes, "-m", "minigrace.plot", "missing") == (
        "python -m minigrace.plot: error: missing does not exist: pass run directories (python train.py --out DIR)")


# ---------------------------------------------------------------------------------------------
# bench/*.py: an --out or a model that would fail only when the benchmark ends is refused at once


@pytest.mark.parametrize("script, argv, message", [
    ("encode_speed.py", ["--models", "empty_dir"], "--models: model 'empty_dir' is a directory with no model in it"),
    ("encode_speed.py", ["--models", "model", "--out", "empty_dir"], "--out empty_dir is a directory: pass the JSON"),
    ("loss_memory.py", ["--tokens", "2k"], "--tokens 2k: expected comma-separated whole numbers"),
    ("loss_memory.py", ["--out", "notes.txt/x.json"], "--out notes.txt/x.json: "),
    ("train_step.py", ["--out", "empty_dir"], "--out empty_dir is a directory"),
    ("realtext_sweep.py", ["--out", "empty_dir"], "--out empty_dir is a directory"),
    ("real_model.py", ["--supervised", "empty_dir"], "--supervised: model 'empty_dir' is a directory with no model"),
    ("real_model.py", ["--reuse", "missing.json"], "--reuse missing.json is not a file"),
    ("real_model.py", ["--runs", "notes.txt"], "--runs notes.txt is a file, not a directory"),
])
def test_bench_mistakes(mistakes, script, argv, message, capsys, monkeypatch):
    sys.path.insert(0, ROOT)  # `from bench.common import ...`
    monkeypatch.chdir(mistakes)
    monkeypatch.setattr(sys, "argv", [script])  # argparse names the program after it
    try:
        main = runpy.run_path(os.path.join(ROOT, "bench", script), run_name="bench_cli")["main"]
    finally:
        sys.path.remove(ROOT)
    before = files_under(mistakes)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert files_under(mistakes) == before
    assert one_line(capsys.readouterr().err).startswith(f"{script}: error: {message}")


def test_bench_mistake_from_the_shell(mistakes):
    line = run_cli(mistakes, os.path.join(ROOT, "bench", "pool_sim.py"), "--out", "empty_dir")
    assert line.startswith("pool_sim.py: error: --out empty_dir is a directory: pass the JSON file to write")


# ---------------------------------------------------------------------------------------------
# the Encoder (Python API): one clear exception, not a loader's traceback


@pytest.mark.parametrize("path, message", [
    ("/nonexistent", "unknown model '/nonexistent', not a local directory: pass"),
    ("empty_dir", "model 'empty_dir' is a directory with no model in it (no config.json)"),
    ("notes.txt", "model 'notes.txt' is a file, not a model"),
])
def test_encoder_mistakes(mistakes, path, message, monkeypatch):
    from minigrace import Encoder

    monkeypatch.chdir(mistakes)
    with pytest.raises(ModelNotAvailable) as e:
        Encoder(path)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_encoder_bad_device(mistakes):
    from minigrace import Encoder

    with pytest.raises(ValueError, match=r"^--device gpu: expected auto, cpu, cuda or cuda:N, got 'gpu'$"):
        Encoder(str(mistakes / "model"), device="gpu")
