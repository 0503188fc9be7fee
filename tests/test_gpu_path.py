"""The GPU path's mechanisms that run on CPU: the process-group backends and the vLLM weight sync's
parameter streaming. (bench/gpu_check.sh runs the GPU-only parts on a GPU.)"""
import copy
import gc
import weakref

import pytest
import torch

from minigrace.parallel import process_group_backend
from minigrace.vllm_rollout import stream_weights


def test_gpu_runs_get_a_cpu_backend_too():
    # FSDP2's CPU offload all-reduces the gradient norm over CPU shards: NCCL alone has no CPU backend.
    assert process_group_backend(torch.device("cuda", 1)) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_weight_sync_streams_one_parameter_at_a_time(tiny):
    model, _ = tiny
    params = dict(model.named_parameters())
    previous, seen = None, []
    for name, tensor in stream_weights(model, dtype=torch.bfloat16):
        gc.collect()
        assert previous is None or previous() is None, "the previous parameter's copy is still alive"
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, params[name].detach().to(torch.bfloat16))
        seen.append(name)
        previous = weakref.ref(tensor)
        del tensor
    assert seen == list(params)  # every parameter once (the tied lm_head is the embedding's parameter)


def test_weight_sync_gives_plain_hf_names_for_a_lora_model(tiny):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.merge_adapter()
    names = [name for name, _ in stream_weights(lora)]
    lora.unmerge_adapter()
    assert names == [name for name, _ in model.named_parameters()]  # no lora_ tensors, no peft prefixes
