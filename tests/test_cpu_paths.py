"""The CPU kernels' special paths, each against a float64 truth through torch ops: narrow rows
(C <= 64, vectorised across rows), the fused forward+backward of rows with one exponential per
logit (multi-chunk rows, -inf chunks, every dtype), and the host fast path of cross_entropy
(one compiled call for the common mean / sum: the same bits as the general path, torch's values,
errors and fallbacks), and the fixed-order sum it shares with the general path."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from softmax_ce import ops
from conftest import require_compiled
from helpers import assert_close, assert_unchanged, checksum, truth_cross_entropy

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

OPTIONS = {
    "plain": {},
    "weight_smooth_ignore": {"weight": True, "label_smoothing": 0.2, "ignore_index": 1},
    "softcap_z": {"softcap": 3.0, "z_loss": 0.01},
    "prob": {"prob": True, "label_smoothing": 0.1},
    "prob_weight_cap": {"prob": True, "weight": True, "softcap": 2.0},
}


def _inputs(N, C, dtype, kw):
    kw = dict(kw)
    x = (torch.randn(N, C, dtype=torch.float64) * 3).to(dtype)
    if kw.pop("prob", False):
        t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, C, (N,))
        if N > 2:
            t[::3] = kw.get("ignore_index", -100)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 1.5, C, dtype=torch.float64).to(dtype)
    return x, t, kw


def _truth(x, t, kw, reduction):
    kwd = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    xd = x.double().requires_grad_()
    td = t.double() if t.is_floating_point() else t
    loss = truth_cross_entropy(xd, td, reduction=reduction, **kwd)
    (g,) = torch.autograd.grad(loss.sum(), xd)
    return loss.detach(), g


def _ours(x, t, kw, reduction, **extra):
    xr = x.clone().requires_grad_().clone()  # an intermediate: in-place allowed
    loss = softmax_ce.cross_entropy(xr, t, reduction=reduction, **kw, **extra)
    (g,) = torch.autograd.grad(loss.sum(), xr)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 3, 10, 33, 64, 65])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_narrow_rows_match_truth(cpu_impl, dtype, C, option):
    """Row counts that fill no group, one group and groups with a remainder (2L rows per group:
    16 / 32 lanes), for C on both sides of the narrow limit (64)."""
    for N in (1, 37, 70):
        x, t, kw = _inputs(N, C, dtype, OPTIONS[option])
        before = checksum(x, t)
        for reduction in ("none", "mean", "sum"):
            loss, grad = _ours(x, t, kw, reduction)
            loss_t, grad_t = _truth(x, t, kw, reduction)
            what = f"N={N} C={C} {option} {reduction}"
            assert_close(loss, loss_t, dtype, scale=3.0, what=what + " loss")
            assert_close(grad, grad_t, dtype, what=what + " grad")
            # the in-place gradient (written into the logits' storage): the same values
            _, grad_i = _ours(x, t, kw, reduction, inplace_backward=True)
            assert_close(grad_i, grad_t, dtype, what=what + " in-place grad")
        assert_unchanged(before, x, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", ["plain", "weight_smooth_ignore", "prob"])
def test_fused_rows_across_chunks(cpu_impl, dtype, option):
    """Rows of several 2048-logit chunks (the kept exponentials are relative to the running
    maximum after each chunk): the maximum in the last chunk, a first chunk of -inf only, a row
    of -inf but one logit, and a handed-over gradient equal to a recomputed one, bit for bit."""
    C = 5000
    x, t, kw = _inputs(5, C, dtype, OPTIONS[option])
    x[0, 4990] = 40.0
    x[1, :2048] = float("-inf")
    x[2, :] = float("-inf")
    x[2, 4321] = 1.0
    if not t.is_floating_point():
        t[1] = 3000
        t[2] = 4321
    for reduction in ("mean", "sum"):
        loss, grad = _ours(x, t, kw, reduction)
        # torch in float64 (the written-out truth has 0 * inf where the logits are -inf)
        kwd = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        xd = x.double().requires_grad_()
        loss_t = F.cross_entropy(xd, t.double() if t.is_floating_point() else t,
                                 reduction=reduction, **kwd)
        (grad_t,) = torch.autograd.grad(loss_t, xd)
        assert_close(loss, loss_t, dtype, scale=3.0, what=f"{option} {reduction} loss")
        assert_close(grad, grad_t, dtype, what=f"{option} {reduction} grad")
    xr = x.clone().requires_grad_()
    loss = softmax_ce.cross_entropy(xr, t, **kw)
    (first,) = torch.autograd.grad(loss, xr, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xr)  # recomputed by the backward kernel
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_large_gradient_rows_streamed(cpu_impl, dtype):
    """Gradients of 8 MB or more in rows of whole cache lines are written with non-temporal
    stores (ce_cpu.cpp, stream_output): the fused and the backward-time gradient against a float64
    truth, and a recomputed gradient the same bits as the handed-over one."""
    N = 256 if dtype == torch.float32 else 512
    x, t, kw = _inputs(N, 8192, dtype, {"label_smoothing": 0.1})
    assert x.numel() * x.element_size() >= 8 << 20
    for reduction in ("mean", "none"):
        loss, grad = _ours(x, t, kw, reduction)
        loss_t, grad_t = _truth(x, t, kw, reduction)
        assert_close(loss, loss_t, dtype, scale=3.0, what=f"{reduction} loss")
        assert_close(grad, grad_t, dtype, what=f"{reduction} grad")
    xr = x.clone().requires_grad_()
    loss = softmax_ce.cross_entropy(xr, t, **kw)
    (first,) = torch.autograd.grad(loss, xr, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xr)
    assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------
# The host fast path
# ------------------------------------------------------------------------------------------

@pytest.fixture
def general_path(monkeypatch):
    """A function that runs a call with the host fast path switched off (the general path)."""
    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(softmax_ce._core, "host_cross_entropy", lambda *args: None)
            return fn()
    return run


def _host_node(loss):
    """Whether the loss came from the host path's autograd node (behind a cast for half types)."""
    fn = loss.grad_fn
    if fn.name() == "ToCopyBackward0":
        fn = fn.next_functions[0][0]
    return "HostCeFunction" in fn.name()


