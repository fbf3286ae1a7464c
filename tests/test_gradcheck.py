"""gradcheck and gradgradcheck (float64) of every public function and option, both
implementations."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import softmax_ce

CE_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 1},
    "smoothing": {"label_smoothing": 0.2},
    "smoothing_weight_ignore": {"weight": True, "label_smoothing": 0.3, "ignore_index": 2},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"softcap": 2.5},
    "all_extras": {"weight": True, "label_smoothing": 0.1, "z_loss": 0.02, "softcap": 3.0},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def _ce_inputs(device, kind, shape, opts):
    C = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    if kind == "prob":
        t = torch.softmax(torch.randn(shape, dtype=torch.float64, device=device), 1 if len(shape) > 1 else 0)
        t.requires_grad_(True)
    else:
        tshape = [s for i, s in enumerate(shape) if i != (1 if len(shape) > 1 else 0)]
        t = torch.randint(0, C, tshape, device=device)
        ii = opts.get("ignore_index", -100)
        t.view(-1)[0] = (ii + 1) % C  # never all ignored (mean would be NaN)
    kw = dict(opts)
    w = None
    if kw.pop("weight", False):
        w = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    if kind == "prob":
        kw.pop("ignore_index", None)
    return x, t, w, kw


@pytest.mark.parametrize("shape", [(4, 5), (2, 4, 3), (5,)], ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_gradcheck(impl, device, option, kind, shape):
    x, t, w, kw = _ce_inputs(device, kind, shape, CE_OPTIONS[option])
    inputs = (x, t) if kind == "prob" else (x,)

    def fn(x, t=t):
        return softmax_ce.cross_entropy(x, t, w, **kw)

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("fn_name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((4, 6), 1), ((3, 4, 2), 1), ((5,), 0), ((2, 3, 4), -1), ((3, 4), 0)])
def test_softmax_gradcheck(impl, device, fn_name, shape, dim):
    fn = getattr(softmax_ce, fn_name)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda x: fn(x, dim), (x,))
    assert gradgradcheck(lambda x: fn(x, dim), (x,))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_gradcheck(impl, device, weighted, pos_weighted, reduction):
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.rand(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=device) + 0.5 if weighted else None
    pw = torch.rand(4, 3, dtype=torch.float64, device=device) + 0.5 if pos_weighted else None

    def fn(x, y):
        return softmax_ce.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)

    assert gradcheck(fn, (x, y))
    assert gradgradcheck(fn, (x, y))


def test_autograd_functions_directly(impl, device):
    """The Function classes themselves, on the kernels' [outer, C, inner] layout."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (2, 3), device=device)
    for fn in (softmax_ce.SoftmaxFunction.apply, softmax_ce.LogSoftmaxFunction.apply):
        assert gradgradcheck(fn, (x,))

    def ce(x):
        return softmax_ce.SoftmaxCrossEntropyFunction.apply(x, t, None, -100, 0.1, 0.01, 0.0)[0]

    assert gradcheck(ce, (x,))
    assert gradgradcheck(ce, (x,))
    y = torch.rand(2, 5, 3, dtype=torch.float64, device=device)

    def bce(x):
        return softmax_ce.SigmoidCrossEntropyFunction.apply(x, y, None, None)

    assert gradgradcheck(bce, (x,))


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("option", ["plain", "all_extras", "ignore"])
def test_third_order_derivatives(impl, device, kind, option):
    """gradgradcheck of the second-order path (the gradient as a differentiable function):
    third derivatives. Before, the second-order backward treated the saved lse as a constant
    and called a raw op: a third derivative was wrong (or raised only with a warning)."""
    x, t, w, kw = _ce_inputs(device, kind, (3, 4), CE_OPTIONS[option])
    t = t.detach()
    v = torch.randn(3, 4, dtype=torch.float64, device=device)

    def first(x):
        (g,) = torch.autograd.grad(softmax_ce.cross_entropy(x, t, w, **kw), x, create_graph=True)
        return (g * v).sum(1)

    assert gradgradcheck(first, (x,))
