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
  LoRA         a frozen base in the compute dtype (bf16: 2 B per parameter, nothing for autocast to copy)
               + 16 B per adapter parameter; the frozen lm_head gets no gradient buffer
Also counted: the embed pass's KV cache (use_cache), fp32 keys beside bf16 values under autocast, the held-out
eval (its own phase: up to 64 rows of greedy generation while the AdamW state is resident), the recomputed
layer's bf16 copies of fp32 norm outputs, vLLM's --vllm-gpu-memory share in the rollout phase only (sleep
mode; in every phase without it), and, as an option, FSDP2's unsharded fp32 gradient when gradient sync is
skipped between micro-batches (minigrace reduce-scatters every micro-batch instead).
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


def state_bytes(m: dict, gpus: int, setup: str, lora_r: int = 16, base_bytes: int = 2) -> float:
    """Weights + gradients + AdamW states on one GPU. LoRA's frozen base: `base_bytes` per parameter (bf16 when
    training under bf16 autocast, lora.base_dtype; fp32 on the fp32 CPU path)."""
    p = n_params(m)
    if setup.startswith("lora"):
        total = base_bytes * p + 16 * n_lora_params(m, lora_r)
    else:
        total = 16 * p
    if "offload" in setup:
        return 0.0
    return total / gpus if "fsdp" in setup else total


# Bytes per element of what a forward makes, by how it runs. 1 GPU / DDP: fp32 weights under bf16 autocast,
# whose residual stream stays fp32; rotary embedding multiplies the bf16 keys by fp32 cos/sin, so the KV
# cache holds fp32 keys beside bf16 values (measured: checks()). FSDP: bf16 compute weights, all bf16.
# CPU without autocast (the measured checks): all fp32.
AUTOCAST = dict(residual=4, act=2, key=4, value=2)
BF16 = dict(residual=2, act=2, key=2, value=2)
FP32 = dict(residual=4, act=4, key=4, value=4)
GPU_GIB = 79.6  # what an 80 GB H100 reports; --vllm-gpu-memory is a fraction of it
EVAL_ROWS = 64  # eval.heldout_retrieval's batch of greedy rationales (train.evaluate: at most --rollout-rows)
EVAL_PREFILL_TOKENS = 16384  # encode.embed_prompts: rows × longest prompt of one prefill, its default


def kv_cache_bytes(m: dict, rows: int, tokens: int, dt: dict = BF16) -> float:
    return rows * tokens * m["layers"] * m["kv_heads"] * m["head_dim"] * (dt["key"] + dt["value"])


def growing_kv_cache_bytes(m: dict, rows: int, tokens: int, dt: dict = BF16) -> float:
    """A decode loop's cache at its longest: each step concatenates a layer's cache into a new tensor, so one
    layer's cache exists twice for a moment (measured on CPU: rss_checks)."""
    return kv_cache_bytes(m, rows, tokens, dt) * (1 + 1 / m["layers"])


def layer_bytes(m: dict, tokens: int, dt: dict = BF16) -> float:
    """One decoder layer's activations over `tokens` tokens, as saved for its backward: the residual-stream
    tensors (the layer's input, its two norms' outputs, the mid-layer residual), the compute-dtype copies
    autocast makes of a norm's fp32 output for each linear that reads it (q, k, v; gate, up), q, k, v and the
    attention output, rotary's cos and sin, and the MLP's gate, up, activation and product. Without autocast
    the linears read the norms' outputs (weight × normed) themselves: 2 × hidden instead of 5 copies.
    (Checked against the tensors autograd saves, bf16 autocast and fp32: within 0.2%.)"""
    q, kv, h, i = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"], m["hidden"], m["intermediate"]
    linear_inputs = (5 if dt["residual"] != dt["act"] else 2) * h * dt["act"]
    rotary = 2 * m["head_dim"] * dt["residual"]
    return tokens * (4 * h * dt["residual"] + linear_inputs + (2 * q + 2 * kv) * dt["act"] + 4 * i * dt["act"] + rotary)


