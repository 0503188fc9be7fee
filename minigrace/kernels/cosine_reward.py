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

Triton path: two launches, no host sync, no atomics (see "Triton kernels" below). The cosines with the
queries are one product C = D Q^T [N, NQ] (NQ = P query rows, or N), tiled over a 2-D grid of (whole groups,
query columns): each query is met once per group, not once per rollout. The in-group doc-doc cosines come from
each program's D_blk D_blk^T, whose diagonal also gives the document norms; the query norms are summed over K
once, after the K loop. A second, small kernel combines the column blocks' partial sums per rollout.
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


# ----------------------------------------------------------------------------- Triton kernels
# Every cosine the formulas need, except the in-group doc-doc ones, is an entry of one product
#   C = D Q^T   [N, NQ],   C[i, c] = cos(d_i, q_c),   Q = query_emb (NQ = P rows, or N: one query per rollout)
# positive_i = C[i, query(i)], the logits of discriminative are C[i, rep(g')] / tau (rep(g') = the query row of
# group g'), and supervised cross_group needs, for each query column c, the max of C[j, c] over the rows j of
# every other group. With one query per group that product is [N, P]: each query is seen once per group, not
# once per rollout. The consistency cosines are the off-diagonal in-group entries of D_blk D_blk^T, whose
# diagonal gives |d_i|^2: no separate norm pass over the documents.
#
# 1. _reward_tile_kernel, grid (row blocks, column blocks): a program takes GROUPS_M whole groups (each padded
#    to BLOCK_G row slots) against BLOCK_C query columns, streams H once, and writes the partial sums of its tile.
# 2. _reward_finish_kernel, grid (N / BLOCK_R,): combines the column blocks' partials per rollout (log-sum-exp,
#    sums over groups) and writes total, cross_group and discriminative. Two launches, no host sync, no atomics:
#    the result is deterministic.
@jit
def _inv_norm(sq):
    return 1.0 / tl.maximum(tl.sqrt(sq), 1e-8)  # 1e-8 = COS_EPS: cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))


