"""The opt-in in-place gradient (memory saving and its guard) and the nn.Module losses."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from conftest import REQUIRE_EXTENSION
from helpers import assert_close
from softmax_ce import nn as scnn


def _torch_grads(x, t, w, **kw):
    """torch's loss and gradients (logits, and the target when it requires grad) in float64."""
    xd = x.detach().double().requires_grad_()
    td = t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
    loss = F.cross_entropy(xd, td, w, **kw)
    inputs = (xd, td) if t.requires_grad else (xd,)
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_gradient_matches_torch_and_reuses_storage(impl, device, kind, dtype):
    """On an intermediate (the usual case: a model's output) the gradient is written into the
    logits' storage, and it is torch's gradient."""
    x = torch.randn(8, 33, device=device).to(dtype).requires_grad_()
    t = torch.randint(0, 33, (8,), device=device) if kind == "index" else \
        torch.softmax(torch.randn(8, 33, device=device), 1).to(dtype)
    expected_loss, (expected_grad,) = _torch_grads(x, t, None, label_smoothing=0.1)
    logits = x * 1.0  # an intermediate
    ptr = logits.data_ptr()
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    loss = softmax_ce.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True)
    assert_close(loss, expected_loss, dtype)
    loss.backward()
    assert_close(x.grad, expected_grad, dtype)
    assert seen == [ptr]  # the gradient lives in the logits' storage
    assert torch.equal(logits.detach(), x.grad)  # ... and the logits were overwritten


@pytest.mark.parametrize("view", [False, True])
def test_regression_inplace_on_a_leaf_writes_a_fresh_gradient(impl, device, view):
    """Bug: on a leaf (or a view of one) the in-place backward overwrote the leaf's values and
    made .grad share its storage, so an optimizer step read garbage. A leaf now gets a fresh
    gradient and keeps its values."""
    x = torch.randn(6, 9, device=device, requires_grad=True)
    t = torch.randint(0, 9, (6,), device=device)
    before = x.detach().clone()
    logits = x.view(6, 9) if view else x
    softmax_ce.cross_entropy(logits, t, inplace_backward=True).backward()
    assert torch.equal(x.detach(), before)
    assert x.grad.data_ptr() != x.data_ptr()
    _, (expected,) = _torch_grads(before, t, None)
    assert_close(x.grad, expected, torch.float32)
    opt = torch.optim.SGD([x], lr=1.0)
    opt.step()
    torch.testing.assert_close(x.detach(), before - expected.float())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_regression_inplace_with_probability_target_that_requires_grad(impl, device, reduction):
    """Bug: with inplace_backward=True the target's gradient was formed from the logits after
    the backward had overwritten them with their gradient: a silently wrong gradient."""
    x = torch.randn(5, 7, device=device, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(5, 7, device=device, dtype=torch.float64), 1).requires_grad_()
    loss = softmax_ce.cross_entropy(x * 1.0, p, reduction=reduction, label_smoothing=0.1,
                                    inplace_backward=True)
    up = torch.randn(loss.shape, dtype=torch.float64, device=device)
    loss.backward(up)
    xd, pd = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    expected = F.cross_entropy(xd, pd, reduction=reduction, label_smoothing=0.1)
    expected.backward(up)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, xd.grad)
    torch.testing.assert_close(p.grad, pd.grad)


def test_inplace_through_a_model(impl, device):
    lin = torch.nn.Linear(6, 40).to(device)
    h = torch.randn(12, 6, device=device)
    t = torch.randint(0, 40, (12,), device=device)
    ref = torch.autograd.grad(F.cross_entropy(lin(h), t), list(lin.parameters()))
    loss = softmax_ce.cross_entropy(lin(h), t, inplace_backward=True)
    got = torch.autograd.grad(loss, list(lin.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_inplace_guard_other_saved_use_fails(impl, device):
    """The in-place contract: a wrong gradient is impossible. Another autograd use of the logits
    that saved them either ran its backward before ours (the gradients are then right) or
    raises "modified by an inplace operation"; which one happens depends on the order in which
    autograd runs the two backward functions."""
    x = torch.randn(5, 7, device=device, requires_grad=True)
    t = torch.randint(0, 7, (5,), device=device)

    # the other use recorded first: autograd runs our backward first, then the other one raises
    logits = x * 2.0
    other = (logits * logits).sum()  # saves logits for its own backward
    loss = softmax_ce.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()

    # the other use recorded after the loss: its backward runs first and reads intact logits
    x.grad = None
    logits = x * 2.0
    loss = softmax_ce.cross_entropy(logits, t, inplace_backward=True)
    other = (logits ** 2).mean()
    (loss + other).backward()
    xt = x.detach().clone().requires_grad_()
    lt = xt * 2.0
    (F.cross_entropy(lt, t) + (lt ** 2).mean()).backward()
    torch.testing.assert_close(x.grad, xt.grad)


def test_inplace_falls_back_with_create_graph(impl, device):
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 6, (4,), device=device)
    logits = x * 1.0
    before = logits.detach().clone()
    loss = softmax_ce.cross_entropy(logits, t, inplace_backward=True)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.equal(logits.detach(), before)  # a fresh gradient, the logits kept
    v = torch.randn(4, 6, dtype=torch.float64, device=device)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.cross_entropy(xt, t), xt, create_graph=True)
    (ht,) = torch.autograd.grad((gt * v).sum(), xt)
    torch.testing.assert_close(g, gt)
    torch.testing.assert_close(h, ht)