def layer_transient_bytes(m: dict, tokens: int, dt: dict = BF16) -> float:
    """One decoder layer's peak under no_grad: its input, its norm's output, and the MLP's activation, up
    projection and their product alive at once."""
    return tokens * (3 * m["hidden"] * dt["residual"] + 3 * m["intermediate"] * dt["act"])


def kept_hidden_bytes(m: dict, tokens: int, residual_bytes: int) -> float:
    """A forward's output_hidden_states: the embeddings' output + every layer's."""
    return (m["layers"] + 1) * tokens * m["hidden"] * residual_bytes


def sampling_bytes(m: dict, rows: int) -> float:
    """The sampler's [rows, vocab] fp32 buffers (logits, probabilities, sorted, cumulative, mask, noise)."""
    return 6 * rows * m["vocab"] * 4


def adamw_temporary_bytes(trainable: float, adamw: str) -> float:
    """torch's foreach AdamW makes one fp32 temporary per trainable parameter (the sqrt of exp_avg_sq);
    the fused one updates in place (measured on CPU: rss_checks)."""
    return {"foreach": 4 * trainable, "fused": 0.0}[adamw]


def phases(m: dict, *, rollout_rows: int, microbatch_tokens: int, checkpointing: bool = True, setup: str = "full",
           gpus: int = 1, lora_r: int = 16, rows_total: int = GRACE["rollout_rows"],
           prompt_tokens: int = GRACE["prompt_tokens"], tokens: int = GRACE["tokens"],
           chunk: int = GRACE["logprob_chunk"], adamw: str = "foreach", rollout: str = "hf",
           vllm_gpu_memory: float = 0.3, vllm_sleep: bool = True, eval_rows: int = EVAL_ROWS,
           fsdp_accumulate: str = "reduce-scatter", device: str = "cuda") -> dict[str, float]:
    """Bytes on one GPU in each phase of a step, and in the held-out eval. rollout_rows 0 = all of this GPU's
    rows at once. rollout: hf, or vllm (its --vllm-gpu-memory share of the GPU while it samples; in every phase
    when it does not sleep). fsdp_accumulate: reduce-scatter every micro-batch's gradients (parallel.gradient_sync),
    or "unsharded": set_requires_gradient_sync(False) keeps a full fp32 gradient until the last micro-batch."""
    p, vocab, hidden, n_layers = n_params(m), m["vocab"], m["hidden"], m["layers"]
    lora, fsdp, offload = setup.startswith("lora"), "fsdp" in setup, "offload" in setup
    trainable = n_lora_params(m, lora_r) if lora else p
    share = 0.0 if offload else (1 / gpus if fsdp else 1.0)
    base_bytes = 4 if device == "cpu" else 2  # LoRA's frozen base: in the compute dtype (lora.base_dtype)
    state = share * (12 * trainable + (base_bytes * p if lora else 0))  # weights + AdamW (+ the frozen base)
    grads = share * 4 * trainable
    lm_grad = 0 if lora else 4 * vocab * hidden
    if device == "cpu":  # fp32 throughout, no autocast copies (the measured checks: rss_checks)
        dt = FP32
        sampling_weights = train_weights = lm_upcast = 0
    elif fsdp:
        dt = BF16
        sampling_weights, train_weights = 2 * p, 2 * (2 * p / n_layers + vocab * hidden)
        lm_upcast = 4 * vocab * hidden
    else:  # autocast's bf16 copies of the trainable weights
        dt = AUTOCAST
        sampling_weights = train_weights = 0 if lora else 2 * p
        lm_upcast = 0
    unsharded_grads = 4 * trainable if fsdp and fsdp_accumulate == "unsharded" else 0.0
    vllm_awake = vllm_gpu_memory * GPU_GIB * GiB if rollout == "vllm" else 0.0
    vllm_asleep = vllm_awake if not vllm_sleep else 0.0
    local_rows = rows_total // gpus
    rows = min(rollout_rows, local_rows) if rollout_rows else local_rows
    if rollout == "vllm":  # the engine samples; the trainer streams it one parameter at a time, the largest
        largest = vocab * hidden  # the embedding: its bf16 copy (+ the fp32 gather under FSDP)
        rollout_bytes = vllm_awake + largest * (2 + (4 if fsdp else 0))
        sampling_weights_at_rollout = sampling_weights if fsdp else 0.0  # FSDP: full_weights is gathered already
    else:
        # the cache, + the prefill's layer transient or, later, the sampler's buffers (measured: not at once)
        rollout_bytes = growing_kv_cache_bytes(m, rows, tokens, dt) + max(
            layer_transient_bytes(m, rows * prompt_tokens, dt), sampling_bytes(m, rows))
        sampling_weights_at_rollout = sampling_weights
    t = microbatch_tokens
    # the embed pass, its forward: every layer's output kept, one layer's transient, the KV cache of the rows
    # after the shared system prompt (prefixed_forward runs with use_cache); then the last layer's output and
    # a [chunk, vocab] fp32 log-prob chunk; FSDP's lm_head upcast throughout
    embed_forward = (kept_hidden_bytes(m, t, dt["residual"]) + layer_transient_bytes(m, t, dt)
                     + kv_cache_bytes(m, 1, t, dt))
    embed_logprobs = t * hidden * dt["residual"] + chunk * vocab * 4
    embed = max(embed_forward, embed_logprobs) + lm_upcast
    if checkpointing:  # each layer's input + one layer recomputed, with its gradients
        activations = n_layers * t * hidden * dt["residual"] + 2 * layer_bytes(m, t, dt)
    else:  # every layer's activations; the shared-prefix forward keeps its KV cache (not under FSDP)
        activations = n_layers * layer_bytes(m, t, dt) + (0 if fsdp else kv_cache_bytes(m, 1, t, dt))
    train = activations + 2 * chunk * vocab * 4 + lm_grad + lm_upcast + unsharded_grads
    # held-out eval (train.evaluate): greedy rationales of eval_rows rows, the prefill's hidden states kept
    e_rows = min(eval_rows, rollout_rows) if rollout_rows else eval_rows
    prefill = min(e_rows * prompt_tokens, EVAL_PREFILL_TOKENS)
    evaluation = (growing_kv_cache_bytes(m, e_rows, tokens, dt) + kept_hidden_bytes(m, prefill, dt["residual"])
                  + max(layer_transient_bytes(m, prefill, dt), sampling_bytes(m, e_rows)))
    return {"rollout": state + sampling_weights_at_rollout + rollout_bytes,
            "embed": state + sampling_weights + embed + vllm_asleep,
            "train": state + grads + train_weights + train + vllm_asleep,
            "step": state + grads + share * adamw_temporary_bytes(trainable, adamw) + vllm_asleep,
            "eval": state + sampling_weights + evaluation + vllm_asleep}