def _loss_grad(x, t, kw, upstream=1.0):
    xr = x.clone().requires_grad_()
    loss = softmax_ce.cross_entropy(xr, t, **kw)
    (loss * upstream).backward()
    return loss, xr.grad


HOST_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 2},
    {"z_loss": 1e-3, "label_smoothing": 0.05},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", range(len(HOST_OPTIONS)))
@pytest.mark.parametrize("shape", [(64, 10), (256, 1000), (9000, 3)], ids=str)
def test_host_path_same_bits_as_general_path(general_path, dtype, option, shape):
    require_compiled("cpu")  # skipped without the kernels; a failure where they are required
    x, t, kw = _inputs(*shape, dtype, {k: v for k, v in HOST_OPTIONS[option].items()})
    xr = x.clone().requires_grad_()
    host_loss = softmax_ce.cross_entropy(xr, t, **kw)
    assert _host_node(host_loss)
    for upstream in (1.0, -2.5):
        loss, grad = _loss_grad(x, t, kw, upstream)
        loss_g, grad_g = general_path(lambda: _loss_grad(x, t, kw, upstream))
        assert torch.equal(loss, loss_g) and loss.dtype == dtype
        assert torch.equal(grad, grad_g)
    with torch.no_grad():
        nograd = softmax_ce.cross_entropy(x, t, **kw)
        nograd_g = general_path(lambda: softmax_ce.cross_entropy(x, t, **kw))
    assert torch.equal(nograd, nograd_g) and torch.equal(nograd, loss.detach())
    reduction = kw.pop("reduction", "mean")
    truth, g_truth = _truth(x, t, kw, reduction)
    assert_close(loss, truth, dtype, scale=3.0, what="host loss")
    assert_close(grad, -2.5 * g_truth, dtype, scale=3.0, what="host grad")


def test_host_path_against_torch_and_its_errors():
    require_compiled("cpu")  # skipped without the kernels; a failure where they are required
    x = torch.randn(64, 10, requires_grad=True)
    t = torch.randint(0, 10, (64,))
    x2 = x.detach().clone().requires_grad_()
    loss = softmax_ce.cross_entropy(x, t)
    expected = F.cross_entropy(x2, t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, x2.grad)
    # the host op below autograd (inference mode): the loss alone, torch's value
    with torch.inference_mode():
        torch.testing.assert_close(ops.ce_loss_host(x, t, None, -100, 0.0, 0.0, True), expected)
    # every position ignored: NaN for the mean, 0 for the sum, as torch
    t_ign = torch.full((64,), -100)
    with torch.no_grad():
        assert torch.isnan(softmax_ce.cross_entropy(x, t_ign))
        assert softmax_ce.cross_entropy(x, t_ign, reduction="sum") == 0
    # out-of-range class: torch's IndexError, inputs untouched, with and without grad
    bad = t.clone()
    bad[5] = 10
    before = checksum(x, bad)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="Target 10 is out"):
            softmax_ce.cross_entropy(x, bad)
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="Target 10 is out"):
            softmax_ce.cross_entropy(x, bad, weight=torch.ones(10))
    assert_unchanged(before, x, bad)
    # arguments the host path does not take go to the general path, which raises as torch does
    with pytest.raises(ValueError, match="batch_size"):
        softmax_ce.cross_entropy(x, t[:3])
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        softmax_ce.cross_entropy(x, t, weight=torch.ones(3))
    with pytest.raises(RuntimeError, match="label_smoothing must be between"):
        softmax_ce.cross_entropy(x, t, label_smoothing=1.5)


