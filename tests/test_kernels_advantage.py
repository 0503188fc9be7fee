"""group_advantage, compute_advantages: hand cases, NaN groups, on-device stats, Triton (interpreter) vs reference."""
import importlib

import pytest
from kernel_compile import DEVICE, assert_no_spills, compile_for_sm90, spy_guard
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minigrace.advantage import compute_advantages
from minigrace.kernels import group_advantage, group_advantage_reference

# the module, not the function of the same name that minigrace.kernels exports
group_advantage_module = importlib.import_module("minigrace.kernels.group_advantage")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", request.param)
    return request.param


def test_hand_computed(backend):
    # group 0: [1, 2, 3] mean 2 -> [-1, 0, 1]; unbiased std = sqrt((1 + 0 + 1) / 2) = 1
    # group 1: [5, 5, 5] all equal -> 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], device=DEVICE)
    torch.testing.assert_close(group_advantage(rewards, 3).cpu(), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    eps = 1e-6
    scaled = group_advantage(rewards, 3, scale_std=True, eps=eps)
    torch.testing.assert_close(scaled.cpu(), torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]))


def test_all_equal_group_is_exactly_zero(backend):
    # fp32 means of seven 0.1s or seven 0.7s are not exactly 0.1 / 0.7 (sequential and pairwise sums both
    # round), so r - mean alone would give ~1e-8, not 0
    spread = torch.tensor([0.0, 1, 2, 3, 4, 5, 7])
    rewards = torch.cat([torch.full((7,), 0.1), torch.full((7,), 0.7), spread]).to(DEVICE)
    for scale_std in (False, True):
        adv, stats = group_advantage(rewards, 7, scale_std=scale_std, return_stats=True)
        assert (adv[:14] == 0.0).all()
        assert (adv[14:] != 0.0).all()
        assert stats.dtype == torch.int32 and stats.tolist() == [2, 0]  # two all-equal groups, no bad reward


def test_group_of_one_is_zero(backend):
    rewards = torch.tensor([3.0, -1.0, 2.0], device=DEVICE)
    for scale_std in (False, True):
        assert (group_advantage(rewards, 1, scale_std=scale_std) == 0).all()


def loop_reference(rewards, G, scale_std, eps):
    """An independent per-group loop with torch.mean / torch.std in fp64."""
    out = []
    for r in rewards.cpu().double().split(G):
        adv = r - r.mean()
        if scale_std:
            adv = adv / (r.std() + eps) if G > 1 else torch.zeros_like(r)
        out.append(adv)
    return torch.cat(out).float()