def test_module_state_dict_roundtrip():
    w = torch.rand(5)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    ours = scnn.CrossEntropyLoss(weight=torch.zeros(5), ignore_index=2, label_smoothing=0.1)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, w)
    back = torch.nn.CrossEntropyLoss(weight=torch.zeros(5))
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, w)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(scnn.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict())
    pw = torch.rand(3)
    bce_t = torch.nn.BCEWithLogitsLoss(weight=torch.rand(3), pos_weight=pw)
    bce_o = scnn.BCEWithLogitsLoss(weight=torch.zeros(3), pos_weight=torch.zeros(3))
    bce_o.load_state_dict(bce_t.state_dict())
    assert torch.equal(bce_o.pos_weight, pw)
    assert list(bce_o.state_dict()) == list(bce_t.state_dict())


@pytest.mark.parametrize("module_pair", [
    (lambda: scnn.CrossEntropyLoss(label_smoothing=0.05), lambda: torch.nn.CrossEntropyLoss(label_smoothing=0.05)),
    (lambda: scnn.CrossEntropyLoss(reduction="sum", ignore_index=0), lambda: torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=0)),
    (lambda: scnn.BCEWithLogitsLoss(), lambda: torch.nn.BCEWithLogitsLoss()),
])
def test_module_matches_torch_module(impl, device, module_pair):
    ours, theirs = module_pair[0]().to(device), module_pair[1]().to(device)
    x = torch.randn(6, 4, device=device)
    t = torch.randint(0, 4, (6,), device=device) if isinstance(ours, torch.nn.CrossEntropyLoss) \
        else torch.rand(6, 4, device=device)
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_softmax_modules(impl, device):
    x = torch.randn(3, 5, 2, device=device)
    for ours, theirs in ((scnn.Softmax(dim=1), torch.nn.Softmax(dim=1)),
                         (scnn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1))):
        torch.testing.assert_close(ours(x), theirs(x))


def test_training_loop_matches_torch(impl, device):
    """A few SGD steps with our loss track the same steps with torch's."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7)).to(device)
    model_b = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7)).to(device)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    loss_a_fn = scnn.CrossEntropyLoss(label_smoothing=0.1)
    loss_b_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(5):
        h = torch.randn(16, 10, device=device)
        t = torch.randint(0, 7, (16,), device=device)
        for model, opt, fn in ((model_a, opt_a, loss_a_fn), (model_b, opt_b, loss_b_fn)):
            opt.zero_grad()
            fn(model(h), t).backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_every_op_has_its_compiled_cpu_kernel():
    """A compiled build registers a CPU kernel for every op (one missing registration would
    silently move that op, and the whole device's report, to the reference)."""
    per_op = softmax_ce.implementation("cpu", per_op=True)
    assert set(per_op) == set(softmax_ce.ops.SCHEMAS)
    if softmax_ce._C is None:
        assert not REQUIRE_EXTENSION, softmax_ce.extension_error
        assert set(per_op.values()) == {"reference"}
    else:
        assert set(per_op.values()) == {"compiled"}, per_op
        assert softmax_ce.implementation("cpu") == "compiled"
    assert set(softmax_ce.implementation("meta", per_op=True).values()) == {"reference"}
    assert softmax_ce.build_info()["cpu"] == softmax_ce.implementation("cpu")


def test_output_cache_never_aliases_live_tensors(cpu_impl):
    """Large outputs come from a cache of freed buffers: live ones are never handed out twice."""
    torch.manual_seed(0)
    grads = []
    for _ in range(3):
        x = torch.randn(1024, 2048, requires_grad=True)  # 8 MB: above the cache's threshold
        t = torch.randint(0, 2048, (1024,))
        softmax_ce.cross_entropy(x, t).backward()
        expected = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
        torch.testing.assert_close(x.grad, expected)
        grads.append(x.grad)
    assert len({g.data_ptr() for g in grads}) == 3
    y = softmax_ce.softmax(torch.randn(1024, 2048), 1)
    assert y.data_ptr() not in {g.data_ptr() for g in grads}
    del grads
    softmax_ce.empty_cache()
    x = torch.randn(1024, 2048, requires_grad=True)
    t = torch.zeros(1024, dtype=torch.long)
    softmax_ce.cross_entropy(x, t).backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, t), x)[0])
