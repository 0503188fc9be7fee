"""Parallel: data-parallel GRACE with torchrun, on the engines torch ships (DDP, FSDP2).

    torchrun --nproc-per-node N train.py ...     # N GPUs (nccl), or N CPU processes (gloo)

Every rank draws the same global batch of P prompts (the data order is seeded) and owns prompts
rank, rank+N, rank+2N, …: it samples, embeds and trains on those only. The reward compares every
rollout with every query of the batch, so the embeddings are all-gathered (no gradient flows
through the reward) and every rank computes the same global rewards and advantages. DDP or FSDP2
averages the gradients over ranks; the loss is scaled so that this average is exactly the
one-process token-mean (see `grace_step`). Only rank 0 logs and writes checkpoints, which hold full
(unsharded) state dicts, so a run can resume on any number of ranks.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op: rank 0 of 1. Under
torchrun with one process the model is still wrapped (FSDP with --offload fits a bigger model on one GPU).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    def max(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

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
        """Accumulate gradients over micro-batches; all-reduce / reduce-scatter only when `sync`."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
            with model.no_sync():
                yield
        elif is_fsdp(model):
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield


def process_group_backend(device: torch.device) -> str:
    """NCCL for GPU tensors, plus gloo for CPU tensors on GPU machines: with FSDP2's CPU offload the
    gradient-norm all-reduce of clip_grad_norm_ runs on CPU shards, which NCCL cannot reduce."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def setup(device: str) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
    `device`: the --device flag; under torchrun, cuda means this rank's GPU (cuda:LOCAL_RANK)."""
    from .models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":  # the current device is the one kernels and NCCL use by default
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" not in os.environ:  # plain `python train.py`: one process, no wrapping
        return Ranks(0, 1, dev, launched=False)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(dev), device_id=dev if dev.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), dev, launched=True)


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
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


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full, unsharded tensors on CPU, keyed by parameter name.

    A collective under FSDP: every rank calls it; the tensors are complete on rank 0. They load on
    any world size (`load_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = unwrap(model)
    weights = get_model_state_dict(module, options=options)
    # Tied weights (lm_head = input embeddings) once, under the name save_pretrained keeps.
    names = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    weights = {name: tensor for name, tensor in weights.items() if name in names}
    return weights, get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (every rank read it from the checkpoint) into a possibly sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
