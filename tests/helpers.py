"""Tolerances and comparisons shared by the tests."""

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Tolerances against torch in the same dtype (fp64/fp32), or against the float64 truth for
# bf16/fp16, where our result is computed in float32 and rounded once to the output dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
}


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=tol["rtol"],
        atol=tol["atol"] * scale, equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


def checksum(*tensors):
    """A fingerprint of tensors' contents, to prove an input was not modified."""
    return [None if t is None else t.detach().clone() for t in tensors]


def _same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta":
        return True  # no data to compare
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def assert_unchanged(before, *tensors):
    for b, t in zip(before, tensors):
        if b is not None:
            assert _same(b, t.detach()), "an input tensor was modified"


def assert_no_worse_than_torch(ours, theirs, truth, dtype, slack=None, what=""):
    """Pass rule for low precision: our max error against the float64 truth is no worse than
    torch's own (in the same dtype) plus a small slack."""
    truth = truth.double().cpu()
    err_ours = (ours.double().cpu() - truth).abs().nan_to_num(0.0).max().item() if ours.numel() else 0.0
    err_torch = (theirs.double().cpu() - truth).abs().nan_to_num(0.0).max().item() if ours.numel() else 0.0
    if slack is None:
        slack = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * truth.abs().max().item() if truth.numel() else 0
    assert err_ours <= err_torch + slack, f"{what}: ours {err_ours:.3g} vs torch {err_torch:.3g}"


def truth_cross_entropy(x, t, weight=None, ignore_index=-100, label_smoothing=0.0,
                        reduction="mean", z_loss=0.0, softcap=None):
    """torch's cross_entropy (and our z-loss and soft-capping) written out in plain differentiable
    torch ops, class dimension 1: an oracle that torch.func can transform (torch's own function
    cannot be vmapped with some options) and that covers our extensions.
    tests/test_torch_func.py checks it against torch's cross_entropy."""
    C = x.shape[1]
    xs = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(xs, 1)
    nlp = lse.unsqueeze(1) - xs
    w = weight if weight is not None else torch.ones(C, dtype=x.dtype, device=x.device)
    if t.is_floating_point():
        tt = t * (1 - label_smoothing) + label_smoothing / C
        loss = (w.view(1, C, *([1] * (x.dim() - 2))) * tt * nlp).sum(1) + z_loss * lse * lse
        denom = torch.tensor(float(loss.numel()), dtype=x.dtype, device=x.device)
    else:
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        w_y = w[safe]
        loss = (1 - label_smoothing) * w_y * nlp.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = loss + (label_smoothing / C) * (w.view(1, C, *([1] * (x.dim() - 2))) * nlp).sum(1) + z_loss * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        denom = torch.where(valid, w_y, torch.zeros_like(w_y)).sum()
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / denom


def formed_in_forward(loss):
    """Whether a loss's gradient was formed in its forward pass: its autograd node (behind a cast
    or a view) is ReducedCrossEntropyFunction, or the host fast path's C++ node."""
    fns = [loss.grad_fn]
    for _ in range(3):
        if not fns:
            break
        fn = fns.pop(0)
        name = fn.name() if fn is not None else ""
        if "ReducedCrossEntropy" in name or "HostCeFunction" in name:
            return True
        if fn is not None:
            fns += [f[0] for f in fn.next_functions if f[0] is not None]
    return False
