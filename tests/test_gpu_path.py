"""The GPU path's mechanisms that run on CPU: start-up on a GPU (an indexed device for set_device and the
process group, against a stand-in CUDA runtime), the process-group backends, the vLLM weight sync's parameter
streaming, fp32 sampling logits, the bf16 autocast dtype path itself (--device cpu --dtype bf16: fp32 weights
and AdamW state, first-update ratio 1, dual clip), LoRA's base dtype, fused AdamW on CUDA, and resuming on
other devices. (bench/gpu_check.sh runs the GPU-only parts on a GPU.)"""
import copy
import gc
import weakref

import pytest
import torch

from minigrace import parallel
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


# ---------------------------------------------------------------------------------------------
# Start-up on a GPU (issue #22): torch.cuda.set_device and init_process_group need a device with an index.
# A stand-in for the CUDA runtime records what parallel.setup hands it; the code under test is the real one.


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available' (2 GPUs) on this CPU machine; the runtime's set-device call records the index it gets
    (torch.cuda.set_device itself runs: it turns its argument into an index, and raises without one)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", chosen.append, raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return chosen


def _index_ok(dev: torch.device) -> int:
    """What torch.cuda.set_device and init_process_group(device_id=…) accept: a CUDA device with an index."""
    assert dev.type == "cuda" and dev.index is not None, dev
    return torch.cuda._utils._get_device_index(dev, optional=False)


@pytest.mark.parametrize("flag, index", [("auto", 0), ("cuda", 0), ("cuda:1", 1)])
def test_one_gpu_process_sets_an_indexed_device(fake_cuda, flag, index):
    ranks = parallel.setup(flag)
    assert fake_cuda == [index] and _index_ok(ranks.device) == index
    assert (ranks.rank, ranks.world, ranks.launched) == (0, 1, False)


