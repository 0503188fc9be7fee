"""Group-relative advantages (GRPO / Dr.GRPO): adv_i = r_i - mean_group (optionally / (std_group + eps)).

Groups are equal (`group_size`) or ragged (`offsets` [P+1], group p = rows offsets[p]:offsets[p+1]).
A group whose rewards are all equal gets exactly 0.0; a group of one gets 0.0; NaN/inf is an error.

Triton path: grid (P, T/BLOCK_T), one program per (group, token block). Each program reads its group's
rewards (small), computes mean/std, and writes the advantages and, with a token mask, the
[rows, BLOCK_T] slice of adv[:, None] * token_mask - one pass, no [N] round trip.
"""
import torch

from .dispatch import jit, kernel_backend, tl


def _group_offsets(N, group_size, offsets, device):
    """Validate and return int64 offsets [P+1] on `device`."""
    if (group_size is None) == (offsets is None):
        raise ValueError("pass exactly one of group_size or offsets")
    if offsets is None:
        G = int(group_size)
        if G < 1 or N % G != 0:
            raise ValueError(f"{N} rewards cannot be split into groups of group_size={group_size}")
        return torch.arange(0, N + 1, G, device=device, dtype=torch.int64)
    offsets = torch.as_tensor(offsets).to(device=device, dtype=torch.int64)
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be [P+1] with P >= 1, got shape {tuple(offsets.shape)}")
    if offsets[0].item() != 0 or offsets[-1].item() != N or bool((offsets.diff() < 0).any()):
        raise ValueError(f"offsets must be non-decreasing from 0 to N={N}, got {offsets.tolist()}")
    return offsets


def _raise_if_not_finite(bad_per_group):
    """bad_per_group [P] = number of NaN/inf rewards in each group."""
    if bool((bad_per_group > 0).any()):
        first = int(torch.nonzero(bad_per_group)[0, 0])
        raise ValueError(
            f"rewards contain {int(bad_per_group.sum())} non-finite value(s) (NaN/inf); "
            f"first bad group: {first} ({int(bad_per_group[first])} bad there)"
        )


def _check_rewards(rewards, token_mask):
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if token_mask is not None:
        if token_mask.dim() != 2 or token_mask.shape[0] != rewards.shape[0]:
            raise ValueError(f"token_mask must be [N={rewards.shape[0]}, T], got {tuple(token_mask.shape)}")
        if token_mask.device != rewards.device:
            raise ValueError(f"token_mask is on {token_mask.device}, rewards on {rewards.device}")


# ----------------------------------------------------------------------------- reference (the specification)
def group_advantage_reference(rewards, group_size=None, *, offsets=None, scale_std=False, eps=1e-6,
                              token_mask=None):
    _check_rewards(rewards, token_mask)
    r = rewards.float()  # [N]
    offsets = _group_offsets(r.shape[0], group_size, offsets, r.device)
    sizes = offsets.diff()  # [P]
    P = sizes.shape[0]
    group = torch.repeat_interleave(torch.arange(P, device=r.device), sizes)  # [N] group id of each row

    _raise_if_not_finite(torch.zeros(P, device=r.device).index_add_(0, group, (~r.isfinite()).float()))

    def per_group(values, reduce):  # [N] -> [P]
        return torch.zeros(P, device=r.device).scatter_reduce(0, group, values, reduce, include_self=False)

    mean = per_group(r, "mean")
    adv = r - mean[group]
    if scale_std:  # unbiased std, as torch.std
        var = per_group(adv * adv, "sum") / (sizes - 1).clamp_min(1)
        adv = torch.where(sizes[group] > 1, adv / (var.sqrt()[group] + eps), 0.0)
    all_equal = per_group(r, "amax") == per_group(r, "amin")  # [P]
    adv = torch.where(all_equal[group], 0.0, adv)  # exactly 0, whatever the rounding of the mean
    return adv if token_mask is None else adv[:, None] * token_mask.float()


