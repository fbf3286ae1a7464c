"""The fused linear + cross-entropy (softmax_ce.linear_cross_entropy and its modules): the same
loss and gradients as torch's F.linear_cross_entropy and as our cross_entropy on F.linear (float64
oracles), whatever the chunk size; every option; retain_graph / create_graph; bf16 accuracy;
compile / export / opcheck; torch's errors for bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import assert_no_worse_than_torch, assert_unchanged, checksum, truth_cross_entropy

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch has no linear_cross_entropy")


def _problem(device, dtype=torch.float64, N=23, H=12, C=31, prob=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).to(device)
    W = (torch.randn(C, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device) if bias else None
    if prob:
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, C, (N,), generator=g)
        t[::4] = 3  # class 3 is the ignored one where ignore_index=3
    return x, W, b, t.to(device)


def _grads(loss, inputs, upstream):
    inputs = [i for i in inputs if i is not None]
    return torch.autograd.grad(loss, inputs, upstream)


def _leaf(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


OPTION_SETS = {
    "plain": {},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": 0.15},
    "ignore": {"ignore_index": 3},
    "weight_smooth_ignore": {"weight": True, "label_smoothing": 0.1, "ignore_index": 3},
}


def _kwargs(opts, C, dtype, device):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 1.5, C, dtype=dtype, device=device)
    return kw


# ignore_index applies to class indices only
TARGET_CASES = [(option, prob) for option in OPTION_SETS for prob in (False, True)
                if not (prob and "ignore_index" in OPTION_SETS[option])]


@needs_torch_lce
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option,prob", TARGET_CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_torch_float64(device, reduction, option, prob, bias):
    x, W, b, t = _problem(device, prob=prob, bias=bias)
    kw = _kwargs(OPTION_SETS[option], W.shape[0], torch.float64, device)
    before = checksum(x, W, b, t)
    xo, Wo, bo = _leaf(x, W, b)
    ours = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction,
                                           chunk_size=5, **kw)
    xr, Wr, br = _leaf(x, W, b)
    ref = F.linear_cross_entropy(xr, Wr, t, linear_bias=br, reduction=reduction, **kw)
    up = torch.rand(ref.shape, dtype=ref.dtype, device=device) + 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(_grads(ours, (xo, Wo, bo), up), _grads(ref, (xr, Wr, br), up)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)
    assert_unchanged(before, x, W, b, t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_extensions_match_the_composite(device, reduction, prob):
    """z-loss and soft-capping (torch has neither): as our cross_entropy on F.linear, and as the
    float64 truth written out in torch's ops."""
    x, W, b, t = _problem(device, prob=prob)
    kw = dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.05)
    xo, Wo, bo = _leaf(x, W, b)
    ours = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction,
                                           chunk_size=4, **kw)
    xr, Wr, br = _leaf(x, W, b)
    truth = truth_cross_entropy(F.linear(xr, Wr, br), t, reduction=reduction, **kw)
    up = torch.rand(truth.shape, dtype=truth.dtype, device=device) + 0.5
    torch.testing.assert_close(ours, truth, rtol=1e-11, atol=1e-12)
    for a, e in zip(_grads(ours, (xo, Wo, bo), up), _grads(truth, (xr, Wr, br), up)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_size_invariance_float64(device, reduction):
    x, W, b, t = _problem(device, N=26)
    results = []
    for chunk in (1, 2, 3, 7, 13, 26, 1000):
        xo, Wo, bo = _leaf(x, W, b)
        loss = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction,
                                               chunk_size=chunk, label_smoothing=0.1)
        up = torch.ones_like(loss) if reduction == "mean" else torch.linspace(0.1, 2, 26,
                                                                             dtype=loss.dtype,
                                                                             device=device)
        results.append((loss.detach(), *_grads(loss, (xo, Wo, bo), up)))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@needs_torch_lce
@pytest.mark.parametrize("unbatched_kind", ["index", "prob"])
def test_unbatched_input(device, unbatched_kind):
    x, W, b, t = _problem(device, N=1, prob=unbatched_kind == "prob")
    x1, t1 = x[0], t[0]
    for reduction in ("mean", "sum", "none"):
        (xo,) = _leaf(x1)
        ours = softmax_ce.linear_cross_entropy(xo, W, t1, linear_bias=b, reduction=reduction)
        (xr,) = _leaf(x1)
        ref = F.linear_cross_entropy(xr, W, t1, linear_bias=b, reduction=reduction)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, xo)[0], torch.autograd.grad(ref, xr)[0])


