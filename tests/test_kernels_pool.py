"""masked_mean_pool / masked_mean_pool_span: Triton (interpreter on CPU) and torch paths against the reference."""
from types import SimpleNamespace

import pytest
from kernel_compile import DEVICE, assert_no_spills, compile_for_sm90, spy_guard
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import minigrace.kernels.pool as pool
from minigrace.kernels import (kernel_backend, masked_mean_pool, masked_mean_pool_reference, masked_mean_pool_span,
                               span_mask)
from minigrace.kernels.dispatch import INTERPRET, device_guard

BACKENDS = ["torch", "triton"]
TOL = dict(atol=1e-6, rtol=1e-5)  # both paths accumulate in fp32 and return fp32: only the summation order differs


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", request.param)
    return request.param


def random_case(N, T, H, dtype=torch.float32, mask_kind="bool", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g).to(dtype)
    mask = torch.rand(N, T, generator=g) > 0.4  # rows with holes
    mask[0, 0] = True  # at least one token somewhere
    if N > 2:
        mask[1] = False  # an all-masked row
    mask = {"bool": mask, "int": mask.long(), "float": mask.float()}[mask_kind]
    return hidden.to(DEVICE), mask.to(DEVICE)


def test_kernel_backend_selection(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("MINIGRACE_KERNELS", "auto")
    assert kernel_backend(x) == "torch"  # CPU tensors -> torch under auto
    monkeypatch.setenv("MINIGRACE_KERNELS", "torch")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    if INTERPRET:  # conftest set TRITON_INTERPRET=1 (on CPU)
        assert kernel_backend(x) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernel_backend(x)
    monkeypatch.setenv("MINIGRACE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MINIGRACE_KERNELS"):
        kernel_backend(x)


def test_device_guard_is_the_tensors_gpu():
    # Triton launches on the current device: the guard must switch to the tensor's (cuda:1 here). Building
    # torch.cuda.device needs no GPU; entering it would.
    guard = device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.zeros(1)), torch.cuda.device)  # CPU: nothing to switch


def test_launches_are_guarded_with_the_hidden_device(monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    seen = spy_guard(monkeypatch, pool)
    hidden, mask = random_case(2, 5, 8)
    masked_mean_pool(hidden, mask)
    masked_mean_pool_span(hidden, torch.tensor([0, 1], device=DEVICE), torch.tensor([3, 5], device=DEVICE))
    assert seen == [hidden.device, hidden.device]


def test_known_values(backend):
    # row 0: mean of (1, 0) and (3, 4) = (2, 2); (100, 100) is masked out -> normalized (1/sqrt2, 1/sqrt2)
    # row 1: all masked -> zeros (not NaN)
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]], device=DEVICE).bfloat16()
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], device=DEVICE)
    s = 2 ** -0.5
    out = masked_mean_pool(hidden, mask)
    assert out.dtype == torch.float32  # fp32 whatever the hidden dtype: the reward sees unrounded embeddings
    torch.testing.assert_close(out.cpu(), torch.tensor([[s, s], [0.0, 0.0]]))
    unnormalized = masked_mean_pool(hidden, mask, normalize=False)
    torch.testing.assert_close(unnormalized.cpu(), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))


@pytest.mark.parametrize("N,T,H", [(1, 1, 1), (3, 7, 37), (4, 19, 300), (3, 70, 5)])  # > one H block, > one T tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, N, T, H, dtype):
    hidden, mask = random_case(N, T, H, dtype)
    for normalize in (True, False):
        out = masked_mean_pool(hidden, mask, normalize=normalize)
        assert out.dtype == torch.float32 and out.shape == (N, H)
        torch.testing.assert_close(out, masked_mean_pool_reference(hidden, mask, normalize=normalize), **TOL)
    if N > 2:
        assert (out[1] == 0).all()  # the all-masked row


