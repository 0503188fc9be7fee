"""Checkpoints and run directories: atomic save, verify, resume, and the faults that must lose nothing.

A checkpoint directory holds the model (safetensors, loadable by `from_pretrained`), the tokenizer,
and `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step). The step checkpoints
of a sharded (FSDP) model hold `sharded/` instead of the safetensors and the optimizer: every rank's
shards of the weights and AdamW state as torch.distributed.checkpoint wrote them, each rank its own
(parallel.save_sharded_checkpoint); they load on any number of processes. A checkpoint is written to a
temporary sibling directory and renamed into place, so a crash mid-write leaves the previous
checkpoint untouched and never a half-written one. `manifest.json` lists every file's SHA-256 (the
shards' included): `verify_checkpoint` re-reads them, and `prune_checkpoints` deletes older
checkpoints only after the newest one verifies.

The faults, each a one-line CheckpointError:
- `claim_run_dir`: a new run refuses a directory that holds a run (unless --overwrite, which removes
  that run's files first), and a lock file with the PID keeps two trainings out of one directory.
- `save_checkpoint`: a full disk (checked before writing when the size is known, ENOSPC during it)
  is a DiskFullError; the temporary directory is removed and the previous checkpoint is verified.
- `resume_checkpoint`: --resume verifies the newest checkpoint and falls back to the newest that
  verifies, setting corrupt ones aside.
- `check_model_dir`: the model loader's check of a corrupted or half-written checkpoint directory.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
import time
import warnings

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A run directory or checkpoint problem; the message (one line) says what, where, and what to do."""


class RunDirError(CheckpointError):
    """The run directory holds another run, or another training holds it."""


class DiskFullError(CheckpointError):
    """No space left for a checkpoint; nothing was written and the previous checkpoint is intact."""


class CorruptCheckpoint(CheckpointError, ValueError):
    """A checkpoint's files are missing, cut short, or do not match their hashes."""


STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
SHARDED_DIR = "sharded"  # a sharded checkpoint's weights and AdamW state: torch.distributed.checkpoint files
LOCK_FILE = "run.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "summary.json", "rejected_rows.jsonl", "curves.png")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state's RNGs: Python, numpy and torch's CPU generator always; the CUDA generators only when
    the state holds one per GPU present (--device may change on --resume: a CPU run continues on a GPU)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def set_generator_state(generator: torch.Generator, state: torch.Tensor) -> bool:
    """generator.set_state(state) when the state is one of its kind (the trainer's rollout-noise generator is
    on CPU; a run saved with one on CUDA has a 16-byte state): True. Else a warning, the generator as seeded,
    and False: the run goes on with other rollout noise than it would have drawn."""
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return True
    warnings.warn(f"the checkpoint's rollout-noise generator state ({state.numel()} bytes) is not a "
                  f"{generator.device.type} generator's: the noise continues from the run's seed instead")
    return False


def save_checkpoint(path: str, model, tokenizer, trainer_state: dict | None = None, state_dict: dict | None = None,
                    merge_adapter=None) -> str:
    """Write model + tokenizer (+ trainer state) to `path` atomically. Returns `path`.

    state_dict: the full weights when `model` is sharded (parallel.full_state_dicts). A peft model
    writes its adapter only; merge_adapter(adapter_dir, out_dir) (lora.save_merged) also writes
    `<path>/merged`, the merged plain model, inside the same atomic write.

    A full disk raises DiskFullError: before anything is written when the checkpoint's tensors alone do
    not fit, or when a write runs out of space (the partial temporary directory is removed). Its message
    says whether the newest step checkpoint next to `path` verifies, so the run can be resumed from it."""
    needed = checkpoint_bytes(model, state_dict, trainer_state, merge_adapter)
    tmp = start_checkpoint(path, needed)
    with removed_on_failure(path, tmp, needed):
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if merge_adapter is not None:
            merge_adapter(tmp, os.path.join(tmp, "merged"))
        seal_checkpoint(tmp, trainer_state)
    return publish_checkpoint(tmp, path)


def start_checkpoint(path: str, needed: int) -> str:
    """A fresh temporary directory next to `path`, `<path>.tmp-PID`, to write a checkpoint of at least
    `needed` bytes into. DiskFullError, with nothing written, when they do not fit."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run_dir = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise DiskFullError(f"disk full: {path} needs {_size(needed)}, {_size(free)} free on {run_dir}; nothing "
                            f"was written. {_last_good(run_dir)}")
    os.makedirs(tmp)
    return tmp


@contextlib.contextmanager
def removed_on_failure(path: str, tmp: str, needed: int):
    """Never leave a partial checkpoint behind: any failure inside (a second Ctrl-C included) removes `tmp`;
    running out of space becomes a one-line DiskFullError."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            run_dir = os.path.dirname(os.path.abspath(path))
            raise DiskFullError(f"disk full while writing {path} ({_first_line(e)}): it needs at least "
                                f"{_size(needed)}, {_size(shutil.disk_usage(run_dir).free)} are free on {run_dir}; "
                                f"removed the partial {os.path.basename(tmp)}. {_last_good(run_dir)}") from e
        raise