@needs_torch_lce
def test_int32_targets_and_k_dim_out_features(device):
    x, W, b, t = _problem(device)
    ours = softmax_ce.linear_cross_entropy(x, W, t.to(torch.int32), linear_bias=b)
    torch.testing.assert_close(ours, F.linear_cross_entropy(x, W, t, linear_bias=b))
    # K-dim out_features: (C, d1, H) weight, target (N, d1): the composite path
    Wk = torch.randn(5, 3, x.shape[1], dtype=x.dtype, device=device)
    tk = torch.randint(0, 5, (x.shape[0], 3), device=device)
    torch.testing.assert_close(softmax_ce.linear_cross_entropy(x, Wk, tk),
                               F.linear_cross_entropy(x, Wk, tk))


@needs_torch_lce
def test_every_position_ignored_like_torch(device):
    x, W, b, t = _problem(device)
    t = torch.full_like(t, -100)
    xo, Wo = _leaf(x, W)
    ours = softmax_ce.linear_cross_entropy(xo, Wo, t)
    xr, Wr = _leaf(x, W)
    ref = F.linear_cross_entropy(xr, Wr, t)
    assert torch.isnan(ours) and torch.isnan(ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xo.grad, xr.grad, equal_nan=True)
    torch.testing.assert_close(Wo.grad, Wr.grad, equal_nan=True)


