"""torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, jvp) and forward-mode AD
(torch.autograd.forward_ad) through every function, against torch's own functions in float64.

Before the Functions had setup_context, a jvp and vmap rules, every transform raised (torch's
"must override the setup_context staticmethod"), and forward-mode AD through a call that autograd
did not record silently dropped the tangent.

Under a transform the dispatcher chooses the implementation (force_reference is for eager mode),
so these tests take the device fixture; CI runs this file again with SOFTMAX_CE_DISABLE_EXTENSION=1
for the reference."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import softmax_ce
from helpers import truth_cross_entropy

DT = torch.float64


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


CE_OPTIONS = {
    "plain": {},
    "smooth_weight": {"label_smoothing": 0.1, "weight": True},
    "ignore": {"ignore_index": 2},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4, 2)], ids=str)
def test_truth_is_torch(device, shape):
    """The oracle (helpers.truth_cross_entropy) equals torch's cross_entropy where torch's can
    be evaluated."""
    x = torch.randn(shape, dtype=DT, device=device)
    w = torch.rand(5, dtype=DT, device=device) + 0.5
    for kind in ("index", "prob"):
        if kind == "prob":
            t = torch.softmax(torch.randn(shape, dtype=DT, device=device), 1)
        else:
            t = torch.randint(0, 5, shape[:1] + shape[2:], device=device)
        for reduction in ("none", "mean", "sum"):
            kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
            if kind == "index":
                kw["ignore_index"] = 2
            _close(truth_cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw))


def _ce_pair(kind, opts, device, z_loss=0.0, softcap=None):
    """Our cross_entropy and the oracle, as functions of (x, t)."""
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 1.5, 5, dtype=DT, device=device)
    if kind == "prob":
        kw.pop("ignore_index", None)

    def ours(x, t):
        return softmax_ce.cross_entropy(x, t, z_loss=z_loss, softcap=softcap, **kw)

    def theirs(x, t):
        return truth_cross_entropy(x, t, z_loss=z_loss, softcap=softcap, **kw)

    return ours, theirs


def _inputs(kind, device, batch=()):
    x = torch.randn(*batch, 6, 5, dtype=DT, device=device)
    if kind == "prob":
        t = torch.softmax(torch.randn(*batch, 6, 5, dtype=DT, device=device), -1)
    else:
        t = torch.randint(0, 5, (*batch, 6), device=device)
    return x, t


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_transforms_match_torch(device, kind, option):
    ours, theirs = _ce_pair(kind, CE_OPTIONS[option], device)
    x, t = _inputs(kind, device)
    scalar = CE_OPTIONS[option].get("reduction", "mean") != "none"
    _close(jacrev(ours)(x, t), jacrev(theirs)(x, t))
    _close(jacfwd(ours)(x, t), jacfwd(theirs)(x, t))
    v = torch.randn_like(x)
    for a, b in zip(jvp(lambda x: ours(x, t), (x,), (v,)), jvp(lambda x: theirs(x, t), (x,), (v,))):
        _close(a, b)
    if scalar:
        _close(grad(ours)(x, t), grad(theirs)(x, t))
        _close(hessian(ours)(x, t), hessian(theirs)(x, t))
    xb, tb = _inputs(kind, device, batch=(3,))
    _close(vmap(ours)(xb, tb), vmap(theirs)(xb, tb))
    _close(vmap(ours, in_dims=(0, None))(xb, t), vmap(theirs, in_dims=(0, None))(xb, t))
    _close(vmap(ours, in_dims=(None, 0))(x, tb), vmap(theirs, in_dims=(None, 0))(x, tb))


def test_per_sample_gradients(device):
    """vmap(grad): the classic per-example gradient."""
    x, t = _inputs("index", device)
    w = torch.linspace(0.5, 1.5, 5, dtype=DT, device=device)

    def one(fn):
        return lambda xi, ti: fn(xi.unsqueeze(0), ti.unsqueeze(0), w, label_smoothing=0.1)

    _close(vmap(grad(one(softmax_ce.cross_entropy)))(x, t), vmap(grad(one(truth_cross_entropy)))(x, t))


def test_batched_class_weights(device):
    """A weight that is itself batched (vmap over weights) takes the per-element rule."""
    x, t = _inputs("index", device)
    wb = torch.rand(4, 5, dtype=DT, device=device) + 0.5

    def ours(w):
        return softmax_ce.cross_entropy(x, t, w, label_smoothing=0.2)

    def theirs(w):
        return truth_cross_entropy(x, t, w, label_smoothing=0.2)

    _close(vmap(ours)(wb), vmap(theirs)(wb))


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_z_loss_and_softcap_hessian(device, kind):
    ours, theirs = _ce_pair(kind, {}, device, z_loss=0.01, softcap=3.0)
    x, t = _inputs(kind, device)
    _close(hessian(ours)(x, t), hessian(theirs)(x, t))
    _close(jacfwd(jacrev(ours))(x, t), hessian(theirs)(x, t))


def test_probability_target_derivatives(device):
    x, t = _inputs("prob", device)
    ours = lambda x, t: softmax_ce.cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    theirs = lambda x, t: truth_cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    for a, b in zip(grad(ours, argnums=(0, 1))(x, t), grad(theirs, argnums=(0, 1))(x, t)):
        _close(a, b)
    tangents = (torch.randn_like(x), torch.randn_like(t))
    for a, b in zip(jvp(ours, (x, t), tangents), jvp(theirs, (x, t), tangents)):
        _close(a, b)
    h_ours, h_theirs = hessian(ours, argnums=(0, 1))(x, t), hessian(theirs, argnums=(0, 1))(x, t)
    for i in range(2):
        for j in range(2):
            _close(h_ours[i][j], h_theirs[i][j])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_transforms(device, name):
    ours = lambda x: getattr(softmax_ce, name)(x, 1)  # noqa: E731
    theirs = lambda x: getattr(F, name)(x, 1)  # noqa: E731
    x = torch.randn(4, 6, dtype=DT, device=device)
    _close(jacrev(ours)(x), jacrev(theirs)(x))
    _close(jacfwd(ours)(x), jacfwd(theirs)(x))
    _close(hessian(lambda x: ours(x).sin().sum())(x), hessian(lambda x: theirs(x).sin().sum())(x))
    xb = torch.randn(3, 4, 6, dtype=DT, device=device)
    _close(vmap(ours)(xb), vmap(theirs)(xb))


@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_transforms(device, pos_weighted):
    pw = torch.rand(5, dtype=DT, device=device) + 0.5 if pos_weighted else None
    w = torch.rand(6, 1, dtype=DT, device=device) + 0.5
    ours = lambda x, y: softmax_ce.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw)  # noqa: E731
    theirs = lambda x, y: F.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw)  # noqa: E731
    x = torch.randn(6, 5, dtype=DT, device=device)
    y = torch.rand(6, 5, dtype=DT, device=device)
    h_ours, h_theirs = hessian(ours, argnums=(0, 1))(x, y), hessian(theirs, argnums=(0, 1))(x, y)
    for i in range(2):
        for j in range(2):
            _close(h_ours[i][j], h_theirs[i][j])
    xb, yb = torch.randn(3, 6, 5, dtype=DT, device=device), torch.rand(3, 6, 5, dtype=DT, device=device)
    _close(vmap(ours)(xb, yb), vmap(theirs)(xb, yb))
    _close(vmap(ours, in_dims=(0, None))(xb, y), vmap(theirs, in_dims=(0, None))(xb, y))
    wb = torch.rand(3, 5, dtype=DT, device=device)  # a batched weight of lower rank
    _close(vmap(lambda w: softmax_ce.binary_cross_entropy_with_logits(x, y, w))(wb),
           vmap(lambda w: F.binary_cross_entropy_with_logits(x, y, w))(wb))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad(device, requires_grad):
    """torch.autograd.forward_ad dual tensors through every function (with and without
    reverse-mode autograd recording at the same time)."""
    x, t = _inputs("index", device)
    p = torch.softmax(torch.randn_like(x), 1)
    v = torch.randn_like(x)
    x = x.requires_grad_(requires_grad)
    cases = [
        (lambda x: softmax_ce.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01, softcap=4.0),
         lambda x: _ce_pair("index", {"label_smoothing": 0.1}, device, 0.01, 4.0)[1](x, t)),
        (lambda x: softmax_ce.cross_entropy(x, p, reduction="sum"),
         lambda x: F.cross_entropy(x, p, reduction="sum")),
        (lambda x: softmax_ce.cross_entropy(x, t, reduction="none"),
         lambda x: F.cross_entropy(x, t, reduction="none")),
        (lambda x: softmax_ce.softmax(x, 1), lambda x: F.softmax(x, 1)),
        (lambda x: softmax_ce.log_softmax(x, 0), lambda x: F.log_softmax(x, 0)),
        (lambda x: softmax_ce.binary_cross_entropy_with_logits(x, p),
         lambda x: F.binary_cross_entropy_with_logits(x, p)),
    ]
    for ours, theirs in cases:
        with fwAD.dual_level():
            a = fwAD.unpack_dual(ours(fwAD.make_dual(x, v)))
            b = fwAD.unpack_dual(theirs(fwAD.make_dual(x, v)))
        assert a.tangent is not None
        _close(a.primal, b.primal)
        _close(a.tangent, b.tangent)


def test_reduced_function_raises_under_transforms(device):
    """ReducedCrossEntropyFunction (the gradient formed in the forward pass) is for plain
    autograd; cross_entropy does not use it under a transform, and applied directly it raises
    torch's clear error instead of computing something."""
    x, t = _inputs("index", device)
    scale = torch.full((), 1 / 6, dtype=DT, device=device).expand(6, 1)

    def direct(x):
        return softmax_ce.ReducedCrossEntropyFunction.apply(
            x.unsqueeze(-1), t.unsqueeze(-1), None, scale, torch.sum, -100, 0.0, 0.0, 0.0)

    with pytest.raises(RuntimeError, match="setup_context"):
        grad(direct)(x)