def test_torchrun_rank_takes_the_gpu_of_its_local_rank(fake_cuda, monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # second GPU of the second node
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    ranks = parallel.setup("auto")
    assert fake_cuda == [1], "the current device is this rank's GPU, set before the process group starts"
    (backend, kw), = calls
    assert backend == "cuda:nccl,cpu:gloo" and _index_ok(kw["device_id"]) == 1
    assert ranks.device == torch.device("cuda", 1) and (ranks.rank, ranks.world, ranks.launched) == (3, 4, True)


def test_cuda_device_has_an_index():
    assert parallel.cuda_device(torch.device("cuda"), local_rank=None) == torch.device("cuda", 0)
    assert parallel.cuda_device(torch.device("cuda", 2), local_rank=None) == torch.device("cuda", 2)
    assert parallel.cuda_device(torch.device("cuda"), local_rank=5) == torch.device("cuda", 5)


@pytest.fixture
def torchrun_of_one(monkeypatch):
    """parallel.setup("cpu") as one torchrun process would run it (a real 1-rank gloo group), torn down after."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    ranks = parallel.setup("cpu")
    yield ranks
    parallel.teardown(ranks)
    assert not torch.distributed.is_initialized()


def test_torchrun_on_cpu_joins_a_gloo_group(torchrun_of_one):
    ranks = torchrun_of_one
    assert torch.distributed.get_backend() == "gloo" and ranks.device == torch.device("cpu") and ranks.launched


# ---------------------------------------------------------------------------------------------
# Sampling logits in fp32: the decode step's logits are the loss's fp32 logits, also under bf16 autocast


def _prompts(tokenizer, texts):
    from minigrace.prompts import chat_prompt
    return [chat_prompt(tokenizer, text, 64) for text in texts]


def fp32_logits(hidden, weight):  # what loss.py's chunked log-probs compute on CPU: autocast off, fp32
    with torch.autocast("cpu", enabled=False):
        return torch.nn.functional.linear(hidden.float(), weight.float())


def test_sampling_logits_are_fp32_under_bf16_autocast(tiny):
    from minigrace.rollout import KVDecoder
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, ["the comet crossed the sky", "knead the dough twice"])
    head = model.get_output_embeddings().weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = KVDecoder(model, hidden=True)
        logits, hidden, _, _ = decoder.prefill(prompts, tokenizer.pad_token_id)  # [n, V], [n, W, H]
        assert logits.dtype == torch.float32
        assert torch.equal(logits, fp32_logits(hidden[:, -1], head))  # the loss's logits of the same state
        step_logits, step_hidden = decoder.step(logits.argmax(-1), torch.ones(2, dtype=torch.bool))
        assert step_logits.dtype == torch.float32 and torch.equal(step_logits, fp32_logits(step_hidden, head))
        assert not torch.equal(step_logits, step_logits.bfloat16().float())  # not bf16 numbers cast up


def test_fp32_sampling_logits_are_the_models_own_logits(tiny):
    """Without autocast the fp32 head changes no bit: the default CPU run samples the same tokens."""
    from minigrace.rollout import KVDecoder, left_pad, position_ids
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, ["the comet crossed the sky", "knead the dough"])
    with torch.no_grad():
        logits = KVDecoder(model, hidden=False).prefill(prompts, tokenizer.pad_token_id)[0]
        ids, attention, _ = left_pad(prompts, tokenizer.pad_token_id, "cpu")
        plain = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                      logits_to_keep=1).logits[:, -1]
    assert torch.equal(logits, plain)


# ---------------------------------------------------------------------------------------------
# The GPU's dtype path on CPU: --device cpu --dtype bf16 (fp32 weights and AdamW state, bf16 autocast)

SHORT = ["--max-steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "2", "--eval-size", "0",
         "--max-new-tokens", "8", "--device", "cpu"]


def train_recording_ratios(monkeypatch, out, *flags):
    """A short run of the tiny model → (summary, policies seen, max |ratio − 1| over the response tokens of the
    first optimizer update: the new log-probs of its micro-batches against the embedding pass's old ones,
    before any optimizer step). Wraps step.policy_loss (the real one computes the loss) to read its inputs."""
    from minigrace import step, train
    from minigrace.config import parse_args
    seen, deviations = {}, []
    real_grace_step, real_policy_loss = train.grace_step, step.policy_loss

    def grace_step(policy, optimizer, *args, **kw):
        seen.setdefault("policy", policy)
        seen.setdefault("optimizer", optimizer)
        return real_grace_step(policy, optimizer, *args, **kw)

    def policy_loss(logprobs, old_logprobs, advantages, response_mask, *args, **kw):
        if not seen["optimizer"].state:  # no optimizer step yet: the first update
            ratio = torch.exp(logprobs.detach() - old_logprobs)[response_mask]
            deviations.append(float((ratio - 1).abs().max()))
        return real_policy_loss(logprobs, old_logprobs, advantages, response_mask, *args, **kw)

    monkeypatch.setattr(train, "grace_step", grace_step)
    monkeypatch.setattr(step, "policy_loss", policy_loss)
    summary = train.main(parse_args([*SHORT, *flags, "--out", str(out)])[0])
    assert deviations, "the first update computed no loss"
    return summary, seen, max(deviations)


# The update's forward (with grad) and the embedding pass's (no grad, other micro-batches) must be the same
# kind of forward, also under --grad-checkpointing (the real-model presets'), where the update cannot share
# the system prompt's KV cache: step.shares_prefix. (On CPU bf16 rounding hides the difference; fp32 shows it.)
CHECKPOINTING = pytest.mark.parametrize("flags", [[], ["--grad-checkpointing"]], ids=["default", "grad-ckpt"])


@pytest.mark.parametrize("flags", [[], ["--grad-checkpointing"], ["--lora-r", "4", "--kl-coef", "0.1"]],
                         ids=["default", "grad-ckpt", "lora-kl"])
def test_cpu_bf16_run_trains_fp32_weights_under_bf16_autocast(tiny, one_thread, tmp_path, monkeypatch, flags):
    from safetensors.torch import load_file
    summary, seen, ratio_dev = train_recording_ratios(monkeypatch, tmp_path / "bf16", "--dtype", "bf16", *flags)
    policy, optimizer = seen["policy"], seen["optimizer"]
    assert policy.autocast_dtype == torch.bfloat16 and policy.ranks.device.type == "cpu"
    params = list(policy.module.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params if p.requires_grad)
    frozen = [p.dtype for p in params if not p.requires_grad]  # LoRA's base: in the compute dtype
    assert frozen == [torch.bfloat16] * len(frozen) and bool(frozen) == policy.lora
    adam = [t for state in optimizer.state.values() for t in (state["exp_avg"], state["exp_avg_sq"])]
    assert adam and all(t.dtype == torch.float32 for t in adam)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    final_dir = tmp_path / "bf16" / "checkpoint-final" / ("merged" if policy.lora else "")  # LoRA: merged/
    final = load_file(str(final_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())
    # Old and new log-probs are fp32 logits of bf16-autocast hidden states of the same weights: ratio 1.
    print(f"bf16 CPU: first update max |ratio - 1| = {ratio_dev:.3g}")
    assert ratio_dev <= 1e-6
    assert logged_first_update_ratio_dev(tmp_path / "bf16") == pytest.approx(ratio_dev, abs=1e-12)


@CHECKPOINTING
def test_fp32_cpu_run_first_update_ratio_is_one(tiny, one_thread, tmp_path, monkeypatch, flags):
    _, seen, ratio_dev = train_recording_ratios(monkeypatch, tmp_path / "fp32", *flags)
    assert seen["policy"].autocast_dtype is None  # the default CPU run: no autocast
    print(f"fp32 CPU: first update max |ratio - 1| = {ratio_dev:.3g}")
    assert ratio_dev <= 1e-6
    assert logged_first_update_ratio_dev(tmp_path / "fp32") == pytest.approx(ratio_dev, abs=1e-12)


def logged_first_update_ratio_dev(run_dir) -> float:
    """metrics.jsonl's first_update_ratio_dev of step 1 (what bench/gpu_check.py reads on a GPU)."""
    import json
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return next(r["first_update_ratio_dev"] for r in rows if r.get("step") == 1 and "first_update_ratio_dev" in r)


def test_dual_clip_holds_on_the_bf16_path(tiny):
    """verl's dual clip on log-probs of a bf16-autocast forward: where A < 0 and the ratio is far above 1,
    each token's loss is held at dual_clip·|A| and gives no gradient."""
    from minigrace.embed import policy_forward
    from minigrace.loss import policy_loss, response_logprobs
    from minigrace.rollout import left_pad
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, ["the comet crossed the sky", "knead the dough twice"])
    ids, attention, _ = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, -3:] = True  # score the last 3 tokens as the "response"
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = policy_forward(model, ids, attention)
        logprobs = response_logprobs(hidden, model.get_output_embeddings().weight, ids, response_mask)
        assert logprobs.dtype == torch.float32
        old = logprobs.detach() - 3.0  # ratio e³ ≈ 20 > dual_clip 3
        advantages = torch.tensor([-1.0, -0.5])
        tokens = float(response_mask.sum())
        loss, stats = policy_loss(logprobs, old, advantages, response_mask, 0.2, tokens, dual_clip=3.0)
    assert float(stats["dual_clip_frac_sum"]) == tokens  # every token held
    expected = float((3.0 * -advantages[:, None] * response_mask).sum()) / tokens
    assert abs(float(loss.detach()) - expected) < 1e-6
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(float(g.abs().max()) == 0 for g in grads)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# LoRA's frozen base in the compute dtype; AdamW fused on CUDA; resuming on other devices


