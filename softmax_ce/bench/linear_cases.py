"""The fused linear + cross-entropy cases: shape (N, H, C) = (tokens, hidden size, vocabulary).

Implementations: ours, torch's ``F.linear_cross_entropy`` in its reference mode (linear, then
cross_entropy) and its chunked mode (``options=LinearCrossEntropyOptions()``), and the three bare
GEMMs of the head (logits, grad_input, grad_weight: the time floor). Each is timed forward (under
``no_grad``) and forward+backward (``loss.backward()`` into ``input`` and ``weight``), checked
against torch's reference mode, and measured for extra peak memory beyond the inputs, the weight
and their gradients, as a share of what the whole logits would take."""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import softmax_ce

from .harness import DTYPES, Record, extra_peak_bytes, log, measure_peaks


def make_linear_impls() -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {"softmax_ce": softmax_ce.linear_cross_entropy}
    if hasattr(F, "linear_cross_entropy"):
        impls["torch reference"] = F.linear_cross_entropy
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            options = torch.nn.LinearCrossEntropyOptions()
            impls["torch chunked"] = lambda x, w, t: F.linear_cross_entropy(x, w, t,
                                                                            options=options)
    impls["bare GEMMs"] = None  # the floor: see _gemms
    return impls


def _gemms(x, w, backward: bool):
    with torch.no_grad():
        logits = x @ w.t()
        if backward:
            logits @ w
            logits.t() @ x


def _problem(shape, dtype_name, device, seed=0):
    N, H, C = shape
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, H, generator=gen).to(dtype).to(device).requires_grad_()
    w = (torch.randn(C, H, generator=gen) * H ** -0.5).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, C, (N,), generator=gen).to(device)
    return x, w, t


def _steps(fn, x, w, t):
    if fn is None:
        return (lambda: _gemms(x, w, False)), (lambda: _gemms(x, w, True))

    def fwd():
        with torch.no_grad():
            fn(x, w, t)

    def fwdbwd():
        fn(x, w, t).backward()
        x.grad = None
        w.grad = None

    return fwd, fwdbwd


def _check(fn, x, w, t, ref):
    xc, wc = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(xc, wc, t)
    loss.backward()
    errs = [(loss.double() - ref[0].double()).abs().item() / max(1e-30, ref[0].abs().item())]
    for got, want in ((xc.grad, ref[1]), (wc.grad, ref[2])):
        scale = want.double().abs().max().item() or 1.0
        errs.append((got.double() - want.double()).abs().max().item() / scale)
    return max(errs)


def bench_linear(name, shape, dtype_name, device, timer, bw, args) -> List[Record]:
    x, w, t = _problem(shape, dtype_name, device)
    impls = make_linear_impls()
    tol = 1e-4 if dtype_name in ("float32", "float64") else 3e-2
    repeat = min(args.repeat, 3)
    reference = impls.get("torch reference") or (
        lambda a, b, c: softmax_ce.cross_entropy(F.linear(a, b), c))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = reference(xr, wr, t)
    loss.backward()
    ref = (loss.detach(), xr.grad, wr.grad)
    del xr, wr, loss
    records = {}
    for impl, fn in impls.items():
        rec = Record(name, list(shape), dtype_name, device, "linear_cross_entropy", impl)
        if fn is not None and impl != "torch reference":
            log(f"  {impl}: check against torch's reference mode")
            rec.max_err = _check(fn, x, w, t, ref)
            rec.agrees = rec.max_err <= tol
        records[impl] = rec
    del ref
    steps = {impl: _steps(fn, x, w, t) for impl, fn in impls.items()}
    for impl, (fwd, fwdbwd) in steps.items():
        log(f"  {impl}: warm-up")
        fwd()
        fwdbwd()
    times = {impl: ([], []) for impl in steps}
    for r in range(repeat):
        log(f"  timing round {r + 1}/{repeat}")
        for impl, (fwd, fwdbwd) in steps.items():  # interleaved
            times[impl][0].append(timer(fwd))
            times[impl][1].append(timer(fwdbwd))
    for impl, rec in records.items():
        rec.fwd_ms = statistics.median(times[impl][0])
        rec.fwdbwd_ms = statistics.median(times[impl][1])
    floor = records["bare GEMMs"].fwdbwd_ms
    chunked = records["torch chunked"].fwdbwd_ms if "torch chunked" in records else None
    for rec in records.values():
        rec.floor_fwdbwd_ms = floor
        rec.fwdbwd_over_floor = rec.fwdbwd_ms / floor
        rec.vs_compile = chunked / rec.fwdbwd_ms if chunked else None  # x torch chunked
    return list(records.values())


def measure_linear_memory(records: List[Record], device: str, compile_baseline=False) -> None:
    """Extra peak memory of one forward+backward beyond inputs, weight and their gradients, over
    the bytes of the whole logits (N x C in the input dtype), as harness.measure_peaks does."""
    rec0 = records[0]
    spec = {"shape": rec0.shape, "dtype": rec0.dtype, "device": device,
            "impls": [r.impl for r in records if r.impl != "bare GEMMs"]}
    measure_peaks(records, device, spec, "softmax_ce.bench.linear_cases", "_linear_memory_case")


def _linear_memory_case(spec: dict) -> dict:
    impls = make_linear_impls()
    N, H, C = spec["shape"]
    out = {"logits_bytes": N * C * DTYPES[spec["dtype"]].itemsize}
    for impl in spec["impls"]:
        fn = impls[impl]
        x, w, t = _problem(tuple(spec["shape"]), spec["dtype"], spec["device"])
        grad_bytes = x.numel() * x.element_size() + w.numel() * w.element_size()

        def step():
            fn(x, w, t).backward()

        step()  # warm: the gradients' first allocation, caches
        x.grad = None
        w.grad = None
        softmax_ce.empty_cache()
        peak = extra_peak_bytes(step, spec["device"])
        # the gradients stay allocated after the step; the inputs were there before it
        out[impl] = None if peak is None else max(0, peak - grad_bytes)
        del x, w, t
    return out


def format_linear_table(records: List[Record]) -> str:
    cols = ["case", "shape (N, H, C)", "dtype", "impl", "fwd ms", "fwd+bwd ms",
            "x bare GEMMs", "speed-up vs torch chunked", "extra mem (x full logits)", "max err",
            "ok"]
    lines = ["", "Fused linear + cross-entropy: x bare GEMMs = fwd+bwd time / the three GEMMs' "
             "time (the floor); extra mem: peak beyond inputs, weight and their gradients.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for r in records:
        lines.append("| " + " | ".join([
            r.case, "x".join(map(str, r.shape)), r.dtype, r.impl, f(r.fwd_ms, "{:.0f}"),
            f(r.fwdbwd_ms, "{:.0f}"), f(r.fwdbwd_over_floor), f(r.vs_compile, "{:.2f}x"),
            f(r.extra_peak_over_logits, "{:.3f}"), f(r.max_err, "{:.1e}"),
            "" if r.agrees is None else ("yes" if r.agrees else "NO"),
        ]) + " |")
    return "\n".join(lines)