@jit
def _reward_tile_kernel(
    doc_ptr, query_ptr, neg_ptr,  # [N, H], [NQ, H], [P, H] or None: one dtype
    out_ptr,  # [6, N] fp32: this kernel writes row 1 (positive), 2 (negative), 3 (consistency)
    row_stats_ptr,  # [3, CB, N] fp32 (CB column blocks): logit max, sum of exp(logit - max), other-group cos sum
    own_ptr,  # [N] fp32: cos(d_i, q_rep(g)), g the own group
    group_max_ptr,  # [P, NQ] fp32: max over the rows j of group g' of cos(d_j, q_c)   (supervised)
    N, P, G, NQ, H, inv_tau,
    BLOCK_G: tl.constexpr, GROUPS_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, QUERY_PER_ROLLOUT: tl.constexpr, HAS_NEG: tl.constexpr, SUPERVISED: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    # rows: GROUPS_M groups, BLOCK_G slots each (slots past G are padding, masked)
    slot = tl.arange(0, BLOCK_M)
    group = pid_m * GROUPS_M + slot // BLOCK_G  # [BLOCK_M]
    row_ok = (slot % BLOCK_G < G) & (group < P)
    rows = group * G + slot % BLOCK_G  # [BLOCK_M] rollout index
    # columns: BLOCK_C query rows
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < NQ
    if QUERY_PER_ROLLOUT:  # query row c belongs to group c // G and represents it when c % G == 0
        col_group, col_is_rep = cols // G, col_ok & (cols % G == 0)
        my_query, my_rep = rows, group * G
    else:
        col_group, col_is_rep = cols, col_ok
        my_query, my_rep = group, group

    # The K loop: per step, a [BLOCK_M, BLOCK_K] tile of documents and a [BLOCK_C, BLOCK_K] tile of queries,
    # each read once from global memory (L2 after the first program) and fed to the tensor cores twice (C, Gram).
    # The only CUDA-core work is the queries' squares, summed over K once after the loop.
    doc_rows = doc_ptr + rows.to(tl.int64)[:, None] * H  # [BLOCK_M, 1] row starts
    query_rows = query_ptr + cols.to(tl.int64)[:, None] * H  # [BLOCK_C, 1]
    dots = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # d_i . q_c
    gram = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)  # d_i . d_j
    sq_query = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)  # |q_c|^2, before the sum over K
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(doc_rows + k[None, :], mask=row_ok[:, None] & (k < H)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        q = tl.load(query_rows + k[None, :], mask=col_ok[:, None] & (k < H)[None, :], other=0.0)  # [BLOCK_C, BLOCK_K]
        if DOT_FP32:  # fp32 inputs (and the interpreter, whose bf16 dot is wrong); bf16/fp16 go to the MMA as is
            d = d.to(tl.float32)
            q = q.to(tl.float32)
        dots = tl.dot(d, tl.trans(q), dots, input_precision=PRECISION)
        gram = tl.dot(d, tl.trans(d), gram, input_precision=PRECISION)
        q32 = q.to(tl.float32)
        sq_query += q32 * q32

    same_slot = slot[:, None] == slot[None, :]  # [BLOCK_M, BLOCK_M]
    inv_d = _inv_norm(tl.sum(tl.where(same_slot, gram, 0.0), axis=1))  # [BLOCK_M] from the Gram diagonal
    inv_q = _inv_norm(tl.sum(sq_query, axis=1))  # [BLOCK_C]
    cos = dots * inv_d[:, None] * inv_q[None, :]  # [BLOCK_M, BLOCK_C] cos(d_i, q_c)

    # positive and the own-group cosine: the one column block holding the row's column stores it
    col_lo = pid_c * BLOCK_C
    positive = tl.sum(tl.where(cols[None, :] == my_query[:, None], cos, 0.0), axis=1)
    here = row_ok & (my_query >= col_lo) & (my_query < col_lo + BLOCK_C)
    tl.store(out_ptr + N + rows, positive, mask=here)
    own = tl.sum(tl.where(cols[None, :] == my_rep[:, None], cos, 0.0), axis=1)
    here = row_ok & (my_rep >= col_lo) & (my_rep < col_lo + BLOCK_C)
    tl.store(own_ptr + rows, own, mask=here)

    # discriminative: this block's share of the log-sum-exp over the groups' logits cos(d_i, q_rep(g')) / tau
    logit = tl.where(col_is_rep[None, :], cos * inv_tau, -float("inf"))
    logit_max = tl.max(logit, axis=1)  # [BLOCK_M], -inf when the block holds no representative
    exp_sum = tl.sum(tl.exp(logit - tl.where(logit_max == -float("inf"), 0.0, logit_max)[:, None]), axis=1)
    CB = tl.num_programs(1)
    stats = row_stats_ptr + pid_c * N + rows  # [BLOCK_M] pointers into [3, CB, N]
    tl.store(stats, logit_max, mask=row_ok)
    tl.store(stats + CB * N, exp_sum, mask=row_ok)
    if SUPERVISED:  # max_{j in g'} cos(q_c, d_j) for this block's groups g' and columns c -> group_max[g', c]
        cos_rows = tl.where(row_ok[:, None], cos, -float("inf"))
        best = tl.max(tl.reshape(cos_rows, [GROUPS_M, BLOCK_G, BLOCK_C]), axis=1)  # [GROUPS_M, BLOCK_C]
        block_groups = pid_m * GROUPS_M + tl.arange(0, GROUPS_M)
        tl.store(group_max_ptr + block_groups[:, None] * NQ + cols[None, :], best,
                 mask=(block_groups < P)[:, None] & col_ok[None, :])
    else:  # unsupervised cross_group: sum of cos(d_i, q_rep(g')) over the other groups g' in this block
        other = col_is_rep[None, :] & (col_group[None, :] != group[:, None])
        tl.store(stats + 2 * CB * N, tl.sum(tl.where(other, cos, 0.0), axis=1), mask=row_ok)

    if pid_c == 0:  # the per-row terms that need no query column: one column block writes them
        mate = (group[:, None] == group[None, :]) & ~same_slot & row_ok[None, :]
        cos_mates = tl.where(mate, gram * inv_d[:, None] * inv_d[None, :], 0.0)  # [BLOCK_M, BLOCK_M]
        consistency = tl.sum(cos_mates, axis=1) / tl.maximum(G - 1, 1)  # 0 when G == 1
        tl.store(out_ptr + 3 * N + rows, consistency, mask=row_ok)
        # negative = -cos(q_rep(g), n_g): a row dot per group, GROUPS_M rows of queries and negatives
        block_groups = pid_m * GROUPS_M + tl.arange(0, GROUPS_M)
        negative = tl.zeros([GROUPS_M], dtype=tl.float32)
        if HAS_NEG:
            groups_ok = block_groups < P
            rep_rows = block_groups * G if QUERY_PER_ROLLOUT else block_groups
            rep_start = query_ptr + rep_rows.to(tl.int64)[:, None] * H  # [GROUPS_M, 1]
            neg_start = neg_ptr + block_groups.to(tl.int64)[:, None] * H
            qn = tl.zeros([GROUPS_M, BLOCK_K], dtype=tl.float32)  # summed over K after the loop
            qq = tl.zeros([GROUPS_M, BLOCK_K], dtype=tl.float32)
            nn = tl.zeros([GROUPS_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                ok = groups_ok[:, None] & (k < H)[None, :]
                qr = tl.load(rep_start + k[None, :], mask=ok, other=0.0).to(tl.float32)  # [GROUPS_M, BLOCK_K]
                ng = tl.load(neg_start + k[None, :], mask=ok, other=0.0).to(tl.float32)
                qn += qr * ng
                qq += qr * qr
                nn += ng * ng
            negative = -tl.sum(qn, axis=1) * _inv_norm(tl.sum(qq, axis=1)) * _inv_norm(tl.sum(nn, axis=1))
        members = tl.arange(0, BLOCK_G)
        neg_rows = block_groups[:, None] * G + members[None, :]  # [GROUPS_M, BLOCK_G]
        tl.store(out_ptr + 2 * N + neg_rows, tl.broadcast_to(negative[:, None], [GROUPS_M, BLOCK_G]),
                 mask=(block_groups < P)[:, None] & (members < G)[None, :])


@jit
def _reward_finish_kernel(
    out_ptr, row_stats_ptr, own_ptr, group_max_ptr,  # as in _reward_tile_kernel
    N, P, G, NQ, CB, inv_tau,
    w_pos, w_neg, w_cons, w_cross, w_disc,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, QUERY_PER_ROLLOUT: tl.constexpr, SUPERVISED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    ok = rows < N
    group = rows // G

    # log-sum-exp over the column blocks: block 0 always holds a representative (column 0), so its max is finite
    logit_max = tl.load(row_stats_ptr + rows, mask=ok, other=0.0)
    exp_sum = tl.load(row_stats_ptr + CB * N + rows, mask=ok, other=1.0)
    cross_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    if not SUPERVISED:
        cross_sum = tl.load(row_stats_ptr + 2 * CB * N + rows, mask=ok, other=0.0)
    for b in range(1, CB):
        block_max = tl.load(row_stats_ptr + b * N + rows, mask=ok, other=-float("inf"))
        block_sum = tl.load(row_stats_ptr + (CB + b) * N + rows, mask=ok, other=0.0)
        new_max = tl.maximum(logit_max, block_max)
        exp_sum = exp_sum * tl.exp(logit_max - new_max) + block_sum * tl.exp(block_max - new_max)
        logit_max = new_max
        if not SUPERVISED:
            cross_sum += tl.load(row_stats_ptr + (2 * CB + b) * N + rows, mask=ok, other=0.0)
    own = tl.load(own_ptr + rows, mask=ok, other=0.0)
    discriminative = own * inv_tau - (logit_max + tl.log(exp_sum))  # exactly 0 when P == 1

    if SUPERVISED:  # sum over the other groups g' of group_max[g', query(i)]
        my_query = rows if QUERY_PER_ROLLOUT else group
        for p0 in range(0, P, BLOCK_P):
            groups = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
            other = ok[:, None] & (groups < P)[None, :] & (groups[None, :] != group[:, None])
            best = tl.load(group_max_ptr + groups[None, :] * NQ + my_query[:, None], mask=other, other=0.0)
            cross_sum += tl.sum(best, axis=1)
    cross_group = -cross_sum / tl.maximum(P - 1, 1)  # 0 when P == 1

    positive = tl.load(out_ptr + N + rows, mask=ok, other=0.0)
    negative = tl.load(out_ptr + 2 * N + rows, mask=ok, other=0.0)
    consistency = tl.load(out_ptr + 3 * N + rows, mask=ok, other=0.0)
    total = (w_pos * positive + w_neg * negative + w_cons * consistency + w_cross * cross_group) * inv_tau \
        + w_disc * discriminative
    tl.store(out_ptr + rows, total, mask=ok)
    tl.store(out_ptr + 4 * N + rows, cross_group, mask=ok)
    tl.store(out_ptr + 5 * N + rows, discriminative, mask=ok)


MAX_GROUP = 128  # a program holds whole groups (its Gram tile is [G, G]): larger groups take the reference
FILL_PROGRAMS = 256  # about 2 programs per SM of an H100 (132 SMs): below it, narrow column blocks
FP32_DOT_PRECISION = "tf32x3"  # fp32 inputs: 3xTF32, as accurate as fp32 (1xTF32 "tf32": 2.7x fewer instructions)


def _reward_blocks(P, G, NQ, dtype):
    """Launch sizes of the tile kernel: GROUPS_M groups of BLOCK_G = next_pow2(G) row slots per program (at least
    16 rows, the smallest tensor-core tile) against BLOCK_C query columns. 16 columns while that keeps the grid
    under FILL_PROGRAMS (GRACE's P = 64, G = 8: 32 x 4 = 128 programs), else 64 (fewer re-reads of the documents).
    Every warp of a 16-row tile runs the whole MMA (Triton splits warps along rows), so the per-warp work per
    K step scales with BLOCK_C: 263 instructions at 16 columns, 368 at 32 (sm_90, fp32 3xTF32).
    4 warps, 8 once the Gram tile is 64 x 64 or more."""
    BLOCK_G = next_pow2(G)
    GROUPS_M = max(16 // BLOCK_G, 1)
    BLOCK_M = GROUPS_M * BLOCK_G
    row_blocks = _cdiv(P, GROUPS_M)
    BLOCK_C = 16 if row_blocks * _cdiv(NQ, 16) <= FILL_PROGRAMS else 64
    return dict(BLOCK_G=BLOCK_G, GROUPS_M=GROUPS_M, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
                BLOCK_K=32 if dtype == torch.float32 else 64, num_warps=4 if BLOCK_M <= 32 else 8)


def _cdiv(a, b):
    return -(-a // b)


def _reward_grid(P, NQ, blocks):
    return (_cdiv(P, blocks["GROUPS_M"]), _cdiv(NQ, blocks["BLOCK_C"]))


FINISH_BLOCKS = dict(BLOCK_R=64, BLOCK_P=32, num_warps=4)


def _grace_reward_triton(doc_emb, query_emb, neg_emb, P, G, tau, weights, mode):
    N, H = doc_emb.shape
    has_neg = neg_emb is not None and mode == "supervised"
    dtype = torch.promote_types(doc_emb.dtype, query_emb.dtype)  # one dtype for the dot products
    dtype = torch.promote_types(dtype, neg_emb.dtype) if has_neg else dtype
    doc, query = doc_emb.to(dtype).contiguous(), query_emb.to(dtype).contiguous()  # no-ops in the trainer
    neg = neg_emb.to(dtype).contiguous() if has_neg else None
    NQ = query.shape[0]
    blocks = _reward_blocks(P, G, NQ, doc.dtype)
    grid = _reward_grid(P, NQ, blocks)
    CB = grid[1]
    # one allocation: the outputs and every partial, each entry written once before it is read
    buf = torch.empty(6 * N + 3 * CB * N + N + P * NQ, device=doc.device, dtype=torch.float32)
    out = buf[:6 * N].view(6, N)
    row_stats, own, group_max = buf[6 * N:].split([3 * CB * N, N, P * NQ])
    dot_fp32 = doc.dtype == torch.float32 or INTERPRET
    supervised, per_rollout = mode == "supervised", NQ == N
    w = weights
    with device_guard(doc):
        _reward_tile_kernel[grid](
            doc, query, neg, out, row_stats, own, group_max, N, P, G, NQ, H, 1.0 / tau,
            **blocks, QUERY_PER_ROLLOUT=per_rollout, HAS_NEG=has_neg, SUPERVISED=supervised,
            DOT_FP32=dot_fp32, PRECISION="ieee" if INTERPRET else FP32_DOT_PRECISION)
        _reward_finish_kernel[(_cdiv(N, FINISH_BLOCKS["BLOCK_R"]),)](
            out, row_stats, own, group_max, N, P, G, NQ, CB, 1.0 / tau,
            w.positive, w.negative, w.consistency, w.cross_group, w.discriminative,
            **FINISH_BLOCKS, QUERY_PER_ROLLOUT=per_rollout, SUPERVISED=supervised)
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