def test_lora_base_loads_in_the_compute_dtype():
    from minigrace.lora import base_dtype
    from minigrace.models import compute_dtype
    assert base_dtype(compute_dtype("auto", torch.device("cuda", 0))) == "bf16"  # GPU default: bf16 autocast
    assert base_dtype(compute_dtype("bf16", torch.device("cpu"))) == "bf16"  # the GPU path on CPU
    assert base_dtype(compute_dtype("fp32", torch.device("cuda", 0))) == "fp32"
    assert base_dtype(compute_dtype("auto", torch.device("cpu"))) == "fp32"  # the default CPU run: unchanged


def test_lora_on_a_bf16_base_trains_fp32_adapters(tiny):
    pytest.importorskip("peft")
    from minigrace.config import parse_args
    from minigrace.lora import add_adapters
    model, _ = tiny
    cfg, _ = parse_args(["--lora-r", "2"])
    lora = add_adapters(copy.deepcopy(model).to(torch.bfloat16), cfg)
    trained = [p for p in lora.parameters() if p.requires_grad]
    frozen = [p for p in lora.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # peft upcasts the adapters
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_adamw_is_fused_on_cuda_only():
    from minigrace.train import adamw_options
    assert adamw_options(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_options(torch.device("cuda", 0), offload=True) == {}  # the shards step on CPU
    assert adamw_options(torch.device("cpu")) == {}  # the default CPU run: unchanged
    weight = torch.nn.Parameter(torch.ones(3))
    torch.optim.AdamW([weight], **adamw_options(torch.device("cpu")))  # (fused needs CUDA tensors here)


def _rng(cuda=None) -> dict:
    import random
    import numpy as np
    from minigrace.checkpoint import rng_state
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    state = rng_state()
    if cuda is not None:
        state["cuda"] = cuda
    return state


@pytest.mark.parametrize("cuda", [None, [torch.zeros(16, dtype=torch.uint8)] * 2])
def test_rng_state_restores_on_a_machine_without_its_gpus(cuda):
    import random
    import numpy as np
    from minigrace.checkpoint import set_rng_state
    state = _rng(cuda)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    set_rng_state(state)  # a GPU run resumed on CPU: the CUDA states are left out
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]


def test_cuda_rng_state_restores_only_onto_as_many_gpus(monkeypatch):
    from minigrace.checkpoint import set_rng_state
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    one_gpu = [torch.zeros(16, dtype=torch.uint8)]
    set_rng_state(_rng(one_gpu * 2))  # saved on 2 GPUs, resumed on 1
    set_rng_state(_rng())  # saved on CPU, resumed on a GPU
    assert restored == []
    set_rng_state(_rng(one_gpu))
    assert restored == [one_gpu]


def test_rollout_noise_generator_state_resumes_or_warns():
    from minigrace.checkpoint import set_generator_state
    saved = torch.Generator().manual_seed(3)
    saved_state, expected = saved.get_state(), torch.rand(4, generator=saved)
    generator = torch.Generator().manual_seed(0)
    assert set_generator_state(generator, saved_state) and torch.equal(torch.rand(4, generator=generator), expected)
    with pytest.warns(UserWarning, match="rollout-noise generator"):
        assert not set_generator_state(generator, torch.zeros(16, dtype=torch.uint8))  # a CUDA generator's state


# ---------------------------------------------------------------------------------------------
# FSDP2 gradient accumulation: every micro-batch's gradient is reduce-scattered into the sharded gradient


def test_fsdp_accumulation_keeps_gradients_sharded_between_micro_batches(torchrun_of_one):
    """Under Ranks.gradient_sync(sync=False) FSDP2 must still reduce-scatter: with
    set_requires_gradient_sync(False) it would hold an unsharded fp32 gradient of every parameter until the
    last micro-batch (4 B per parameter, even with --offload), and param.grad stays None meanwhile."""
    from torch.distributed.fsdp import fully_shard
    ranks = torchrun_of_one
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    plain = copy.deepcopy(model)
    fully_shard(model)
    batches = [torch.randn(4, 8), torch.randn(4, 8)]
    with ranks.gradient_sync(model, sync=False):
        model(batches[0]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # reduce-scattered into the sharded gradient
    with ranks.gradient_sync(model, sync=True):
        model(batches[1]).sum().backward()
    for x in batches:
        plain(x).sum().backward()
    for sharded, full in zip(model.parameters(), plain.parameters()):  # the accumulated sum of both
        torch.testing.assert_close(sharded.grad.full_tensor(), full.grad)
