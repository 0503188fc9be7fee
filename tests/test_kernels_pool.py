"""masked_mean_pool: Triton (interpreter on CPU) and torch paths against the reference."""

import pytest
from kernel_compile import compile_for_sm90
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minigrace.kernels import kernel_backend, masked_mean_pool, masked_mean_pool_reference, masked_mean_pool_span

BACKENDS = ["torch", "triton"]
# output tolerance per dtype: both paths accumulate in fp32, then round to the output dtype once
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", request.param)
    return request.param


def random_case(N, T, H, dtype=torch.float32, mask_kind="bool", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g).to(dtype)
    mask = torch.rand(N, T, generator=g) > 0.4
    mask[0, 0] = True  # at least one token somewhere
    if N > 2:
        mask[1] = False  # an all-masked row
    mask = {"bool": mask, "int": mask.long(), "float": mask.float()}[mask_kind]
    return hidden, mask


def test_kernel_backend_selection(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("MINIGRACE_KERNELS", "auto")
    assert kernel_backend(x) == "torch"  # CPU tensors -> torch under auto
    monkeypatch.setenv("MINIGRACE_KERNELS", "torch")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    assert kernel_backend(x) == "triton"  # conftest set TRITON_INTERPRET=1
    monkeypatch.setenv("MINIGRACE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MINIGRACE_KERNELS"):
        kernel_backend(x)


def test_known_values(backend):
    # row 0: mean of (1, 0) and (3, 4) = (2, 2); (100, 100) is masked out -> normalized (1/sqrt2, 1/sqrt2)
    # row 1: all masked -> zeros (not NaN)
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    s = 2 ** -0.5
    torch.testing.assert_close(masked_mean_pool(hidden, mask), torch.tensor([[s, s], [0.0, 0.0]]))
    torch.testing.assert_close(masked_mean_pool(hidden, mask, normalize=False), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))


@pytest.mark.parametrize("N,T,H", [(1, 1, 1), (3, 7, 37), (4, 19, 300)])  # 300 > one H block, 19 > one T block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, N, T, H, dtype):
    hidden, mask = random_case(N, T, H, dtype)
    for normalize in (True, False):
        out = masked_mean_pool(hidden, mask, normalize=normalize)
        ref = masked_mean_pool_reference(hidden, mask, normalize=normalize)
        assert out.dtype == dtype and out.shape == (N, H)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=1e-2)
    if N > 2:
        assert (out[1] == 0).all()  # the all-masked row


@pytest.mark.parametrize("mask_kind", ["int", "float"])
def test_mask_dtypes(backend, mask_kind):
    hidden, mask = random_case(3, 5, 8, mask_kind=mask_kind)
    torch.testing.assert_close(masked_mean_pool(hidden, mask), masked_mean_pool_reference(hidden, mask != 0))


def test_noncontiguous_hidden(backend):
    hidden, mask = random_case(3, 6, 10)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides (H, N*H, 1)
    assert not hidden_t.is_contiguous()
    torch.testing.assert_close(masked_mean_pool(hidden_t, mask), masked_mean_pool_reference(hidden, mask))


def test_span_equals_mask(backend):
    hidden, _ = random_case(3, 9, 5)
    start, end = torch.tensor([0, 4, 6]), torch.tensor([3, 9, 6])  # last row empty
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 0:3] = mask[1, 4:9] = True
    torch.testing.assert_close(masked_mean_pool_span(hidden, start, end), masked_mean_pool_reference(hidden, mask))


def test_shape_errors(backend):
    with pytest.raises(ValueError, match="pool_mask"):
        masked_mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden"):
        masked_mean_pool(torch.zeros(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradcheck_fp64(normalize):
    hidden, mask = random_case(3, 5, 4, torch.float64)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: masked_mean_pool_reference(h, mask, normalize), (hidden,))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grad_matches_reference(monkeypatch, normalize, dtype):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    hidden, mask = random_case(4, 19, 300, dtype)
    grad_out = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    h_triton = hidden.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    (masked_mean_pool(h_triton, mask, normalize) * grad_out).sum().backward()
    (masked_mean_pool_reference(h_ref, mask, normalize) * grad_out).sum().backward()
    assert h_triton.grad.dtype == dtype
    assert (h_triton.grad[~mask] == 0).all()  # padding gets no gradient
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(h_triton.grad.float(), h_ref.grad.float(), atol=tol, rtol=1e-2)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 4), T=st.integers(1, 20), H=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference_and_ignores_padding(monkeypatch, N, T, H, seed):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    hidden, mask = random_case(N, T, H, seed=seed)
    out = masked_mean_pool(hidden, mask)
    torch.testing.assert_close(out, masked_mean_pool_reference(hidden, mask), atol=1e-6, rtol=1e-5)
    garbage = hidden.masked_fill(~mask[:, :, None], 1e4)  # change only the masked-out positions
    torch.testing.assert_close(masked_mean_pool(garbage, mask), out, atol=1e-6, rtol=1e-5)
    nonempty = mask.any(1)
    torch.testing.assert_close(out[nonempty].norm(dim=1), torch.ones(int(nonempty.sum())))
    assert (out[~nonempty] == 0).all()


def test_triton_kernels_compile_for_gpu():
    f32, bf16 = "*fp32", "*bf16"
    compile_for_sm90("minigrace.kernels.pool", [
        ("_masked_mean_kernel", dict(hidden_ptr=bf16, mask_ptr="*u8", mean_ptr=f32, count_ptr=f32),
         dict(BLOCK_T=16, BLOCK_H=256)),
        ("_l2_normalize_kernel", dict(mean_ptr=f32, out_ptr=bf16, norm_ptr=f32, eps="fp32"),
         dict(NORMALIZE=True, BLOCK_H=1024)),
        ("_pool_grad_rows_kernel", dict(grad_out_ptr=bf16, mean_ptr=f32, norm_ptr=f32, count_ptr=f32,
                                        grad_sum_ptr=f32, eps="fp32"), dict(NORMALIZE=True, BLOCK_H=1024)),
        ("_masked_broadcast_kernel", dict(grad_sum_ptr=f32, mask_ptr="*i64", grad_hidden_ptr=bf16),
         dict(BLOCK_T=16, BLOCK_H=256)),
    ])
