"""opcheck on every op, torch.compile(fullgraph=True, dynamic=True) without graph breaks, and
torch.export. These exercise whatever implementation the dispatcher serves (the compiled kernels
when built; CI also runs this file with SOFTMAX_CE_DISABLE_EXTENSION=1 for the reference)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import truth_cross_entropy
from softmax_ce import nn as scnn


def _ce_samples(device):
    out = []
    for shape, requires_grad in (((4, 7, 1), False), ((3, 5, 4), True), ((0, 5, 1), False),
                                 ((2, 6, 3), True)):
        O, C, I = shape
        x = torch.randn(shape, device=device, requires_grad=requires_grad)
        t = torch.randint(0, C, (O, I), device=device)
        if O:
            t[0, 0] = -100
        out.append((x, t, None))
        out.append((x, t.int(), torch.rand(C, device=device)))
    # non-contiguous logits (a transposed view)
    base = torch.randn(5, 6, device=device)
    out.append((base.t().unsqueeze(-1), torch.randint(0, 5, (6, 1), device=device), None))
    out.append((torch.randn(3, 4, 2, device=device, dtype=torch.bfloat16),
                torch.randint(0, 4, (3, 2), device=device), None))
    return out


def _opcheck(op, args):
    # opcheck's autograd test backpropagates through the raw op itself, which has no autograd
    # kernel by design (autograd.py's Functions differentiate the ops): torch warns about that.
    # Only here is the warning expected; pyproject.toml makes it an error everywhere else.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*autograd kernel was not registered.*", UserWarning)
        result = torch.library.opcheck(op, args)
    failures = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failures, failures


def test_opcheck_cross_entropy_ops(device):
    ops = torch.ops.softmax_ce
    for x, t, w in _ce_samples(device):
        for ls, z, cap in ((0.0, 0.0, 0.0), (0.1, 1e-3, 5.0)):
            _opcheck(ops.ce_fwd.default, (x, t, w, -100, ls, z, cap))
            loss, lse = ops.ce_fwd(x.detach(), t, w, -100, ls, z, cap)
            g = torch.randn_like(loss)
            _opcheck(ops.ce_bwd.default, (g, x, t, w, lse, -100, ls, z, cap))
            _opcheck(ops.ce_bwd_.default, (g, x.detach().clone(), t, w, lse, -100, ls, z, cap))
            p = torch.softmax(torch.randn(x.shape, device=device), 1).to(x.dtype)
            _opcheck(ops.ce_prob_fwd.default, (x, p, w, ls, z, cap))
            loss, lse = ops.ce_prob_fwd(x.detach(), p, w, ls, z, cap)
            _opcheck(ops.ce_prob_bwd.default, (g, x, p, w, lse, ls, z, cap))
            _opcheck(ops.ce_prob_bwd_.default, (g, x.detach().clone(), p, w, lse, ls, z, cap))
            _opcheck(ops.ce_fwd_bwd.default, (g, x, t, w, -100, ls, z, cap))
            _opcheck(ops.ce_prob_fwd_bwd.default, (g, x, p, w, ls, z, cap))
            if x.shape[0]:
                # a broadcast upstream gradient (the mean's 1 / denominator), as functional passes
                scale = torch.full((), 0.25, device=device).expand(x.shape[0], x.shape[2])
                _opcheck(ops.ce_fwd_bwd.default, (scale, x, t, w, -100, ls, z, cap))


def test_opcheck_redone_backward(device):
    """The gradient formed in the forward pass, redone for another upstream gradient (or kept)."""
    ops = torch.ops.softmax_ce
    for x, t, w in _ce_samples(device):
        if not x.shape[0]:
            continue
        p = torch.softmax(torch.randn(x.shape, device=device), 1).to(x.dtype)
        for value in (1.0, 0.5):
            up = torch.tensor(value, device=device)
            scale = torch.full((), 0.25, device=device).expand(x.shape[0], x.shape[2])
            g = up * scale
            _, lse, grad = ops.ce_fwd_bwd(scale, x.detach(), t, w, -100, 0.1, 1e-3, 5.0)
            _opcheck(ops.ce_bwd_redo_.default,
                     (up, g, x.detach(), t, w, lse, -100, 0.1, 1e-3, 5.0, grad.clone()))
            _, lse, grad = ops.ce_prob_fwd_bwd(scale, x.detach(), p, w, 0.1, 1e-3, 5.0)
            _opcheck(ops.ce_prob_bwd_redo_.default,
                     (up, g, x.detach(), p, w, lse, 0.1, 1e-3, 5.0, grad.clone()))


def test_opcheck_softmax_and_sigmoid_ops(device):
    ops = torch.ops.softmax_ce
    for x, _, _ in _ce_samples(device):
        for log in (False, True):
            _opcheck(ops.softmax_fwd.default, (x, log))
            y = ops.softmax_fwd(x.detach(), log)
            _opcheck(ops.softmax_bwd.default, (torch.randn_like(y), y, log))
        y = torch.rand(x.shape, device=device, dtype=x.dtype)
        w = torch.rand(x.shape[-1:], device=device, dtype=x.dtype)
        for weight, pos_weight in ((None, None), (w, None), (None, w), (w, w)):
            _opcheck(ops.sigmoid_ce_fwd.default, (x, y, weight, pos_weight))
            g = torch.randn(x.shape, device=device, dtype=x.dtype)
            _opcheck(ops.sigmoid_ce_bwd.default, (g, x, y, weight, pos_weight))


class _Model(torch.nn.Module):
    def __init__(self, loss, features=8, classes=6):
        super().__init__()
        self.proj = torch.nn.Linear(features, classes)
        self.loss = loss

    def forward(self, h, target):
        return self.loss(self.proj(h), target)


LOSSES = {
    "ce": lambda: scnn.CrossEntropyLoss(),
    "ce_options": lambda: scnn.CrossEntropyLoss(
        weight=torch.rand(6) + 0.5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, ignore_index=2
    ),
    "ce_sum": lambda: scnn.CrossEntropyLoss(reduction="sum"),
    "ce_inplace": lambda: scnn.CrossEntropyLoss(inplace_backward=True),
    "ce_prob": lambda: scnn.CrossEntropyLoss(label_smoothing=0.05),
    "bce": lambda: scnn.BCEWithLogitsLoss(pos_weight=torch.rand(6) + 0.5),
    "log_softmax_nll": lambda: _Composed(scnn.LogSoftmax(dim=1), F.nll_loss),
    "softmax_mse": lambda: _Composed(scnn.Softmax(dim=1), lambda p, t: (p - F.one_hot(t, 6)).pow(2).mean()),
}


class _Composed(torch.nn.Module):
    def __init__(self, module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, x, t):
        return self.fn(self.module(x), t)


def _target(name, n, device):
    if name == "ce_prob":
        return torch.softmax(torch.randn(n, 6, device=device), 1)
    if name == "bce":
        return torch.rand(n, 6, device=device)
    return torch.randint(0, 6, (n,), device=device)


# Each loss in torch's own functions (our extensions in the float64-style formula of helpers.py),
# given our module (for its buffers): the eager results are checked against these.
TORCH_LOSSES = {
    "ce": lambda m: F.cross_entropy,
    "ce_options": lambda m: lambda x, t: truth_cross_entropy(
        x, t, m.weight, ignore_index=2, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
    "ce_sum": lambda m: lambda x, t: F.cross_entropy(x, t, reduction="sum"),
    "ce_inplace": lambda m: F.cross_entropy,
    "ce_prob": lambda m: lambda x, t: F.cross_entropy(x, t, label_smoothing=0.05),
    "bce": lambda m: lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=m.pos_weight),
    "log_softmax_nll": lambda m: lambda x, t: F.nll_loss(F.log_softmax(x, 1), t),
    "softmax_mse": lambda m: lambda x, t: (F.softmax(x, 1) - F.one_hot(t, 6)).pow(2).mean(),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_compile_fullgraph_dynamic(device, name):
    torch._dynamo.reset()
    model = _Model(LOSSES[name]()).to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for n in (4, 7, 9):
        h = torch.randn(n, 8, device=device)
        t = _target(name, n, device)
        eager_loss = model(h, t)
        eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
        torch_loss = TORCH_LOSSES[name](model.loss)(model.proj(h), t)
        torch.testing.assert_close(eager_loss, torch_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(eager_grads, torch.autograd.grad(torch_loss, list(model.parameters()))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        comp_loss = compiled(h, t)
        comp_grads = torch.autograd.grad(comp_loss, list(model.parameters()))
        torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(comp_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ce", "ce_options", "bce", "log_softmax_nll"])
def test_no_graph_break(device, name):
    torch._dynamo.reset()
    model = _Model(LOSSES[name]()).to(device)

    h = torch.randn(5, 8, device=device)
    explanation = torch._dynamo.explain(model)(h, _target(name, 5, device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_kdim_and_softmax_functions(device):
    torch._dynamo.reset()

    def fn(x, t):
        return (softmax_ce.cross_entropy(x, t, label_smoothing=0.1)
                + softmax_ce.softmax(x, 1).sum() + softmax_ce.log_softmax(x, -1).mean())

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 5, 4, 3, device=device, requires_grad=True)
        t = torch.randint(0, 5, (n, 4, 3), device=device)
        eager = fn(x, t)
        (g_eager,) = torch.autograd.grad(eager, x)
        comp = compiled(x, t)
        (g_comp,) = torch.autograd.grad(comp, x)
        torch.testing.assert_close(comp, eager)
        torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.parametrize("name", ["ce", "ce_options", "ce_prob", "bce", "log_softmax_nll"])
def test_export(device, name):
    model = _Model(LOSSES[name]()).to(device)
    h = torch.randn(5, 8, device=device)
    t = _target(name, 5, device)
    exported = torch.export.export(model, (h, t))
    assert any("softmax_ce" in str(node.target) for node in exported.graph.nodes)
    h2 = torch.randn(5, 8, device=device)
    t2 = _target(name, 5, device)
    torch.testing.assert_close(exported.module()(h2, t2), model(h2, t2))
    torch.testing.assert_close(model(h2, t2), TORCH_LOSSES[name](model.loss)(model.proj(h2), t2))


@pytest.mark.parametrize("classes", [
    50, pytest.param(32000, marks=pytest.mark.slow, id="32000-slow")])
def test_regression_compile_changing_row_counts_at_most_one_recompile(classes):
    """Bug: the fixed-order sum branched on the number of positions in Python, so every new
    row count above 4096 (a multiple of 4096 or not, one more level or not) recompiled. A
    training step compiled with dynamic shapes at 4096 rows, then run at other row counts:
    no graph break, at most one recompile (inductor's own split at 4096 elements), and the
    compiled loss and gradient equal eager torch's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def step(x, t):
        return softmax_ce.cross_entropy(x, t, label_smoothing=0.1)

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for n in (4096, 4100, 6000, 8192):
        x = torch.randn(n, classes, requires_grad=True)
        t = torch.randint(0, classes, (n,))
        loss = compiled(x, t)
        (grad,) = torch.autograd.grad(loss, x)
        first = counter.frame_count if first is None else first
        expected = F.cross_entropy(x, t, label_smoothing=0.1)
        (expected_grad,) = torch.autograd.grad(expected, x)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
        del x, grad, expected_grad
    assert counter.frame_count - first <= 1, counter.frame_count - first


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _offset(x):
    """The same values in a contiguous tensor that starts one element into its storage (its
    data pointer is not 16-byte aligned)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    buf[1:] = x.reshape(-1)
    return buf[1:].view(x.shape)


def test_regression_fakes_match_real_outputs_on_unaligned_inputs(device):
    """Bug (CUDA): outputs of an input with a storage offset were allocated with the input's
    alignment (a storage offset of their own) while the fakes promise offset 0, which compiled
    code trusts. Every op's real outputs must have the fake's sizes, strides and offset."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.softmax_ce
    for dtype in (torch.float32, torch.bfloat16):
        x = _offset(torch.randn(3, 37, 2, device=device).to(dtype))
        t = torch.randint(0, 37, (3, 2), device=device)
        p = _offset(torch.softmax(torch.randn(3, 37, 2, device=device), 1).to(dtype))
        g = torch.rand(3, 2, device=device)
        _, lse = ops.ce_fwd(x, t, None, -100, 0.1, 0.0, 0.0)
        y = _offset(torch.rand(3, 37, 2, device=device).to(dtype))
        calls = [
            (ops.ce_fwd.default, (x, t, None, -100, 0.1, 0.0, 0.0)),
            (ops.ce_bwd.default, (g, x, t, None, lse, -100, 0.1, 0.0, 0.0)),
            (ops.ce_prob_fwd.default, (x, p, None, 0.1, 0.0, 0.0)),
            (ops.ce_prob_bwd.default, (g, x, p, None, lse, 0.1, 0.0, 0.0)),
            (ops.ce_fwd_bwd.default, (g, x, t, None, -100, 0.1, 0.0, 0.0)),
            (ops.ce_prob_fwd_bwd.default, (g, x, p, None, 0.1, 0.0, 0.0)),
            (ops.softmax_fwd.default, (x, False)),
            (ops.softmax_bwd.default, (y, y, True)),
            (ops.sigmoid_ce_fwd.default, (x, y, None, None)),
            (ops.sigmoid_ce_bwd.default, (y, x, y, None, None)),
        ]
        for op, args in calls:
            real = _as_tuple(op(*args))
            with FakeTensorMode() as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = _as_tuple(op(*fake_args))
            for r, f in zip(real, fake):
                meta = lambda v: (tuple(v.shape), v.stride(), v.storage_offset(), v.dtype)  # noqa: E731
                assert meta(r) == meta(f), (op, meta(r), meta(f))
            _opcheck(op, args)


def test_compile_on_unaligned_input(device):
    torch._dynamo.reset()

    def step(x, t):
        return softmax_ce.cross_entropy(x, t, label_smoothing=0.1) + softmax_ce.softmax(x, 1).amax()

    compiled = torch.compile(step, fullgraph=True)
    x = _offset(torch.randn(6, 33, device=device)).requires_grad_()
    t = torch.randint(0, 33, (6,), device=device)
    got = compiled(x, t)
    (g,) = torch.autograd.grad(got, x)
    xt = x.detach().clone().requires_grad_()
    expected = F.cross_entropy(xt, t, label_smoothing=0.1) + F.softmax(xt, 1).amax()
    (gt,) = torch.autograd.grad(expected, xt)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g, gt)
