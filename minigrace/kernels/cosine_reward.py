"""GRACE reward components from embeddings (see grace.md section 2).

Rollout i belongs to group g = i // G; q_i is its query, qrep_g the query of group g, d_i its document
embedding, n_g the group's negative. All cosines in fp32, cos(a, b) = a.b / (max|a|, eps)(max|b|, eps).

  positive_i       = cos(q_i, d_i)
  negative_i       = -cos(qrep_g, n_g)                        (supervised with negatives, else 0)
  consistency_i    = mean_{j in g, j != i} cos(d_i, d_j)
  cross_group_i    = -mean_{g' != g} max_{j in g'} cos(q_i, d_j)     (supervised)
                   = -mean_{g' != g} cos(d_i, qrep_g')               (unsupervised)
  discriminative_i = log_softmax_{g'}(cos(d_i, qrep_g') / tau)[g]
  total_i = (w_pos pos + w_neg neg + w_cons cons + w_cross cross) / tau + w_disc disc

Triton path: one launch, one program per block of BLOCK_M rollouts. A program streams tiles of
documents / queries and gets the cosines from tensor-core dot products (tl.dot, fp32 accumulation; fp32
inputs use 3xTF32, as accurate as fp32), with the norms from the same tiles:
  1. row terms     q_i.d_i, |q_i|, |d_i|, qrep_g.n_g        -> positive, negative
  2. own groups    D_blk D_own^T                            -> consistency (a tile or two)
  3. all queries   D_blk Qrep^T, online log-sum-exp          -> discriminative (+ unsupervised cross_group)
  4. all documents Q_blk D^T, max over each group's columns  -> supervised cross_group
Every sum is finished in registers at the end: no [N, N] matrix in global memory, no atomics.
"""
from dataclasses import dataclass

import torch

from .dispatch import INTERPRET, device_guard, jit, kernel_backend, next_pow2, tl

REWARD_COMPONENTS = ("positive", "negative", "consistency", "cross_group", "discriminative")
COS_EPS = 1e-8  # as torch.nn.functional.cosine_similarity
MODES = ("supervised", "unsupervised")


@dataclass(frozen=True)
class RewardWeights:
    positive: float = 1.0
    negative: float = 1.0
    consistency: float = 0.2
    cross_group: float = 0.2
    discriminative: float = 0.0