@pytest.mark.parametrize("G", [1, 2, 5, 8, 16, 64])
@pytest.mark.parametrize("scale_std", [False, True])
def test_matches_loop_reference(backend, G, scale_std):
    rewards = (torch.randn(3 * G, generator=torch.Generator().manual_seed(G)) * 3).to(DEVICE)
    torch.testing.assert_close(group_advantage(rewards, G, scale_std=scale_std).cpu(),
                               loop_reference(rewards, G, scale_std, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    rewards = (torch.randn(12, generator=torch.Generator().manual_seed(1)) * 5).to(dtype).to(DEVICE)
    adv = group_advantage(rewards, 4, scale_std=True)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    expected = loop_reference(rewards.float(), 4, True, 1e-6)  # exact on the rounded inputs
    torch.testing.assert_close(adv.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_strided_rewards(backend):
    table = torch.randn(8, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    rewards = table[:, 1]  # stride 3
    torch.testing.assert_close(group_advantage(rewards, 4), group_advantage_reference(rewards.contiguous(), 4))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_group_gets_nan_and_is_counted(backend, bad_value):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    rewards[7] = bad_value  # group 1 of groups of 4
    rewards[10] = rewards[11] = bad_value  # group 2
    for scale_std in (False, True):
        adv, stats = group_advantage(rewards, 4, scale_std=scale_std, return_stats=True)
        assert torch.isnan(adv[4:]).all()  # every member of a bad group, not only the bad reward
        torch.testing.assert_close(adv[:4].cpu(), loop_reference(rewards[:4], 4, scale_std, 1e-6), atol=1e-5, rtol=1e-5)
        assert stats.tolist() == [0, 3]  # a bad group never counts as all-equal, even [inf, inf]


def test_compute_advantages_reads_the_stats(backend):
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0], device=DEVICE)
    adv, frac_zero = compute_advantages(rewards, 3, scale_std=False)
    assert frac_zero == 0.5 and isinstance(frac_zero, float)
    torch.testing.assert_close(adv.cpu(), loop_reference(rewards, 3, False, 1e-6))
    rewards[4] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        compute_advantages(rewards, 3, scale_std=True)


def test_launch_is_guarded_with_the_rewards_device(monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    seen = spy_guard(monkeypatch, group_advantage_module)
    rewards = torch.randn(6, device=DEVICE)
    group_advantage(rewards, 3)
    assert seen == [rewards.device]


def test_argument_errors(backend):
    rewards = torch.randn(6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantage(rewards, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantage(rewards, 0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        group_advantage(rewards.view(2, 3), 3)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(P=st.integers(1, 70), G=st.integers(1, 20), scale_std=st.booleans(), shift=st.floats(-100, 100),
       seed=st.integers(0, 2**16))
def test_property_triton_matches_reference(monkeypatch, P, G, scale_std, shift, seed):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    rewards = torch.randn(P * G, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    adv, stats = group_advantage(rewards, G, scale_std=scale_std, return_stats=True)
    ref, ref_stats = group_advantage_reference(rewards, G, scale_std=scale_std, return_stats=True)
    torch.testing.assert_close(adv, ref)
    assert stats.tolist() == ref_stats.tolist()
    centered = group_advantage(rewards, G)
    assert (centered.view(P, G).sum(1).abs() < 1e-5 * G).all()  # zero-mean within each group
    shifted = group_advantage(rewards + shift, G)  # a constant shift cancels
    torch.testing.assert_close(shifted, centered, atol=1e-6 * (1 + abs(shift)), rtol=0)


def test_stats_over_several_programs(monkeypatch):
    # past one tile (MAX_TILE rewards) the programs add their stats atomically into a zeroed buffer
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    monkeypatch.setattr(group_advantage_module, "MAX_TILE", 16)  # groups of 4 -> 4 groups per program
    rewards = torch.randn(40, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    rewards[8:12] = 2.0  # one all-equal group
    rewards[21] = float("nan")
    adv, stats = group_advantage(rewards, 4, return_stats=True)
    ref, ref_stats = group_advantage_reference(rewards, 4, return_stats=True)
    torch.testing.assert_close(adv, ref, equal_nan=True)
    assert stats.tolist() == ref_stats.tolist() == [1, 1]


def test_one_launch_no_host_sync(monkeypatch):
    # GRACE sizes: one program, the stats stored directly (torch.empty: no memset launch); nothing read back
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    launches = []
    real_kernel = group_advantage_module._group_advantage_kernel
    spy = type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or real_kernel[grid]})
    monkeypatch.setattr(group_advantage_module, "_group_advantage_kernel", spy())
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail("a memset launch"))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host sync"))
    adv, stats = group_advantage(torch.randn(512, device=DEVICE), 8, return_stats=True)
    assert launches == [(1,)] and adv.shape == (512,) and stats.shape == (2,)


def test_triton_kernel_compiles_for_gpu():
    # GRACE: N = 512 rewards in groups of 8 -> one program of [64, 8]; with and without stats, std; and the
    # atomic path of several programs
    builds = [("minigrace.kernels.group_advantage", "_group_advantage_kernel",
               dict(rewards_ptr="*fp32", adv_ptr="*fp32", stats_ptr="*i32" if stats else None, P=64, G=8, stride_r=1,
                    eps=1e-6, SCALE_STD=stats, BLOCK_P=64, BLOCK_G=8, ONE_PROGRAM=one), {}, f"stats={stats} one={one}")
              for stats, one in ((False, True), (True, True), (True, False))]
    assert_no_spills(compile_for_sm90(builds))