def test_retain_graph_and_create_graph(device):
    x, W, b, t = _problem(device)
    xo, Wo, bo = _leaf(x, W, b)
    loss = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, label_smoothing=0.1)
    first = torch.autograd.grad(loss * 2.0, (xo, Wo, bo), retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, (xo, Wo, bo), retain_graph=True)  # recomputed
    third = torch.autograd.grad(loss, (xo, Wo, bo))
    for a, b2, c in zip(first, second, third):
        torch.testing.assert_close(a, b2, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a, 2 * c, rtol=1e-12, atol=1e-13)
    # double backward through the composite, against the composite
    xo, Wo = _leaf(x, W)
    (gx,) = torch.autograd.grad(softmax_ce.linear_cross_entropy(xo, Wo, t), xo, create_graph=True)
    (ggW,) = torch.autograd.grad(gx.square().sum(), Wo)
    xr, Wr = _leaf(x, W)
    (gxr,) = torch.autograd.grad(softmax_ce.cross_entropy(F.linear(xr, Wr), t), xr,
                                 create_graph=True)
    (ggWr,) = torch.autograd.grad(gxr.square().sum(), Wr)
    torch.testing.assert_close(ggW, ggWr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_class_weight_create_graph(device, dtype, reduction):
    """A differentiable backward of a half-precision head with class weights runs the composite
    with the weight as the caller gave it (it raised a dtype error), and gives the composite's
    first and second derivatives in that dtype."""
    x, W, b, t = _problem(device, N=7, H=5, C=11)
    w = (torch.rand(11, dtype=torch.float64, device=device) + 0.5).to(dtype)
    xo, Wo = _leaf(x.to(dtype), W.to(dtype))
    loss = softmax_ce.linear_cross_entropy(xo, Wo, t, weight=w, reduction=reduction)
    (gx,) = torch.autograd.grad(loss.sum(), xo, create_graph=True)
    (ggW,) = torch.autograd.grad(gx.float().square().sum(), Wo)
    xr, Wr = _leaf(x.to(dtype), W.to(dtype))
    ref = F.cross_entropy(F.linear(xr, Wr), t, weight=w, reduction=reduction)
    (gxr,) = torch.autograd.grad(ref.sum(), xr, create_graph=True)
    (ggWr,) = torch.autograd.grad(gxr.float().square().sum(), Wr)
    xt, Wt = _leaf(x.to(dtype).double(), W.to(dtype).double())  # float64 truth, same values
    truth = F.cross_entropy(F.linear(xt, Wt), t, weight=w.double(), reduction=reduction)
    (gxt,) = torch.autograd.grad(truth.sum(), xt, create_graph=True)
    (ggWt,) = torch.autograd.grad(gxt.square().sum(), Wt)
    assert gx.dtype == dtype and ggW.dtype == dtype
    assert_no_worse_than_torch(gx, gxr, gxt, dtype, what="gradient")
    assert_no_worse_than_torch(ggW, ggWr, ggWt, dtype, what="second derivative")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_gradcheck_and_gradgradcheck(device, reduction, prob):
    x, W, b, t = _problem(device, N=5, H=3, C=4, prob=prob)
    xo, Wo, bo = _leaf(x, W, b)

    def f(x_, W_, b_):
        return softmax_ce.linear_cross_entropy(x_, W_, t, linear_bias=b_, reduction=reduction,
                                               chunk_size=2, z_loss=1e-2)

    assert torch.autograd.gradcheck(f, (xo, Wo, bo))
    assert torch.autograd.gradgradcheck(f, (xo, Wo, bo))


@needs_torch_lce
def test_bfloat16_no_worse_than_torch(device):
    x, W, b, t = _problem(device, N=64, H=32, C=300, bias=False)
    xd, Wd = _leaf(x, W)
    truth = F.linear_cross_entropy(xd, Wd, t)
    g_truth = torch.autograd.grad(truth, (xd, Wd))
    xo, Wo = _leaf(x.bfloat16(), W.bfloat16())
    ours = softmax_ce.linear_cross_entropy(xo, Wo, t, chunk_size=8)
    g_ours = torch.autograd.grad(ours, (xo, Wo))
    xr, Wr = _leaf(x.bfloat16(), W.bfloat16())
    theirs = F.linear_cross_entropy(xr, Wr, t)
    g_theirs = torch.autograd.grad(theirs, (xr, Wr))
    assert ours.dtype == torch.bfloat16 and g_ours[1].dtype == torch.bfloat16
    assert_no_worse_than_torch(ours, theirs, truth, torch.bfloat16, what="loss")
    for name, a, e, tr in zip(("input", "weight"), g_ours, g_theirs, g_truth):
        assert_no_worse_than_torch(a, e, tr, torch.bfloat16, what=f"grad {name}")


def test_options_and_accumulation_dtype(device):
    x, W, b, t = _problem(device, N=20)
    base = softmax_ce.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=6)
    if HAS_TORCH_LCE:
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=6)
        torch.testing.assert_close(
            softmax_ce.linear_cross_entropy(x, W, t, linear_bias=b, options=opts), base)
        with pytest.raises(ValueError, match="disagree"):
            softmax_ce.linear_cross_entropy(x, W, t, options=opts, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        softmax_ce.linear_cross_entropy(x, W, t, chunk_size=0)
    with pytest.raises(ValueError, match="grad_weight_acc_dtype"):
        softmax_ce.linear_cross_entropy(x, W, t, grad_weight_acc_dtype=torch.float16)
    # bf16 with grad_weight accumulated in bf16: still close to the float32-accumulated one
    xb, Wb = _leaf(x.bfloat16(), W.bfloat16())
    g32 = torch.autograd.grad(softmax_ce.linear_cross_entropy(xb, Wb, t, chunk_size=3), Wb)[0]
    g16 = torch.autograd.grad(softmax_ce.linear_cross_entropy(
        xb, Wb, t, chunk_size=3, grad_weight_acc_dtype=torch.bfloat16), Wb)[0]
    torch.testing.assert_close(g16.float(), g32.float(), rtol=0.05, atol=2e-3)


def test_default_chunk_size_budget():
    # the chunk's working memory stays under 1/11 of the whole logits
    for rows, C, H, dtype, acc in ((4096, 32000, 1024, torch.float32, torch.float32),
                                   (8192, 128256, 4096, torch.bfloat16, torch.float32)):
        chunk = softmax_ce.linear.default_chunk_size(rows, C, H, dtype, acc)
        size = torch.empty((), dtype=dtype).element_size()
        work = chunk * C * size + (chunk * (C + H) * 4 if acc != dtype else 0)
        assert 1 <= chunk <= rows and work <= rows * C * size / 11
    assert softmax_ce.linear.default_chunk_size(10, 5, 3, torch.float32, torch.float32) == 10


def test_default_chunk_memory_is_capped(monkeypatch):
    """However many tokens: the default chunk's working memory stays under chunk_memory (256 MiB
    by default; at (131072, 32, 32000) float32 the 1/11 rule alone gave 1.5 GB), settable
    process-wide, for a block, and by SOFTMAX_CE_CHUNK_MEMORY_MIB."""
    def work(rows, C, H, dtype, acc):
        chunk = softmax_ce.linear.default_chunk_size(rows, C, H, dtype, acc)
        size = torch.empty((), dtype=dtype).element_size()
        return chunk * C * size + (chunk * (C + H) * 4 if acc != dtype else 0)

    cases = ((131072, 32000, 32, torch.float32, torch.float32),
             (327680, 152064, 4096, torch.bfloat16, torch.float32))
    for case in cases:
        assert work(*case) <= 256 << 20
    with softmax_ce.chunk_memory(64 << 20):
        for case in cases:
            assert work(*case) <= 64 << 20
    assert work(*cases[0]) > 64 << 20  # restored
    # small problems are unchanged (1/11 of the logits, 16 MiB at least)
    assert softmax_ce.linear.default_chunk_size(4096, 32000, 1024, torch.float32,
                                                torch.float32) == 372
    with pytest.raises(ValueError, match="positive"):
        softmax_ce.chunk_memory(0)
    import subprocess
    import sys

    code = ("import softmax_ce, torch; print(softmax_ce.linear.default_chunk_size(131072, 32000, "
            "32, torch.float32, torch.float32))")
    env = dict(__import__("os").environ, SOFTMAX_CE_CHUNK_MEMORY_MIB="32")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) == (32 << 20) // (32000 * 4)