def seal_checkpoint(tmp: str, trainer_state: dict | None, hashes: dict[str, str] | None = None) -> None:
    """Write the trainer state, then manifest.json: the SHA-256 of every file in `tmp` and in its sharded/
    directory (fsynced as it is read), so the checkpoint can be verified before anything older is deleted.
    hashes: files already hashed (and synced) by the ranks that wrote them."""
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    hashes = dict(hashes or {})
    for name in checkpoint_files(tmp):
        if name not in hashes:
            hashes[name] = sha256(os.path.join(tmp, name), sync=True)
    write_json(os.path.join(tmp, MANIFEST), dict(sorted(hashes.items())))


def link_checkpoint(source: str, path: str) -> str:
    """Publish a complete checkpoint `source` also as `path` (e.g. checkpoint-final as checkpoint-best), atomically,
    without a second copy of the weights: hard links (a full copy where the filesystem has none). Returns `path`."""
    tmp = start_checkpoint(path, 0)
    with removed_on_failure(path, tmp, 0):
        try:
            shutil.copytree(source, tmp, copy_function=os.link, dirs_exist_ok=True)
        except OSError:  # no hard links here (EXDEV, EPERM, some network filesystems): start over, copying
            shutil.rmtree(tmp)
            shutil.copytree(source, tmp, copy_function=shutil.copy2)
    return publish_checkpoint(tmp, path)


def checkpoint_files(path: str) -> list[str]:
    """The files a checkpoint's manifest covers, relative to `path`: the top level and sharded/."""
    files = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)) and n != MANIFEST]
    shards = os.path.join(path, SHARDED_DIR)
    if os.path.isdir(shards):
        files += [f"{SHARDED_DIR}/{n}" for n in os.listdir(shards) if os.path.isfile(os.path.join(shards, n))]
    return sorted(files)


def publish_checkpoint(tmp: str, path: str) -> str:
    """Rename the complete `tmp` to `path` (replacing an older `path`, e.g. checkpoint-final of an earlier attempt)."""
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path


def checkpoint_bytes(model, state_dict: dict | None, trainer_state: dict | None, merge_adapter) -> int:
    """A lower bound on a checkpoint's size: the bytes of the distinct tensors it will hold (the
    tokenizer, headers and non-tensor state come on top)."""
    weights = state_dict if state_dict is not None else model.state_dict()
    if hasattr(model, "peft_config"):  # peft writes the adapters; merge_adapter adds the merged base
        adapters = {k: v for k, v in weights.items() if "lora_" in k}
        base = {k: v for k, v in weights.items() if "lora_" not in k} if merge_adapter else {}
        weights = {**adapters, **base}
    return tensor_bytes(weights) + tensor_bytes(trainer_state)


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors in a nested dict / list / tuple, each storage counted once (tied weights)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor) and hasattr(obj, "to_local"):  # a DTensor: this rank's shard
        obj = obj.to_local()
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.nbytes)
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


# How each writer says the disk is full: OSError(ENOSPC) from Python, "No space left on device (os error
# 28)" inside safetensors' SafetensorError, and torch.save's short write, "[enforce fail at
# inline_container.cc] unexpected pos N vs M" (its stream writer checks the position after each write).
DISK_FULL_SIGNS = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos")


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or an error it was raised from or while handling) says the disk is full."""
    for _ in range(4):  # torch.save: "basic_ios::clear: iostream error", then "unexpected pos" while closing
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(error) for sign in DISK_FULL_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _last_good(run_dir: str) -> str:
    """What the DiskFullError message says about the checkpoint to continue from."""
    found = step_checkpoints(run_dir)
    for _, path in reversed(found):
        try:
            verify_checkpoint(path, trainer_state="hash")
        except CorruptCheckpoint:
            continue
        return (f"The last good checkpoint, {os.path.basename(path)}, is intact and verifies: free some space (older "
                f"checkpoints can go; --keep-last N prunes them as it trains), then continue with --resume {run_dir}")
    if found:
        return f"No earlier checkpoint in {run_dir} verifies"
    return f"There is no earlier checkpoint in {run_dir} to continue from"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def sharded_dir(path: str | None) -> str | None:
    """`<path>/sharded` when `path` is a sharded checkpoint (the weights and AdamW state as every rank's
    torch.distributed.checkpoint shards: parallel.load_sharded_state), else None (transformers files)."""
    shards = os.path.join(path, SHARDED_DIR) if path else None
    return shards if shards and os.path.isdir(shards) else None


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete step checkpoint in a run directory."""
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def sha256(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(fh.fileno())  # on disk before the rename that publishes it
    return digest.hexdigest()


def verify_checkpoint(path: str, trainer_state: str = "load") -> None:
    """Raise CorruptCheckpoint (naming the file) unless every file in the manifest is present with its
    hash and the weights parse. trainer_state: "load" also loads trainer_state.pt, "hash" only checks
    its hash (the caller loads it next), "skip" leaves it out (loading the model needs no optimizer)."""
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: no readable {MANIFEST} ({_first_line(e)}): not a complete "
                                f"checkpoint") from None
    for name, expected in manifest.items():
        if name == STATE_FILE and trainer_state == "skip":
            continue
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CorruptCheckpoint(f"{path}: {name} is missing (listed in {MANIFEST})")
        if sha256(file) != expected:
            raise CorruptCheckpoint(f"{path}: {name} does not match its hash in {MANIFEST} (corrupted or changed "
                                    f"after it was written)")
    for name in manifest:
        if name.endswith(".safetensors"):
            _check_safetensors(path, name)
    if STATE_FILE in manifest and trainer_state == "load":
        try:
            load_trainer_state(path)
        except Exception as e:
            raise CorruptCheckpoint(f"{path}: {STATE_FILE} does not load ({_first_line(e)})") from None


