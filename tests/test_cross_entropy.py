"""Parity with torch.nn.functional.cross_entropy over the feature matrix, both implementations."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import FLOAT_DTYPES, LOW_PRECISION, assert_close, assert_unchanged, checksum

# (input shape, description); the class dim is 1 (0 for unbatched input).
SHAPES = {
    "2d": (7, 5),
    "2d_wide": (6, 67),
    "c1": (4, 1),
    "kdim1": (3, 5, 4),
    "kdim2": (2, 6, 3, 5),
    "kdim3": (2, 3, 2, 2, 3),
    "unbatched": (5,),
    "empty": (0, 5),
}


def _class_dim(shape):
    return 1 if len(shape) >= 2 else 0


def make_case(shape, dtype, device, kind, ignore_index, non_contiguous=False):
    C = shape[_class_dim(shape)]
    if non_contiguous and len(shape) >= 2:
        # the same shape as a transposed view of a differently laid-out tensor
        perm = list(range(len(shape)))[::-1]
        base = torch.randn([shape[i] for i in perm], dtype=torch.float64) * 3
        x = base.permute(*perm).to(device)
        x = x.to(dtype) if dtype != torch.float64 else x
    else:
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
    if kind == "prob":
        t = torch.softmax(torch.randn(shape, dtype=torch.float64), _class_dim(shape))
        t = t.to(dtype).to(device)
    else:
        tshape = [s for i, s in enumerate(shape) if i != _class_dim(shape)]
        t = torch.randint(0, C, tshape, device=device)
        if t.numel() > 1:
            t.view(-1)[:: max(1, t.numel() // 3)] = ignore_index  # some ignored positions
    return x, t


def reference_loss(x, t, weight, **kw):
    """torch's result: same dtype for fp32/fp64, float64 truth for half precision."""
    if x.dtype in LOW_PRECISION:
        x = x.double()
        t = t.double() if t.is_floating_point() else t
        weight = weight.double() if weight is not None else None
    return F.cross_entropy(x, t, weight, **kw)


def run_and_grad(fn, x, t, weight, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t, weight, **kw)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss.detach(), grad


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_parity_matrix(impl, device, dtype, shape_name, kind):
    shape = SHAPES[shape_name]
    C = shape[_class_dim(shape)]
    combos = itertools.product(
        [False, True],  # weight
        [-100, 1] if kind == "index" else [-100],  # ignore_index (1 is a valid class)
        ["none", "mean", "sum"],
        [0.0, 0.15],  # label_smoothing
    )
    for use_weight, ignore_index, reduction, ls in combos:
        x, t = make_case(shape, dtype, device, kind, ignore_index)
        weight = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype).to(device) if use_weight else None
        before = checksum(x, t, weight)
        kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
        ours = softmax_ce.cross_entropy(x, t, weight, **kw)
        expected = reference_loss(x, t, weight, **kw)
        what = f"{shape_name} {kind} w={use_weight} ii={ignore_index} {reduction} ls={ls}"
        assert ours.dtype == F.cross_entropy(x, t, weight, **kw).dtype, what
        assert ours.shape == expected.shape, what
        assert_close(ours, expected, dtype, scale=3.0, what=what)
        assert_unchanged(before, x, t, weight)
        if x.numel() == 0:
            continue
        xd = x.double() if dtype in LOW_PRECISION else x
        td = t.double() if (dtype in LOW_PRECISION and t.is_floating_point()) else t
        wd = weight.double() if (weight is not None and dtype in LOW_PRECISION) else weight
        # a random upstream gradient, and the unit one of a plain loss.backward() (for mean and
        # sum the gradient formed in the forward pass, handed over untouched)
        for upstream in (torch.randn(ours.shape, dtype=torch.float64, device=device),
                         torch.ones(ours.shape, dtype=torch.float64, device=device)):
            _, g_ours = run_and_grad(softmax_ce.cross_entropy, x, t, weight, upstream, **kw)
            _, g_ref = run_and_grad(F.cross_entropy, xd, td, wd, upstream, **kw)
            assert g_ours.dtype == dtype
            assert_close(g_ours, g_ref, dtype, what=what + " grad")


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (2, 4, 3, 3)], ids=str)
def test_non_contiguous(impl, device, dtype, shape, kind):
    x, t = make_case(shape, dtype, device, kind, -100, non_contiguous=True)
    assert not x.is_contiguous()
    ours = softmax_ce.cross_entropy(x, t, reduction="none")
    expected = reference_loss(x, t, None, reduction="none")
    assert_close(ours, expected, dtype, scale=3.0)
    upstream = torch.randn(ours.shape, dtype=torch.float64, device=device)
    _, g_ours = run_and_grad(softmax_ce.cross_entropy, x, t, None, upstream, reduction="none")
    xd = x.double() if dtype in LOW_PRECISION else x
    td = t.double() if t.is_floating_point() and dtype in LOW_PRECISION else t
    _, g_ref = run_and_grad(F.cross_entropy, xd, td, None, upstream, reduction="none")
    assert_close(g_ours, g_ref, dtype)


