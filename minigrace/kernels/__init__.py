"""minigrace.kernels: pooling, GRACE reward, and group advantages. Triton on CUDA, torch reference elsewhere."""
from .cosine_reward import REWARD_COMPONENTS, RewardWeights, grace_reward, grace_reward_reference
from .dispatch import kernel_backend
from .group_advantage import group_advantage, group_advantage_reference
from .pool import masked_mean_pool, masked_mean_pool_reference, masked_mean_pool_span, span_mask

__all__ = [
    "masked_mean_pool", "masked_mean_pool_span", "grace_reward", "group_advantage", "RewardWeights",
    "REWARD_COMPONENTS", "kernel_backend",
    "masked_mean_pool_reference", "span_mask", "grace_reward_reference", "group_advantage_reference",
]
