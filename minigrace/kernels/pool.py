"""Masked mean pooling of hidden states (+ L2 normalization): GRACE's text embedding, in fp32.

emb[n] = normalize( sum_t mask[n, t] * hidden[n, t] / max(sum_t mask[n, t], 1) )          [N, H] fp32

Two ways to say which tokens are pooled: a dense pool_mask [N, T], or a span start[n] <= t < end[n]
per row (a rollout's pooled tokens are one contiguous run, so the span is all the caller needs).

Triton path (forward only: the trainer pools under no_grad; with autograd on, the torch reference runs):
  1. _mean_pool_kernel     grid (N * H/BLOCK_H,): the row's pooled tokens are read once, fp32 sum -> mean
  2. _l2_normalize_kernel  grid (N,): in place on the fp32 means
Each program loops only over its row's span [lo, hi) (a dense mask is scanned once for its first and last
pooled token), so padding costs nothing, and the loop is software-pipelined (tl.range num_stages): the
next tiles load while the current one is added. Inside the span the mask is read only when the row has
holes; a contiguous row never waits on a mask load. Bytes moved = pooled tokens * H * itemsize.
"""
import torch

from .dispatch import autotune, device_guard, jit, kernel_backend, next_pow2, tl


# ----------------------------------------------------------------------------- reference (the specification)
def masked_mean_pool_reference(hidden, pool_mask, normalize=True, eps=1e-12):
    """hidden [N, T, H], pool_mask [N, T] (nonzero = include) -> [N, H] fp32 (fp64 for fp64 hidden)."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    mask = (pool_mask != 0).to(acc_dtype)  # [N, T]
    summed = torch.einsum("nth,nt->nh", hidden.to(acc_dtype), mask)  # [N, H]
    mean = summed / mask.sum(1, keepdim=True).clamp_min(1)  # empty row -> 0, not NaN
    if normalize:
        mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(eps)
    return mean


def span_mask(start, end, T: int):
    """[N] start, [N] end -> bool [N, T], True where start <= t < end."""
    t = torch.arange(T, device=start.device)
    return (t[None, :] >= start[:, None]) & (t[None, :] < end[:, None])


# ----------------------------------------------------------------------------- Triton kernels
@jit
def _mask_bounds(mask_row_ptr, T, stride_mt, SCAN_T: tl.constexpr):
    """One pass over a mask row -> (lo, hi, count): first pooled token, last + 1, and how many are pooled."""
    offs = tl.arange(0, SCAN_T)
    first = tl.full([SCAN_T], T, dtype=tl.int32)
    last = tl.full([SCAN_T], -1, dtype=tl.int32)
    count = tl.zeros([SCAN_T], dtype=tl.int32)
    for t0 in range(0, T, SCAN_T):
        t = t0 + offs
        keep = tl.load(mask_row_ptr + t.to(tl.int64) * stride_mt, mask=t < T, other=0) != 0
        first = tl.minimum(first, tl.where(keep, t, T))
        last = tl.maximum(last, tl.where(keep, t, -1))
        count += keep.to(tl.int32)
    hi = tl.max(last, axis=0) + 1
    lo = tl.minimum(tl.min(first, axis=0), hi)  # an empty row gives lo = hi = 0
    return lo, hi, tl.sum(count, axis=0)


@autotune(
    # (BLOCK_T, BLOCK_H, NUM_STAGES), warps. One tile = BLOCK_T tokens x BLOCK_H features (8-32 KB in bf16).
    configs=[(dict(BLOCK_T=16, BLOCK_H=256, NUM_STAGES=3), 4), (dict(BLOCK_T=32, BLOCK_H=256, NUM_STAGES=3), 4),
             (dict(BLOCK_T=32, BLOCK_H=256, NUM_STAGES=4), 8), (dict(BLOCK_T=16, BLOCK_H=512, NUM_STAGES=3), 4),
             (dict(BLOCK_T=32, BLOCK_H=512, NUM_STAGES=3), 8), (dict(BLOCK_T=64, BLOCK_H=128, NUM_STAGES=3), 4)],
    key=["T_BUCKET", "H"],  # the next power of two of T: trimmed micro-batches vary T by one token at a time
)
@jit
def _mean_pool_kernel(
    hidden_ptr, mask_ptr, start_ptr, end_ptr, out_ptr,  # [N, T, H]; [N, T] or None; [N], [N] or None; [N, H] fp32
    T, H, T_BUCKET,  # T_BUCKET: autotune key only
    stride_hn, stride_ht, stride_hh, stride_mn, stride_mt,
    HAS_MASK: tl.constexpr, SCAN_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    n_hblocks = tl.cdiv(H, BLOCK_H)
    row = (tl.program_id(0) // n_hblocks).to(tl.int64)  # the H-blocks of a row are neighbours in launch order
    offs_h = (tl.program_id(0) % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = offs_h < H

    if HAS_MASK:
        mask_row = mask_ptr + row * stride_mn
        lo, hi, count = _mask_bounds(mask_row, T, stride_mt, SCAN_T)
        holes = count < hi - lo  # else the mask is 1 everywhere in [lo, hi) and need not be read again
    else:
        hi = tl.minimum(tl.load(end_ptr + row).to(tl.int32), T)
        lo = tl.minimum(tl.maximum(tl.load(start_ptr + row).to(tl.int32), 0), hi)
        count = hi - lo

    # 64-bit offsets: t * stride_ht passes 2**31 for a [T, N, H]-strided view (T = 2048, N = 512, H = 3072)
    row_ptr = hidden_ptr + row * stride_hn + offs_h.to(tl.int64)[None, :] * stride_hh  # [1, BLOCK_H]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # the loads of the next NUM_STAGES - 1 tiles are in flight while one tile is added. (The loop counts from 0:
    # a lower bound that comes from a reduction hides the pointers' contiguity from Triton: no vector loads.)
    for t in tl.range(0, hi - lo, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = lo + t + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        keep = offs_t < hi
        if HAS_MASK:  # inside the span, only a row with holes reads its mask (else the load is predicated off)
            m = tl.load(mask_row + offs_t.to(tl.int64) * stride_mt, mask=tl.where(holes, keep, False), other=1)
            keep = keep & (m != 0)
        x = tl.load(row_ptr + offs_t.to(tl.int64)[:, None] * stride_ht, mask=keep[:, None] & h_ok[None, :], other=0.0)
        acc += x.to(tl.float32)  # upcast before any math (bf16 math is also wrong in the interpreter)
    mean = tl.sum(acc, axis=0) / tl.maximum(count, 1).to(tl.float32)  # [BLOCK_H]
    tl.store(out_ptr + row * H + offs_h, mean, mask=h_ok)


@jit
def _l2_normalize_kernel(x_ptr, H, eps, BLOCK_H: tl.constexpr):
    """x[n] /= max(|x[n]|, eps), in place on fp32 [N, H]."""
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * H
    sq = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(row_ptr + offs, mask=offs < H, other=0.0)
        sq += x * x
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        tl.store(row_ptr + offs, tl.load(row_ptr + offs, mask=offs < H) * scale, mask=offs < H)


def _pool_triton(hidden, mask, start, end, normalize, eps):
    """mask [N, T] or (start, end) [N] each -> fp32 [N, H]."""
    N, T, H = hidden.shape
    out = torch.empty((N, H), device=hidden.device, dtype=torch.float32)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    mask_strides = mask.stride() if mask is not None else (0, 0)
    grid = lambda meta: (N * ((H + meta["BLOCK_H"] - 1) // meta["BLOCK_H"]),)
    with device_guard(hidden):
        _mean_pool_kernel[grid](hidden, mask, start, end, out, T, H, next_pow2(T), *hidden.stride(), *mask_strides,
                                HAS_MASK=mask is not None, SCAN_T=min(next_pow2(T), 1024))
        if normalize:
            _l2_normalize_kernel[(N,)](out, H, eps, BLOCK_H=min(next_pow2(H), 2048))
    return out


def _check_hidden(hidden, *others):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    for name, t in others:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")


def _use_torch(hidden, *others):
    # the Triton path has no backward: with autograd recording through hidden, the reference runs
    return kernel_backend(hidden, *others) == "torch" or (torch.is_grad_enabled() and hidden.requires_grad)


# ----------------------------------------------------------------------------- public API
def masked_mean_pool(hidden, pool_mask, normalize: bool = True, eps: float = 1e-12):
    """Mean of hidden [N, T, H] over positions where pool_mask [N, T] != 0, L2-normalized -> fp32 [N, H].

    fp32 accumulation and output (fp64 stays fp64 on the torch path); an all-zero mask row gives zeros.
    """
    _check_hidden(hidden, ("pool_mask", pool_mask))
    if pool_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool_mask must be [N, T] = {tuple(hidden.shape[:2])}, got {tuple(pool_mask.shape)}")
    if _use_torch(hidden, pool_mask):
        return masked_mean_pool_reference(hidden, pool_mask, normalize, eps)
    return _pool_triton(hidden, pool_mask, None, None, bool(normalize), float(eps))


def masked_mean_pool_span(hidden, start, end, normalize: bool = True, eps: float = 1e-12):
    """masked_mean_pool over the positions start[n] <= t < end[n] of each row (integer [N] tensors).

    The same result as masked_mean_pool(hidden, span_mask(start, end, T)), without a mask: the kernel
    reads two integers per row. An empty span (end <= start) gives zeros."""
    N = hidden.shape[0] if hidden.dim() == 3 else None
    _check_hidden(hidden, ("start", start), ("end", end))
    if start.shape != (N,) or end.shape != (N,):
        raise ValueError(f"start/end must be [N] = [{N}], got {tuple(start.shape)}, {tuple(end.shape)}")
    if _use_torch(hidden, start, end):
        return masked_mean_pool_reference(hidden, span_mask(start, end, hidden.shape[1]), normalize, eps)
    return _pool_triton(hidden, None, start, end, bool(normalize), float(eps))
