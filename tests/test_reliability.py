"""Reliability: non-finite semantics pinned to torch's, determinism (repeated runs, thread
counts, concurrent Python threads), and a tensor with more than 2^31 elements (slow)."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import TOL


def _nonfinite_logits(dtype=torch.float32):
    x = torch.randn(7, 6, dtype=torch.float64) * 2
    x[0, :] = -math.inf              # a row of -inf
    x[1, :3] = -math.inf             # partly masked
    x[2, 4] = math.inf               # a +inf logit
    x[3, 1] = math.nan               # a NaN logit
    x[4, 0] = -math.inf              # masked class that is also ...
    x[5, 2:] = -math.inf             # ... mostly masked
    return x.to(dtype)


NONFINITE_OPTIONS = [
    dict(), dict(label_smoothing=0.2), dict(weight=True), dict(reduction="sum"),
    dict(ignore_index=0), dict(prob=True), dict(prob=True, label_smoothing=0.1),
]


@pytest.mark.parametrize("options", NONFINITE_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_finite_cross_entropy_matches_torch(cpu_impl, options, dtype):
    """NaN where torch gives NaN, inf where inf, finite where finite: loss and gradient."""
    kw = dict(options)
    x = _nonfinite_logits(dtype)
    if kw.pop("prob", False):
        t = torch.softmax(torch.randn(7, 6), 1).to(dtype)
    else:
        t = torch.tensor([1, 4, 0, 2, 3, 0, 1])
    w = torch.rand(6).to(dtype) + 0.5 if kw.pop("weight", False) else None
    kw.setdefault("reduction", "none")
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = softmax_ce.cross_entropy(xo, t, w, **kw)
    theirs = F.cross_entropy(xt.double(), t.double() if t.is_floating_point() else t,
                             w.double() if w is not None else None, **kw)
    assert torch.equal(ours.double().isnan(), theirs.isnan())
    assert torch.equal(ours.double().isinf(), theirs.isinf())
    finite = torch.isfinite(theirs)
    tol = TOL[dtype]  # each dtype at its own precision (bf16 against the float64 truth)
    scale = 3.0 if dtype == torch.bfloat16 else 1.0
    torch.testing.assert_close(ours.double()[finite], theirs[finite], rtol=tol["rtol"] * scale,
                               atol=tol["atol"] * scale)
    up = torch.ones_like(ours)
    (g,) = torch.autograd.grad(ours, xo, up)
    (g_ref,) = torch.autograd.grad(theirs, xt, up.double())
    assert torch.equal(g.isnan(), g_ref.isnan()), (g, g_ref)
    fin = torch.isfinite(g_ref)
    torch.testing.assert_close(g.double()[fin], g_ref.double()[fin], rtol=tol["rtol"],
                               atol=tol["atol"])


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_non_finite_softmax_matches_torch(cpu_impl, name):
    x = _nonfinite_logits().requires_grad_()
    ours = getattr(softmax_ce, name)(x, 1)
    theirs = getattr(F, name)(x, 1)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    g = torch.randn(7, 6)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0],
                               equal_nan=True)


def test_non_finite_bce_matches_torch(cpu_impl):
    x = torch.tensor([-math.inf, -50.0, 0.0, 50.0, math.inf, math.nan], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    ours = softmax_ce.binary_cross_entropy_with_logits(x, y, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0],
                               torch.autograd.grad(theirs.sum(), x)[0], equal_nan=True)


def _run_all(x, t, w):
    """Loss (every reduction) and gradient of a few options, as raw bits."""
    out = []
    for kw in (dict(), dict(label_smoothing=0.1, weight=w), dict(z_loss=1e-3, softcap=10.0)):
        for reduction in ("mean", "sum", "none"):
            xr = x.clone().requires_grad_()
            loss = softmax_ce.cross_entropy(xr, t, kw.get("weight"), reduction=reduction,
                                            **{k: v for k, v in kw.items() if k != "weight"})
            loss.sum().backward()
            out += [loss.detach().clone(), xr.grad]
    y = softmax_ce.softmax(x, 1)
    out.append(y)
    out.append(softmax_ce.binary_cross_entropy_with_logits(x, torch.sigmoid(x.flip(1))))
    return out


def _bits_equal(a, b):
    return all(torch.equal(u.view(-1).view(torch.int32) if u.dtype == torch.float32 else u,
                           v.view(-1).view(torch.int32) if v.dtype == torch.float32 else v)
               for u, v in zip(a, b))


@pytest.fixture
def det_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5000, generator=g) * 3  # large enough to be split across threads
    t = torch.randint(0, 5000, (300,), generator=g)
    t[::7] = -100
    w = torch.rand(5000, generator=g) + 0.5
    return x, t, w


def test_deterministic_across_runs_and_thread_counts(cpu_impl, det_inputs):
    first = _run_all(*det_inputs)
    # what is compared bit for bit is also torch's result (plain options, mean)
    x, t, _ = det_inputs
    xt = x.clone().requires_grad_()
    expected = F.cross_entropy(xt, t)
    expected.backward()
    tol = TOL[torch.float32]
    torch.testing.assert_close(first[0], expected, **tol)
    torch.testing.assert_close(first[1], xt.grad, **tol)
    assert _bits_equal(first, _run_all(*det_inputs))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run_all(*det_inputs)
    finally:
        torch.set_num_threads(threads)
    assert _bits_equal(first, single)


def test_concurrent_python_threads_match_serial(cpu_impl, det_inputs):
    serial = _run_all(*det_inputs)
    results, errors = [None] * 4, []
    reference_forced = softmax_ce.ops.reference_forced()

    def work(i):
        try:
            with softmax_ce.force_reference(reference_forced):
                results[i] = _run_all(*det_inputs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for r in results:
        assert _bits_equal(serial, r)


@pytest.mark.slow
def test_more_than_2_31_elements_bf16(cpu_impl):
    """outer * C > 2^31 in bf16 (~4.3 GB of logits): per-row losses and sampled gradient rows
    equal those of the same rows computed in small chunks (so no offset wrapped), and agree with
    torch in float32 on a sample."""
    if cpu_impl == "reference":
        pytest.skip("the reference's float64 temporaries would need ~50 GB here")
    C = 1 << 17
    N = (1 << 31) // C + 3
    assert N * C > 2**31
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, C, dtype=torch.bfloat16)
    for i in range(0, N, 1024):  # fill in chunks: a float32 copy of it all would be 8.6 GB
        x[i:i + 1024] = torch.randn(min(1024, N - i), C, generator=g)
    t = torch.randint(0, C, (N,), generator=g)
    xr = x.requires_grad_()
    loss = softmax_ce.cross_entropy(xr, t, reduction="none")
    loss.sum().backward()
    grad = xr.grad
    rows = torch.tensor([0, 1, N // 2, N - 3, N - 2, N - 1])
    for start in (0, N // 2, N - 3):
        chunk = x.detach()[start:start + 3].clone().requires_grad_()
        chunk_loss = softmax_ce.cross_entropy(chunk, t[start:start + 3], reduction="none")
        chunk_loss.sum().backward()
        assert torch.equal(chunk_loss, loss[start:start + 3])
        assert torch.equal(chunk.grad, grad[start:start + 3])
    x32 = x.detach()[rows].float().requires_grad_()
    ref = F.cross_entropy(x32, t[rows], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss[rows].float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output
    torch.testing.assert_close(grad[rows].float(), x32.grad, rtol=1e-2, atol=1e-4)


def test_regression_log_softmax_backward_of_nan_row(cpu_impl):
    """Bug found by the non-finite tests: the CPU log_softmax backward computed exp(y) with the
    fast exponential, which maps NaN to a finite value, so a NaN row (all -inf, +inf or NaN
    logits) got a finite gradient where torch's is NaN."""
    x = torch.tensor([[-math.inf] * 4, [0.0, 1.0, math.nan, 2.0], [0.0, 1.0, 2.0, 3.0]],
                     requires_grad=True)
    g = torch.tensor([[1.0, -1.0, 0.5, 2.0]] * 3)
    (ours,) = torch.autograd.grad(softmax_ce.log_softmax(x, 1), x, g)
    (theirs,) = torch.autograd.grad(F.log_softmax(x, 1), x, g)
    assert ours[:2].isnan().all()
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_regression_reductions_independent_of_thread_count(cpu_impl):
    """Bug found by the determinism tests: reductions used torch.sum, whose CPU result depends
    on the number of threads; 'mean' and 'sum' now sum in a fixed order."""
    x = torch.randn(100003, 3, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(100003, dtype=torch.long)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [softmax_ce.cross_entropy(x, t, reduction=r) for r in ("mean", "sum")]
    finally:
        torch.set_num_threads(threads)
    many = [softmax_ce.cross_entropy(x, t, reduction=r) for r in ("mean", "sum")]
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_targets_that_require_grad(cpu_impl):
    """Probability targets and BCE targets may require grad (torch differentiates them)."""
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1).requires_grad_()
    ours = torch.autograd.grad(softmax_ce.cross_entropy(x, p, label_smoothing=0.1), (x, p))
    theirs = torch.autograd.grad(F.cross_entropy(x, p, label_smoothing=0.1), (x, p))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    y = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    pw = torch.rand(4, dtype=torch.float64) + 0.5
    ours = torch.autograd.grad(softmax_ce.binary_cross_entropy_with_logits(x, y, pos_weight=pw), (x, y))
    theirs = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, y, pos_weight=pw), (x, y))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_ignored_nan_row_like_torch(cpu_impl, reduction, ls):
    """An ignored position whose logits hold a NaN: loss 0 (it is not read), gradient row NaN
    (torch's log_softmax backward multiplies it by 0), as torch. The README said "NaN loss even
    when ignored"; the code was right, the README is now too."""
    x = torch.randn(3, 4, dtype=torch.float64)
    x[1, 0] = math.nan
    t = torch.tensor([1, -100, 2])
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = softmax_ce.cross_entropy(xo, t, reduction=reduction, label_smoothing=ls)
    theirs = F.cross_entropy(xt, t, reduction=reduction, label_smoothing=ls)
    torch.testing.assert_close(ours, theirs)
    assert torch.isfinite(ours).all()
    up = torch.randn(ours.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(ours, xo, up)
    (g_ref,) = torch.autograd.grad(theirs, xt, up)
    assert g[1].isnan().all() and torch.isfinite(g[[0, 2]]).all()
    torch.testing.assert_close(g, g_ref, equal_nan=True)
