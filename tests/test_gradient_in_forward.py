"""The gradient formed in the forward pass (mean / sum reductions, softmax_ce.gradient_in_forward):
the same losses and gradients as the backward-time path, whatever the upstream gradient, a
second backward, a differentiable backward or a reduction that ignores every position."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import (assert_close, assert_unchanged, checksum, formed_in_forward,
                     truth_cross_entropy)

OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "smooth_z": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap_weight": {"softcap": 4.0, "weight": True},
    "ignore": {"ignore_index": 3},
}


def _case(device, dtype, kind, shape=(9, 67)):
    C = shape[1]
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    if kind == "prob":
        t = torch.softmax(torch.randn(shape), 1).to(dtype).to(device)
    else:
        t = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), device=device)
        t.view(-1)[::4] = 3  # some positions hold class 3 (ignored with ignore_index=3)
    return x, t


def _loss_and_grad(x, t, kw, upstream, fused):
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 1.5, x.shape[1], device=x.device).to(x.dtype)
    x = x.detach().clone().requires_grad_()
    with softmax_ce.gradient_in_forward(fused):
        loss = softmax_ce.cross_entropy(x, t, **kw)
    is_fused = formed_in_forward(loss)
    (loss * upstream).backward()
    return loss.detach(), x.grad, is_fused


def _truth_loss_and_grad(x, t, kw, upstream):
    kw = dict(kw)
    xd = x.detach().double().requires_grad_()
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 1.5, x.shape[1], device=x.device).to(x.dtype).double()
    td = t.double() if t.is_floating_point() else t
    loss = truth_cross_entropy(xd, td, **kw)
    (loss * upstream).backward()
    return loss.detach(), xd.grad


# ignore_index applies to class indices only
CASES = [(option, kind) for option in OPTIONS for kind in ("index", "prob")
         if not (kind == "prob" and "ignore_index" in OPTIONS[option])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("option,kind", CASES)
def test_same_as_backward_time_gradient(impl, device, dtype, option, kind):
    kw = OPTIONS[option]
    x, t = _case(device, dtype, kind)
    before = checksum(x, t)
    for upstream in (1.0, -2.5):
        loss_f, grad_f, used = _loss_and_grad(x, t, kw, upstream, True)
        loss_u, grad_u, used_u = _loss_and_grad(x, t, kw, upstream, False)
        assert used and not used_u
        assert torch.equal(loss_f, loss_u)
        # and both are torch's (float64 truth for our extensions and half precision)
        truth, g_truth = _truth_loss_and_grad(x, t, kw, upstream)
        assert_close(loss_f, truth, dtype, scale=3.0, what=f"{option} {kind} loss")
        assert_close(grad_f, g_truth, dtype, what=f"{option} {kind} grad, upstream {upstream}")
        if upstream == 1.0:  # the gradient of the forward, handed over untouched
            assert torch.equal(grad_f, grad_u)
        else:  # redone in its buffer: one more rounding in low precision
            assert_close(grad_f, grad_u, dtype, what=f"{option} {kind} upstream {upstream}")
    assert_unchanged(before, x, t)


def test_matches_torch_kdim_and_unbatched(impl, device):
    for shape in ((3, 5, 4), (2, 6, 3, 5), (7,)):
        C = shape[1] if len(shape) > 1 else shape[0]
        x = torch.randn(shape, device=device, requires_grad=True)
        t = torch.randint(0, C, shape[:1] + shape[2:] if len(shape) > 1 else (), device=device)
        loss = softmax_ce.cross_entropy(x, t)
        loss.backward()
        x2 = x.detach().clone().requires_grad_()
        F.cross_entropy(x2, t).backward()
        torch.testing.assert_close(loss, F.cross_entropy(x2, t))
        torch.testing.assert_close(x.grad, x2.grad)


def test_second_backward_with_retain_graph(impl, device):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (6,), device=device)
    loss = softmax_ce.cross_entropy(x, t, label_smoothing=0.05)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # the first backward handed its gradient over: this one recomputes
    torch.testing.assert_close(x.grad, 2 * first)
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2, t, label_smoothing=0.05).backward()
    torch.testing.assert_close(first, x2.grad)


def test_create_graph_double_backward(impl, device):
    x = torch.randn(5, 11, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (5,), device=device)
    v = torch.randn(5, 11, device=device, dtype=torch.float64)
    (g,) = torch.autograd.grad(softmax_ce.cross_entropy(x, t, z_loss=0.01), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    loss2 = F.cross_entropy(x2, t) + 0.01 * (torch.logsumexp(x2, 1) ** 2).mean()
    (g2,) = torch.autograd.grad(loss2, x2, create_graph=True)
    (h2,) = torch.autograd.grad((g2 * v).sum(), x2)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(h, h2)


def test_probability_target_gradient_too(impl, device):
    x = torch.randn(4, 9, device=device, requires_grad=True)
    p = torch.softmax(torch.randn(4, 9, device=device), 1).requires_grad_()
    softmax_ce.cross_entropy(x, p, label_smoothing=0.2).backward()
    x2, p2 = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    F.cross_entropy(x2, p2, label_smoothing=0.2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(p.grad, p2.grad)


def test_every_position_ignored_like_torch(impl, device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss = softmax_ce.cross_entropy(x, t)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    expected = F.cross_entropy(x2, t)
    expected.backward()
    assert torch.isnan(loss) and torch.isnan(expected)
    torch.testing.assert_close(x.grad, x2.grad, equal_nan=True)


def test_not_used_without_grad_or_with_inplace(impl, device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    t = torch.randint(0, 6, (4,), device=device)
    with torch.no_grad():
        assert softmax_ce.cross_entropy(x, t).grad_fn is None
    loss = softmax_ce.cross_entropy(x.detach(), t)
    assert loss.grad_fn is None
    loss = softmax_ce.cross_entropy(x.clone(), t, inplace_backward=True)
    assert type(loss.grad_fn).__name__ != "ReducedCrossEntropyFunctionBackward"
    loss = softmax_ce.cross_entropy(x, t, reduction="none")
    assert "ReducedCrossEntropy" not in type(loss.grad_fn).__name__


def test_bad_target_raises_before_anything_is_returned(cpu_impl):
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(IndexError):
        softmax_ce.cross_entropy(x, torch.tensor([0, 1, 6, 2]))


def test_switch_as_call_and_context_manager(cpu_impl):
    x = torch.randn(4, 6, requires_grad=True)
    t = torch.randint(0, 6, (4,))

    def fused():
        return formed_in_forward(softmax_ce.cross_entropy(x, t))

    assert fused()
    with softmax_ce.gradient_in_forward(False):
        assert not fused()
        with softmax_ce.gradient_in_forward(True):
            assert fused()
        assert not fused()
    assert fused()
    softmax_ce.gradient_in_forward(False)  # as a call: from then on, in this thread
    try:
        assert not fused()
    finally:
        softmax_ce.gradient_in_forward(True)
    assert fused()


@pytest.mark.parametrize("kind", ["index", "prob"])
# (3, 20000) float32: on a GPU of compute capability 9.0 or later, a cluster of 4 blocks per row
@pytest.mark.parametrize("shape", [(9, 67), (3, 20000)], ids=str)
def test_handed_over_gradient_equals_recomputed_bit_for_bit(impl, device, kind, shape):
    """The gradient formed in the forward pass and the one a second backward recomputes from the
    saved lse are the same bits (gradcheck's reentrancy check depends on it)."""
    x, t = _case(device, torch.float32, kind, shape)
    x.requires_grad_()
    loss = softmax_ce.cross_entropy(x, t, label_smoothing=0.1)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)
    _, expected = _truth_loss_and_grad(x, t, {"label_smoothing": 0.1}, 1.0)
    assert_close(first, expected, torch.float32)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_gradcheck_fast_mode(impl, device, kind):
    """Fast-mode gradcheck backpropagates a random upstream gradient twice and requires the same
    bits: the handed-over gradient redone for it, then a recomputed one."""
    x, t = _case(device, torch.float64, kind, (4, 7))
    x.requires_grad_()
    fn = lambda x: softmax_ce.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


