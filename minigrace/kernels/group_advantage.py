"""Group-relative advantages (GRPO / Dr.GRPO): adv_i = r_i - mean_group (optionally / (std_group + eps)).

Rewards [P*G] come in P groups of G. A group whose rewards are all equal gets exactly 0.0 (a group of one
too); a group holding a NaN/inf reward gets NaN advantages, all of them: never a silent finite value.
Nothing here waits for the GPU. With return_stats=True the call also returns, on the device, int32
[2] = (groups whose rewards are all equal, non-finite rewards): one read of that pair is the only sync,
and the caller does it where it already syncs (minigrace.advantage reads it for its logged fraction).

Triton path: one launch, grid (P / BLOCK_P,), no host sync (no .item(), no branch on tensor values). A
program holds a [BLOCK_P, BLOCK_G] tile of rewards in registers and writes the advantages. At GRACE sizes
(P = 64, G = 8; up to MAX_TILE rewards) a single program does everything and stores the stats itself: one
launch in all. Past one tile the stats are atomic adds into a zeroed buffer (a memset before the launch).
"""
import torch

from .dispatch import device_guard, jit, kernel_backend, next_pow2, tl

MAX_TILE = 4096  # rewards per program; a group must fit in one (G <= MAX_TILE)


def _check_rewards(rewards, group_size):
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    G = int(group_size)
    if G < 1 or rewards.shape[0] % G != 0:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be split into groups of group_size={group_size}")
    return G


# ----------------------------------------------------------------------------- reference (the specification)
def group_advantage_reference(rewards, group_size, *, scale_std=False, eps=1e-6, return_stats=False):
    G = _check_rewards(rewards, group_size)
    r = rewards.float().view(-1, G)  # [P, G]
    finite = r.isfinite().all(1, keepdim=True)  # [P, 1]
    adv = r - r.mean(1, keepdim=True)
    if scale_std:  # unbiased std, as torch.std; a group of one has none -> 0
        adv = adv / (r.std(1, keepdim=True) + eps) if G > 1 else torch.zeros_like(r)
    all_equal = finite & (r.amax(1, keepdim=True) == r.amin(1, keepdim=True))  # [P, 1]
    adv = torch.where(all_equal, 0.0, torch.where(finite, adv, float("nan"))).flatten()
    if not return_stats:
        return adv
    stats = torch.stack([all_equal.sum(), (~r.isfinite()).sum()]).to(torch.int32)
    return adv, stats


# ----------------------------------------------------------------------------- Triton kernel
@jit
def _group_advantage_kernel(
    rewards_ptr, adv_ptr, stats_ptr,  # [P*G] any float dtype, [P*G] fp32, int32 [2] zeroed (or None)
    P, G, stride_r, eps,
    SCALE_STD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, ONE_PROGRAM: tl.constexpr,
):
    groups = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    members = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    ok = (groups < P)[:, None] & (members < G)[None, :]  # [BLOCK_P, BLOCK_G]
    rows = groups[:, None] * G + members[None, :]
    r = tl.load(rewards_ptr + rows.to(tl.int64) * stride_r, mask=ok, other=0.0).to(tl.float32)

    bad = ok & ((r != r) | (tl.abs(r) == float("inf")))  # NaN or +-inf
    finite = tl.sum(bad.to(tl.int32), axis=1) == 0  # [BLOCK_P]
    mean = tl.sum(r, axis=1) / G
    adv = tl.where(ok, r - mean[:, None], 0.0)
    if SCALE_STD:
        std = tl.sqrt(tl.sum(adv * adv, axis=1) / tl.maximum(G - 1, 1))
        adv = adv * tl.where(G > 1, 1.0 / (std + eps), 0.0)[:, None]
    # min == max, not adv == 0: the fp32 mean of equal values need not equal them. (GPU min/max skip NaN.)
    lo, hi = tl.min(tl.where(ok, r, float("inf")), axis=1), tl.max(tl.where(ok, r, -float("inf")), axis=1)
    all_equal = finite & (lo == hi)
    adv = tl.where(all_equal[:, None], 0.0, tl.where(finite[:, None], adv, float("nan")))
    tl.store(adv_ptr + rows, adv, mask=ok)
    if stats_ptr is not None:
        n_equal = tl.sum((all_equal & (groups < P)).to(tl.int32), axis=0)
        n_bad = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)
        if ONE_PROGRAM:  # the whole answer is here: store it (the buffer needs no zeroing, no memset launch)
            tl.store(stats_ptr, n_equal)
            tl.store(stats_ptr + 1, n_bad)
        else:
            tl.atomic_add(stats_ptr, n_equal)
            tl.atomic_add(stats_ptr + 1, n_bad)


def _group_advantage_triton(rewards, G, scale_std, eps, return_stats):
    N, P = rewards.shape[0], rewards.shape[0] // G
    BLOCK_G = next_pow2(G)
    BLOCK_P = max(1, min(next_pow2(P), MAX_TILE // BLOCK_G))
    programs = (P + BLOCK_P - 1) // BLOCK_P
    adv = torch.empty(N, device=rewards.device, dtype=torch.float32)
    stats = None
    if return_stats:  # int32 [2]; summed by atomics (from zero) only when several programs share it
        stats = (torch.empty if programs == 1 else torch.zeros)(2, device=rewards.device, dtype=torch.int32)
    with device_guard(rewards):
        _group_advantage_kernel[(programs,)](
            rewards, adv, stats, P, G, rewards.stride(0), eps, SCALE_STD=scale_std, BLOCK_P=BLOCK_P, BLOCK_G=BLOCK_G,
            ONE_PROGRAM=programs == 1)
    return (adv, stats) if return_stats else adv


# ----------------------------------------------------------------------------- public API
def group_advantage(rewards, group_size: int, *, scale_std: bool = False, eps: float = 1e-6,
                    return_stats: bool = False):
    """Group-centered advantages of rewards [P*G] in groups of group_size -> fp32 [P*G].

    scale_std divides by (unbiased std + eps). A group with a NaN/inf reward gets NaN advantages.
    return_stats=True -> (advantages, int32 [2] on the device: groups with all-equal rewards, non-finite
    rewards); nothing is read back here, so the call never waits for the GPU.
    """
    G = _check_rewards(rewards, group_size)
    if kernel_backend(rewards) == "torch" or G > MAX_TILE:  # a group larger than a tile: the reference
        return group_advantage_reference(rewards, G, scale_std=scale_std, eps=eps, return_stats=return_stats)
    return _group_advantage_triton(rewards, G, bool(scale_std), float(eps), bool(return_stats))