@needs_torch_lce
def test_modules_state_dict_and_tied_form(device):
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(12, 31, bias=True, dtype=torch.float64).to(device)
    ours = softmax_ce.nn.LinearCrossEntropyLoss(12, 31, bias=True, dtype=torch.float64,
                                                chunk_size=4).to(device)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x, _, _, t = _problem(device)
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    ours(x, t).backward()
    theirs(x, t).backward()
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    tied = softmax_ce.nn.TiedLinearCrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(
        tied(x, ours.linear.weight, t, ours.linear.bias),
        softmax_ce.linear_cross_entropy(x, ours.linear.weight, t, linear_bias=ours.linear.bias,
                                        label_smoothing=0.1))


# (our arguments, what torch's function is given: the same)
BAD = {
    "input 3-D": lambda x, W, b, t: (x.view(1, *x.shape), W, t, {}),
    "in_features mismatch": lambda x, W, b, t: (x[:, :-1], W, t, {}),
    "weight 1-D": lambda x, W, b, t: (x, W[0], t, {}),
    "bias shape": lambda x, W, b, t: (x, W, t, {"linear_bias": b[:-1]}),
    "target length": lambda x, W, b, t: (x, W, t[:-1], {}),
    "target float of wrong shape": lambda x, W, b, t: (x, W, t.double()[:, None], {}),
    "class weight shape": lambda x, W, b, t: (x, W, t, {"weight": torch.ones(3, dtype=x.dtype)}),
    "out-of-range target": lambda x, W, b, t: (x, W, torch.full_like(t, 999), {}),
    "label_smoothing": lambda x, W, b, t: (x, W, t, {"label_smoothing": 1.5}),
    "reduction": lambda x, W, b, t: (x, W, t, {"reduction": "avg"}),
    "ignore_index with probabilities": lambda x, W, b, t: (
        x, W, torch.softmax(torch.randn(x.shape[0], W.shape[0], dtype=x.dtype), 1),
        {"ignore_index": 1}),
}


@needs_torch_lce
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_like_torch(case):
    x, W, b, t = _problem("cpu")
    args = BAD[case](x, W, b, t)
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(args[0], args[1], args[2], **args[3])
    with pytest.raises(type(theirs.value)):
        softmax_ce.linear_cross_entropy(args[0], args[1], args[2], **args[3])


def test_bad_dtypes_name_the_argument():
    x, W, b, t = _problem("cpu")
    with pytest.raises(RuntimeError, match="linear_weight"):
        softmax_ce.linear_cross_entropy(x, W.float(), t)
    with pytest.raises(RuntimeError, match="linear_bias"):
        softmax_ce.linear_cross_entropy(x, W, t, linear_bias=b.float())
    with pytest.raises(RuntimeError, match="target"):
        softmax_ce.linear_cross_entropy(x, W, t.double())


