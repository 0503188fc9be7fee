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

Triton path: one program per rollout, one launch; it loops over the groups and reads each group's
documents once, so the [N, N] similarity matrix never exists in global memory.
"""
from dataclasses import dataclass

import torch

from .dispatch import jit, kernel_backend, tl

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
def _grace_reward_kernel(
    doc_ptr, query_ptr, neg_ptr, out_ptr,  # [N, H], [N or P, H], [P, H], [6, N] fp32 (total + 5 parts)
    N, P, H,
    inv_tau, eps, inv_other_members, inv_other_groups,  # 1/tau, cos eps, 1/max(G-1, 1), 1/max(P-1, 1)
    w_pos, w_neg, w_cons, w_cross, w_disc,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr,
    QUERY_PER_ROLLOUT: tl.constexpr, HAS_NEG: tl.constexpr, SUPERVISED: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # this rollout
    g = i // G  # its group
    q_row = i if QUERY_PER_ROLLOUT else g
    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] member index inside a group
    g_ok = offs_g < G

    # |q_i|, |d_i| (and the negative term, the same for the whole group)
    sq_q = tl.zeros([BLOCK_H], dtype=tl.float32)
    sq_d = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        q = tl.load(query_ptr + q_row * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        d = tl.load(doc_ptr + i * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        sq_q += q * q
        sq_d += d * d
    q_norm = tl.maximum(tl.sqrt(tl.sum(sq_q, axis=0)), eps)
    d_norm = tl.maximum(tl.sqrt(tl.sum(sq_d, axis=0)), eps)

    negative = 0.0
    if HAS_NEG:
        qrep_row = g * G if QUERY_PER_ROLLOUT else g
        dot_qn = tl.zeros([BLOCK_H], dtype=tl.float32)
        sq_qr = tl.zeros([BLOCK_H], dtype=tl.float32)
        sq_n = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            qr = tl.load(query_ptr + qrep_row * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
            n = tl.load(neg_ptr + g * H + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
            dot_qn += qr * n
            sq_qr += qr * qr
            sq_n += n * n
        negative = -tl.sum(dot_qn, axis=0) / (
            tl.maximum(tl.sqrt(tl.sum(sq_qr, axis=0)), eps) * tl.maximum(tl.sqrt(tl.sum(sq_n, axis=0)), eps))

    positive = 0.0
    consistency = 0.0
    cross_sum = 0.0
    logit_max = -float("inf")  # online log-sum-exp over groups of cos(d_i, qrep_g') / tau
    exp_sum = 0.0
    logit_own = 0.0
    for g2 in range(0, P):
        # dot products of this rollout with the G documents of group g2 and with qrep_g2
        docs = doc_ptr + (g2 * G + offs_g)[:, None] * H  # [BLOCK_G, 1] row pointers
        qrep2_row = g2 * G if QUERY_PER_ROLLOUT else g2
        dot_qd = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)  # q_i . d_j
        dot_dd = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)  # d_i . d_j
        sq_dj = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)  # |d_j|^2
        dot_dq = tl.zeros([BLOCK_H], dtype=tl.float32)  # d_i . qrep_g2
        sq_qr = tl.zeros([BLOCK_H], dtype=tl.float32)  # |qrep_g2|^2
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            q = tl.load(query_ptr + q_row * H + offs_h, mask=h_ok, other=0.0).to(tl.float32)  # [BLOCK_H]
            d = tl.load(doc_ptr + i * H + offs_h, mask=h_ok, other=0.0).to(tl.float32)  # [BLOCK_H]
            qr = tl.load(query_ptr + qrep2_row * H + offs_h, mask=h_ok, other=0.0).to(tl.float32)  # [BLOCK_H]
            dj = tl.load(docs + offs_h[None, :], mask=g_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            dot_qd += q[None, :] * dj
            dot_dd += d[None, :] * dj
            sq_dj += dj * dj
            dot_dq += d * qr
            sq_qr += qr * qr
        dj_norm = tl.maximum(tl.sqrt(tl.sum(sq_dj, axis=1)), eps)  # [BLOCK_G]
        cos_qd = tl.sum(dot_qd, axis=1) / (q_norm * dj_norm)  # [BLOCK_G]
        cos_dd = tl.sum(dot_dd, axis=1) / (d_norm * dj_norm)  # [BLOCK_G]
        cos_dq = tl.sum(dot_dq, axis=0) / (d_norm * tl.maximum(tl.sqrt(tl.sum(sq_qr, axis=0)), eps))

        own = g2 == g
        is_self = (g2 * G + offs_g) == i  # [BLOCK_G]
        positive += tl.where(own, tl.sum(tl.where(is_self, cos_qd, 0.0), axis=0), 0.0)
        consistency += tl.where(own, tl.sum(tl.where(g_ok & ~is_self, cos_dd, 0.0), axis=0), 0.0)
        if SUPERVISED:
            cross = tl.max(tl.where(g_ok, cos_qd, -float("inf")), axis=0)
        else:
            cross = cos_dq
        cross_sum += tl.where(own, 0.0, cross)

        logit = cos_dq * inv_tau
        new_max = tl.maximum(logit_max, logit)
        exp_sum = exp_sum * tl.exp(logit_max - new_max) + tl.exp(logit - new_max)
        logit_max = new_max
        logit_own += tl.where(own, logit, 0.0)

    consistency = consistency * inv_other_members  # 0 when G == 1 (no other members)
    cross_group = -cross_sum * inv_other_groups  # 0 when P == 1
    discriminative = logit_own - (logit_max + tl.log(exp_sum))  # exactly 0 when P == 1
    total = (w_pos * positive + w_neg * negative + w_cons * consistency + w_cross * cross_group) * inv_tau \
        + w_disc * discriminative
    tl.store(out_ptr + i, total)
    tl.store(out_ptr + N + i, positive)
    tl.store(out_ptr + 2 * N + i, negative)
    tl.store(out_ptr + 3 * N + i, consistency)
    tl.store(out_ptr + 4 * N + i, cross_group)
    tl.store(out_ptr + 5 * N + i, discriminative)


def _grace_reward_triton(doc_emb, query_emb, neg_emb, P, G, tau, weights, mode):
    N, H = doc_emb.shape
    doc, query = doc_emb.contiguous(), query_emb.contiguous()
    has_neg = neg_emb is not None and mode == "supervised"
    neg = neg_emb.contiguous() if has_neg else doc  # dummy pointer when unused
    out = torch.empty((6, N), device=doc.device, dtype=torch.float32)
    w = weights
    _grace_reward_kernel[(N,)](
        doc, query, neg, out, N, P, H,
        1.0 / tau, COS_EPS, 1.0 / max(G - 1, 1), 1.0 / max(P - 1, 1), w.positive, w.negative, w.consistency, w.cross_group, w.discriminative,
        G=G, BLOCK_G=max(_next_pow2(G), 2), BLOCK_H=min(_next_pow2(H), 256),
        QUERY_PER_ROLLOUT=query.shape[0] == N, HAS_NEG=has_neg, SUPERVISED=mode == "supervised",
    )
    return out[0], dict(zip(REWARD_COMPONENTS, out[1:]))


def _next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
def grace_reward(doc_emb, query_emb, neg_emb, group_size: int, tau: float,
                 weights: RewardWeights = RewardWeights(), mode: str = "supervised"):
    """GRACE rewards for P groups of G rollouts -> (total fp32 [P*G], {component: fp32 [P*G]}).

    doc_emb [P*G, H]; query_emb [P*G, H] or [P, H] (shared by the group); neg_emb [P, H] or None.
    Components are raw (unweighted, unscaled); see the module docstring for the formulas.
    """
    P, G = _check_inputs(doc_emb, query_emb, neg_emb, group_size, tau, mode)
    if kernel_backend(doc_emb, query_emb, neg_emb) == "torch":
        return grace_reward_reference(doc_emb, query_emb, neg_emb, G, tau, weights, mode)
    return _grace_reward_triton(doc_emb, query_emb, neg_emb, P, G, float(tau), weights, mode)