def test_host_path_second_and_differentiable_backward():
    require_compiled("cpu")  # skipped without the kernels; a failure where they are required
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    loss = softmax_ce.cross_entropy(x, t, label_smoothing=0.05)
    assert _host_node(loss)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)  # recomputed: the same bits
    assert torch.equal(first, second)
    v = torch.randn(6, 40, dtype=torch.float64)
    w = torch.linspace(0.5, 2.0, 40, dtype=torch.float64)
    t[2] = 7
    for kw in ({"z_loss": 0.01}, {"weight": w, "label_smoothing": 0.1, "ignore_index": 7},
               {"reduction": "sum", "label_smoothing": 0.3}):
        kw_torch = {k: val for k, val in kw.items() if k != "z_loss"}
        z = kw.get("z_loss", 0.0)
        loss = softmax_ce.cross_entropy(x, t, **kw)
        assert _host_node(loss)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        x2 = x.detach().clone().requires_grad_()
        loss2 = F.cross_entropy(x2, t, **kw_torch) + z * (torch.logsumexp(x2, 1) ** 2).mean()
        (g2,) = torch.autograd.grad(loss2, x2, create_graph=True)
        (h2,) = torch.autograd.grad((g2 * v).sum(), x2)
        torch.testing.assert_close(g, g2)
        torch.testing.assert_close(h, h2)
        # the gradient's derivative with respect to the upstream gradient (a gradient penalty)
        u = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        (gu,) = torch.autograd.grad(loss * u, x, create_graph=True)
        (du,) = torch.autograd.grad((gu * v).sum(), u)
        torch.testing.assert_close(du, (g2 * v).sum().detach())


def test_host_path_under_autocast_and_transforms():
    """Calls the host path does not serve give torch's results by the general path."""
    require_compiled("cpu")  # skipped without the kernels; a failure where they are required
    x = torch.randn(8, 5)
    t = torch.randint(0, 5, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = softmax_ce.cross_entropy(x.bfloat16(), t)
        theirs = F.cross_entropy(x.bfloat16(), t)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    g = torch.func.grad(lambda x: softmax_ce.cross_entropy(x, t))(x)
    torch.testing.assert_close(g, torch.func.grad(lambda x: F.cross_entropy(x, t))(x))


def test_fixed_sum_independent_of_threads_and_differentiable():
    require_compiled("cpu")  # skipped without the kernels; a failure where they are required
    from softmax_ce.fixed_sum import fixed_order_sum

    values = torch.randn(100_003, dtype=torch.float32) * 1e3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.fixed_sum(values)
        torch.set_num_threads(max(2, threads))
        many = ops.fixed_sum(values)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    torch.testing.assert_close(one.double(), values.double().sum(), rtol=1e-7, atol=0)
    v = torch.randn(5000, dtype=torch.float64, requires_grad=True)
    total = fixed_order_sum(v)
    total.backward()
    assert torch.equal(v.grad, torch.ones_like(v))
    torch.testing.assert_close(total, v.detach().sum())
    with pytest.raises(RuntimeError, match="'values' must be float32 or float64"):
        ops.fixed_sum(torch.ones(3, dtype=torch.int64))


def test_regression_first_call_under_compile(monkeypatch):
    """Bug: the host path's check for its kernels ran (once, then cached) inside the first call;
    when that call was traced by torch.compile(fullgraph=True) the check was a graph break. The
    host path now steps aside before it under compile (the cache is reset here to make this call
    the first)."""
    monkeypatch.setattr(ops, "_host", [None])
    torch._dynamo.reset()
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    compiled = torch.compile(lambda x, t: softmax_ce.cross_entropy(x, t, label_smoothing=0.1),
                             backend="eager", fullgraph=True)
    loss = compiled(x, t)
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    expected = F.cross_entropy(x2, t, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(g, torch.autograd.grad(expected, x2)[0])
    torch._dynamo.reset()