def _check_inputs(doc_emb, query_emb, neg_emb, group_size, tau, mode):
    """Validate shapes; return (P, G)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if doc_emb.dim() != 2:
        raise ValueError(f"doc_emb must be [P*G, H], got shape {tuple(doc_emb.shape)}")
    N, H = doc_emb.shape
    G = int(group_size)
    if G < 1 or N == 0 or N % G != 0:
        raise ValueError(f"doc_emb has {N} rows, not a positive multiple of group_size={group_size}")
    P = N // G
    if query_emb.dim() != 2 or query_emb.shape[1] != H or query_emb.shape[0] not in (N, P):
        raise ValueError(f"query_emb must be [{N}, {H}] or [{P}, {H}] (P*G or P rows), got {tuple(query_emb.shape)}")
    if neg_emb is not None and tuple(neg_emb.shape) != (P, H):
        raise ValueError(f"neg_emb must be [P, H] = [{P}, {H}], got {tuple(neg_emb.shape)}")
    for name, t in (("query_emb", query_emb), ("neg_emb", neg_emb)):
        if t is not None and t.device != doc_emb.device:
            raise ValueError(f"{name} is on {t.device}, doc_emb on {doc_emb.device}")
    return P, G


def _total(parts, weights, tau):
    w = weights
    scaled = (w.positive * parts["positive"] + w.negative * parts["negative"]
              + w.consistency * parts["consistency"] + w.cross_group * parts["cross_group"])
    return scaled / tau + w.discriminative * parts["discriminative"]


# ----------------------------------------------------------------------------- reference (the specification)
@torch.no_grad()
def grace_reward_reference(doc_emb, query_emb, neg_emb, group_size, tau, weights=RewardWeights(), mode="supervised"):
    P, G = _check_inputs(doc_emb, query_emb, neg_emb, group_size, tau, mode)
    N = P * G

    def unit(x):  # cos(a, b) = unit(a) . unit(b)
        x = x.float()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)

    d = unit(doc_emb)  # [N, H]
    q = unit(query_emb)
    q_roll = q if q.shape[0] == N else q.repeat_interleave(G, 0)  # [N, H] query of each rollout
    q_rep = q_roll[::G]  # [P, H] query of each group
    group = torch.arange(N, device=d.device) // G  # [N]
    other_group = group[:, None] != torch.arange(P, device=d.device)[None, :]  # [N, P]
    zeros = torch.zeros(N, device=d.device)

    positive = (q_roll * d).sum(-1)
    if neg_emb is None or mode == "unsupervised":
        negative = zeros
    else:
        negative = -(q_rep * unit(neg_emb)).sum(-1).repeat_interleave(G)

    if G > 1:
        d_grouped = d.view(P, G, -1)
        doc_doc = d_grouped @ d_grouped.transpose(1, 2)  # [P, G, G]
        not_self = ~torch.eye(G, dtype=torch.bool, device=d.device)
        consistency = (doc_doc * not_self).sum(-1).flatten() / (G - 1)
    else:
        consistency = zeros

    doc_query = d @ q_rep.T  # [N, P] cos(d_i, qrep_g')
    if P > 1:
        if mode == "supervised":
            per_group = (q_roll @ d.T).view(N, P, G).amax(-1)  # [N, P] max_j cos(q_i, d_j), j in g'
        else:
            per_group = doc_query
        cross_group = -(per_group * other_group).sum(-1) / (P - 1)
        discriminative = torch.log_softmax(doc_query / tau, dim=-1).gather(1, group[:, None]).squeeze(1)
    else:
        cross_group = discriminative = zeros

    parts = dict(positive=positive, negative=negative, consistency=consistency,
                 cross_group=cross_group, discriminative=discriminative)
    return _total(parts, weights, tau), parts


# ----------------------------------------------------------------------------- Triton kernel
@jit
def _row_dots(x_ptr, x_rows, y_ptr, y_rows, ok, H, BLOCK_K: tl.constexpr):
    """Row by row: (x.y, |x|^2, |y|^2), each [BLOCK_M], of rows x_rows of X [*, H] and y_rows of Y [*, H]."""
    x_base = x_ptr + x_rows.to(tl.int64)[:, None] * H  # [BLOCK_M, 1]
    y_base = y_ptr + y_rows.to(tl.int64)[:, None] * H
    xy = tl.zeros([x_rows.shape[0], BLOCK_K], dtype=tl.float32)  # summed over K once, after the loop
    xx = tl.zeros([x_rows.shape[0], BLOCK_K], dtype=tl.float32)
    yy = tl.zeros([x_rows.shape[0], BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        tile_ok = ok[:, None] & (k < H)[None, :]
        x = tl.load(x_base + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        y = tl.load(y_base + k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        xy += x * y
        xx += x * x
        yy += y * y
    return tl.sum(xy, axis=1), tl.sum(xx, axis=1), tl.sum(yy, axis=1)


@jit
def _dot_tile(a_ptr, a_rows, a_ok, b_ptr, b_rows, b_ok, H,
              BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """A[a_rows] B[b_rows]^T [BLOCK_A, BLOCK_B] (fp32 accumulation) and _inv_norm(|B[b_rows]|^2) [BLOCK_B]."""
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * H  # [BLOCK_A, 1]
    b_base = b_ptr + b_rows.to(tl.int64)[:, None] * H  # [BLOCK_B, 1]
    dots = tl.zeros([a_rows.shape[0], b_rows.shape[0]], dtype=tl.float32)
    sq_b = tl.zeros([b_rows.shape[0]], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + k[None, :], mask=a_ok[:, None] & (k < H)[None, :], other=0.0)  # [BLOCK_A, BLOCK_K]
        b = tl.load(b_base + k[None, :], mask=b_ok[:, None] & (k < H)[None, :], other=0.0)  # [BLOCK_B, BLOCK_K]
        if DOT_FP32:  # fp32 inputs (and the interpreter, whose bf16 dot is wrong); bf16/fp16 go to the MMA as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        dots = tl.dot(a, tl.trans(b), dots, input_precision=PRECISION)
        b32 = b.to(tl.float32)
        sq_b += tl.sum(b32 * b32, axis=1)
    return dots, _inv_norm(sq_b)


@jit
def _inv_norm(sq):
    return 1.0 / tl.maximum(tl.sqrt(sq), 1e-8)  # 1e-8 = COS_EPS: cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))


@jit
def _grace_reward_kernel(
    doc_ptr, query_ptr, neg_ptr, out_ptr,  # [N, H], [N or P, H], [P, H] or None, [6, N] fp32 (total + 5 parts)
    N, P, G, H, inv_tau,
    w_pos, w_neg, w_cons, w_cross, w_disc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, GROUPS: tl.constexpr,
    QUERY_PER_ROLLOUT: tl.constexpr, HAS_NEG: tl.constexpr, SUPERVISED: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)  # [BLOCK_M] this program's rollouts
    row_ok = rows < N
    group = rows // G  # [BLOCK_M]
    q_rows = rows if QUERY_PER_ROLLOUT else group  # query of each rollout
    inf = float("inf")

    # 1. row terms: positive = cos(q_i, d_i), negative = -cos(qrep_g, n_g)
    qd, sq_q, sq_d = _row_dots(query_ptr, q_rows, doc_ptr, rows, row_ok, H, BLOCK_K)
    inv_q = _inv_norm(sq_q)
    inv_d = _inv_norm(sq_d)
    positive = qd * inv_q * inv_d
    negative = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NEG:
        qrep_row = group * G if QUERY_PER_ROLLOUT else group  # qrep_g = the query of the group's first rollout
        qn, sq_qr, sq_n = _row_dots(query_ptr, qrep_row, neg_ptr, group, row_ok, H, BLOCK_K)
        negative = -qn * _inv_norm(sq_qr) * _inv_norm(sq_n)

    # 2. consistency: cosines with the other members of the own group, columns [own_lo, own_hi)
    own_lo = (first // G) * G
    own_hi = tl.minimum((tl.minimum(first + BLOCK_M, N) - 1) // G * G + G, N)
    cons_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(own_lo, own_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        dd, inv_dj = _dot_tile(doc_ptr, rows, row_ok, doc_ptr, cols, cols < own_hi, H, BLOCK_K, DOT_FP32, PRECISION)
        mate = (cols[None, :] // G == group[:, None]) & (cols[None, :] != rows[:, None]) & (cols < own_hi)[None, :]
        cons_sum += tl.sum(tl.where(mate, dd * inv_d[:, None] * inv_dj[None, :], 0.0), axis=1)
    consistency = cons_sum / tl.maximum(G - 1, 1)  # 0 when G == 1

    # 3. cos(d_i, qrep_g') for all groups g': online log-sum-exp of the logits cos / tau
    logit_max = tl.full([BLOCK_M], -inf, dtype=tl.float32)
    exp_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cos_own = tl.zeros([BLOCK_M], dtype=tl.float32)  # cos(d_i, qrep_g), g the own group
    cross_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_N):
        groups = p0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        g_ok = groups < P
        qrep_rows = groups * G if QUERY_PER_ROLLOUT else groups
        dq, inv_qr = _dot_tile(doc_ptr, rows, row_ok, query_ptr, qrep_rows, g_ok, H, BLOCK_K, DOT_FP32, PRECISION)
        cos = dq * inv_d[:, None] * inv_qr[None, :]  # [BLOCK_M, BLOCK_N]
        logit = tl.where(g_ok[None, :], cos * inv_tau, -inf)
        new_max = tl.maximum(logit_max, tl.max(logit, axis=1))
        exp_sum = exp_sum * tl.exp(logit_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        logit_max = new_max
        own = groups[None, :] == group[:, None]
        cos_own += tl.sum(tl.where(own, cos, 0.0), axis=1)
        if not SUPERVISED:
            cross_sum += tl.sum(tl.where(g_ok[None, :] & ~own, cos, 0.0), axis=1)
    discriminative = cos_own * inv_tau - (logit_max + tl.log(exp_sum))  # exactly 0 when P == 1

    # 4. supervised: max_{j in g'} cos(q_i, d_j). A tile holds GROUPS whole groups, each padded to BLOCK_G columns.
    if SUPERVISED:
        slot = tl.arange(0, GROUPS * BLOCK_G)
        member = slot % BLOCK_G
        for p0 in range(0, P, GROUPS):
            groups = p0 + slot // BLOCK_G
            cols_ok = (member < G) & (groups < P)
            qd_all, inv_dj = _dot_tile(query_ptr, q_rows, row_ok, doc_ptr, groups * G + member, cols_ok, H,
                                       BLOCK_K, DOT_FP32, PRECISION)
            cos = tl.where(cols_ok[None, :], qd_all * inv_q[:, None] * inv_dj[None, :], -inf)
            best = tl.max(tl.reshape(cos, [BLOCK_M, GROUPS, BLOCK_G]), axis=2)  # [BLOCK_M, GROUPS]
            tile_groups = p0 + tl.arange(0, GROUPS)
            other = (tile_groups < P)[None, :] & (tile_groups[None, :] != group[:, None])
            cross_sum += tl.sum(tl.where(other, best, 0.0), axis=1)
    cross_group = -cross_sum / tl.maximum(P - 1, 1)  # 0 when P == 1

    total = (w_pos * positive + w_neg * negative + w_cons * consistency + w_cross * cross_group) * inv_tau \
        + w_disc * discriminative
    tl.store(out_ptr + rows, total, mask=row_ok)
    tl.store(out_ptr + N + rows, positive, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, negative, mask=row_ok)
    tl.store(out_ptr + 3 * N + rows, consistency, mask=row_ok)
    tl.store(out_ptr + 4 * N + rows, cross_group, mask=row_ok)
    tl.store(out_ptr + 5 * N + rows, discriminative, mask=row_ok)


MAX_GROUP = 128  # larger groups widen the supervised tile past the register file: the reference runs
LARGE_N = 4096  # above it, 32 rollouts per program


def _reward_blocks(N, G, dtype):
    """Launch sizes. BLOCK_M rollouts per program: 16 keeps more SMs busy at GRACE sizes (N = 512 -> 32
    programs); 32 halves the L2 traffic (each program streams all N documents) once N is large.
    Supervised tiles hold GROUPS groups of BLOCK_G = next_pow2(G) columns (>= BLOCK_N columns in all).
    8 warps: fewer registers per thread (sm_90, fp32 3xTF32, G = 8: 156 instead of 178)."""
    BLOCK_N, BLOCK_G = 64, next_pow2(G)
    return dict(BLOCK_M=16 if N <= LARGE_N else 32, BLOCK_N=BLOCK_N, BLOCK_K=32 if dtype == torch.float32 else 64,
                BLOCK_G=BLOCK_G, GROUPS=max(BLOCK_N // BLOCK_G, 1), num_warps=8)



def _grace_reward_triton(doc_emb, query_emb, neg_emb, P, G, tau, weights, mode):
    N, H = doc_emb.shape
    has_neg = neg_emb is not None and mode == "supervised"
    dtype = torch.promote_types(doc_emb.dtype, query_emb.dtype)  # one dtype for the dot products
    dtype = torch.promote_types(dtype, neg_emb.dtype) if has_neg else dtype
    doc, query = doc_emb.to(dtype).contiguous(), query_emb.to(dtype).contiguous()  # no-ops in the trainer
    neg = neg_emb.to(dtype).contiguous() if has_neg else None
    out = torch.empty((6, N), device=doc.device, dtype=torch.float32)
    blocks = _reward_blocks(N, G, doc.dtype)
    w = weights
    dot_fp32 = doc.dtype == torch.float32 or INTERPRET
    with device_guard(doc):
        _grace_reward_kernel[((N + blocks["BLOCK_M"] - 1) // blocks["BLOCK_M"],)](
            doc, query, neg, out, N, P, G, H, 1.0 / tau,
            w.positive, w.negative, w.consistency, w.cross_group, w.discriminative,
            **blocks, QUERY_PER_ROLLOUT=query.shape[0] == N, HAS_NEG=has_neg, SUPERVISED=mode == "supervised",
            DOT_FP32=dot_fp32, PRECISION="ieee" if INTERPRET else "tf32x3",
        )
    return out[0], dict(zip(REWARD_COMPONENTS, out[1:]))


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
def grace_reward(doc_emb, query_emb, neg_emb, group_size: int, tau: float,
                 weights: RewardWeights = RewardWeights(), mode: str = "supervised"):
    """GRACE rewards for P groups of G rollouts -> (total fp32 [P*G], {component: fp32 [P*G]}).

    doc_emb [P*G, H]; query_emb [P*G, H] or [P, H] (shared by the group); neg_emb [P, H] or None.
    Components are raw (unweighted, unscaled); see the module docstring for the formulas. Groups larger
    than MAX_GROUP = 128 take the torch reference on every device.
    """
    P, G = _check_inputs(doc_emb, query_emb, neg_emb, group_size, tau, mode)
    if kernel_backend(doc_emb, query_emb, neg_emb) == "torch" or G > MAX_GROUP:
        return grace_reward_reference(doc_emb, query_emb, neg_emb, G, tau, weights, mode)
    return _grace_reward_triton(doc_emb, query_emb, neg_emb, P, G, float(tau), weights, mode)