def test_errors_call_the_logits_by_their_name():
    """The fused head's errors describe the logits as input @ linear_weight.T, not as the
    user's 'input' (whose shape is the hidden states')."""
    x, W, b, t = _problem("cpu")
    logits = f"the logits ('input' @ 'linear_weight'.T) [{x.shape[0]}, {W.shape[0]}]"
    with pytest.raises(ValueError) as err:
        softmax_ce.linear_cross_entropy(x, W, t[:-1])
    assert logits in str(err.value) and "'input' [" not in str(err.value)
    with pytest.raises(RuntimeError) as err:
        softmax_ce.linear_cross_entropy(x, W, t[:, None].expand(-1, 2))
    assert logits in str(err.value)
    with pytest.raises(RuntimeError, match="dtype of the logits"):
        softmax_ce.linear_cross_entropy(x, W, t, weight=torch.ones(W.shape[0]))
    # cross_entropy itself still names its input
    with pytest.raises(ValueError, match=r"'input' \["):
        softmax_ce.cross_entropy(x @ W.T, t[:-1])


def test_opcheck_linear_ops():
    x, W, b, t = _problem("cpu", N=9)
    scale = torch.ones((), dtype=torch.float64)
    options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=0.0, chunk=4,
                   acc_fp32=True, grad_input=True, grad_weight=True, grad_bias=True)
    torch.library.opcheck(torch.ops.softmax_ce.linear_ce_fwd.default,
                          (x, W, b, t, None, scale), options)
    lse = torch.logsumexp(F.linear(x, W, b), 1)
    rows = torch.rand(9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.softmax_ce.linear_ce_bwd.default,
                          (x, W, b, t, None, lse, rows), options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_and_export(reduction):
    x, W, b, t = _problem("cpu", dtype=torch.float32, N=16)

    def f(x_, W_, b_, t_):
        return softmax_ce.linear_cross_entropy(x_, W_, t_, linear_bias=b_, reduction=reduction,
                                               chunk_size=5).sum()

    xo, Wo, bo = _leaf(x, W, b)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(xo, Wo, bo, t)
    grads = torch.autograd.grad(got, (xo, Wo, bo))
    xr, Wr, br = _leaf(x, W, b)
    want = f(xr, Wr, br, t)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, torch.autograd.grad(want, (xr, Wr, br))):
        torch.testing.assert_close(a, e)

    class Head(torch.nn.Module):
        def forward(self, x_, W_, t_):
            return softmax_ce.linear_cross_entropy(x_, W_, t_, reduction=reduction, chunk_size=5)

    exported = torch.export.export(Head(), (x, W, t))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("linear_ce_fwd" in n for n in names), names
    torch.testing.assert_close(exported.module()(x, W, t), Head()(x, W, t))


def test_compiled_retain_graph_second_backward():
    """Under torch.compile the handed-over gradients are scaled out of place: a second backward
    (retain_graph) gives the same gradients, not twice-scaled ones."""
    x, W, b, t = _problem("cpu", dtype=torch.float32, N=12)
    xo, Wo = _leaf(x, W)
    loss = torch.compile(lambda a, c: softmax_ce.linear_cross_entropy(a, c, t, chunk_size=5) * 3,
                         fullgraph=True, backend="aot_eager")(xo, Wo)
    g1 = torch.autograd.grad(loss, (xo, Wo), retain_graph=True)
    g2 = torch.autograd.grad(loss, (xo, Wo))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_no_grad_and_partial_grads(device):
    x, W, b, t = _problem(device)
    with torch.no_grad():
        a = softmax_ce.linear_cross_entropy(x, W, t, linear_bias=b)
    torch.testing.assert_close(a, softmax_ce.cross_entropy(F.linear(x, W, b), t))
    for which in itertools.product([False, True], repeat=3):
        if not any(which):
            continue
        leaves = [v.detach().clone().requires_grad_(w) for v, w in zip((x, W, b), which)]
        loss = softmax_ce.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2])
        ref_leaves = [v.detach().clone().requires_grad_(w) for v, w in zip((x, W, b), which)]
        ref = softmax_ce.cross_entropy(F.linear(*ref_leaves), t)
        got = torch.autograd.grad(loss, [v for v in leaves if v.requires_grad])
        want = torch.autograd.grad(ref, [v for v in ref_leaves if v.requires_grad])
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_skipped_on_the_cpu(reduction):
    """Half the positions ignored (a prompt): the CPU skips their GEMM work; the loss and every
    gradient are still torch's, also through the recomputing backward of 'none'."""
    from softmax_ce import _linear_core

    x, W, b, t = _problem("cpu", N=40, H=6, C=13)
    t[::2] = -100
    assert _linear_core._kept_rows(x, W, b, t, softmax_ce._args.CeOptions(-100, 0., 0., 0.)) \
        is not None
    xo, Wo, bo = _leaf(x, W, b)
    loss = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction,
                                           label_smoothing=0.1, chunk_size=7)
    grads = torch.autograd.grad(loss.sum() * 2.0, (xo, Wo, bo))
    xr, Wr, br = _leaf(x, W, b)
    ref = F.cross_entropy(F.linear(xr, Wr, br), t, reduction=reduction, label_smoothing=0.1)
    for a, e in zip(grads, torch.autograd.grad(ref.sum() * 2.0, (xr, Wr, br))):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(grads[0][::2]) == 0


