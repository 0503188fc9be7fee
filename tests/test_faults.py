"""Faults a user meets, reproduced as they would meet them (issue #16): a new run into an existing run
directory, a full disk while a checkpoint is written, a corrupted checkpoint on --resume, two trainings
in one directory, and a corrupted or half-written checkpoint given to the Encoder / eval.

Real tiny runs, real files: the disk-full tests mount a small tmpfs (root only; skipped with the
reason otherwise), corruption overwrites bytes of a real model.safetensors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from minigrace.checkpoint import (CheckpointError, CorruptCheckpoint, DiskFullError, RunDirError, check_model_dir,
                                  claim_run_dir, is_disk_full, latest_checkpoint, load_trainer_state,
                                  save_checkpoint, step_checkpoints, verify_checkpoint)
from minigrace.config import parse_args
from minigrace.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--batch-size", "2", "--mini-batch-size", "2", "--group-size", "2", "--eval-size", "0",
         "--max-new-tokens", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_cli(*args, timeout=300):
    """`python train.py ARGS` as a user runs it → (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def one_line_error(stderr: str) -> str:
    """The CLI's message: exactly one line, no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "stopped:"))]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def overwrite_bytes(path, offset: int, n: int = 64) -> None:
    """One byte range of a file overwritten in place (what a bad disk or a bad copy leaves)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xa5" * n)


@pytest.fixture(scope="module")
def run3(tiny, one_thread, tmp_path_factory):
    """A finished 3-step run with checkpoints after steps 1 and 2 (and checkpoint-final)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    main(parse_args(SHORT + ["--max-steps", "3", "--save-every", "1", "--out", str(out)])[0])
    return out


def copy_run(run, dest, keep=("config.json", "metrics.jsonl", "checkpoint-000001", "checkpoint-000002")):
    dest.mkdir()
    for name in keep:
        (shutil.copytree if os.path.isdir(run / name) else shutil.copy)(run / name, dest / name)
    return dest


# ---------------------------------------------------------------------------------------------
# 1. A new run into an existing run directory


def test_new_run_into_an_existing_run_is_refused_and_overwrite_starts_over(run3, tmp_path, one_thread):
    run = copy_run(run3, tmp_path / "a")
    before = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    code, out, err = train_cli(*SHORT, "--max-steps", "1", "--lr", "1e-3", "--out", str(run))
    message = one_line_error(err)
    assert code == 2
    assert str(run) in message and f"--resume {run}" in message and "--overwrite" in message
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing touched
    assert sorted(os.listdir(run)) == ["checkpoint-000001", "checkpoint-000002", "config.json", "metrics.jsonl"]

    # --overwrite: the old run's files are removed first, so nothing of it mixes with the new one.
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    main(parse_args(SHORT + ["--max-steps", "1", "--lr", "1e-3", "--overwrite", "--out", str(run)])[0])
    assert sorted(os.listdir(run)) == ["checkpoint-final", "config.json", "curves.png", "metrics.jsonl", "notes.txt",
                                       "samples.jsonl", "summary.json"]
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [0, 1, 1]  # this run's rows only
    assert json.load(open(run / "config.json"))["lr"] == 1e-3

    # An empty or missing directory is fine; so is one holding only unrelated files.
    empty, missing = tmp_path / "empty", tmp_path / "missing" / "deeper"
    empty.mkdir()
    for ok in (empty, missing):
        claim_run_dir(str(ok), overwrite=False, resuming=False).release()
        assert os.listdir(ok) == []  # the lock is gone with the claim


# ---------------------------------------------------------------------------------------------
# 2. A full disk while writing a checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem: a tmpfs mount (needs root and a kernel that allows it)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (disk-full tests run as root in CI)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_run_stops_with_one_line_and_resume_continues(run3, small_disk, one_thread):
    # 5 MB: the run's first checkpoint (~3.2 MB: weights, AdamW state, tokenizer) fits, the second does not.
    run = small_disk / "run"
    code, out, err = train_cli(*SHORT, "--max-steps", "3", "--save-every", "1", "--out", str(run))
    message = one_line_error(err)
    assert code != 0 and "disk full" in message and str(run / "checkpoint-000002") in message
    assert "needs" in message and "free" in message  # bytes needed vs free
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-000001"]  # no .tmp
    assert "checkpoint-000001" in message and "--resume" in message
    verify_checkpoint(str(run / "checkpoint-000001"))
    assert load_trainer_state(str(run / "checkpoint-000001"))["step"] == 1

    # The user frees space (here: grows the filesystem), then --resume finishes the run, bit for bit the
    # same as the run that never ran out of space.
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    cfg, run_dir = parse_args(["--resume", str(run)])
    main(cfg, run_dir)
    a, b = load_file(run3 / "checkpoint-final" / "model.safetensors"), load_file(run / "checkpoint-final" /
                                                                                   "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_inside_torch_save_removes_the_partial_checkpoint(tiny, small_disk):
    """ENOSPC in the middle of a write (torch.save's wrapped form, "unexpected pos"): the trainer state
    carries 4 MB the free-space check cannot count (a bytes object), so the check passes and the
    write itself runs out of space on the real filesystem."""
    model, tok = tiny
    first = save_checkpoint(str(small_disk / "checkpoint-000001"), model, tok, {"step": 1})
    with pytest.raises(DiskFullError) as failed:
        save_checkpoint(str(small_disk / "checkpoint-000002"), model, tok, {"step": 2, "blob": b"\0" * (4 << 20)})
    message = str(failed.value)
    assert "\n" not in message and "disk full" in message and str(small_disk / "checkpoint-000002") in message
    assert "checkpoint-000001" in message and "verifies" in message
    assert sorted(os.listdir(small_disk)) == ["checkpoint-000001"]  # the temporary directory is gone
    verify_checkpoint(first)
    assert latest_checkpoint(str(small_disk)) == first


def test_real_out_of_space_errors_are_recognized(small_disk):
    """What each writer raises when the disk is full, from real writes to a full tmpfs."""
    from safetensors.torch import save_file

    with open(small_disk / "fill", "wb") as fh:  # fill the filesystem to the last byte
        with pytest.raises(OSError) as plain:
            for _ in range(64):
                fh.write(b"\0" * (1 << 20))
                fh.flush()
    errors = [plain.value]
    for write in (lambda p: torch.save({"x": torch.zeros(1 << 18)}, p),
                  lambda p: save_file({"x": torch.zeros(1 << 18)}, p)):
        with pytest.raises(Exception) as e:
            write(str(small_disk / f"x-{uuid.uuid4().hex}"))
        errors.append(e.value)
    assert [type(e).__name__ for e in errors] == ["OSError", "RuntimeError", "SafetensorError"]
    assert all(is_disk_full(e) for e in errors)
    assert not is_disk_full(RuntimeError("size mismatch for lm_head.weight"))
    assert not is_disk_full(OSError(13, "Permission denied"))


def test_free_space_is_checked_before_anything_is_written(tiny, small_disk):
    model, tok = tiny
    big = {"step": 1, "optimizer": {"exp_avg": torch.zeros(2 << 20)}}  # 8 MB of tensors on a 5 MB disk
    with pytest.raises(DiskFullError, match=r"needs 9\.\d MB, [45]\.\d MB free") as failed:
        save_checkpoint(str(small_disk / "checkpoint-000001"), model, tok, big)
    assert "no earlier checkpoint" in str(failed.value)
    assert os.listdir(small_disk) == []


# ---------------------------------------------------------------------------------------------
# 3. A corrupted checkpoint on --resume


def test_resume_skips_a_corrupted_checkpoint_and_continues_from_the_newest_good_one(run3, tmp_path, one_thread,
                                                                                    capsys):
    run = copy_run(run3, tmp_path / "a")
    overwrite_bytes(run / "checkpoint-000002" / "model.safetensors", 100)  # inside the safetensors header
    cfg, run_dir = parse_args(["--resume", str(run)])
    capsys.readouterr()
    main(cfg, run_dir)
    printed = capsys.readouterr().out
    assert "checkpoint-000002" in printed and "model.safetensors" in printed and "corrupt" in printed
    assert f"resuming {run} from step 1" in printed
    # Resumed from step 1, it ends bit-identical to the run that was never corrupted.
    a, b = load_file(run3 / "checkpoint-final" / "model.safetensors"), load_file(run / "checkpoint-final" /
                                                                                   "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The corrupt one was set aside (kept for inspection), and step 2 was written again.
    assert [os.path.basename(p) for _, p in step_checkpoints(str(run))] == ["checkpoint-000001", "checkpoint-000002"]
    assert any(n.startswith("checkpoint-000002.corrupt") for n in os.listdir(run))
    verify_checkpoint(str(run / "checkpoint-000002"))


def test_resume_with_no_checkpoint_that_verifies_stops_with_a_clear_message(run3, tmp_path):
    run = copy_run(run3, tmp_path / "a")
    overwrite_bytes(run / "checkpoint-000002" / "model.safetensors", 2000)  # in the tensor data: loads, but wrong
    (run / "checkpoint-000001" / "trainer_state.pt").write_bytes(b"")  # a truncated trainer state
    code, out, err = train_cli("--resume", str(run))
    message = one_line_error(err)
    assert code != 0 and "no checkpoint" in message
    assert "checkpoint-000002: model.safetensors" in message and "checkpoint-000001: trainer_state.pt" in message
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint")) == ["checkpoint-000001",
                                                                                "checkpoint-000002"]  # kept as found


# ---------------------------------------------------------------------------------------------
# Two trainings in one directory


def test_a_run_directory_is_locked_while_a_training_holds_it(tmp_path):
    run = tmp_path / "a"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from minigrace.checkpoint import claim_run_dir
        lock = claim_run_dir({str(run)!r}, overwrite=False, resuming=False)
        print("claimed", flush=True)
        time.sleep(120)
    """)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        for resuming, overwrite in ((False, False), (True, False), (False, True)):  # --overwrite does not steal it
            with pytest.raises(RunDirError, match=rf"{run} is in use by another training \(pid {holder.pid}"):
                claim_run_dir(str(run), overwrite=overwrite, resuming=resuming)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The holder died without cleaning up: its lock file (with its PID) is stale and is taken over.
    assert str(holder.pid) in (run / "run.lock").read_text()
    with claim_run_dir(str(run), overwrite=False, resuming=False) as lock:
        assert (run / "run.lock").read_text().split()[1] == str(os.getpid())
        with pytest.raises(RunDirError, match="in use"):  # also within one process
            claim_run_dir(str(run), overwrite=False, resuming=True)
    assert not (run / "run.lock").exists()
    with claim_run_dir(str(run), overwrite=False, resuming=False):
        pass
    assert lock.released


# ---------------------------------------------------------------------------------------------
# The Encoder and eval on a corrupted or half-written checkpoint


def test_encoder_and_eval_say_what_is_wrong_with_a_checkpoint(run3, tmp_path):
    from minigrace.encode import Encoder

    final = tmp_path / "checkpoint-final"
    shutil.copytree(run3 / "checkpoint-final", final)
    Encoder(str(final))  # loads as is
    overwrite_bytes(final / "model.safetensors", 2000)  # tensor data: without the check it loads wrong weights
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors does not match its hash"):
        Encoder(str(final))
    code, out, err = _eval_cli(final)
    assert code == 2 and "model.safetensors does not match its hash" in one_line_error(err)

    # Half-written: the temporary directory of a save killed mid-write (no manifest yet, weights cut short).
    half = tmp_path / "checkpoint-000003.tmp-4242"
    shutil.copytree(run3 / "checkpoint-000002", half)
    os.remove(half / "manifest.json")
    with open(half / "model.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(half / "model.safetensors") // 2)
    with pytest.raises(CorruptCheckpoint, match="never finished"):
        Encoder(str(half))
    cut = tmp_path / "copied"  # the same files under an ordinary name (say, an interrupted copy)
    half.rename(cut)
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors is truncated or not a safetensors file"):
        check_model_dir(str(cut))
    check_model_dir(str(run3 / "checkpoint-000001"))  # good ones pass, quietly


def _eval_cli(model_dir):
    done = subprocess.run([sys.executable, "-m", "minigrace.eval", "--model", str(model_dir), "--quiet",
                           "--out", str(model_dir) + "-eval"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr

