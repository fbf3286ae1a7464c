"""Differential fuzzing against torch with hypothesis, both implementations (the cpu_impl
fixture runs every test with the compiled kernels, then with the reference).

Random shapes (0-sized dims, C = 1, odd and prime C, C up to 2^17, K-dim with 1-3 spatial dims,
unbatched), dtypes, layouts (non-contiguous, transposed, expanded, channels-last, storage
offsets), values (huge, tiny, -inf masks, +inf, NaN) and every option. Loss and gradient are
compared with torch, or with a float64 torch evaluation of our definition for our extensions.
Pass rule: our error against the float64 truth is no worse than torch's own error in the same
dtype, plus a small slack (tight in float32/float64, a few ulps in bf16/fp16); non-finite values
must sit exactly where the truth's are.

Profiles: "ci" (the default, a couple of minutes) and "long" (thousands of cases):
    python -m pytest tests/test_fuzz.py --hypothesis-profile=long
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REQUIRE_EXTENSION, require_compiled

try:
    import hypothesis  # noqa: F401
except ImportError:
    if REQUIRE_EXTENSION:  # part of the set-up: its absence must fail the run, not skip it
        raise
    pytest.skip("hypothesis is not installed", allow_module_level=True)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import softmax_ce  # noqa: E402


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CLASSES = [1, 2, 3, 5, 7, 13, 31, 32, 33, 97, 128, 257, 1000, 4099, 1 << 17]
LOW = (torch.float16, torch.bfloat16)
SLACK = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@st.composite
def cases(draw):
    C = draw(st.sampled_from(CLASSES))
    big = C >= 4099
    layout = draw(st.sampled_from(["2d", "unbatched", "kdim"]) if not big else st.just("2d"))
    if layout == "2d":
        shape = (draw(st.integers(0, 3 if big else 9)), C)
    elif layout == "unbatched":
        shape = (C,)
    else:
        spatial = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        shape = (draw(st.integers(0, 3)), C) + spatial
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        memory=draw(st.sampled_from(["contiguous", "transposed", "offset", "expanded",
                                     "channels_last"])),
        values=draw(st.sampled_from(["normal", "normal", "huge", "tiny", "masked", "inf", "nan"])),
        scale=draw(st.sampled_from([1.0, 4.0, 30.0])),
        prob=draw(st.booleans()),
        weight=draw(st.booleans()),
        ignore=draw(st.sampled_from([None, -100, 0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        ls=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        z=draw(st.sampled_from([0.0, 0.0, 1e-3])),
        cap=draw(st.sampled_from([None, None, 5.0])),
        inplace=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layout(x, memory):
    """The same values in a different memory layout (on x's device)."""
    if memory == "transposed" and x.dim() >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if memory == "offset":
        buf = torch.empty(x.numel() + 3, dtype=x.dtype, device=x.device)
        buf[3:] = x.reshape(-1)
        return buf[3:].view(x.shape)
    if memory == "expanded" and x.dim() >= 2 and x.shape[0] > 0:
        return x[:1].expand(x.shape)  # every row the same, stride 0
    if memory == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _make(case, device="cpu"):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    cdim = 1 if len(shape) > 1 else 0
    C = shape[cdim]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * case["scale"]
    kind = case["values"]
    if kind == "huge":
        x = x * (1e4 if dtype in (torch.float16,) else 1e6)
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
    elif kind == "tiny":
        x = x * 1e-6
    elif kind in ("masked", "inf", "nan") and x.numel():
        mask = torch.rand(shape, generator=g) < 0.3
        x[mask] = {"masked": -math.inf, "inf": math.inf, "nan": math.nan}[kind]
        if kind == "masked" and x.dim() >= 2 and x.shape[0] > 0:
            x.select(0, 0).fill_(-math.inf)  # one fully masked row (or spatial slice)
    x = _layout(x.to(dtype).to(device), case["memory"])
    if case["prob"]:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), cdim).to(dtype)
        t = _layout(t.to(device), case["memory"])
    else:
        tshape = tuple(s for i, s in enumerate(shape) if i != cdim)
        t = torch.randint(0, C, tshape, generator=g)
        if case["ignore"] is not None and t.numel():
            t.view(-1)[torch.rand(t.numel(), generator=g) < 0.3] = case["ignore"]
        t = t.to(device)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.25).to(dtype) if case["weight"] else None
    return x, t, (w.to(device) if w is not None else None)


def _truth(x, t, w, case, dtype=torch.float64):
    """Our definition in torch ops, evaluated in `dtype`."""
    x = x.to(dtype)
    t = t.to(dtype) if t.is_floating_point() else t
    w = w.to(dtype) if w is not None else None
    ii = case["ignore"] if case["ignore"] is not None else -100
    if case["prob"]:
        ii = -100
    xs = case["cap"] * torch.tanh(x / case["cap"]) if case["cap"] else x
    loss = F.cross_entropy(xs, t, w, ignore_index=ii, reduction="none", label_smoothing=case["ls"])
    if case["z"]:
        cdim = 1 if x.dim() > 1 else 0
        lse = torch.logsumexp(xs, cdim)
        if not t.is_floating_point():
            lse = torch.where(t != ii, lse, torch.zeros_like(lse))
        loss = loss + case["z"] * lse * lse
    if case["reduction"] == "none":
        return loss
    if case["reduction"] == "sum":
        return loss.sum()
    if t.is_floating_point():
        return loss.sum() / (loss.numel() if loss.dim() else 1)
    valid = t != ii
    wy = w[t.clamp(0, w.shape[0] - 1)] if w is not None else torch.ones(t.shape, dtype=dtype)
    return loss.sum() / torch.where(valid, wy, torch.zeros_like(wy)).sum()


def _loss_and_grad(fn, x, t, w, up_seed):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t, w)
    g = torch.Generator().manual_seed(up_seed)
    up = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype).to(loss.device)
    if x.numel() == 0 or not loss.requires_grad:
        return loss.detach(), torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), grad


def _err(a, b):
    a, b = a.double(), b.double()
    both = torch.isfinite(a) & torch.isfinite(b)
    return (a[both] - b[both]).abs().max().item() if both.any() else 0.0


def _check(ours, truth, theirs, dtype, what):
    # non-finite positions agree exactly (NaN where torch gives NaN, inf where inf; a finite
    # value beyond the output dtype's range rounds to inf)
    assert torch.equal(torch.isnan(ours.double()), torch.isnan(truth)), f"{what}: NaN pattern"
    overflow = truth.abs() > torch.finfo(dtype).max
    assert torch.equal(torch.isinf(ours.double()), torch.isinf(truth) | overflow), \
        f"{what}: inf pattern"
    scale = max(1.0, truth[torch.isfinite(truth)].abs().max().item()) if torch.isfinite(truth).any() else 1.0
    err = _err(ours, truth)
    # no worse than torch's own error in the same dtype (cancellation at huge values hits both)
    allowed = _err(theirs, truth) + SLACK[dtype] * scale
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


@given(case=cases())
def test_fuzz_cross_entropy(cpu_impl, case):
    _fuzz_cross_entropy(case, "cpu")


@pytest.fixture
def cuda_compiled():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_compiled("cuda")


@given(case=cases())
def test_fuzz_cross_entropy_cuda(cuda_compiled, case):
    """The CUDA kernels against the same float64 truth and torch's own CPU result."""
    _fuzz_cross_entropy(case, "cuda")


def _fuzz_cross_entropy(case, device):
    x, t, w = _make(case, device)
    dtype = case["dtype"]
    if case["prob"] and case["ignore"] is not None and case["ignore"] >= 0:
        case = dict(case, ignore=None)
    ii = case["ignore"] if case["ignore"] is not None else -100
    kw = dict(ignore_index=ii, reduction=case["reduction"], label_smoothing=case["ls"])
    extra = dict(z_loss=case["z"], softcap=case["cap"], inplace_backward=case["inplace"])
    what = f"{case}"

    loss, grad = _loss_and_grad(
        lambda x, t, w: softmax_ce.cross_entropy(x, t, w, **kw, **extra), x, t, w, case["seed"])
    assert loss.dtype == dtype
    loss, grad = loss.cpu(), grad.cpu()
    x, t, w = x.cpu(), t.cpu(), (w.cpu() if w is not None else None)
    x64 = x.detach().double().requires_grad_()
    truth = _truth(x64, t, w, case)
    up = torch.randn(truth.shape, generator=torch.Generator().manual_seed(case["seed"]),
                     dtype=torch.float64)
    g_truth = torch.autograd.grad(truth, x64, up.to(truth.dtype))[0] if x.numel() and truth.requires_grad else torch.zeros_like(x64)
    # torch's own result in the same dtype: the yardstick for half precision
    xl = x.detach().clone().requires_grad_()
    theirs = _truth(xl, t, w, case, dtype=dtype)
    g_theirs = torch.autograd.grad(theirs, xl, up.to(theirs.dtype))[0] if x.numel() and theirs.requires_grad else torch.zeros_like(xl)
    _check(loss, truth.detach(), theirs.detach(), dtype, what + " loss")
    _check(grad, g_truth, g_theirs, dtype, what + " grad")


@st.composite
def bce_cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    return dict(
        shape=shape, dtype=draw(st.sampled_from(DTYPES)),
        values=draw(st.sampled_from(["normal", "huge", "inf", "nan"])),
        weight=draw(st.booleans()), pos_weight=draw(st.booleans()),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(case=bce_cases())
def test_fuzz_bce(cpu_impl, case):
    _fuzz_bce(case, "cpu")


@given(case=bce_cases())
def test_fuzz_bce_cuda(cuda_compiled, case):
    _fuzz_bce(case, "cuda")


def _fuzz_bce(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if case["values"] == "huge":
        x = x * 1e3
    elif case["values"] in ("inf", "nan") and x.numel():
        x[torch.rand(shape, generator=g) < 0.3] = math.inf if case["values"] == "inf" else math.nan
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    last = tuple(shape[-1:])
    w = torch.rand(last, generator=g, dtype=torch.float64) + 0.5 if case["weight"] else None
    pw = torch.rand(last, generator=g, dtype=torch.float64) * 3 if case["pos_weight"] else None
    # every input rounded to the dtype under test first: the truth sees the same values
    x, y = x.to(dtype).double(), y.to(dtype).double()
    w = None if w is None else w.to(dtype).double()
    pw = None if pw is None else pw.to(dtype).double()
    kw = dict(reduction=case["reduction"])

    def run(fn, d, dev="cpu"):
        def to(v):
            return None if v is None else v.to(d).to(dev)

        xr = to(x).requires_grad_()
        loss = fn(xr, to(y), to(w), pos_weight=to(pw), **kw)
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad = torch.autograd.grad(loss, xr, to(up).to(loss.dtype))[0] if x.numel() else torch.zeros_like(xr)
        return loss.detach().cpu(), grad.cpu()

    loss, grad = run(softmax_ce.binary_cross_entropy_with_logits, dtype, device)
    truth, g_truth = run(F.binary_cross_entropy_with_logits, torch.float64)
    theirs, g_theirs = run(F.binary_cross_entropy_with_logits, dtype)
    _check(loss, truth, theirs, dtype, f"{case} loss")
    _check(grad, g_truth, g_theirs, dtype, f"{case} grad")