def _check_safetensors(path: str, name: str) -> None:
    """Parse every tensor header of a safetensors file (a file cut short fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(path, name), "pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except Exception as e:
        raise CorruptCheckpoint(f"{path}: {name} is truncated or not a safetensors file ({_first_line(e)})") from None


def check_model_dir(path: str) -> None:
    """Raise CorruptCheckpoint when the model directory `path` is a half-written or corrupted checkpoint:
    the temporary directory of a save that never finished, files missing or not matching manifest.json,
    safetensors files cut short, shards missing from an index. Model loading calls it before
    transformers does; a directory it finds nothing wrong with passes quietly."""
    name = os.path.basename(os.path.normpath(path))
    if ".tmp-" in name:
        raise CorruptCheckpoint(f"{path}: a checkpoint that was never finished (the temporary directory of a save "
                                f"that was interrupted); use a complete one, e.g. {name.split('.tmp-')[0]} or the "
                                f"run's newest checkpoint-NNNNNN")
    if sharded_dir(path) and not any(n.endswith(".safetensors") for n in os.listdir(path)):  # before hashing it
        raise CheckpointError(f"{path}: a sharded training checkpoint (each FSDP rank's part of the weights and "
                              f"optimizer, for --resume): it holds no transformers model; use the run's "
                              f"checkpoint-final")
    if os.path.exists(os.path.join(path, MANIFEST)):  # a minigrace checkpoint: every model file has its hash
        verify_checkpoint(path, trainer_state="skip")
        return
    files = sorted(os.listdir(path))
    for file in files:
        if file.endswith(".safetensors"):
            _check_safetensors(path, file)
        if file.endswith(".safetensors.index.json"):
            try:
                with open(os.path.join(path, file)) as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise CorruptCheckpoint(f"{path}: {file} is unreadable ({_first_line(e)})") from None
            missing = [shard for shard in shards if shard not in files]
            if missing:
                raise CorruptCheckpoint(f"{path}: {', '.join(missing)} (listed in {file}) missing")


def step_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoint-NNNNNN directories, oldest first (temporary ones are ignored)."""
    found = []
    for name in os.listdir(run_dir):
        full = os.path.join(run_dir, name)
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() \
                and os.path.exists(os.path.join(full, STATE_FILE)):
            found.append((int(name[len("checkpoint-"):]), full))
    return sorted(found)