def test_ignored_row_that_is_not_finite_spreads_nan_like_torch():
    x, W, b, t = _problem("cpu", N=16, H=5, C=9)
    t[:8] = -100
    x[1, 2] = float("nan")  # an ignored row: torch's gradient of the weight is NaN
    xo, Wo = _leaf(x, W)
    softmax_ce.linear_cross_entropy(xo, Wo, t).backward()
    xr, Wr = _leaf(x, W)
    F.cross_entropy(F.linear(xr, Wr), t).backward()
    torch.testing.assert_close(Wo.grad, Wr.grad, equal_nan=True)
    assert torch.isnan(Wo.grad).any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "weight_smoothing_z", "softcap", "prob",
                                    "token_weight"])
def test_vocab_chunked_weight_gradient(reduction, option):
    """vocab_chunk_size: the weight's gradient accumulated a slice of the vocabulary at a time
    (a bounded float32 accumulator for half heads): torch's loss and every gradient."""
    x, W, b, t = _problem("cpu", N=13, H=5, C=17, prob=option == "prob")
    kw = {}
    if option == "weight_smoothing_z":
        kw = dict(weight=torch.rand(17, dtype=torch.float64) + 0.5, label_smoothing=0.2)
    if option == "softcap":
        kw = dict(softcap=2.0)
    tw = torch.rand(13, dtype=torch.float64) if option == "token_weight" else None
    xo, Wo, bo = _leaf(x, W, b)
    loss = softmax_ce.linear_cross_entropy(xo, Wo, t, linear_bias=bo, reduction=reduction,
                                           vocab_chunk_size=5, chunk_size=4, token_weight=tw,
                                           z_loss=1e-2 if option == "weight_smoothing_z" else 0.0,
                                           **kw)
    got = torch.autograd.grad(loss.sum() * 1.5, (xo, Wo, bo))
    xr, Wr, br = _leaf(x, W, b)
    want = softmax_ce.linear_cross_entropy(xr, Wr, t, linear_bias=br, reduction=reduction,
                                           token_weight=tw,
                                           z_loss=1e-2 if option == "weight_smoothing_z" else 0.0,
                                           **kw)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, e in zip(got, torch.autograd.grad(want.sum() * 1.5, (xr, Wr, br))):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    if option == "plain" and reduction == "mean":  # against torch itself too
        xt, Wt, bt = _leaf(x, W, b)
        ref = F.cross_entropy(F.linear(xt, Wt, bt), t)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_vocab_chunked_half_precision_and_errors():
    x, W, _, t = _problem("cpu", N=16, H=8, C=40, bias=False)
    xo, Wo = _leaf(x.bfloat16(), W.bfloat16())
    softmax_ce.linear_cross_entropy(xo, Wo, t, vocab_chunk_size=7).backward()
    xr, Wr = _leaf(x.bfloat16(), W.bfloat16())
    softmax_ce.linear_cross_entropy(xr, Wr, t).backward()
    assert Wo.grad.dtype == torch.bfloat16
    # both accumulate in float32 and round once: the same to bf16 rounding
    torch.testing.assert_close(Wo.grad.float(), Wr.grad.float(), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        softmax_ce.linear_cross_entropy(xo, Wo, t, vocab_chunk_size=0)
    bad = t.clone()
    bad[3] = 40
    with pytest.raises(IndexError, match="Target 40 is out of bounds"):
        softmax_ce.linear_cross_entropy(x, W, bad, vocab_chunk_size=7)