def test_regression_saved_tensor_hooks_see_the_gradient_formed_in_forward(impl, device):
    """Bug: the gradient formed in the forward pass was kept outside save_for_backward, so
    saved-tensor hooks (CPU offload, checkpointing) never saw it. Every tensor kept for backward
    now goes through the hooks, and the gradients stay torch's."""
    x = torch.randn(8, 50, device=device, requires_grad=True)
    t = torch.randint(0, 50, (8,), device=device)
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor.clone()  # what an offloading hook does: a copy comes back

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = softmax_ce.cross_entropy(x * 1.0, t, label_smoothing=0.1)
    assert formed_in_forward(loss)
    grads = [p.reshape(x.shape) for p in packed if p.numel() == x.numel() and p.is_floating_point()]
    assert len(grads) == 2  # the logits and their gradient
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2, t, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    # the packed gradient is torch's (and the logits are the other one)
    assert sum(torch.allclose(p, x2.grad, rtol=2e-5, atol=2e-6) for p in grads) == 1


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_non_reentrant_checkpoint(impl, device, kind):
    """torch.utils.checkpoint (non-reentrant) around a block that ends in the loss: the same
    gradients as torch's, with unit and other upstream gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 30).to(device)
    h = torch.randn(10, 16, device=device, requires_grad=True)
    t = torch.randint(0, 30, (10,), device=device) if kind == "index" else \
        torch.softmax(torch.randn(10, 30, device=device), 1)
    params = [h] + list(lin.parameters())
    for upstream in (1.0, 0.25):
        ours = checkpoint(lambda h: softmax_ce.cross_entropy(lin(h), t, label_smoothing=0.1), h,
                          use_reentrant=False)
        got = torch.autograd.grad(ours * upstream, params)
        theirs = F.cross_entropy(lin(h), t, label_smoothing=0.1)
        expected = torch.autograd.grad(theirs * upstream, params)
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_regression_switches_are_seen_by_worker_threads(cpu_impl):
    """Bug: gradient_in_forward and force_reference were per thread, so worker threads
    (nn.DataParallel, a user's pool) did not see the caller's setting. They are process-wide."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.randn(4, 6, requires_grad=True)
    t = torch.randint(0, 6, (4,))

    def fused_in_worker():
        return formed_in_forward(softmax_ce.cross_entropy(x, t))

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(fused_in_worker).result()
        with softmax_ce.gradient_in_forward(False):
            assert not pool.submit(fused_in_worker).result()
        assert pool.submit(fused_in_worker).result()
        forced = not softmax_ce.ops.reference_forced()
        with softmax_ce.force_reference(forced):
            assert pool.submit(softmax_ce.ops.reference_forced).result() is forced
        assert pool.submit(softmax_ce.ops.reference_forced).result() is not forced