def test_contiguous_rows_holes_and_edges(backend):
    # the kernel reads a row's mask inside its span only when the row has holes: cover both, and spans that
    # touch t = 0 and t = T - 1 or cover a single token
    T = 40
    hidden = torch.randn(6, T, 12, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(6, T, dtype=torch.bool)
    mask[0, 5:33] = True  # contiguous
    mask[1, :] = True  # everything
    mask[2, [0, 17, 39]] = True  # first, middle, last token only
    mask[3, 39] = True  # one token at the end
    mask[4, 3:20] = True
    mask[4, 9] = False  # one hole
    mask[5, 0] = True  # one token at the start
    hidden, mask = hidden.to(DEVICE), mask.to(DEVICE)
    torch.testing.assert_close(masked_mean_pool(hidden, mask), masked_mean_pool_reference(hidden, mask), **TOL)


@pytest.mark.parametrize("mask_kind", ["int", "float"])
def test_mask_dtypes(backend, mask_kind):
    hidden, mask = random_case(3, 5, 8, mask_kind=mask_kind)
    torch.testing.assert_close(masked_mean_pool(hidden, mask), masked_mean_pool_reference(hidden, mask != 0), **TOL)


def test_noncontiguous_hidden(backend):
    hidden, mask = random_case(3, 6, 10)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides (H, N*H, 1)
    assert not hidden_t.is_contiguous()
    torch.testing.assert_close(masked_mean_pool(hidden_t, mask), masked_mean_pool_reference(hidden, mask), **TOL)


def test_token_offsets_past_int32(backend):
    # t * stride_t = 2 * 2**30 elements: wraps in int32. A 4 GiB storage is only reserved (torch.empty does not
    # touch it); the few positions the view covers are written, and only those pages become memory.
    storage = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    hidden = storage.as_strided((2, 3, 8), (8, 2**30, 1))  # [N=2, T=3, H=8]
    hidden.copy_(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4)).half())
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], device=DEVICE)
    expected = masked_mean_pool_reference(hidden.clone(), mask)
    torch.testing.assert_close(masked_mean_pool(hidden, mask), expected, **TOL)
    start, end = torch.tensor([2, 1], device=DEVICE), torch.tensor([3, 3], device=DEVICE)
    torch.testing.assert_close(masked_mean_pool_span(hidden, start, end),
                               masked_mean_pool_reference(hidden.clone(), span_mask(start, end, 3)), **TOL)


def test_span_equals_mask(backend):
    hidden, _ = random_case(5, 9, 5, torch.bfloat16)
    # row 2 is an empty span, rows 3 and 4 reach past the edges
    start, end = torch.tensor([0, 4, 6, -3, 7], device=DEVICE), torch.tensor([3, 9, 6, 2, 20], device=DEVICE)
    for normalize in (True, False):
        out = masked_mean_pool_span(hidden, start, end, normalize=normalize)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, masked_mean_pool_reference(hidden, span_mask(start, end, 9), normalize), **TOL)
    assert (out[2] == 0).all()
    assert span_mask(start, end, 9)[3].tolist() == [True, True] + [False] * 7


def test_shape_errors(backend):
    with pytest.raises(ValueError, match="pool_mask"):
        masked_mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden"):
        masked_mean_pool(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="start/end"):
        masked_mean_pool_span(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradcheck_fp64(normalize):
    hidden, mask = random_case(3, 5, 4, torch.float64)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: masked_mean_pool_reference(h, mask, normalize), (hidden,))


def test_autograd_runs_the_reference(backend):
    # the Triton path is forward-only (the trainer pools under no_grad): with autograd on, the reference runs
    hidden, mask = random_case(3, 6, 5)
    h = hidden.clone().requires_grad_(True)
    masked_mean_pool(h, mask).square().sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    masked_mean_pool_reference(h_ref, mask).square().sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    assert (h.grad[~mask] == 0).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 4), T=st.integers(1, 40), H=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference_and_ignores_padding(monkeypatch, N, T, H, seed):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    hidden, mask = random_case(N, T, H, seed=seed)
    out = masked_mean_pool(hidden, mask)
    torch.testing.assert_close(out, masked_mean_pool_reference(hidden, mask), **TOL)
    garbage = hidden.masked_fill(~mask[:, :, None], 1e4)  # change only the masked-out positions
    torch.testing.assert_close(masked_mean_pool(garbage, mask), out, **TOL)
    nonempty = mask.any(1)
    torch.testing.assert_close(out[nonempty].norm(dim=1).cpu(), torch.ones(int(nonempty.sum())))
    assert (out[~nonempty] == 0).all()


def test_triton_kernels_compile_for_gpu():
    # the GRACE shape with the launcher's real specialization (contiguous bf16 [512, 2048, 1536], uint8 mask),
    # every autotune config, mask and span entry
    N, T, H = 512, 2048, 1536
    common = dict(hidden_ptr="*bf16", out_ptr="*fp32", T=T, H=H, T_BUCKET=T, stride_hn=T * H, stride_ht=H,
                  stride_hh=1, SCAN_T=1024)
    mask_args = dict(common, mask_ptr="*u8", start_ptr=None, end_ptr=None, stride_mn=T, stride_mt=1, HAS_MASK=True)
    span_args = dict(common, mask_ptr=None, start_ptr="*i64", end_ptr="*i64", stride_mn=0, stride_mt=0, HAS_MASK=False)
    results = compile_for_sm90([
        ("minigrace.kernels.pool", "_mean_pool_kernel", mask_args, {}, "mask"),
        ("minigrace.kernels.pool", "_mean_pool_kernel", span_args, {}, "span"),
        ("minigrace.kernels.pool", "_l2_normalize_kernel", dict(x_ptr="*fp32", H=H, eps=1e-12, BLOCK_H=2048), {},
         "normalize"),
    ])
    assert len(results) == 2 * len(pool._mean_pool_kernel.configs) + 1
    assert_no_spills(results)
    for r in results[:-1]:
        # software-pipelined: the hidden tiles are copied to shared memory asynchronously, 16 bytes at a time
        assert "cp.async.cg.shared.global" in r["ptx"] and ", 0x10," in r["ptx"], r["config"]
