"""Memory model: per-GPU bytes of a GRACE step for the GRACE backbones, and the same arithmetic
checked against what the tiny model really allocates.

    python bench/memory_model.py                                  # presets, setups table, checks on 1 process
    torchrun --nproc-per-node 2 bench/memory_model.py             # each rank's FSDP share (gloo)

A step has four phases; its peak is the largest. Every phase holds the training state: fp32 weights
(4 B per parameter) and AdamW's exp_avg + exp_avg_sq (8 B); gradients (4 B) exist from the first
backward to the optimizer step.
  rollout  sampling: the KV cache of the rows generated at once, rows × tokens × 2 (K,V) × layers ×
           kv_heads × head_dim × 2 B; one layer's prefill activations; the sampling buffers (rows × vocab)
  embed    the no-grad forward over all rollouts, T tokens (--max-tokens-per-microbatch) at a time:
           every layer's output is kept (output_hidden_states), + one layer's transient and one
           [chunk, vocab] fp32 log-prob chunk
  train    forward + backward of a T-token micro-batch. With --grad-checkpointing: each layer's input
           + one layer recomputed with its gradients (2 × T × (6·hidden + 2·kv_dim + 4·intermediate)
           × 2 B); without: every layer's activations. Plus the [chunk, vocab] fp32 log-prob chunk and
           its gradient, and the fp32 lm_head gradient buffer (vocab × hidden × 4 B)
  step     AdamW. torch's default (foreach) implementation makes one temporary of 4 B per trainable
           parameter (exp_avg_sq.sqrt()); the fused one makes none
bf16 compute on GPU, as minigrace runs it:
  1 GPU / DDP  autocast keeps a bf16 copy of every trainable fp32 weight (2 B per parameter) while an
               autocast region runs (rollout + embed; each training micro-batch); the residual stream
               stays fp32 (fp32 residual + bf16 layer output = fp32): 4 B per hidden element
  FSDP         weights and AdamW states ÷ N GPUs; weights gathered in bf16 (all of them for rollout +
               embed, parallel.full_weights; two layers + the root's embedding while training); a bf16
               residual stream; the loss upcasts the gathered bf16 lm_head to fp32 (vocab × hidden × 4 B)
  + offload    weights, gradients and AdamW states in CPU memory; the AdamW step runs on the CPU
  LoRA         a frozen fp32 base (4 B per parameter, which autocast does not cache) + 16 B per adapter
               parameter; the frozen lm_head gets no gradient buffer
Left out: the CUDA context (~0.5 GiB) and the allocator's slack, hence FIT_GIB below 80 GB = 79.6 GiB;
a --kl-coef reference model without LoRA (+4 B per parameter).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

GiB = 2**30
FIT_GIB = 76  # a model preset must fit this on an 80 GB GPU (79.6 GiB): ≥ 3.6 GiB for context and slack

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
# minigrace's model aliases (minigrace/models.py ALIASES) → the shapes above.
ALIAS_BACKBONE = {"qwen2.5-1.5b": "Qwen2.5-1.5B", "qwen2.5-3b": "Qwen2.5-3B", "llama3.2-3b": "Llama-3.2-3B",
                  "qwen3-4b": "Qwen3-4B"}
# GRACE (grace.md §4): 64 prompts × (8 main + 1 query + 1 negative) rollouts, ≤ 1024 prompt + 2048
# response tokens, micro-batches of 16384 tokens; minigrace's defaults are the same.
GRACE = dict(rollout_rows=64 * 10, prompt_tokens=1024, tokens=1024 + 2048, microbatch_tokens=16384,
             logprob_chunk=1024)
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


def layer_bytes(m: dict, tokens: int) -> float:
    """One decoder layer's bf16 activations over `tokens` tokens (q, k, v, o, MLP in, gate, up, act, ...)."""
    return tokens * (6 * m["hidden"] + 2 * m["kv_heads"] * m["head_dim"] + 4 * m["intermediate"]) * 2


def kept_hidden_bytes(m: dict, tokens: int, residual_bytes: int) -> float:
    """The no-grad forward's output_hidden_states: the embeddings' output + every layer's."""
    return (m["layers"] + 1) * tokens * m["hidden"] * residual_bytes


def phases(m: dict, *, rollout_rows: int, microbatch_tokens: int, checkpointing: bool = True, setup: str = "full",
           gpus: int = 1, lora_r: int = 16, rows_total: int = GRACE["rollout_rows"],
           prompt_tokens: int = GRACE["prompt_tokens"], tokens: int = GRACE["tokens"],
           chunk: int = GRACE["logprob_chunk"], adamw: str = "foreach") -> dict[str, float]:
    """Bytes on one GPU in each phase of a step. rollout_rows 0 = all of this GPU's rows at once."""
    p, vocab, hidden, n_layers = n_params(m), m["vocab"], m["hidden"], m["layers"]
    lora, fsdp, offload = setup.startswith("lora"), "fsdp" in setup, "offload" in setup
    trainable = n_lora_params(m, lora_r) if lora else p
    share = 0.0 if offload else (1 / gpus if fsdp else 1.0)
    state = share * (12 * trainable + (4 * p if lora else 0))  # weights + AdamW (+ the frozen base)
    grads = share * 4 * trainable
    adamw_temp = share * 4 * trainable if adamw == "foreach" else 0.0
    lm_grad = 0 if lora else 4 * vocab * hidden
    if fsdp:
        sampling_weights, train_weights = 2 * p, 2 * (2 * p / n_layers + vocab * hidden)
        residual, lm_upcast = 2, 4 * vocab * hidden
    else:  # autocast's bf16 copies of the trainable weights
        sampling_weights = train_weights = 0 if lora else 2 * p
        residual, lm_upcast = 4, 0
    local_rows = rows_total // gpus
    rows = min(rollout_rows, local_rows) if rollout_rows else local_rows
    rollout = kv_cache_bytes(m, rows, tokens) + layer_bytes(m, rows * prompt_tokens) + 6 * rows * vocab * 4
    t = microbatch_tokens
    embed = kept_hidden_bytes(m, t, residual) + layer_bytes(m, t) + chunk * vocab * 4 + lm_upcast
    if checkpointing:
        activations = n_layers * t * hidden * residual + 2 * layer_bytes(m, t)
    else:
        activations = n_layers * (layer_bytes(m, t) + 3 * t * hidden * residual)
    train = activations + 2 * chunk * vocab * 4 + lm_grad + lm_upcast
    return {"rollout": state + sampling_weights + rollout, "embed": state + sampling_weights + embed,
            "train": state + grads + train_weights + train, "step": state + grads + adamw_temp}