def preset_phases(alias: str, recipe: str = "minigrace",
                  flags: tuple[str, ...] = ()) -> tuple[object, dict[str, float]]:
    """(config, phases) of `python train.py --model ALIAS --recipe RECIPE FLAGS` on one GPU."""
    from minigrace.config import parse_args

    cfg, _ = parse_args(["--model", alias, "--recipe", recipe, *flags])
    m = BACKBONES[ALIAS_BACKBONE[alias]]
    return cfg, phases(m, rollout_rows=cfg.rollout_rows, microbatch_tokens=cfg.max_tokens_per_microbatch,
                       checkpointing=cfg.grad_checkpointing, rows_total=cfg.batch_size * (cfg.group_size + 2),
                       prompt_tokens=cfg.max_prompt_len, tokens=cfg.max_prompt_len + cfg.max_new_tokens,
                       chunk=cfg.logprob_chunk, lora_r=cfg.lora_r, setup="lora" if cfg.lora_r else "full",
                       rollout=cfg.rollout, vllm_gpu_memory=cfg.vllm_gpu_memory)


def presets_table() -> str:
    """Markdown: each GRACE backbone's model preset on one 80 GB GPU, GiB per phase."""
    lines = ["| `--model` | preset | rollout | embed | train | AdamW step | held-out eval | peak "
             "| peak, --rollout vllm | without the preset |", "|---|---|---|---|---|---|---|---|---|---|"]
    for alias, name in ALIAS_BACKBONE.items():
        cfg, ph = preset_phases(alias)
        _, with_vllm = preset_phases(alias, flags=("--rollout", "vllm"))
        bare = phases(BACKBONES[name], rollout_rows=0, microbatch_tokens=GRACE["microbatch_tokens"],
                      checkpointing=False)
        preset = (f"`--rollout-rows {cfg.rollout_rows} --max-tokens-per-microbatch {cfg.max_tokens_per_microbatch}"
                  f"{' --grad-checkpointing' if cfg.grad_checkpointing else ''}`")
        lines.append(f"| {alias} | {preset} | " + " | ".join(f"{v / GiB:.1f}" for v in ph.values())
                     + f" | **{max(ph.values()) / GiB:.0f}** | {max(with_vllm.values()) / GiB:.0f} "
                     f"| {max(bare.values()) / GiB:.0f} |")
    return "\n".join(lines)


