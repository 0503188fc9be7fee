"""Sharded checkpoints (issue #13 item 8): the step checkpoints of an FSDP run on 2 processes (torchrun,
gloo, CPU) are written by every rank, each its own shards of the weights and AdamW state
(torch.distributed.checkpoint), hashed into the manifest: a corrupted shard is found, --resume falls
back past it and continues bit for bit on 2 processes (on 1 process, and a 1-process checkpoint on 2
FSDP processes: tests/test_parallel.py). checkpoint-final stays a transformers model; a disk that
fills during a sharded save is a one-line DiskFullError that leaves nothing behind; ranks that wait
for rank 0's slow work wait on a group whose timeout outlasts the process group's."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_faults import overwrite_bytes, small_disk  # noqa: F401 (small_disk: a fixture)
from transformers import AutoModelForCausalLM

from minigrace import parallel
from minigrace.checkpoint import (CheckpointError, CorruptCheckpoint, DiskFullError, check_model_dir,
                                  load_trainer_state, resume_checkpoint, verify_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 3 steps × 4 prompts × G=4, a checkpoint after steps 1 and 2 (as tests/test_parallel.py, one step more).
ARGS = ["--max-steps", "3", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "4",
        "--max-new-tokens", "8", "--eval-size", "0", "--save-every", "1", "--lr", "3e-5"]


def torchrun(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run, "checkpoint-final", "model.safetensors"))


def crashed_copy(run, dest, checkpoints=("checkpoint-000001", "checkpoint-000002")):
    """What a run that died after its last step checkpoint leaves behind."""
    dest.mkdir()
    shutil.copy(run / "config.json", dest / "config.json")
    for name in checkpoints:
        shutil.copytree(run / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def fsdp_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun("train.py", *ARGS, "--parallel", "fsdp", "--out", str(out))
    return out


def test_every_rank_writes_its_own_shards_and_the_manifest_hashes_them(fsdp_run, tiny):
    ckpt = fsdp_run / "checkpoint-000002"
    shards = sorted(os.listdir(ckpt / "sharded"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank + DCP's index
    assert not any(n.endswith(".safetensors") for n in os.listdir(ckpt))
    manifest = json.load(open(ckpt / "manifest.json"))
    assert {f"sharded/{n}" for n in shards} | {"trainer_state.pt", "config.json", "tokenizer.json"} <= manifest.keys()
    verify_checkpoint(str(ckpt))

    # Nothing was gathered: every weight and AdamW moment is stored as 2 halves, each in its rank's file
    # (the tied lm_head once, as embed_tokens).
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(str(ckpt / "sharded")).read_metadata()
    files = {(index.fqn, tuple(index.offset)): info.relative_path for index, info in meta.storage_data.items()
             if index.offset is not None}  # (not the pickled values, e.g. the learning rate)
    tensors = {k: v for k, v in meta.state_dict_metadata.items() if k.startswith("model.") or "exp_avg" in k}
    model, _ = tiny
    assert len(tensors) == 3 * len(list(model.parameters())) and not any("lm_head" in k for k in tensors)
    for key, stored in tensors.items():
        rows = stored.size[0]
        assert [(c.offsets[0], c.sizes[0]) for c in stored.chunks] == [(0, rows // 2), (rows // 2, rows // 2)], key
        assert [files[key, tuple(c.offsets)] for c in stored.chunks] == ["__0_0.distcp", "__1_0.distcp"], key
    state = load_trainer_state(str(ckpt))
    assert "optimizer" not in state and state["step"] == 2 and len(state["rank_rngs"]) == 2

    with pytest.raises(CheckpointError, match="sharded training checkpoint .* use the run's checkpoint-final"):
        check_model_dir(str(ckpt))  # what Encoder / eval say instead of a loader traceback
    final = AutoModelForCausalLM.from_pretrained(fsdp_run / "checkpoint-final")  # full weights, plain transformers
    assert {k for k in final.state_dict() if k != "lm_head.weight"} == set(final_weights(fsdp_run))


def test_a_corrupted_shard_is_found_and_resume_continues_bit_for_bit_from_the_one_before(fsdp_run, tmp_path):
    run = crashed_copy(fsdp_run, tmp_path / "run")
    overwrite_bytes(run / "checkpoint-000002" / "sharded" / "__1_0.distcp", 4000)  # rank 1's tensor data
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint-000002: sharded/__1_0\.distcp does not match its hash"):
        verify_checkpoint(str(run / "checkpoint-000002"))

    done = torchrun("train.py", "--resume", str(run))  # 2 FSDP ranks read the shards of 2 FSDP ranks
    assert f"resuming {run} from step 1" in done.stdout and "sharded/__1_0.distcp" in done.stdout
    a, b = final_weights(fsdp_run), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resume_checkpoint(str(run)) == str(run / "checkpoint-000002")  # written again, and it verifies


def test_a_disk_that_fills_during_a_sharded_save_is_one_line_and_leaves_nothing(tiny, small_disk):
    """The real torch.distributed.checkpoint writer runs out of space on a real filesystem, after the
    free-space check passed (the check counts the tensors; the files hold an index and headers too)."""
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    optimizer = torch.optim.AdamW(model.parameters())
    ranks = parallel.Ranks(0, 1, torch.device("cpu"), launched=False)
    subprocess.run(["mount", "-o", "remount,size=12m", str(small_disk)], check=True)
    first = str(small_disk / "checkpoint-000001")
    assert parallel.save_sharded_checkpoint(first, model, optimizer, tok, {"step": 1}, ranks) is None
    needed = sum(os.path.getsize(os.path.join(first, "sharded", n)) for n in os.listdir(os.path.join(first, "sharded")))
    tensors = 3 * 4 * sum(p.numel() for p in model.parameters())
    assert needed > tensors + 64_000  # the room the test leaves below
    with open(small_disk / "filler", "wb") as fh:  # leave the tensors' bytes + 32 kB free
        fh.write(b"\0" * (shutil.disk_usage(small_disk).free - tensors - 32_000))

    failed = parallel.save_sharded_checkpoint(str(small_disk / "checkpoint-000002"), model, optimizer, tok,
                                              {"step": 2}, ranks)
    message = str(failed)
    assert isinstance(failed, DiskFullError) and "\n" not in message, message
    assert "disk full while writing" in message and "rank 0: RuntimeError" in message  # (torch's short write)
    assert "checkpoint-000001" in message and "verifies" in message
    assert sorted(os.listdir(small_disk)) == ["checkpoint-000001", "filler"]  # the temporary directory is gone
    verify_checkpoint(first)


SLOW_RANK_0 = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from minigrace import parallel
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1))
    ranks = parallel.Ranks(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), launched=True)
    parallel.slow_wait_group()
    if ranks.is_main:
        time.sleep(2)  # rank 0 alone: writing, hashing, fsync
    got = parallel.wait_for_main(ranks, "written" if ranks.is_main else None)
    sys.stdout.write(f"rank {ranks.rank} got {got}\\n")  # one write: the two ranks share the pipe
    sys.stdout.flush()
    if ranks.is_main:  # the control: rank 1 waits in the process group itself, which gives up after 1 s
        time.sleep(1.5)
        os._exit(0)
    try:
        ranks.broadcast(None)
    except Exception as e:
        sys.stdout.write(f"process group: {type(e).__name__}\\n")
        sys.stdout.flush()
    os._exit(0)
""")


def test_ranks_waiting_for_rank_0_outlast_the_process_group_timeout(tmp_path):
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    out = torchrun(str(script)).stdout
    assert "rank 0 got written" in out and "rank 1 got written" in out
    assert "process group:" in out  # (the same wait in the process group would have failed)
