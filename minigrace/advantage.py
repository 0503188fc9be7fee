"""Advantage: GRPO's group-relative baseline.

A_i = R_i − mean_{j in group(i)} R_j, optionally divided by the group's std (GRACE keeps the
Dr.GRPO form without std). The G rationales of one prompt compete only with each other, so no value
model is needed. A group whose rewards are all equal carries no signal: its advantages are exactly 0,
and the fraction of such groups is logged (`frac_zero_std_groups`).
"""
from __future__ import annotations

import torch

from .kernels import group_advantage


def compute_advantages(total: torch.Tensor, group_size: int, scale_std: bool) -> tuple[torch.Tensor, float]:
    """total [P*G] → (advantages [P*G] fp32, fraction of groups with zero reward variance).

    One launch; the kernel also counts the all-equal groups and the non-finite rewards on the device, and
    the single read below (needed for the logged float anyway) is this function's only sync."""
    advantages, stats = group_advantage(total, group_size, scale_std=scale_std, return_stats=True)
    zero_std_groups, nonfinite = stats.tolist()
    if nonfinite:  # the trainer skips non-finite steps before it gets here: a bug if this fires
        raise ValueError(f"rewards contain {nonfinite} non-finite value(s) (NaN/inf)")
    return advantages, zero_std_groups / (total.numel() // group_size)
