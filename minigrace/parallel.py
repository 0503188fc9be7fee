"""Parallel: data-parallel GRACE with torchrun, on the engines torch ships (DDP, FSDP2).

    torchrun --nproc-per-node N train.py ...     # N GPUs (nccl), or N CPU processes (gloo)

Every rank draws the same global batch of P prompts (the data order is seeded) and owns prompts
rank, rank+N, rank+2N, …: it samples, embeds and trains on those only. The reward compares every
rollout with every query of the batch, so the embeddings are all-gathered (no gradient flows
through the reward) and every rank computes the same global rewards and advantages. DDP or FSDP2
averages the gradients over ranks; the loss is scaled so that this average is exactly the
one-process token-mean (see `grace_step`). Only rank 0 logs. Checkpoints load on any number of ranks:
under FSDP every rank writes its own shards of a step checkpoint (torch.distributed.checkpoint), and
otherwise rank 0 writes full state dicts; checkpoint-final is always the full weights (safetensors).

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op: rank 0 of 1. Under
torchrun with one process the model is still wrapped (FSDP with --offload fits a bigger model on one GPU).
"""
from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .checkpoint import (SHARDED_DIR, CheckpointError, publish_checkpoint, removed_on_failure, seal_checkpoint,
                         sha256, start_checkpoint, tensor_bytes)


@dataclass
class Ranks:
    """This process's place among the data-parallel ranks, and every collective the GRACE step needs.

    On one process (no torchrun) every method is the identity: the step reads the same either way."""
    rank: int  # this process, 0 … world-1
    world: int  # number of processes
    device: torch.device
    launched: bool  # started by torchrun (a process group exists, even with one process)

    @property
    def is_main(self) -> bool:  # rank 0 logs and writes checkpoints
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched

    def shard(self, items: list) -> list:
        """This rank's prompts of the global batch: rank, rank+N, rank+2N, …

        Strided, not contiguous: a mini-batch of prompts [k·M, (k+1)·M) is then spread evenly over the
        ranks, so each optimizer update sees the same prompts as on one process."""
        return items[self.rank::self.world]

    def gather(self, local: torch.Tensor, rows_per_prompt: int) -> torch.Tensor:
        """Per-prompt rows of this rank [P/N·k, ...] → the same rows of the global batch [P·k, ...] in
        global prompt order (k = rows_per_prompt, e.g. G rollouts). All-gather: no gradient flows back."""
        if not self.distributed:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        # Local prompt i of rank r is global prompt i·N + r: stack ranks inside each local prompt index.
        per_prompt = [part.reshape(-1, rows_per_prompt, *local.shape[1:]) for part in parts]  # N × [P/N, k, ...]
        return torch.stack(per_prompt, dim=1).reshape(-1, *local.shape[1:])  # [P/N, N, k, ...] → [P·k, ...]

    def local(self, global_rows: torch.Tensor, rows_per_prompt: int) -> torch.Tensor:
        """Inverse of gather: this rank's rows [P/N·k, ...] of a global per-prompt tensor [P·k, ...]."""
        per_prompt = global_rows.reshape(-1, rows_per_prompt, *global_rows.shape[1:])  # [P, k, ...]
        return per_prompt[self.rank::self.world].reshape(-1, *global_rows.shape[1:])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few numbers over ranks (token counts, metric sums)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int | float) -> int | float:
        """The largest of a number over ranks, of the same type."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return type(value)(t.item())

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object (e.g. the run directory name) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def token_normalizer(self, response_tokens: int) -> float:
        """The divisor that makes the loss a token-mean over the whole mini-batch (every rank's share).

        DDP / FSDP average gradients over the N ranks, so each rank divides by tokens/N: the average
        is then exactly the one-process gradient."""
        return max(self.sum([response_tokens])[0], 1) / self.world

    def pad_passes(self, micros: list) -> tuple[list, int]:
        """(micro-batches, how many are real). Every rank must run the same number of forward/backward
        passes (each may communicate): a rank with fewer repeats its first micro-batch's first row, and
        the caller multiplies those passes' loss by 0."""
        n_real = len(micros)
        return micros + [micros[0][:1]] * (self.max(n_real) - n_real), n_real

    @contextlib.contextmanager
    def gradient_sync(self, model: torch.nn.Module, sync: bool):
        """Accumulate gradients over micro-batches. DDP all-reduces only when `sync` (the last micro-batch).
        FSDP reduce-scatters every micro-batch's gradients into the sharded (or offloaded) ones: skipping it
        (set_requires_gradient_sync(False)) would hold an unsharded fp32 gradient of every parameter on the GPU
        until the last micro-batch, 4 B per parameter even with --offload (bench/memory_model.py)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
            with model.no_sync():
                yield
        else:
            yield


def process_group_backend(device: torch.device) -> str:
    """NCCL for GPU tensors, plus gloo for CPU tensors on GPU machines: with FSDP2's CPU offload the
    gradient-norm all-reduce of clip_grad_norm_ runs on CPU shards, which NCCL cannot reduce."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def cuda_device(device: torch.device, local_rank: int | None) -> torch.device:
    """This process's GPU with an index, which torch.cuda.set_device and init_process_group(device_id=…)
    require (torch ≥ 2.13 raises on a bare "cuda"): cuda:LOCAL_RANK under torchrun, else the flag's own
    index (--device cuda:1), else 0, the first visible GPU."""
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    return device if device.index is not None else torch.device("cuda", 0)


def setup(device: str) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
    `device`: the --device flag; under torchrun, cuda means this rank's GPU (cuda:LOCAL_RANK)."""
    from .models import resolve_device

    dev = resolve_device(device)
    launched = "WORLD_SIZE" in os.environ  # plain `python train.py`: one process, no wrapping
    if dev.type == "cuda":  # the current device is the one kernels and NCCL use by default
        dev = cuda_device(dev, int(os.environ["LOCAL_RANK"]) if launched else None)
        torch.cuda.set_device(dev)
    if not launched:
        return Ranks(0, 1, dev, launched=False)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(dev), device_id=dev if dev.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), dev, launched=True)


