"""Memory model: per-GPU bytes of a GRACE step for the GRACE backbones, and the same arithmetic
checked against what the tiny model really allocates.

    python bench/memory_model.py                                  # the table + checks on 1 process
    torchrun --nproc-per-node 2 bench/memory_model.py             # each rank's FSDP share (gloo)

Arithmetic (minigrace trains fp32 master weights and computes in bf16 on GPU):
  state      weights 4 B + gradients 4 B + AdamW exp_avg/exp_avg_sq 8 B = 16 B per trainable param;
             a frozen (LoRA) base 4 B per param. DDP: all of it on every GPU; FSDP: ÷ N GPUs;
             FSDP + offload: none of it on the GPU (CPU RAM instead).
  rollout    under FSDP the gathered bf16 weights (2 B/param, gathered once for the whole rollout;
             DDP / 1 GPU: the fp32 weights are already there, autocast casts per op) + the KV cache
             of this GPU's rollout rows: rows × tokens × 2 (K,V) × layers × kv_heads × head_dim × 2 B.
  train      with gradient checkpointing: each layer's input, layers × tokens × hidden × 2 B, for a
             micro-batch of max_tokens_per_microbatch tokens, + one layer recomputed
             (≈ tokens × (6·hidden + 2·kv_dim + 4·intermediate) × 2 B) + the log-prob chunk
             ([chunk, vocab] fp32 logits and their gradient). Without checkpointing: every layer's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

GiB = 2**30

# From each model's config.json (all four tie the input and output embeddings).
BACKBONES = {
    "Qwen2.5-1.5B": dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128,
                         vocab=151936, qkv_bias=True, qk_norm=False),
    "Qwen2.5-3B": dict(layers=36, hidden=2048, intermediate=11008, heads=16, kv_heads=2, head_dim=128,
                       vocab=151936, qkv_bias=True, qk_norm=False),
    "Llama-3.2-3B": dict(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, head_dim=128,
                         vocab=128256, qkv_bias=False, qk_norm=False),
    "Qwen3-4B": dict(layers=36, hidden=2560, intermediate=9728, heads=32, kv_heads=8, head_dim=128,
                     vocab=151936, qkv_bias=False, qk_norm=True),
}
# GRACE (grace.md §4): 64 prompts × (8 main + 1 query + 1 negative) rollouts, ≤ 1024 prompt + 2048
# response tokens, micro-batches of 16384 tokens; minigrace's defaults are the same.
GRACE = dict(rollout_rows=64 * 10, tokens=1024 + 2048, microbatch_tokens=16384, logprob_chunk=1024)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def linear_shapes(m: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in one decoder layer."""
    q, kv = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    h, i = m["hidden"], m["intermediate"]
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def n_params(m: dict) -> int:
    shapes = linear_shapes(m)
    per_layer = sum(a * b for a, b in shapes.values()) + 2 * m["hidden"]  # linears + 2 RMSNorms
    if m["qkv_bias"]:
        per_layer += shapes["q"][1] + 2 * shapes["k"][1]
    if m["qk_norm"]:
        per_layer += 2 * m["head_dim"]
    return m["layers"] * per_layer + m["vocab"] * m["hidden"] + m["hidden"]  # + tied embeddings + final norm


def n_lora_params(m: dict, r: int) -> int:
    return m["layers"] * sum(r * (a + b) for name, (a, b) in linear_shapes(m).items() if name in LORA_TARGETS)


def state_bytes(m: dict, gpus: int, setup: str, lora_r: int = 16) -> float:
    """Weights + gradients + AdamW states on one GPU."""
    p = n_params(m)
    if setup.startswith("lora"):
        total = 4 * p + 16 * n_lora_params(m, lora_r)
    else:
        total = 16 * p
    if "offload" in setup:
        return 0.0
    return total / gpus if "fsdp" in setup else total


def kv_cache_bytes(m: dict, rows: int, tokens: int) -> float:
    return rows * tokens * 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2


def train_activation_bytes(m: dict, tokens: int, chunk: int, checkpointing: bool = True) -> float:
    h, kv = m["hidden"], m["kv_heads"] * m["head_dim"]
    one_layer = tokens * (6 * h + 2 * kv + 4 * m["intermediate"]) * 2
    logprob = 2 * chunk * m["vocab"] * 4
    if checkpointing:
        return m["layers"] * tokens * h * 2 + one_layer + logprob
    return m["layers"] * one_layer + logprob