def prune_checkpoints(run_dir: str, keep_last: int) -> list[str]:
    """Verify the newest step checkpoint, then delete all but the newest `keep_last` (0 keeps all).
    Returns the deleted paths. A newest checkpoint that fails verification deletes nothing."""
    found = step_checkpoints(run_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    verify_checkpoint(found[-1][1])
    old = [path for _, path in found[:-keep_last]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def resume_checkpoint(run_dir: str) -> str:
    """The newest step checkpoint of `run_dir` that verifies, for --resume. A newer one that fails is
    reported (which file), set aside as <name>.corrupt-<time> (kept, no longer a step checkpoint) and
    skipped; CheckpointError when none verifies (then nothing is renamed)."""
    found = step_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume {run_dir}: no complete checkpoint-NNNNNN directory in it")
    corrupt = []
    for step, path in reversed(found):
        try:
            verify_checkpoint(path, trainer_state="hash")  # the caller loads the trainer state next
        except CorruptCheckpoint as e:
            print(f"warning: {e}: this checkpoint is corrupt, trying the one before it")
            corrupt.append(str(e))
            continue
        for _, bad in found[found.index((step, path)) + 1:]:
            aside = f"{bad}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(bad, aside)
            print(f"warning: set the corrupt {os.path.basename(bad)} aside as {os.path.basename(aside)}; resuming "
                  f"from {os.path.basename(path)}, the newest checkpoint that verifies (step {step})")
        return path
    raise CheckpointError(f"--resume {run_dir}: no checkpoint verifies ({'; '.join(corrupt)}); there is nothing to "
                          f"continue from: restore the run from a backup, or start over with --overwrite")


# ---------------------------------------------------------------------------------------------
# Run directories: one run per directory, one training at a time


class RunLock:
    """An exclusive lock on a run directory while a training writes into it.

    <run_dir>/run.lock holds "pid PID on HOST since TIME" under an flock: the kernel drops the flock when
    the process ends however it ends (kill -9 included), so a lock file left by a dead process is free
    and taken over. Where the filesystem has no flock (some network filesystems) the PID is checked
    instead. A context manager; release() removes the file."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path, self.released = run_dir, os.path.join(run_dir, LOCK_FILE), False
        while True:
            self.fh = open(self.path, "a+")
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_by_other = False
            except OSError as e:
                self.fh.seek(0)
                holder = self.fh.read().strip()
                held_by_other = e.errno in (errno.EWOULDBLOCK, errno.EACCES) or _pid_alive(holder)
            if held_by_other:
                self.fh.close()
                raise RunDirError(f"{run_dir} is in use by another training ({holder or 'pid unknown'}; lock file "
                                  f"{self.path}): wait for it to end or stop it, or use another --out")
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fh.fileno()).st_ino:
                break  # (else its holder removed the file between our open and our lock: open it again)
            self.fh.close()
        self.fh.seek(0)
        previous = self.fh.read().strip()
        if previous:
            print(f"{run_dir}: taking over {LOCK_FILE}, left by a training that no longer holds it ({previous})")
        self.fh.truncate(0)
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.fh.flush()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            os.remove(self.path)  # before unlocking: a waiting claim then finds no file, or a new one
        except FileNotFoundError:
            pass
        self.fh.close()  # (closing drops the flock)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(holder: str) -> bool:
    """Whether the "pid N on HOST ..." of a lock file names a running process (on another host: assume so)."""
    parts = holder.split()
    if len(parts) < 4 or parts[0] != "pid" or not parts[1].isdigit():
        return False
    if parts[3] != socket.gethostname():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def run_files(run_dir: str) -> list[str]:
    """The names in `run_dir` that belong to a training run (config, logs, checkpoints and their leftovers)."""
    return sorted(n for n in os.listdir(run_dir)
                  if n in RUN_FILES or n.startswith(("checkpoint-", "events.out.tfevents.")))  # + TensorBoard's


def claim_run_dir(run_dir: str, overwrite: bool = False, resuming: bool = False) -> RunLock:
    """Make `run_dir` this training's: create it, lock it (RunLock, refused while another training holds
    it), and refuse it when it holds a run (config.json, metrics.jsonl, checkpoint-*, ...) unless
    `overwrite`, which removes that run's files first (other files stay). `resuming` continues the run
    that is there, minus the temporary directories of saves that never finished. An empty or missing
    directory is fine. Returns the lock: release() it (or use `with`) when the training ends."""
    if overwrite and resuming:
        raise RunDirError(f"--overwrite with --resume {run_dir}: resuming continues the run in it; --overwrite "
                          f"starts a new one (drop one of them)")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--out {run_dir} is a file, not a directory: pass a new or existing run directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except (NotADirectoryError, PermissionError) as e:  # a file on the way, a parent that is not writable
        raise RunDirError(f"--out {run_dir}: cannot create the run directory ({e.strerror}): pass a directory "
                          f"you can write to") from None
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"{run_dir}: the run directory is not writable")
    lock = RunLock(run_dir)
    try:
        previous = run_files(run_dir)
        if resuming:
            remove = [n for n in previous if ".tmp-" in n]  # we hold the lock: nobody is writing them
        elif previous and not overwrite:
            checkpoints = [n for n in previous if n.startswith("checkpoint-")]
            shown = [n for n in previous if n in RUN_FILES][:3] + ([f"{len(checkpoints)} checkpoint(s)"]
                                                                   if checkpoints else [])
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(shown)}): continue it with --resume "
                              f"{run_dir}, or start over with --overwrite (removes that run's files first)")
        else:
            remove = previous
        for name in remove:
            full = os.path.join(run_dir, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        if remove:
            print(f"{run_dir}: removed {', '.join(remove)}"
                  + (" (--overwrite: the previous run)" if not resuming else " (unfinished saves)"))
    except BaseException:
        lock.release()
        raise
    return lock


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