def teardown(ranks: Ranks) -> None:
    """Leave the process groups while the interpreter is fully alive. FSDP's hooks keep the model in reference
    cycles, and a forward without backward (the no-grad embedding pass) leaves gloo work objects holding
    tensors in them: freed only at interpreter shutdown, they abort the process ("terminate called without an
    active exception", seen on 1 in ~25 two-process FSDP runs). Collect them first, then destroy every group."""
    if ranks.distributed and dist.is_initialized():
        gc.collect()
        _slow_wait.clear()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Wrapping the model


def wrap(model: torch.nn.Module, ranks: Ranks, kind: str, compute_dtype: torch.dtype | None,
         offload: bool = False) -> torch.nn.Module:
    """DDP or FSDP2 around the policy (unchanged on one process).

    ddp:  every rank holds the full fp32 weights, gradients and AdamW states; gradients are
          all-reduced (averaged) in backward.
    fsdp: fully_shard every decoder layer, then the root: weights, gradients and AdamW states are
          split over ranks; a layer's weights are all-gathered just before it runs. On GPU the
          gathered weights are `compute_dtype` (bf16) and gradients are reduced in fp32.
          offload: the shards stay in CPU memory (copied to the GPU per layer; AdamW steps on CPU).
    """
    if offload and not (ranks.distributed and kind == "fsdp" and ranks.device.type == "cuda"):
        raise ValueError("--offload moves FSDP shards from GPU to CPU memory: it needs --parallel fsdp, CUDA, "
                         "and torchrun (one GPU: torchrun --nproc-per-node 1 train.py --offload ...)")
    if not ranks.distributed:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # forward_sync_buffers=False: the only buffers are rotary tables, identical everywhere, and a
        # broadcast in every forward would make ranks with different micro-batch counts wait on each other.
        return DistributedDataParallel(model, device_ids=[ranks.device] if ranks.device.type == "cuda" else None,
                                       forward_sync_buffers=False, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw = {}
    if compute_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if offload:  # sharded weights, gradients and AdamW states live in CPU memory between uses
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (also inside a peft wrapper)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF (or peft) model inside DDP. FSDP2 shards the model in place: it is its own module."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """Rollouts and the no-grad embedding forward run with every weight gathered.

    Under FSDP a rank's generation loop and micro-batches differ from the other ranks' (each stops
    when its own rationales end), so no collective may happen in them: gather all layers once,
    keep them through every forward, and re-shard the layers afterwards. (The root's own weights,
    embeddings and lm_head, stay gathered after a forward anyway: FSDP2 does not reshard the root
    until backward.) DDP / one process: nothing to do."""
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    layers = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in [model, *layers]:
        m.unshard()
    try:
        yield
    finally:
        for m in layers:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                     ) -> tuple[dict, dict | None]:
    """(model, optimizer) state dicts with full, unsharded tensors on CPU, keyed by parameter name; the
    optimizer's only when `optimizer` is given (checkpoint-final leaves it out: --resume never reads it).

    A collective under FSDP: every rank calls it; the tensors are complete on rank 0, and only there
    (cpu_offload). They load on any world size (`load_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = unwrap(model)
    weights = without_tied_copies(module, get_model_state_dict(module, options=options))
    if optimizer is None:
        return weights, None
    return weights, get_optimizer_state_dict(module, optimizer, options=options)


def without_tied_copies(module: torch.nn.Module, weights: dict) -> dict:
    """Tied weights (lm_head = input embeddings) once, under the name save_pretrained keeps."""
    names = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {name: tensor for name, tensor in weights.items() if name in names}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (every rank read it from the checkpoint) into a possibly sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints: every rank writes and reads its own part (torch.distributed.checkpoint)
#
# Step checkpoints of an FSDP model are sharded: gathering a 4B model's weights and AdamW state
# (16 bytes a parameter, 64 GB) onto rank 0 and pickling them would take rank 0's host memory and
# leave every other rank idle. (On one process, or with DDP, where every rank holds the full state
# anyway, checkpoints stay transformers directories that any step can be evaluated from.) The final
# checkpoint is always the full weights as safetensors, for from_pretrained.
#
# While one rank works alone (hashing, fsync, writing the final safetensors), the others wait on
# slow_wait_group(): gloo, on CPU, so no NCCL collective is in flight for the NCCL watchdog to time out,
# with a timeout for the slowest filesystem rather than the process group's 30 minutes.

SLOW_WAIT = timedelta(hours=3)
_slow_wait: dict = {}  # {"world": the default process group, "group": its slow-wait group}


def slow_wait_group():
    """The gloo group over every rank with the SLOW_WAIT timeout (None without a process group). Created
    on first use: every rank must reach its first use together (a checkpoint does)."""
    if not dist.is_initialized():
        return None
    if _slow_wait.get("world") is not dist.group.WORLD:
        _slow_wait.update(world=dist.group.WORLD, group=dist.new_group(backend="gloo", timeout=SLOW_WAIT))
    return _slow_wait["group"]


def wait_for_main(ranks: Ranks, obj):
    """Rank 0's `obj` (a small picklable value: an outcome, an error) on every rank, the others waiting
    on the slow-wait group for as long as rank 0 works."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=slow_wait_group())
    return box[0]


def gather_to_main(ranks: Ranks, obj) -> list | None:
    """Every rank's `obj` (small, picklable), in rank order, on rank 0; None on the other ranks."""
    if not ranks.distributed:
        return [obj]
    gathered = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(obj, gathered, dst=0, group=slow_wait_group())
    return gathered


def sharded_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": weights, "optimizer": AdamW state}, keyed by parameter name, as this rank holds them:
    DTensor shards under FSDP (no copy, no communication), full tensors otherwise. A LoRA model's
    frozen base is left out (it is --model's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    weights, optimizer_state = get_state_dict(unwrap(model), optimizer,
                                              options=StateDictOptions(ignore_frozen_params=True))
    return {"model": without_tied_copies(unwrap(model), weights), "optimizer": optimizer_state}


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load a sharded checkpoint's weights and AdamW state (`directory`: its sharded/) into the model as
    it is wrapped now: FSDP on any number of ranks, DDP, or one process. Each rank reads the parts of
    the files that its own shards cover; every name the model and optimizer hold must be there."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = sharded_state_dicts(model, optimizer)  # the tensors to fill (a fresh AdamW gets its states here)
    with quiet_on_one_process():
        load(state, checkpoint_id=directory, process_group=slow_wait_group(), no_dist=not dist.is_initialized())
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # (load checked the names)


def save_sharded_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
                            trainer_state: dict, ranks: Ranks) -> Exception | None:
    """Every rank calls it: a sharded checkpoint at `path`. Returns rank 0's outcome, the error that
    stopped the save or None (other ranks: None; pass it to wait_for_main, which they wait in).

    Every rank writes its own shards of the weights and AdamW state into <tmp>/sharded/ (each file
    fsynced) and hashes the files it wrote; rank 0 adds the model config, tokenizer, trainer state (no
    optimizer) and the manifest of every rank's hashes, then renames the directory into place. A
    full disk, before the write or during it on any rank, is rank 0's one-line DiskFullError."""
    state = sharded_state_dicts(model, optimizer)
    needed = int(ranks.sum([tensor_bytes(state)])[0])  # every rank's shards
    tmp, failed = None, None
    if ranks.is_main:
        try:
            tmp = start_checkpoint(path, needed)
        except CheckpointError as e:
            failed = e
    tmp, failed = wait_for_main(ranks, (tmp, failed))
    if failed is not None:
        return failed if ranks.is_main else None
    hashes_or_error = write_shards(state, tmp, ranks)
    everyone = gather_to_main(ranks, hashes_or_error)
    if not ranks.is_main:
        return None
    try:
        with removed_on_failure(path, tmp, needed):
            errors = [e for e in everyone if isinstance(e, str)]
            if errors:
                raise RuntimeError(errors[0])  # (removed_on_failure tells a full disk from the message)
            unwrap(model).config.save_pretrained(tmp)  # the architecture, for reading the shards without --model
            tokenizer.save_pretrained(tmp)
            seal_checkpoint(tmp, trainer_state, {name: h for hashes in everyone for name, h in hashes.items()})
        publish_checkpoint(tmp, path)
    except CheckpointError as e:
        return e
    return None


def write_shards(state: dict, tmp: str, ranks: Ranks) -> dict[str, str] | str:
    """dcp.save of `state` into <tmp>/sharded/ (collective) → {name: sha256} of the files this rank
    wrote, or why the save failed (a line of text, every rank's errors; torch raises on every rank)."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    shards = os.path.join(tmp, SHARDED_DIR)
    try:
        with quiet_on_one_process():
            save(state, storage_writer=FileSystemWriter(shards), process_group=slow_wait_group(),
                 no_dist=not dist.is_initialized())
        mine = f"__{ranks.rank}_"  # FileSystemWriter names this rank's files so; rank 0 hashes the rest (.metadata)
        return {f"{SHARDED_DIR}/{n}": sha256(os.path.join(shards, n), sync=True)
                for n in sorted(os.listdir(shards)) if n.startswith(mine)}
    except Exception as e:
        return f"rank {ranks.rank}: {type(e).__name__}: {e}"
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException: {rank: (error, traceback)}
        failures = getattr(e, "failures", None)
        if not isinstance(failures, dict):
            raise  # Ctrl-C
        return "; ".join(f"rank {r}: {type(error).__name__}: {error}" for r, (error, _) in failures.items())


@contextlib.contextmanager
def quiet_on_one_process():
    """torch.distributed.checkpoint without a process group warns that it assumes one process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
