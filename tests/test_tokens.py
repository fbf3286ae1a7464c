"""Per-token outputs (log_probs, linear_log_probs, nn.LinearLogProbs) against a float64 truth from
torch (log_softmax(z / T), torch.topk, torch.argmax, the written-out entropy): values, dtypes,
shapes, gradients with random upstream gradients on every output at once and on subsets,
ignored positions, batched shapes, bias, temperature, half precision, chunk-size invariance,
masked logits, gradcheck / gradgradcheck, torch.compile / export, errors. And token weights on
cross_entropy and linear_cross_entropy."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import softmax_ce

OUTPUTS = ("log_prob", "lse", "entropy", "top_k_log_probs")


def truth(z, t, T, ignore_index=-100, k=0):
    """The per-token outputs through torch, in float64, as a dict."""
    s = z.double() / T
    lp = torch.log_softmax(s, -1)
    valid = t != ignore_index
    picked = lp.gather(-1, torch.where(valid, t, 0).unsqueeze(-1)).squeeze(-1)
    p = lp.exp()
    out = {"log_prob": torch.where(valid, picked, torch.zeros_like(picked)),
           "lse": torch.logsumexp(s, -1),
           "entropy": -torch.special.xlogy(p, p).sum(-1),
           "argmax": z.argmax(-1)}
    if k:
        out["top_k_log_probs"], out["top_k_indices"] = torch.topk(lp, k, dim=-1)
    return out


def _problem(shape=(3, 5), C=11, dtype=torch.float64, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randint(0, C, shape, generator=g)
    if ignore:
        t.view(-1)[::4] = -100
    return z, t


def _weighted_sum(out, grads, names):
    return sum((getattr(out, n) * grads[n]).sum() if not isinstance(out, dict)
               else (out[n] * grads[n]).sum() for n in names)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 1, 3)], ids=str)
def test_log_probs_values_and_gradients(dtype, T, shape):
    z, t = _problem(shape, dtype=dtype)
    zo = z.clone().requires_grad_()
    out = softmax_ce.log_probs(zo, t, temperature=T, entropy=True, top_k=3)
    want = truth(z, t, T, k=3)
    out_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for name in OUTPUTS:
        got = getattr(out, name)
        assert got.dtype == out_dtype and got.shape == want[name].shape, name
        # half inputs are exact values: only the float32 arithmetic separates us from float64
        torch.testing.assert_close(got.double(), want[name], **TOL[dtype], msg=name)
    assert torch.equal(out.argmax, want["argmax"]) and out.argmax.dtype == torch.int64
    assert torch.equal(out.top_k_indices, want["top_k_indices"])
    # every output's gradient at once, random upstream gradients
    g = torch.Generator().manual_seed(1)
    ups = {n: torch.randn(want[n].shape, generator=g, dtype=torch.float64) for n in OUTPUTS}
    (grad,) = torch.autograd.grad(_weighted_sum(out, {n: u.to(out_dtype) for n, u in
                                                      ups.items()}, OUTPUTS), zo)
    zd = z.double().requires_grad_()
    (want_grad,) = torch.autograd.grad(_weighted_sum(truth(zd, t, T, k=3), ups, OUTPUTS), zd)
    assert grad.dtype == dtype
    scale = want_grad.abs().max()
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2,
            torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("names", [c for r in range(1, 5) for c in
                                   itertools.combinations(OUTPUTS, r)], ids=str)
def test_any_combination_of_outputs_in_one_backward(names):
    z, t = _problem((6,), C=9)
    zo = z.clone().requires_grad_()
    out = softmax_ce.log_probs(zo, t, temperature=1.3, entropy="entropy" in names,
                               top_k=2 if "top_k_log_probs" in names else 0)
    g = torch.Generator().manual_seed(2)
    want = truth(z, t, 1.3, k=2)
    ups = {n: torch.randn(want[n].shape, generator=g, dtype=torch.float64) for n in names}
    (grad,) = torch.autograd.grad(_weighted_sum(out, ups, names), zo)
    zd = z.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(_weighted_sum(truth(zd, t, 1.3, k=2), ups, names), zd)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    if "entropy" not in names:
        assert out.entropy is None
    if "top_k_log_probs" not in names:
        assert out.top_k_log_probs is None and out.top_k_indices is None


def test_ignored_positions_and_ties_and_masked_logits():
    z = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, float("-inf"), 2.0, float("-inf")],
                      [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([2, 0, -100])
    out = softmax_ce.log_probs(z, t, entropy=True, top_k=2)
    assert out.argmax.tolist() == [1, 2, 0]  # the lowest index on ties, as torch.argmax
    assert out.log_prob[2] == 0
    assert torch.isfinite(out.entropy).all()  # masked (-inf) logits: 0 log 0 = 0
    (g,) = torch.autograd.grad(out.log_prob.sum() + out.entropy.sum(), z, retain_graph=True)
    assert torch.isfinite(g).all() and g[1, 1] == 0 and g[1, 3] == 0
    want = truth(z.detach(), t, 1.0)
    torch.testing.assert_close(out.entropy, want["entropy"])
    # torch's autograd through the written-out entropy is NaN on a row with -inf logits (0 * inf
    # in its chain): the masked row against torch on its finite columns, the others as they are
    rows = {0: [0, 1, 2, 3], 1: [0, 2], 2: [0, 1, 2, 3]}
    for r, cols in rows.items():
        zd = z.detach()[r, cols].clone().requires_grad_()
        target = torch.tensor(cols.index(int(t[r])) if int(t[r]) in cols else -100)
        w = truth(zd, target, 1.0)
        (g_want,) = torch.autograd.grad(w["log_prob"] + w["entropy"], zd)
        torch.testing.assert_close(g[r, cols], g_want)
    # the ignored row's log_prob gives no gradient
    (g_lp,) = torch.autograd.grad(out.log_prob.sum(), z)
    assert torch.count_nonzero(g_lp[2]) == 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_linear_log_probs_against_the_whole_logits(bias, chunk_size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    W = torch.randn(13, 6, generator=g, dtype=torch.float64)
    b = torch.randn(13, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, 13, (2, 5), generator=g)
    t[0, 0] = -100
    leaves = [a.clone().requires_grad_() for a in (x, W) + ((b,) if bias else ())]
    out = softmax_ce.linear_log_probs(leaves[0], leaves[1], t, leaves[2] if bias else None,
                                      temperature=0.9, entropy=True, top_k=4,
                                      chunk_size=chunk_size)
    refs = [a.clone().requires_grad_() for a in (x, W) + ((b,) if bias else ())]
    want = truth(F.linear(refs[0], refs[1], refs[2] if bias else None), t, 0.9, k=4)
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(out, name), want[name], rtol=1e-10, atol=1e-12)
    assert torch.equal(out.top_k_indices, want["top_k_indices"])
    ups = {n: torch.randn(want[n].shape, generator=g, dtype=torch.float64) for n in OUTPUTS}
    got = torch.autograd.grad(_weighted_sum(out, ups, OUTPUTS), leaves)
    expected = torch.autograd.grad(_weighted_sum(want, ups, OUTPUTS), refs)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["log_probs", "linear_log_probs"])
def test_gradcheck_and_exact_second_derivatives(which):
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([1, -100, 4, 0])
    if which == "log_probs":
        args = (torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True),)

        def f(z):
            o = softmax_ce.log_probs(z, t, temperature=0.8, entropy=True, top_k=2)
            return o.log_prob, o.lse, o.entropy, o.top_k_log_probs
    else:
        args = tuple(a.requires_grad_() for a in (
            torch.randn(4, 3, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randn(6, generator=g, dtype=torch.float64)))

        def f(x, W, b):
            o = softmax_ce.linear_log_probs(x, W, t, b, temperature=0.8, entropy=True, top_k=2,
                                            chunk_size=3)
            return o.log_prob, o.lse, o.entropy, o.top_k_log_probs
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_half_precision_linear_and_module():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 8, generator=g).bfloat16()
    head = softmax_ce.nn.LinearLogProbs(8, 17, bias=True, dtype=torch.bfloat16, temperature=1.5,
                                        entropy=True, top_k=3, chunk_size=4)
    t = torch.randint(0, 17, (9,), generator=g)
    out = head(x, t)
    assert isinstance(out, softmax_ce.TokenLogProbs) and out.log_prob.dtype == torch.float32
    want = truth(F.linear(x.double(), head.linear.weight.double(), head.linear.bias.double()),
                 t, 1.5, k=3)
    for name in OUTPUTS:  # the logits of bf16 GEMMs: bf16 rounding of the products
        torch.testing.assert_close(getattr(out, name).double(), want[name], rtol=3e-2,
                                   atol=3e-2)
    (out.log_prob.sum() + out.entropy.sum()).backward()
    assert head.linear.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(head.linear.weight.grad.float()).all()


def test_compile_fullgraph_and_export():
    z, t = _problem((6,), C=7, dtype=torch.float32)

    def f(z_, W_):
        a = softmax_ce.log_probs(z_, t, temperature=0.5, entropy=True, top_k=2)
        b = softmax_ce.linear_log_probs(z_, W_, t, entropy=True, chunk_size=4)
        return a.log_prob.sum() + a.entropy.sum() + a.top_k_log_probs.sum() + b.lse.sum()

    W = torch.randn(5, 7)
    zo, Wo = z.clone().requires_grad_(), W.clone().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(zo, Wo)
    grads = torch.autograd.grad(got, (zo, Wo))
    zr, Wr = z.clone().requires_grad_(), W.clone().requires_grad_()
    want = f(zr, Wr)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, torch.autograd.grad(want, (zr, Wr))):
        torch.testing.assert_close(a, e)

    class Head(torch.nn.Module):
        def forward(self, x_, W_):
            return softmax_ce.linear_log_probs(x_, W_, t, top_k=2).top_k_log_probs

    exported = torch.export.export(Head(), (z, W))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("token_fwd" in n for n in names), names
    torch.testing.assert_close(exported.module()(z, W), Head()(z, W))


@pytest.mark.parametrize("bad,kind,match", [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"top_k": 99}, ValueError, "top_k"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"entropy": 1}, TypeError, "entropy"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
])
def test_bad_options(bad, kind, match):
    z, t = _problem((3,), C=5)
    with pytest.raises(kind, match=match):
        softmax_ce.log_probs(z, t, **bad)


def test_bad_inputs_name_the_argument():
    z, t = _problem((3,), C=5)
    with pytest.raises(RuntimeError, match="target"):
        softmax_ce.log_probs(z, t.float())
    with pytest.raises(RuntimeError, match="target"):
        softmax_ce.log_probs(z, t[:2])
    with pytest.raises(NotImplementedError, match="logits"):
        softmax_ce.log_probs(z.long(), t)
    with pytest.raises(RuntimeError, match="weight"):
        softmax_ce.linear_log_probs(z, torch.randn(4, 5), t)
    with pytest.raises(RuntimeError, match="'weight'"):
        softmax_ce.linear_log_probs(z, torch.randn(4, 5, dtype=torch.float32), t)


# ---------------------------------------------------------------------------------------------
# token weights
# ---------------------------------------------------------------------------------------------


def _token_weight_truth(logits, t, tw, w, reduction, **kw):
    rows = F.cross_entropy(logits, t, w, reduction="none", **kw) * tw
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    valid = t != -100
    w_y = w[torch.where(valid, t, 0)] if w is not None else torch.ones_like(tw)
    return rows.sum() / (tw * w_y * valid).sum()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("where", ["cross_entropy", "linear", "module"])
@pytest.mark.parametrize("class_weight", [False, True])
def test_token_weight(reduction, where, class_weight):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 7, (10,), generator=g)
    t[::3] = -100
    tw = torch.rand(10, generator=g, dtype=torch.float64) * 2
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5 if class_weight else None
    xo, Wo = x.clone().requires_grad_(), W.clone().requires_grad_()
    if where == "cross_entropy":
        loss = softmax_ce.cross_entropy(F.linear(xo, Wo), t, w, reduction=reduction,
                                        label_smoothing=0.1, token_weight=tw)
    elif where == "linear":
        loss = softmax_ce.linear_cross_entropy(xo, Wo, t, weight=w, reduction=reduction,
                                               label_smoothing=0.1, token_weight=tw,
                                               chunk_size=3)
    else:
        module = softmax_ce.nn.TiedLinearCrossEntropyLoss(reduction=reduction, weight=w,
                                                          label_smoothing=0.1, chunk_size=4)
        loss = module(xo, Wo, t, token_weight=tw)
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    want = _token_weight_truth(F.linear(xr, Wr), t, tw, w, reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for upstream in (1.0, 2.5):  # the gradient formed in the forward, and redone for 2.5
        got = torch.autograd.grad(loss.sum() * upstream, (xo, Wo), retain_graph=True)
        expected = torch.autograd.grad(want.sum() * upstream, (xr, Wr), retain_graph=True)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_token_weight_errors():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="token_weight.*requires_grad|not differentiable"):
        softmax_ce.cross_entropy(x, t, token_weight=torch.ones(4, requires_grad=True))
    with pytest.raises(RuntimeError, match="token_weight"):
        softmax_ce.cross_entropy(x, t, token_weight=torch.ones(5))
    with pytest.raises(TypeError, match="token_weight"):
        softmax_ce.linear_cross_entropy(x, torch.randn(3, 3), t,
                                        token_weight=torch.ones(4, dtype=torch.long))