def preset_phases(alias: str, recipe: str = "minigrace") -> tuple[object, dict[str, float]]:
    """(config, phases) of `python train.py --model ALIAS --recipe RECIPE` on one GPU."""
    from minigrace.config import parse_args

    cfg, _ = parse_args(["--model", alias, "--recipe", recipe])
    m = BACKBONES[ALIAS_BACKBONE[alias]]
    return cfg, phases(m, rollout_rows=cfg.rollout_rows, microbatch_tokens=cfg.max_tokens_per_microbatch,
                       checkpointing=cfg.grad_checkpointing, rows_total=cfg.batch_size * (cfg.group_size + 2),
                       prompt_tokens=cfg.max_prompt_len, tokens=cfg.max_prompt_len + cfg.max_new_tokens,
                       chunk=cfg.logprob_chunk, lora_r=cfg.lora_r, setup="lora" if cfg.lora_r else "full")


def presets_table() -> str:
    """Markdown: each GRACE backbone's model preset on one 80 GB GPU, GiB per phase."""
    lines = ["| `--model` | preset | rollout | embed | train | AdamW step | peak | without the preset |",
             "|---|---|---|---|---|---|---|---|"]
    for alias, name in ALIAS_BACKBONE.items():
        cfg, ph = preset_phases(alias)
        bare = phases(BACKBONES[name], rollout_rows=0, microbatch_tokens=GRACE["microbatch_tokens"],
                      checkpointing=False)
        preset = (f"`--rollout-rows {cfg.rollout_rows} --max-tokens-per-microbatch {cfg.max_tokens_per_microbatch}"
                  f"{' --grad-checkpointing' if cfg.grad_checkpointing else ''}`")
        lines.append(f"| {alias} | {preset} | " + " | ".join(f"{v / GiB:.1f}" for v in ph.values())
                     + f" | **{max(ph.values()) / GiB:.0f}** | {max(bare.values()) / GiB:.0f} |")
    return "\n".join(lines)


def table(backbones=("Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen3-4B"), rollout_rows: int = 64) -> str:
    """Markdown table: GiB per GPU at GRACE's sizes (micro-batches of 16384 tokens, checkpointing)."""
    setups = [("1 GPU", 1, "full"), ("4 GPU DDP", 4, "ddp"), ("4 GPU FSDP", 4, "fsdp"),
              ("4 GPU FSDP + offload", 4, "fsdp+offload"), ("1 GPU LoRA r=16", 1, "lora"),
              ("4 GPU FSDP LoRA r=16", 4, "lora+fsdp")]
    lines = [f"| backbone | setup | weights+grads+AdamW | rollout, all rows | rollout, --rollout-rows {rollout_rows} "
             f"| embed | train | AdamW step | peak: all rows / {rollout_rows} |", "|---|---|---|---|---|---|---|---|---|"]
    for name in backbones:
        m = BACKBONES[name]
        for label, gpus, setup in setups:
            kw = dict(microbatch_tokens=GRACE["microbatch_tokens"], setup=setup, gpus=gpus)
            every_row, bounded = phases(m, rollout_rows=0, **kw), phases(m, rollout_rows=rollout_rows, **kw)
            lines.append(f"| {name} ({n_params(m) / 1e9:.2f}B) | {label} | {state_bytes(m, gpus, setup) / GiB:.1f} | "
                         f"{every_row['rollout'] / GiB:.1f} | {bounded['rollout'] / GiB:.1f} | "
                         f"{bounded['embed'] / GiB:.1f} | {bounded['train'] / GiB:.1f} | {bounded['step'] / GiB:.1f} | "
                         f"{max(every_row.values()) / GiB:.0f} / {max(bounded.values()) / GiB:.0f} |")
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
    from minigrace.worlds.builtin import load_tiny
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
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the residual stream stays fp32
        hidden = model(input_ids=torch.randint(5, 500, (rows, tokens)), output_hidden_states=True).hidden_states
    out.append(("embed pass hidden states, bf16 autocast", kept_hidden_bytes(m, rows * tokens, 4),
                tensor_bytes(hidden)))
    return out


def fsdp_check() -> str:
    """Under torchrun: each rank's share of the full-training state after one step ≈ 16 B · params / N."""
    from torch.distributed.fsdp import fully_shard

    from minigrace import parallel
    from minigrace.worlds.builtin import load_tiny

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
    print(presets_table())
    print()
    print(table(tuple(BACKBONES)))
    print()
    for name, formula, measured in checks():
        print(f"tiny model: {name:<38} formula {formula:>12,.0f}   measured {measured:>12,}")
