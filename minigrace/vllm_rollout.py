"""vLLM rollouts (`--rollout vllm`): the same Rollouts as rollout.generate, sampled by vLLM.

Each rank runs its own vLLM engine on its GPU (tensor parallel 1; under torchrun vLLM's
"external_launcher" joins the ranks torchrun started) for its own prompts. Before every step the
trainer's current weights are streamed into the engine one parameter at a time (`load_weights`,
vLLM's in-place weight update, through the public `LLM.apply_model`), then the engine's prefix
cache is reset: every prompt shares the system prompt, and KV computed with the old weights must
not be reused. In-place loads keep the weights' addresses, so CUDA graphs stay valid (no
enforce_eager).

The engine sleeps between rollouts (vLLM's sleep mode, level 1: its bf16 weights move to CPU memory,
its KV cache is freed) and wakes up before the weight sync: its --vllm-gpu-memory share of the GPU
(0.3 ≈ 24 GiB of 80 GB) is taken only while it samples, not while the trainer embeds, trains and
steps AdamW (bench/memory_model.py counts it in the rollout phase only).

Sampling is seeded per row from the row's noise, so a rollout does not depend on
which rank draws it (though vLLM's tokens are not bit-identical to the HF path's).

UNTESTED HERE: vLLM does not install on the CPU machine minigrace is developed on (bench/gpu_check.sh
runs it on a GPU). The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which
`apply_model` with a local function needs. To check on a GPU: that a stop at EOS keeps the EOS token
in `token_ids` (the HF path's responses include it), and that rollouts after `sync_weights` follow
the trained weights (greedy vLLM vs greedy HF).
"""
from __future__ import annotations

import os

import torch

from .prompts import ChatPrompt
from .rollout import Rollouts, left_pad, pack_rollouts


def make_vllm_rollout(cfg, model_source: str, device: torch.device, distributed: bool, lora: bool):
    """A VLLMRollout, or None (with a message) when vLLM is not installed: the caller falls back to HF."""
    if device.type != "cuda":
        raise ValueError("--rollout vllm needs a CUDA GPU (vLLM does not run on CPU); use --rollout hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("--rollout vllm: vllm is not installed (pip install vllm); falling back to --rollout hf "
              "(transformers, batched KV-cached sampling)")
        return None
    if lora and cfg.parallel == "fsdp" and distributed:
        raise NotImplementedError("--rollout vllm with --lora-r and --parallel fsdp: merge-for-sync of sharded "
                                  "adapters is not implemented; use --parallel ddp (adapters are small)")
    return VLLMRollout(model_source, cfg, distributed)


def vllm_engine_kwargs(cfg, model_source: str, distributed: bool) -> dict:
    """Keyword arguments of vllm.LLM(...): bf16, --vllm-gpu-memory of the GPU while awake, room for the longest
    prompt + rationale, seeded, one engine per torchrun rank, and sleep mode (see VLLMRollout.sleep)."""
    return dict(model=model_source, dtype="bfloat16", gpu_memory_utilization=cfg.vllm_gpu_memory,
                max_model_len=cfg.max_prompt_len + cfg.max_new_tokens, seed=cfg.seed,
                distributed_executor_backend="external_launcher" if distributed else None, enable_sleep_mode=True)


class VLLMRollout:
    def __init__(self, model_source: str, cfg, distributed: bool):
        from vllm import LLM

        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("--rollout vllm syncs weights into an engine in this process: unset "
                             "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the model in this process
        self.llm = LLM(**vllm_engine_kwargs(cfg, model_source, distributed))
        self.asleep = False
        self.sleep()  # until the first step's weight sync: the trainer has the GPU to itself meanwhile

    def sleep(self) -> None:
        """Free the engine's GPU memory: level 1 moves its weights to CPU memory and drops its KV cache
        (and its prefix cache with it)."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Take the engine's GPU memory back (weights and KV cache) before it is written or sampled from."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    @torch.no_grad()
    def sync_weights(self, module: torch.nn.Module, lora: bool) -> None:
        """Stream the trainer's current weights into the engine, then drop every cached prefix."""
        self.wake_up()
        if lora:
            module.merge_adapter()  # the engine holds plain weights: W + (α/r)·B·A
        try:
            self.llm.apply_model(lambda model: model.load_weights(stream_weights(module)))
        finally:
            if lora:
                module.unmerge_adapter()
        self.llm.reset_prefix_cache()  # KV of the shared system prompt was computed with the old weights

    def generate(self, prompts: list[ChatPrompt], temperature: torch.Tensor, noise: torch.Tensor, *,
                 max_new_tokens: int, eos_ids: list[int], pad_id: int, top_p: float, device) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = (noise[:, 0].double() * 2**31).long().tolist()  # one seed per row, from the row's own noise
        params = [SamplingParams(temperature=float(t), top_p=top_p, max_tokens=max_new_tokens, seed=s,
                                 stop_token_ids=eos_ids, skip_special_tokens=False)
                  for t, s in zip(temperature.tolist(), seeds)]
        self.wake_up()
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in prompts], params,
                                        use_tqdm=False)
        finally:
            self.sleep()  # the embed pass, the update and AdamW get the engine's share of the GPU
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(len(r) for r in responses)
        response = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        alive = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, r in enumerate(responses):
            response[row, :len(r)] = torch.tensor(r, dtype=torch.long)
            alive[row, :len(r)] = True
        truncated = torch.tensor([o.outputs[0].finish_reason == "length" for o in outputs])
        ids, attention, pool_start = left_pad(prompts, pad_id, device)
        return pack_rollouts(prompts, ids, attention, pool_start, response.to(device), alive.to(device),
                             truncated.to(device))


def stream_weights(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
    """(HF name, full tensor in `dtype`) per parameter, one at a time: never a whole state dict in memory.

    Under FSDP each parameter is gathered (a collective: every rank iterates in the same order) just
    before it is yielded and freed once the engine has copied it. A peft model must have its adapters
    merged (module.merge_adapter()) first; the adapters themselves are skipped."""
    for name, param in module.named_parameters():
        if "lora_" in name:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param  # DTensor under FSDP
        yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), full.detach().to(dtype)
