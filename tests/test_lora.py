"""lora.py: `--lora-r` trains peft adapters on a frozen base (the base, adapters off, is the KL
reference), with gradient checkpointing; checkpoints hold the adapter, merge to the same outputs, and
a LoRA run resumes to the same weights as an uninterrupted one."""
import json
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from minigrace.worlds.builtin import tiny_path
from minigrace.config import parse_args
from minigrace.lora import add_adapters, trainable_fraction
from minigrace.models import load_model
from minigrace.train import main

ARGS = ["--max-steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--group-size", "4",
        "--max-new-tokens", "8", "--eval-size", "0", "--save-every", "1", "--lr", "1e-2",
        "--lora-r", "4", "--kl-coef", "0.1", "--grad-checkpointing"]


@pytest.fixture(scope="module")
def lora_run(tiny, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    main(parse_args(ARGS + ["--out", str(out)])[0])
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_only_adapters_train_and_the_base_is_the_kl_reference(lora_run, tiny):
    final = lora_run / "checkpoint-final"
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= set(os.listdir(final))
    assert not os.path.exists(final / "model.safetensors")  # the adapter, not a full copy
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    # The merged model differs from the base only in the adapted linears; embeddings and norms are frozen.
    merged = load_file(final / "merged" / "model.safetensors")
    base = load_file(os.path.join(tiny_path(), "model.safetensors"))
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # KL to the adapters-off base: 0 while B = 0 (first update), then positive.
    kls = [json.loads(line)["kl"] for line in open(lora_run / "metrics.jsonl") if '"kl"' in line]
    assert len(kls) == 2 and all(k >= 0 for k in kls) and kls[-1] > 0
    # With its adapters switched off the trained peft model is exactly the base model.
    model, _ = tiny
    peft_model = PeftModel.from_pretrained(load_model("tiny", "cpu", "fp32")[0], final)
    ids = torch.tensor([[5, 17, 99, 300, 41, 8]])
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=0, rtol=0)
    assert (logits(peft_model, ids) - logits(model, ids)).abs().max() > 1e-4


def test_saved_adapter_merges_to_the_same_outputs(lora_run):
    final = lora_run / "checkpoint-final"
    ids = torch.tensor([[5, 17, 99, 300, 41, 8], [7, 7, 250, 12, 3, 1000]])
    unmerged = PeftModel.from_pretrained(load_model("tiny", "cpu", "fp32")[0], final)
    merged_on_load, _ = load_model(str(final), "cpu", "fp32")  # what Encoder / eval / --model get
    merged_saved = AutoModelForCausalLM.from_pretrained(final / "merged")  # plain transformers, no peft
    reference = logits(unmerged, ids)
    torch.testing.assert_close(logits(merged_on_load, ids), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(merged_saved, ids), reference, atol=1e-5, rtol=1e-5)


def test_lora_run_resumes_to_the_same_adapter(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoint-final"))
    cfg, resume = parse_args(["--resume", str(run)])  # continues from checkpoint-000001 (an adapter)
    main(cfg, resume)
    a = load_file(lora_run / "checkpoint-final" / "adapter_model.safetensors")
    b = load_file(run / "checkpoint-final" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_trainable_fraction(tiny):
    model = load_model("tiny", "cpu", "fp32")[0]
    cfg = parse_args(["--lora-r", "8"])[0]
    trainable, total = trainable_fraction(add_adapters(model, cfg))
    # r·(in + out) per adapted linear: 4 layers × (q,k,v,o: 4·8·128 + gate,up,down: 3·8·192)
    assert trainable == 4 * (4 * 8 * (64 + 64) + 3 * 8 * (64 + 128))
    assert total == trainable + 263_616
