"""Checkpoints survive crashes: a SIGKILL in the middle of writing one leaves the previous one
loadable, a corrupted one fails verification, and pruning deletes nothing until the newest verifies."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from minigrace.checkpoint import (latest_checkpoint, load_trainer_state, prune_checkpoints, save_checkpoint,
                                  verify_checkpoint)


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tiny, tmp_path):
    # The child saves checkpoint 1, then starts checkpoint 2 with a large trainer state (about 1 s of
    # writing and hashing); we SIGKILL it as soon as checkpoint 2's temporary directory appears.
    child = textwrap.dedent(f"""
        import torch
        from minigrace.worlds.builtin import load_tiny
        from minigrace.checkpoint import save_checkpoint
        model, tok = load_tiny()
        save_checkpoint({str(tmp_path / "checkpoint-000001")!r}, model, tok, {{"step": 1}})
        print("saved", flush=True)
        save_checkpoint({str(tmp_path / "checkpoint-000002")!r}, model, tok,
                        {{"step": 2, "optimizer": torch.randn(64 * 2**20)}})
        print("saved 2", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.monotonic() + 60
    while not any(n.startswith("checkpoint-000002.tmp") for n in os.listdir(tmp_path)):
        assert time.monotonic() < deadline and proc.poll() is None, "checkpoint 2 was never started"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    leftovers = sorted(os.listdir(tmp_path))
    assert "checkpoint-000002" not in leftovers and any(n.startswith("checkpoint-000002.tmp") for n in leftovers)
    previous = latest_checkpoint(str(tmp_path))
    assert previous == str(tmp_path / "checkpoint-000001")
    verify_checkpoint(previous)
    assert load_trainer_state(previous)["step"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(previous)
    base, _ = tiny
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), base.state_dict().values()))


def test_verify_detects_corruption_and_prune_keeps_everything_then(tiny, tmp_path):
    model, tok = tiny
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path / f"checkpoint-{step:06d}"), model, tok, {"step": step})
    newest = tmp_path / "checkpoint-000003"
    verify_checkpoint(str(newest))
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors .*does not match its hash"):
        verify_checkpoint(str(newest))
    with pytest.raises(ValueError):
        prune_checkpoints(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]

    save_checkpoint(str(newest), model, tok, {"step": 3})  # rewritten: replaces the corrupted one
    assert prune_checkpoints(str(tmp_path), keep_last=2) == [str(tmp_path / "checkpoint-000001")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000002", "checkpoint-000003"]
    assert prune_checkpoints(str(tmp_path), keep_last=0) == []  # 0 keeps all
