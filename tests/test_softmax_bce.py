"""softmax / log_softmax and binary_cross_entropy_with_logits parity with torch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import (
    FLOAT_DTYPES,
    LOW_PRECISION,
    assert_close,
    assert_no_worse_than_torch,
    assert_unchanged,
    checksum,
)


def test_classic_softmax_values():
    y = softmax_ce.softmax(torch.tensor([1, 5, 6, 4, 2, 2.6, 6]), dim=0)
    expected = torch.tensor(
        [0.00263032, 0.14361082, 0.39037468, 0.05283147, 0.00714996, 0.01302808, 0.39037468]
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)


SOFTMAX_CASES = [((5,), 0), ((4, 7), 1), ((4, 7), 0), ((3, 5, 6), 1), ((3, 5, 6), -1),
                 ((2, 3, 4, 5), 2), ((6, 300), 1), ((0, 4), 1), ((3, 0), 1), ((), 0)]


@pytest.mark.parametrize("fn_name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_softmax_parity(impl, device, fn_name, shape, dim, dtype):
    ours_fn, torch_fn = getattr(softmax_ce, fn_name), getattr(F, fn_name)
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(device)
    before = checksum(x)
    xr = x.clone().requires_grad_()
    y = ours_fn(xr, dim)
    xd = (x.double() if dtype in LOW_PRECISION else x).clone().requires_grad_()
    y_ref = torch_fn(xd, dim)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype)
    assert_unchanged(before, x)
    if x.numel():
        g = torch.randn(shape, dtype=torch.float64, device=device)
        (gx,) = torch.autograd.grad(y, xr, g.to(dtype))
        (gx_ref,) = torch.autograd.grad(y_ref, xd, g.to(xd.dtype))
        if dtype in LOW_PRECISION:
            # the backward sees only the rounded output y, as torch's does
            xl = x.clone().requires_grad_()
            (gx_torch,) = torch.autograd.grad(torch_fn(xl, dim), xl, g.to(dtype))
            assert_no_worse_than_torch(gx, gx_torch, gx_ref, dtype)
        else:
            assert_close(gx, gx_ref, dtype, scale=4.0)


@pytest.mark.parametrize("fn_name", ["softmax", "log_softmax"])
def test_softmax_dtype_argument_and_implicit_dim(impl, device, fn_name):
    ours_fn, torch_fn = getattr(softmax_ce, fn_name), getattr(F, fn_name)
    x = torch.randn(3, 4, device=device).bfloat16()
    y = ours_fn(x, 1, dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch_fn(x, 1, dtype=torch.float32))
    x3 = torch.randn(2, 3, 4, device=device)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        y = ours_fn(x3)
    torch.testing.assert_close(y, torch_fn(x3, 0))  # torch's legacy choice for 3-D input


def test_softmax_masked_rows(impl, device):
    x = torch.randn(4, 6, device=device)
    x[0, :3] = float("-inf")
    x[1] = float("-inf")
    x[2, 1] = float("nan")
    for name in ("softmax", "log_softmax"):
        torch.testing.assert_close(getattr(softmax_ce, name)(x, 1), getattr(F, name)(x, 1),
                                   equal_nan=True)


BCE_SHAPES = [(7,), (4, 5), (2, 3, 4), ()]


@pytest.mark.parametrize("shape", BCE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bce_parity(impl, device, dtype, shape):
    for use_w, use_pw, reduction in itertools.product([False, True], [False, True],
                                                      ["none", "mean", "sum"]):
        x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(device)
        y = torch.rand(shape, dtype=torch.float64).to(dtype).to(device)
        last = tuple(shape[-1:])
        w = (torch.rand(last, dtype=torch.float64) + 0.5).to(dtype).to(device) if use_w else None
        pw = (torch.rand(shape, dtype=torch.float64) * 3).to(dtype).to(device) if use_pw else None
        before = checksum(x, y, w, pw)
        xr = x.clone().requires_grad_()
        ours = softmax_ce.binary_cross_entropy_with_logits(xr, y, w, reduction=reduction,
                                                           pos_weight=pw)
        low = dtype in LOW_PRECISION
        cast = (lambda t: t.double() if (t is not None and low) else t)
        xd = cast(x).clone().requires_grad_()
        ref = F.binary_cross_entropy_with_logits(xd, cast(y), cast(w), reduction=reduction,
                                                 pos_weight=cast(pw))
        what = f"w={use_w} pw={use_pw} {reduction}"
        assert ours.dtype == dtype and ours.shape == ref.shape, what
        assert_close(ours, ref, dtype, scale=4.0, what=what)
        assert_unchanged(before, x, y, w, pw)
        up = torch.randn(ours.shape, dtype=torch.float64, device=device)
        (g,) = torch.autograd.grad(ours, xr, up.to(dtype))
        (g_ref,) = torch.autograd.grad(ref, xd, up.to(ref.dtype))
        assert_close(g, g_ref, dtype, scale=4.0, what=what + " grad")


def test_bce_extreme_logits(impl, device):
    x = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], device=device, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0], device=device)
    ours = softmax_ce.binary_cross_entropy_with_logits(x, y, reduction="none")
    ref = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(ours, ref)
    (g,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_bce_dtype_promotion(cpu_impl):
    x = torch.randn(4, 3)
    for y in (torch.rand(4, 3, dtype=torch.float64), torch.rand(4, 3).bfloat16()):
        ours = softmax_ce.binary_cross_entropy_with_logits(x, y)
        ref = F.binary_cross_entropy_with_logits(x, y)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = softmax_ce.binary_cross_entropy_with_logits(x.bfloat16(), y.bfloat16())
        ref = F.binary_cross_entropy_with_logits(x.bfloat16(), y.bfloat16())
    assert ours.dtype == ref.dtype == torch.float32