def test_channels_last(impl, device):
    x = torch.randn(2, 5, 3, 4, device=device).to(memory_format=torch.channels_last)
    t = torch.randint(0, 5, (2, 3, 4), device=device)
    torch.testing.assert_close(
        softmax_ce.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none")
    )


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_target_dtypes(impl, device, target_dtype):
    x = torch.randn(9, 7, device=device)
    t = torch.randint(0, 7, (9,), device=device)
    expected = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(
        softmax_ce.cross_entropy(x, t.to(target_dtype), reduction="none"), expected
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(impl, device, weighted, reduction):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    w = torch.rand(6, device=device) if weighted else None
    ours = softmax_ce.cross_entropy(x, t, w, reduction=reduction)
    expected = F.cross_entropy(x, t, w, reduction=reduction)
    torch.testing.assert_close(ours, expected, equal_nan=True)
    if reduction == "mean":
        assert ours.isnan()
    (g,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, g_ref, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(impl, device, reduction):
    for shape, tshape in (((0, 5), (0,)), ((0, 5, 3), (0, 3)), ((2, 5, 0), (2, 0))):
        x = torch.randn(shape, device=device, requires_grad=True)
        t = torch.zeros(tshape, dtype=torch.long, device=device)
        ours = softmax_ce.cross_entropy(x, t, reduction=reduction)
        expected = F.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(ours, expected, equal_nan=True)
        ours.sum().backward()
        xt = x.detach().clone().requires_grad_()
        F.cross_entropy(xt, t, reduction=reduction).sum().backward()
        torch.testing.assert_close(x.grad, xt.grad)


def test_legacy_size_average_reduce(impl, device):
    x = torch.randn(5, 4, device=device)
    t = torch.randint(0, 4, (5,), device=device)
    for size_average, reduce in itertools.product([None, True, False], repeat=2):
        with pytest.warns(UserWarning) if (size_average, reduce) != (None, None) else _nullctx():
            ours = softmax_ce.cross_entropy(x, t, None, size_average, -100, reduce)
        with pytest.warns(UserWarning) if (size_average, reduce) != (None, None) else _nullctx():
            expected = F.cross_entropy(x, t, None, size_average, -100, reduce)
        torch.testing.assert_close(ours, expected)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_positional_signature_matches_torch():
    import inspect

    ours = list(inspect.signature(softmax_ce.cross_entropy).parameters)
    theirs = list(inspect.signature(F.cross_entropy).parameters)
    assert ours[: len(theirs)] == theirs
    for name in ours[len(theirs):]:
        kind = inspect.signature(softmax_ce.cross_entropy).parameters[name].kind
        assert kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cpu_autocast_dtype(cpu_impl, dtype, kind):
    x = torch.randn(6, 5).to(dtype).requires_grad_()
    t = torch.randint(0, 5, (6,)) if kind == "index" else torch.rand(6, 5).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = softmax_ce.cross_entropy(x, t)
        expected = F.cross_entropy(x, t)
    assert ours.dtype == expected.dtype == torch.float32
    # autocast runs the loss in float32 on the (rounded) inputs: float32 precision
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-6)
    (g,) = torch.autograd.grad(ours, x)
    (g_ref,) = torch.autograd.grad(expected, x)
    assert g.dtype == g_ref.dtype == dtype
    assert_close(g, g_ref, dtype, what="autocast grad")


def test_weight_with_smoothing_and_ignore_mean(impl, device):
    """torch's trickiest combination: both terms divided by sum of w[y] over kept positions."""
    x = torch.randn(32, 11, dtype=torch.float64, device=device)
    t = torch.randint(0, 11, (32,), device=device)
    t[::4] = 3
    w = torch.rand(11, dtype=torch.float64, device=device)
    for ii in (3, -100):
        torch.testing.assert_close(
            softmax_ce.cross_entropy(x, t, w, ignore_index=ii, label_smoothing=0.3),
            F.cross_entropy(x, t, w, ignore_index=ii, label_smoothing=0.3),
        )


def _zloss_softcap_truth(x, t, z, cap, ls=0.0, weight=None, reduction="mean", ignore_index=-100):
    """Our extensions' definition in plain differentiable torch ops (float64)."""
    xs = cap * torch.tanh(x / cap) if cap else x
    ce = F.cross_entropy(xs, t, weight, reduction="none", label_smoothing=ls,
                         ignore_index=ignore_index)
    lse = torch.logsumexp(xs, dim=1 if x.dim() > 1 else 0)
    if not t.is_floating_point():
        ce = ce + torch.where(t != ignore_index, z * lse * lse, torch.zeros_like(lse))
    else:
        ce = ce + z * lse * lse
    if reduction == "none":
        return ce
    if reduction == "sum":
        return ce.sum()
    if t.is_floating_point():
        return ce.mean()
    valid = t != ignore_index
    w = weight[t.clamp(min=0)] if weight is not None else torch.ones_like(lse)
    return ce.sum() / torch.where(valid, w, torch.zeros_like(w)).sum()


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("z,cap", [(1e-2, None), (0.0, 3.0), (1e-3, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_z_loss_and_softcap(impl, device, dtype, z, cap, kind):
    shape = (9, 13, 2)
    x, t = make_case(shape, dtype, device, kind, -100)
    w = torch.rand(13, dtype=torch.float64, device=device) + 0.5
    for reduction in ("none", "mean", "sum"):
        kw = dict(reduction=reduction, label_smoothing=0.1)
        xr = x.detach().clone().requires_grad_()
        ours = softmax_ce.cross_entropy(xr, t, w.to(dtype), z_loss=z, softcap=cap, **kw)
        xd = x.detach().double().requires_grad_()
        td = t.double() if t.is_floating_point() else t
        truth = _zloss_softcap_truth(xd, td, z, cap, weight=w, ls=0.1, reduction=reduction)
        assert_close(ours, truth, dtype, scale=3.0, what=f"{reduction} loss")
        up = torch.randn(ours.shape, dtype=torch.float64, device=device)
        (g,) = torch.autograd.grad(ours, xr, up.to(ours.dtype))
        (g_truth,) = torch.autograd.grad(truth, xd, up)
        assert_close(g, g_truth, dtype, what=f"{reduction} grad")


def test_masked_logits(impl, device):
    """Rows of -inf (masked vocab): same as torch; partly masked rows stay finite."""
    x = torch.randn(6, 9, device=device)
    x[0, :4] = float("-inf")
    x[1, :] = float("-inf")
    x[2, 7] = float("inf")
    x[3, 2] = float("nan")
    t = torch.tensor([5, 3, 1, 0, 2, 4], device=device)
    xr = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    ours = softmax_ce.cross_entropy(xr, t, reduction="none")
    expected = F.cross_entropy(xt, t, reduction="none")
    torch.testing.assert_close(ours, expected, equal_nan=True)
    assert torch.isfinite(ours[[0, 4, 5]]).all()
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xr.grad, xt.grad, equal_nan=True)
    assert torch.isfinite(xr.grad[[0, 4, 5]]).all()


def test_large_logits_stable(impl, device):
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-3e4, -3e4, -3e4]], device=device)
    t = torch.tensor([1, 2], device=device)
    torch.testing.assert_close(
        softmax_ce.cross_entropy(x, t, reduction="none"), F.cross_entropy(x, t, reduction="none")
    )