def table(backbones=("Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen3-4B"), rollout_rows: int = 64) -> str:
    """Markdown table: GiB per GPU at GRACE's batch sizes (training fp32 + AdamW, bf16 compute)."""
    setups = [("1 GPU", 1, "full"), ("4 GPU DDP", 4, "ddp"), ("4 GPU FSDP", 4, "fsdp"),
              ("4 GPU FSDP + offload", 4, "fsdp+offload"), ("1 GPU LoRA r=16", 1, "lora"),
              ("4 GPU FSDP LoRA r=16", 4, "lora+fsdp")]
    lines = [f"| backbone | setup | weights+grads+AdamW | rollout (FSDP: + bf16 weights), all rows "
             f"| same, --rollout-rows {rollout_rows} | train activations | peak, all rows / {rollout_rows} rows |",
             "|---|---|---|---|---|---|---|"]
    for name in backbones:
        m = BACKBONES[name]
        p = n_params(m)
        for label, gpus, setup in setups:
            state = state_bytes(m, gpus, setup)
            rows = GRACE["rollout_rows"] // gpus
            gathered = 2 * p if "fsdp" in setup else 0  # FSDP gathers bf16 weights for the rollout; else autocast
            rollout_all = gathered + kv_cache_bytes(m, rows, GRACE["tokens"])
            rollout_chunk = gathered + kv_cache_bytes(m, min(rows, rollout_rows), GRACE["tokens"])
            train = train_activation_bytes(m, GRACE["microbatch_tokens"], GRACE["logprob_chunk"])
            if "fsdp" in setup:  # one layer gathered at a time while training
                train += 2 * p / m["layers"]
            lines.append(f"| {name} ({p / 1e9:.2f}B) | {label} | {state / GiB:.1f} | {rollout_all / GiB:.1f} | "
                         f"{rollout_chunk / GiB:.1f} | {train / GiB:.1f} | {(state + max(rollout_all, train)) / GiB:.0f}"
                         f" / {(state + max(rollout_chunk, train)) / GiB:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Checks on the tiny model: the same formulas against real allocations


def tiny_shape(model) -> dict:
    c = model.config
    return dict(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                vocab=c.vocab_size, qkv_bias=True, qk_norm=False)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_adamw_step(model) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(5, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def local(t):  # an FSDP shard's local tensor; a plain tensor itself
    return t.to_local() if hasattr(t, "to_local") else t


def measured_state(model, optimizer) -> int:
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return (tensor_bytes(local(p) for p in model.parameters()) + tensor_bytes(local(p.grad) for p in trainable)
            + tensor_bytes(states))


def checks() -> list[tuple[str, float, int]]:
    """(quantity, formula, measured) on the tiny model, one process."""
    from minigrace.builtin import load_tiny
    from minigrace.config import GraceConfig
    from minigrace.lora import add_adapters
    from minigrace.rollout import _cache

    torch.manual_seed(0)
    model, _ = load_tiny()
    m = tiny_shape(model)
    out = [("params", n_params(m), sum(t.numel() for t in model.parameters()))]
    optimizer = one_adamw_step(model)
    out.append(("full-training state bytes", state_bytes(m, 1, "full"), measured_state(model, optimizer)))
    lora_model = add_adapters(load_tiny()[0], GraceConfig(lora_r=8))
    optimizer = one_adamw_step(lora_model)
    out.append(("LoRA r=8 trainable params", n_lora_params(m, 8),
                sum(t.numel() for t in lora_model.parameters() if t.requires_grad)))
    out.append(("LoRA r=8 state bytes", state_bytes(m, 1, "lora", 8), measured_state(lora_model, optimizer)))
    rows, tokens = 6, 40
    with torch.no_grad():
        cache = _cache(model(input_ids=torch.randint(5, 500, (rows, tokens)), use_cache=True))
    kv = sum(tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    out.append(("KV cache bytes (fp32 here: 2× bf16)", 2 * kv_cache_bytes(m, rows, tokens), kv))
    return out


def fsdp_check() -> str:
    """Under torchrun: each rank's share of the full-training state after one step ≈ 16 B · params / N."""
    from torch.distributed.fsdp import fully_shard

    from minigrace import parallel
    from minigrace.builtin import load_tiny

    ranks = parallel.setup("cpu")
    model, _ = load_tiny()
    p = sum(t.numel() for t in model.parameters())
    for layer in parallel.decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    torch.manual_seed(0)
    optimizer = one_adamw_step(model)
    mine = measured_state(model, optimizer)
    line = (f"FSDP rank {ranks.rank}/{ranks.world} state bytes   formula {16 * p / ranks.world:>12,.0f}   "
            f"measured {mine:>12,}")
    parallel.teardown(ranks)
    return line


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        print(fsdp_check())
        sys.exit(0)
    print(table(tuple(BACKBONES)))
    print()
    for name, formula, measured in checks():
        print(f"tiny model: {name:<38} formula {formula:>12,.0f}   measured {measured:>12,}")
