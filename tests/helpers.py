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
