"""vLLM rollouts (`--rollout vllm`): the same Rollouts as rollout.generate, sampled by vLLM.

Each rank runs its own vLLM engine on its GPU (tensor parallel 1; under torchrun vLLM's
"external_launcher" joins the ranks torchrun started) for its own prompts. Before every step the
trainer's current weights are copied into the engine (`load_weights`, vLLM's in-place weight
update, the call TRL's GRPOTrainer uses in colocate mode), so rationales always come from the
policy being trained. Sampling is seeded per row from the row's noise, so a rollout does not depend
on which rank draws it (though vLLM's tokens are not bit-identical to the HF path's).

UNTESTED HERE: vLLM does not install on the CPU machine minigrace is developed on. The internal
attribute path to the model runner differs between vLLM versions (written against 0.8-0.10 with
VLLM_ENABLE_V1_MULTIPROCESSING=0); if it moved, `sync_weights` is the one place to adapt. To check
on a GPU: that a stop at EOS keeps the EOS token in `token_ids` (the HF path's responses include it),
and that rollouts after `sync_weights` follow the trained weights (greedy vLLM vs greedy HF).
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


class VLLMRollout:
    def __init__(self, model_source: str, cfg, distributed: bool):
        from vllm import LLM

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the model in this process
        self.llm = LLM(model=model_source, dtype="bfloat16", gpu_memory_utilization=cfg.vllm_gpu_memory,
                       max_model_len=cfg.max_prompt_len + cfg.max_new_tokens, enforce_eager=True, seed=cfg.seed,
                       distributed_executor_backend="external_launcher" if distributed else None)

    @torch.no_grad()
    def sync_weights(self, named_weights) -> None:
        """Copy the trainer's weights (HF names, full tensors) into the engine."""
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(named_weights)

    def generate(self, prompts: list[ChatPrompt], temperature: torch.Tensor, noise: torch.Tensor, *,
                 max_new_tokens: int, eos_ids: list[int], pad_id: int, top_p: float, device) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = (noise[:, 0].double() * 2**31).long().tolist()  # one seed per row, from the row's own noise
        params = [SamplingParams(temperature=float(t), top_p=top_p, max_tokens=max_new_tokens, seed=s,
                                 stop_token_ids=eos_ids, skip_special_tokens=False)
                  for t, s in zip(temperature.tolist(), seeds)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p.ids) for p in prompts], params, use_tqdm=False)
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


def hf_named_weights(module: torch.nn.Module, full_state_dict: dict):
    """(name, tensor) pairs under the plain HF names vLLM expects. A peft model must have its adapters
    merged into the base weights (module.merge_adapter()) before the state dict is taken."""
    for name, tensor in full_state_dict.items():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor
