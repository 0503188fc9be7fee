"""Masked mean pooling of hidden states (+ L2 normalization): GRACE's text embedding.

emb[n] = normalize( sum_t mask[n, t] * hidden[n, t] / max(sum_t mask[n, t], 1) )

Triton path (forward, two launches):
  1. _masked_mean_kernel   grid (N, H/BLOCK_H): stream the row's masked tokens once, fp32 sum -> mean [N, H]
  2. _l2_normalize_kernel  grid (N,): row norm, scale, cast to hidden.dtype
Padding positions are never read (their loads are masked off), so the bytes moved are
(#masked tokens) * H * itemsize, not N * T * H * itemsize.
"""
import torch

from .dispatch import jit, kernel_backend, tl


# ----------------------------------------------------------------------------- reference (the specification)
def masked_mean_pool_reference(hidden, pool_mask, normalize=True, eps=1e-12):
    """hidden [N, T, H], pool_mask [N, T] (nonzero = include) -> [N, H] in hidden.dtype."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    mask = (pool_mask != 0).to(acc_dtype)  # [N, T]
    summed = torch.einsum("nth,nt->nh", hidden.to(acc_dtype), mask)  # [N, H]
    mean = summed / mask.sum(1, keepdim=True).clamp_min(1)  # empty row -> 0, not NaN
    if normalize:
        mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(eps)
    return mean.to(hidden.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@jit
def _masked_mean_kernel(
    hidden_ptr, mask_ptr, mean_ptr, count_ptr,  # [N, T, H], [N, T], [N, H] fp32, [N] fp32
    T, H,
    stride_hn, stride_ht, stride_hh, stride_mn, stride_mt,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_hn can exceed 2**31 at GRACE sizes
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = offs_h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        m = tl.load(mask_ptr + row * stride_mn + offs_t * stride_mt, mask=offs_t < T, other=0)
        keep = m != 0  # [BLOCK_T]
        ptrs = hidden_ptr + row * stride_hn + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh
        # masked-out tokens are not loaded at all; upcast before any math (bf16 math is wrong in the interpreter)
        x = tl.load(ptrs, mask=keep[:, None] & h_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_H]
        acc += x
        count += keep.to(tl.float32)
    n_tokens = tl.sum(count, axis=0)
    mean = tl.sum(acc, axis=0) / tl.maximum(n_tokens, 1.0)  # [BLOCK_H]
    tl.store(mean_ptr + row * H + offs_h, mean, mask=h_ok)
    if pid_h == 0:
        tl.store(count_ptr + row, n_tokens)


@jit
def _l2_normalize_kernel(
    mean_ptr, out_ptr, norm_ptr,  # [N, H] fp32, [N, H] out dtype, [N] fp32
    H, eps,
    NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = 1.0
    if NORMALIZE:
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(mean_ptr + row * H + offs, mask=offs < H, other=0.0)
            sq += x * x
        norm = tl.sqrt(tl.sum(sq, axis=0))
        tl.store(norm_ptr + row, norm)
        scale = 1.0 / tl.maximum(norm, eps)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(mean_ptr + row * H + offs, mask=offs < H, other=0.0)
        tl.store(out_ptr + row * H + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=offs < H)


@jit
def _pool_grad_rows_kernel(
    grad_out_ptr, mean_ptr, norm_ptr, count_ptr, grad_sum_ptr,  # [N, H], [N, H], [N], [N], [N, H] fp32
    H, eps,
    NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """grad_sum[n] = d loss / d (masked sum of row n), from grad_out[n] = d loss / d out[n]."""
    row = tl.program_id(0).to(tl.int64)
    inv_count = 1.0 / tl.maximum(tl.load(count_ptr + row), 1.0)
    inv_norm = 1.0
    proj = 0.0
    if NORMALIZE:
        # out = mean / max(|mean|, eps). For |mean| >= eps: d out/d mean = (I - y y^T) / |mean| with y = out,
        # so grad_mean = (g - y (y.g)) / |mean|. Below eps the clamp is constant: grad_mean = g / eps.
        norm = tl.load(norm_ptr + row)
        inv_norm = 1.0 / tl.maximum(norm, eps)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            g = tl.load(grad_out_ptr + row * H + offs, mask=offs < H, other=0.0).to(tl.float32)
            y = tl.load(mean_ptr + row * H + offs, mask=offs < H, other=0.0) * inv_norm
            dot += y * g
        proj = tl.where(norm >= eps, tl.sum(dot, axis=0), 0.0)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        g = tl.load(grad_out_ptr + row * H + offs, mask=offs < H, other=0.0).to(tl.float32)
        y = tl.load(mean_ptr + row * H + offs, mask=offs < H, other=0.0) * inv_norm
        grad_mean = (g - y * proj) * inv_norm
        tl.store(grad_sum_ptr + row * H + offs, grad_mean * inv_count, mask=offs < H)


@jit
def _masked_broadcast_kernel(
    grad_sum_ptr, mask_ptr, grad_hidden_ptr,  # [N, H] fp32, [N, T], [N, T, H] contiguous
    T, H,
    stride_mn, stride_mt,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """grad_hidden[n, t, :] = mask[n, t] * grad_sum[n, :] (zeros at padding)."""
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = offs_h < H
    g = tl.load(grad_sum_ptr + row * H + offs_h, mask=h_ok, other=0.0)  # [BLOCK_H]
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        m = tl.load(mask_ptr + row * stride_mn + offs_t * stride_mt, mask=offs_t < T, other=0)
        tile = tl.where((m != 0)[:, None], g[None, :], 0.0)  # [BLOCK_T, BLOCK_H]
        ptrs = grad_hidden_ptr + row * T * H + offs_t[:, None] * H + offs_h[None, :]
        tl.store(ptrs, tile.to(grad_hidden_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & h_ok[None, :])


_BLOCK_T, _BLOCK_H, _BLOCK_ROW = 16, 256, 1024


def _cdiv(a, b):
    return (a + b - 1) // b


def _triton_mask(pool_mask):
    return pool_mask.view(torch.uint8) if pool_mask.dtype == torch.bool else pool_mask


class _MaskedMeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, pool_mask, normalize, eps):
        N, T, H = hidden.shape
        mask = _triton_mask(pool_mask)
        mean = torch.empty((N, H), device=hidden.device, dtype=torch.float32)
        count = torch.empty((N,), device=hidden.device, dtype=torch.float32)
        norm = torch.zeros((N,), device=hidden.device, dtype=torch.float32)
        out = torch.empty((N, H), device=hidden.device, dtype=hidden.dtype)
        _masked_mean_kernel[(N, _cdiv(H, _BLOCK_H))](
            hidden, mask, mean, count, T, H, *hidden.stride(), *mask.stride(), BLOCK_T=_BLOCK_T, BLOCK_H=_BLOCK_H
        )
        _l2_normalize_kernel[(N,)](mean, out, norm, H, eps, NORMALIZE=normalize, BLOCK_H=_BLOCK_ROW)
        ctx.save_for_backward(mask, mean, norm, count)
        ctx.normalize, ctx.eps, ctx.hidden_shape, ctx.hidden_dtype = normalize, eps, hidden.shape, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mask, mean, norm, count = ctx.saved_tensors
        N, T, H = ctx.hidden_shape
        grad_out = grad_out.contiguous()
        grad_sum = torch.empty((N, H), device=mean.device, dtype=torch.float32)
        _pool_grad_rows_kernel[(N,)](
            grad_out, mean, norm, count, grad_sum, H, ctx.eps, NORMALIZE=ctx.normalize, BLOCK_H=_BLOCK_ROW
        )
        grad_hidden = torch.empty((N, T, H), device=mean.device, dtype=ctx.hidden_dtype)
        _masked_broadcast_kernel[(N, _cdiv(H, _BLOCK_H))](
            grad_sum, mask, grad_hidden, T, H, *mask.stride(), BLOCK_T=_BLOCK_T, BLOCK_H=_BLOCK_H
        )
        return grad_hidden, None, None, None


# ----------------------------------------------------------------------------- public API
def masked_mean_pool(hidden, pool_mask, normalize: bool = True, eps: float = 1e-12):
    """Mean of hidden [N, T, H] over positions where pool_mask [N, T] != 0, then L2-normalized -> [N, H].

    Output in hidden.dtype, fp32 accumulation; an all-zero mask row gives a zero vector.
    Differentiable w.r.t. hidden on both backends.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if pool_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool_mask must be [N, T] = {tuple(hidden.shape[:2])}, got {tuple(pool_mask.shape)}")
    if pool_mask.device != hidden.device:
        raise ValueError(f"pool_mask is on {pool_mask.device}, hidden on {hidden.device}")
    if kernel_backend(hidden, pool_mask) == "torch":
        return masked_mean_pool_reference(hidden, pool_mask, normalize, eps)
    return _MaskedMeanPool.apply(hidden, pool_mask, bool(normalize), float(eps))


def span_mask(start, end, T: int):
    """[N] start, [N] end -> bool [N, T], True where start <= t < end."""
    t = torch.arange(T, device=start.device)
    return (t[None, :] >= start[:, None]) & (t[None, :] < end[:, None])


def masked_mean_pool_span(hidden, start, end, normalize: bool = True, eps: float = 1e-12):
    """masked_mean_pool over positions start[n] <= t < end[n] of each row."""
    if start.shape != (hidden.shape[0],) or end.shape != (hidden.shape[0],):
        raise ValueError(f"start/end must be [N] = [{hidden.shape[0]}], got {tuple(start.shape)}, {tuple(end.shape)}")
    return masked_mean_pool(hidden, span_mask(start.to(hidden.device), end.to(hidden.device), hidden.shape[1]),
                            normalize, eps)