# ----------------------------------------------------------------------------- Triton kernel
@jit
def _group_advantage_kernel(
    rewards_ptr, offsets_ptr, adv_ptr, bad_ptr,  # [N], [P+1] int32, [N] fp32, [P] int32
    token_mask_ptr, out_ptr,  # [N, T], [N, T] fp32 (only with HAS_TOKEN_MASK)
    T, stride_mn, stride_mt, eps,
    SCALE_STD: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    group = tl.program_id(0)
    pid_t = tl.program_id(1)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    size = (end - start).to(tl.float32)

    # pass 1: sum, min, max, non-finite count
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    lo = tl.full([BLOCK_R], float("inf"), dtype=tl.float32)
    hi = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
    bad = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = rows < end
        r = tl.load(rewards_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        bad += (ok & ((r != r) | (tl.abs(r) == float("inf")))).to(tl.int32)  # NaN or +-inf
        total += r
        lo = tl.minimum(lo, tl.where(ok, r, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, r, -float("inf")))
    mean = tl.sum(total, axis=0) / tl.maximum(size, 1.0)
    all_equal = tl.min(lo, axis=0) == tl.max(hi, axis=0)

    # pass 2 (optional): unbiased variance around the mean
    inv_scale = 1.0
    if SCALE_STD:
        sq = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < end
            r = tl.load(rewards_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            sq += tl.where(ok, (r - mean) * (r - mean), 0.0)
        std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(size - 1.0, 1.0))
        inv_scale = tl.where(size > 1.0, 1.0 / (std + eps), 0.0)  # a group of one -> 0

    # pass 3: write advantages (the token-block-0 program) and the masked per-token slice
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        ok = rows < end
        r = tl.load(rewards_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        adv = tl.where(all_equal, 0.0, (r - mean) * inv_scale)  # [BLOCK_R]
        if pid_t == 0:
            tl.store(adv_ptr + rows, adv, mask=ok)
        if HAS_TOKEN_MASK:
            rows64 = rows.to(tl.int64)
            tile_ok = ok[:, None] & (offs_t < T)[None, :]
            m = tl.load(token_mask_ptr + rows64[:, None] * stride_mn + offs_t[None, :] * stride_mt,
                        mask=tile_ok, other=0).to(tl.float32)  # [BLOCK_R, BLOCK_T]
            tl.store(out_ptr + rows64[:, None] * T + offs_t[None, :], adv[:, None] * m, mask=tile_ok)
    if pid_t == 0:
        tl.store(bad_ptr + group, tl.sum(bad, axis=0))


def _group_advantage_triton(rewards, offsets, scale_std, eps, token_mask):
    N, P = rewards.shape[0], offsets.shape[0] - 1
    adv = torch.empty(N, device=rewards.device, dtype=torch.float32)
    bad = torch.zeros(P, device=rewards.device, dtype=torch.int32)
    if token_mask is None:
        T, mask, out, strides, BLOCK_T = 1, adv, adv, (0, 0), 16  # mask/out are unused placeholders
    else:
        T = token_mask.shape[1]
        mask = token_mask.view(torch.uint8) if token_mask.dtype == torch.bool else token_mask
        out = torch.empty((N, T), device=rewards.device, dtype=torch.float32)
        strides, BLOCK_T = mask.stride(), 256
    grid = (P, (T + BLOCK_T - 1) // BLOCK_T)
    _group_advantage_kernel[grid](
        rewards, offsets.to(torch.int32), adv, bad, mask, out, T, *strides, eps,
        SCALE_STD=scale_std, HAS_TOKEN_MASK=token_mask is not None, BLOCK_R=16, BLOCK_T=BLOCK_T,
    )
    _raise_if_not_finite(bad)
    return adv if token_mask is None else out


# ----------------------------------------------------------------------------- public API
def group_advantage(rewards, group_size=None, *, offsets=None, scale_std: bool = False, eps: float = 1e-6,
                    token_mask=None):
    """Group-centered advantages of rewards [N] -> fp32 [N], or fp32 [N, T] = adv[:, None] * token_mask.

    Exactly one of group_size (equal groups) or offsets ([P+1] ragged group boundaries).
    scale_std divides by (unbiased std + eps). NaN/inf rewards raise ValueError.
    """
    _check_rewards(rewards, token_mask)
    if kernel_backend(rewards, token_mask) == "torch":
        return group_advantage_reference(rewards, group_size, offsets=offsets, scale_std=scale_std, eps=eps,
                                         token_mask=token_mask)
    offsets = _group_offsets(rewards.shape[0], group_size, offsets, rewards.device)
    return _group_advantage_triton(rewards.contiguous(), offsets, bool(scale_std), float(eps), token_mask)