def table(backbones=("Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen3-4B"), rollout_rows: int = 64) -> str:
    """Markdown table: GiB per GPU at GRACE's sizes (micro-batches of 16384 tokens, checkpointing)."""
    setups = [("1 GPU", 1, "full"), ("4 GPU DDP", 4, "ddp"), ("4 GPU FSDP", 4, "fsdp"),
              ("4 GPU FSDP + offload", 4, "fsdp+offload"), ("1 GPU LoRA r=16", 1, "lora"),
              ("4 GPU FSDP LoRA r=16", 4, "lora+fsdp")]
    lines = [f"| backbone | setup | weights+grads+AdamW | rollout, all rows | rollout, --rollout-rows {rollout_rows} "
             f"| embed | train | AdamW step | held-out eval | peak: all rows / {rollout_rows} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in backbones:
        m = BACKBONES[name]
        for label, gpus, setup in setups:
            kw = dict(microbatch_tokens=GRACE["microbatch_tokens"], setup=setup, gpus=gpus)
            every_row, bounded = phases(m, rollout_rows=0, **kw), phases(m, rollout_rows=rollout_rows, **kw)
            lines.append(f"| {name} ({n_params(m) / 1e9:.2f}B) | {label} | {state_bytes(m, gpus, setup) / GiB:.1f} | "
                         f"{every_row['rollout'] / GiB:.1f} | {bounded['rollout'] / GiB:.1f} | "
                         f"{bounded['embed'] / GiB:.1f} | {bounded['train'] / GiB:.1f} | {bounded['step'] / GiB:.1f} | "
                         f"{bounded['eval'] / GiB:.1f} | "
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
    out.append(("LoRA r=8 state bytes", state_bytes(m, 1, "lora", 8, base_bytes=4),  # an fp32 base on CPU
                measured_state(lora_model, optimizer)))
    rows, tokens = 6, 40
    with torch.no_grad():
        cache = _cache(model(input_ids=torch.randint(5, 500, (rows, tokens)), use_cache=True))
    kv = sum(tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    out.append(("KV cache bytes, fp32", kv_cache_bytes(m, rows, tokens, FP32), kv))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 keys (rotary), bf16 values
        cache = _cache(model(input_ids=torch.randint(5, 500, (rows, tokens)), use_cache=True))
    kv = sum(tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    out.append(("KV cache bytes, bf16 autocast", kv_cache_bytes(m, rows, tokens, AUTOCAST), kv))
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


# ---------------------------------------------------------------------------------------------
# Measured on CPU: each phase's peak RSS growth against phases(device="cpu"), one fresh process per phase.
# A Qwen2 model (the tiny model's architecture) widened so that every phase's term is ≥ 50 MB: the tiny model
# itself (0.3M parameters) would drown in allocator noise. Random weights: memory does not depend on them.

MEASURED_SHAPE = dict(layers=4, hidden=256, intermediate=768, heads=4, kv_heads=2, head_dim=64, vocab=65536,
                      qkv_bias=True, qk_norm=False)
MEASURED_SIZES = dict(rollout_rows=32, prompt_tokens=256, new_tokens=32, microbatch_tokens=4096, chunk=256)
RSS_TOLERANCE = 0.25  # measured within ±25% of predicted, ± 8 MB (allocator and page granularity)
PAGE_SLACK = 8 * 2**20


def measured_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = MEASURED_SHAPE
    config = Qwen2Config(num_hidden_layers=m["layers"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
                         num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"],
                         vocab_size=m["vocab"], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_since_reset() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": the peak RSS (VmHWM) restarts at the current RSS
        f.write("5")


def fake_rollouts(rows: int, prompt: int, new: int):
    """Rows of random tokens that share their first 4 (a system prompt) and pool from there on."""
    from minigrace.rollout import Rollouts

    width = prompt + new
    ids = torch.randint(5, MEASURED_SHAPE["vocab"], (rows, width))
    ids[:, :4] = ids[0, :4]
    columns = torch.arange(width)[None].expand(rows, -1)
    return Rollouts(ids, torch.ones_like(ids), columns >= prompt, columns >= 4, torch.zeros(rows, dtype=torch.bool),
                    torch.zeros(rows, dtype=torch.bool), prompt)


def measure_phases() -> list[tuple[str, float, int]]:
    """(phase, predicted, measured): each phase's growth of this process's peak RSS over what it starts with
    (the fp32 weights and AdamW's states; + the gradients, for the AdamW step), one phase after the other."""
    import gc

    from minigrace.embed import forward_rollouts, prefixed_forward, split_prefix, trim
    from minigrace.loss import response_logprobs
    from minigrace.prompts import ChatPrompt
    from minigrace.rollout import generate

    torch.set_num_threads(1)
    z = MEASURED_SIZES
    p = n_params(MEASURED_SHAPE)
    model = measured_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(5, 500, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # AdamW's states exist from here on
    optimizer.zero_grad(set_to_none=True)
    predicted = phases(MEASURED_SHAPE, rollout_rows=z["rollout_rows"], microbatch_tokens=z["microbatch_tokens"],
                       checkpointing=False, rows_total=z["rollout_rows"], prompt_tokens=z["prompt_tokens"],
                       tokens=z["prompt_tokens"] + z["new_tokens"], chunk=z["chunk"], device="cpu")
    state = predicted["step"] - 4 * p - adamw_temporary_bytes(p, "foreach")  # weights + AdamW
    rows = fake_rollouts(z["microbatch_tokens"] // (z["prompt_tokens"] + z["new_tokens"]), z["prompt_tokens"],
                         z["new_tokens"])
    out = []

    def measured(name: str, run, before: float, expected: float) -> None:
        gc.collect()
        start = rss_now()
        reset_rss_peak()
        run()
        out.append((name, expected - before, rss_peak_since_reset() - start))

    def rollout():
        prompts = [ChatPrompt(rows.ids[0, :z["prompt_tokens"]].tolist(), 4, False) for _ in range(z["rollout_rows"])]
        with torch.no_grad():
            generate(model, prompts, torch.ones(len(prompts)), max_new_tokens=z["new_tokens"], eos_ids=[-1], pad_id=0,
                     noise=torch.rand(len(prompts), z["new_tokens"]))

    def embed():
        forward_rollouts(model, rows, z["microbatch_tokens"], z["chunk"])

    def train():  # step.micro_batch_loss without checkpointing: the prefix runs once, rows continue from its cache
        model.train()
        prefix, positions, rest = split_prefix(rows, share=True)
        part, cols = trim(rest)
        hidden = prefixed_forward(model, prefix, part, positions[:, cols])
        lm_head = model.get_output_embeddings().weight
        response_logprobs(hidden, lm_head, part.ids, part.response_mask, z["chunk"]).sum().backward()

    measured("rollout", rollout, state, predicted["rollout"])
    measured("embed", embed, state, predicted["embed"])
    measured("train", train, state, predicted["train"])
    measured("step (foreach AdamW)", optimizer.step, predicted["step"] - adamw_temporary_bytes(p, "foreach"),
             predicted["step"])
    return out


def rss_checks() -> list[tuple[str, float, int]]:
    """(phase, predicted, measured) bytes, measured in a fresh process (its peak RSS is the phases' own)."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**17)}  # big buffers go back to the OS when freed, not to a heap
    done = subprocess.run([sys.executable, __file__, "--measure"], env=env, capture_output=True, text=True, check=True)
    return [tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


if __name__ == "__main__" and "--measure" in sys.argv:
    import json

    print(json.dumps(measure_phases()))
    sys.exit(0)

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
