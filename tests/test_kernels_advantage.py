"""group_advantage: hand cases, ragged groups, NaN errors, Triton (interpreter) vs the torch reference."""

import pytest
from kernel_compile import compile_for_sm90
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minigrace.kernels import group_advantage, group_advantage_reference


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", request.param)
    return request.param


def test_hand_computed(backend):
    # group 0: [1, 2, 3] mean 2 -> [-1, 0, 1]; unbiased std = sqrt((1 + 0 + 1) / 2) = 1
    # group 1: [5, 5, 5] all equal -> 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantage(rewards, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    eps = 1e-6
    scaled = group_advantage(rewards, 3, scale_std=True, eps=eps)
    torch.testing.assert_close(scaled, torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]))


def test_all_equal_group_is_exactly_zero(backend):
    # fp32 means of seven 0.1s or seven 0.7s are not exactly 0.1 / 0.7 (sequential and pairwise sums both
    # round), so r - mean alone would give ~1e-8, not 0
    rewards = torch.cat([torch.full((7,), 0.1), torch.full((7,), 0.7), torch.tensor([0.0, 1, 2, 3, 4, 5, 7])])
    for scale_std in (False, True):
        adv = group_advantage(rewards, 7, scale_std=scale_std)
        assert (adv[:14] == 0.0).all()
        assert (adv[14:] != 0.0).all()


def test_group_of_one_is_zero(backend):
    rewards = torch.tensor([3.0, -1.0, 2.0])
    for scale_std in (False, True):
        assert (group_advantage(rewards, 1, scale_std=scale_std) == 0).all()


def loop_reference(rewards, offsets, scale_std, eps):
    """An independent per-group loop with torch.mean / torch.std."""
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        r = rewards[a:b].double()
        adv = r - r.mean()
        if scale_std:
            adv = adv / (r.std() + eps) if b - a > 1 else torch.zeros_like(r)
        out.append(adv)
    return torch.cat(out).float()


@pytest.mark.parametrize("scale_std", [False, True])
def test_ragged_offsets(backend, scale_std):
    offsets = [0, 1, 4, 4, 11, 12, 30]  # sizes 1, 3, 0 (empty), 7, 1, 18 (> one block of 16)
    rewards = torch.randn(30, generator=torch.Generator().manual_seed(0))
    adv = group_advantage(rewards, offsets=torch.tensor(offsets), scale_std=scale_std)
    torch.testing.assert_close(adv, loop_reference(rewards, offsets, scale_std, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_and_token_mask(backend, dtype):
    g = torch.Generator().manual_seed(1)
    rewards = (torch.randn(12, generator=g) * 5).to(dtype)
    token_mask = torch.rand(12, 37, generator=g) > 0.3
    expected = loop_reference(rewards.float(), list(range(0, 13, 4)), True, 1e-6)  # exact on the rounded inputs
    adv = group_advantage(rewards, 4, scale_std=True)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    for mask in (token_mask, token_mask.float(), token_mask.int()):
        per_token = group_advantage(rewards, 4, scale_std=True, token_mask=mask)
        assert per_token.dtype == torch.float32 and per_token.shape == (12, 37)
        torch.testing.assert_close(per_token, expected[:, None] * token_mask.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(backend, bad_value):
    rewards = torch.randn(12)
    rewards[7] = bad_value  # group 1 of groups of 4
    rewards[10] = bad_value  # group 2
    with pytest.raises(ValueError, match=r"2 non-finite.*first bad group: 1"):
        group_advantage(rewards, 4)
    with pytest.raises(ValueError, match=r"first bad group: 1"):
        group_advantage(rewards, offsets=torch.tensor([0, 2, 8, 12]), token_mask=torch.ones(12, 3))


def test_argument_errors(backend):
    rewards = torch.randn(6)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantage(rewards)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantage(rewards, 3, offsets=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantage(rewards, 4)
    with pytest.raises(ValueError, match="offsets"):
        group_advantage(rewards, offsets=torch.tensor([0, 3, 5]))  # does not end at N
    with pytest.raises(ValueError, match="offsets"):
        group_advantage(rewards, offsets=torch.tensor([0, 4, 2, 6]))  # decreasing
    with pytest.raises(ValueError, match="token_mask"):
        group_advantage(rewards, 3, token_mask=torch.ones(5, 2))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=5), scale_std=st.booleans(),
       shift=st.floats(-100, 100), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference(monkeypatch, sizes, scale_std, shift, seed):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    offsets = torch.tensor([0] + sizes).cumsum(0)
    rewards = torch.randn(int(offsets[-1]), generator=torch.Generator().manual_seed(seed))
    adv = group_advantage(rewards, offsets=offsets, scale_std=scale_std)
    torch.testing.assert_close(adv, group_advantage_reference(rewards, offsets=offsets, scale_std=scale_std))
    centered = group_advantage(rewards, offsets=offsets)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        assert abs(float(centered[a:b].sum())) < 1e-5 * (b - a)  # zero-mean within each group
    shifted = group_advantage(rewards + shift, offsets=offsets)  # a constant shift cancels
    torch.testing.assert_close(shifted, centered, atol=1e-6 * (1 + abs(shift)), rtol=0)


def test_triton_kernel_compiles_for_gpu():
    types = dict(rewards_ptr="*fp32", offsets_ptr="*i32", adv_ptr="*fp32", bad_ptr="*i32", token_mask_ptr="*u8",
                 out_ptr="*fp32", eps="fp32")
    compile_for_sm90("minigrace.kernels.group_advantage", [
        ("_group_advantage_kernel", types, dict(SCALE_STD=flag, HAS_TOKEN_MASK=flag, BLOCK_R=16, BLOCK_T=256))
        for flag in (False, True)
    ])
