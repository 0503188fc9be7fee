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
    """total [P*G] → (advantages [P*G] fp32, fraction of groups with zero reward variance)."""
    advantages = group_advantage(total, group_size, scale_std=scale_std)
    groups = total.view(-1, group_size)
    frac_zero_std = float((groups.amax(-1) == groups.amin(-1)).float().mean())
    return advantages, frac_zero_std
