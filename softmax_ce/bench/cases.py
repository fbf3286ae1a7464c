"""The benchmark's cases: shapes a user recognises, the implementations compared, and how one
case of each kind is timed, checked against torch and measured for memory. A case is data
(name, shape, dtype, kind); ``KINDS`` maps a kind to the function that benchmarks it, so new
kinds (the fused linear cross-entropy, the vocab-parallel loss) are a function and a few rows."""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.nn.functional as F

import softmax_ce
from softmax_ce import ops

from .harness import DTYPES, Record, extra_peak_bytes, log, measure_peaks
from .linear_cases import bench_linear, measure_linear_memory


class Case(NamedTuple):
    name: str
    shape: tuple
    dtype: str
    kind: str = "cross_entropy"


# name, shape, dtype: shapes a user recognises (LLM vocabularies, classification, segmentation).
# The default run: one LLM row, one classifier row, one spatial row (a few minutes on 2 cores).
DEFAULT_CASES = [
    Case("llm-32k", (4096, 32000), "float32"),
    Case("imagenet-1k", (32768, 1000), "float32"),
    Case("segment-21", (16, 21, 128, 128), "float32"),
]


# --full: the whole table of BENCHMARKS.md.
FULL_CASES = [
    Case("llm-32k", (4096, 32000), "float32"),
    Case("llm-32k", (4096, 32000), "bfloat16"),
    Case("llm-32k", (4096, 32000), "float16"),
    Case("llama3-vocab", (4096, 128256), "bfloat16"),
    Case("llama3-vocab", (4096, 128256), "float16"),
    Case("classify-10", (65536, 10), "float32"),
    Case("classify-10-batch", (64, 10), "float32"),
    Case("imagenet-1k-batch", (256, 1000), "float32"),
    Case("imagenet-1k", (32768, 1000), "float32"),
    Case("segment-21", (16, 21, 128, 128), "float32"),
    Case("llm-head-32k", (4096, 1024, 32000), "float32", "linear_cross_entropy"),
    Case("llm-head-32k", (4096, 1024, 32000), "bfloat16", "linear_cross_entropy"),
    Case("llama3-head", (2048, 512, 128256), "float32", "linear_cross_entropy"),
]


QUICK_CASES = [
    Case("llm-32k-small", (512, 32000), "float32"),
    Case("llm-32k-small", (512, 32000), "bfloat16"),
    Case("classify-10", (16384, 10), "float32"),
    Case("segment-21", (4, 21, 64, 64), "float32"),
    Case("llm-head-small", (512, 256, 8000), "float32", "linear_cross_entropy"),
]


GPU_CASES = [
    Case("llm-32k", (8192, 32000), "float32"),
    Case("llama3-vocab", (4096, 128256), "bfloat16"),
    Case("llm-32k", (8192, 32000), "bfloat16"),
    Case("imagenet-1k", (32768, 1000), "float32"),
    Case("segment-21", (16, 21, 128, 128), "float32"),
    Case("llama3-head", (8192, 4096, 128256), "bfloat16", "linear_cross_entropy"),
]


SOFTMAX_SHAPES = {"(4096, 32000)", "(32768, 1000)", "(16, 21, 128, 128)", "(512, 32000)",
                  "(4, 21, 64, 64)", "(8192, 32000)"}


def make_impls(device: str, compile_baseline: bool) -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {}
    if ops.implementation(device) == "compiled":
        impls["softmax_ce"] = lambda x, t: softmax_ce.cross_entropy(x, t)
        impls["softmax_ce inplace"] = lambda x, t: softmax_ce.cross_entropy(
            x, t, inplace_backward=True)

        def gradient_in_backward(x, t):
            with softmax_ce.gradient_in_forward(False):
                return softmax_ce.cross_entropy(x, t)

        impls["softmax_ce bwd-grad"] = gradient_in_backward

    def reference(x, t):
        with ops.force_reference():
            return softmax_ce.cross_entropy(x, t)

    impls["softmax_ce reference"] = reference
    impls["torch eager"] = F.cross_entropy
    if compile_baseline:
        impls["torch.compile"] = torch.compile(F.cross_entropy)
    return impls


def _fwd_step(fn, x, t):
    def step():
        with torch.no_grad():
            fn(x, t)
    return step


def _as_intermediate(x):
    """A copy of x produced by an autograd op, as logits produced by a model's head: what the
    in-place gradient overwrites (it never writes into a leaf's storage)."""
    return x.detach().clone().requires_grad_().clone()


def _fwdbwd_step(fn, x, t):
    """loss.backward() into a leaf's .grad; for an intermediate, the gradient with respect to
    it (autograd.grad), as the head's backward would receive it."""
    def step():
        loss = fn(x, t)
        if x.is_leaf:
            loss.backward()
            x.grad = None
        else:
            torch.autograd.grad(loss, x)
    return step


def _check(fn, x, t, loss_ref, grad_ref):
    """Max error of loss and gradient against eager torch, relative to their magnitudes."""
    xc = _as_intermediate(x)
    loss = fn(xc, t)
    (grad,) = torch.autograd.grad(loss, xc)
    err_loss = (loss.double() - loss_ref.double()).abs().item() / max(1e-30, loss_ref.double().abs().item())
    scale = grad_ref.double().abs().max().item() or 1.0
    err_grad = (grad.double() - grad_ref.double()).abs().max().item() / scale
    return max(err_loss, err_grad)


def bench_cross_entropy(name, shape, dtype_name, device, timer, bw, args) -> List[Record]:
    dtype = DTYPES[dtype_name]
    C = shape[1]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=gen).to(device)
    nbytes = x.numel() * x.element_size()
    floor_fwd = nbytes / bw * 1e3
    floor_fwdbwd = 2 * nbytes / bw * 1e3

    impls = make_impls(device, not args.no_compile)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls or k == "torch eager"}
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2

    # the eager result every implementation is checked against
    xr = x.detach().clone().requires_grad_()
    loss_ref = F.cross_entropy(xr, t)
    loss_ref.backward()
    grad_ref = xr.grad
    del xr

    records = {}
    for impl, fn in impls.items():
        rec = Record(name, list(shape), dtype_name, device, "cross_entropy", impl)
        rec.floor_fwd_ms, rec.floor_fwdbwd_ms = floor_fwd, floor_fwdbwd
        if impl != "torch eager":
            log(f"  {impl}: check against eager")
            rec.max_err = _check(fn, x, t, loss_ref, grad_ref)
            rec.agrees = rec.max_err <= tol
        records[impl] = rec
    del loss_ref, grad_ref
    # the in-place gradient overwrites its logits: that implementation gets its own copy, an
    # intermediate (the gradient of a leaf is never written into the leaf)
    inputs = {impl: (_as_intermediate(x) if "inplace" in impl else x) for impl in impls}
    for impl, fn in impls.items():
        log(f"  {impl}: warm-up")
        for _ in range(args.warmup):
            _fwd_step(fn, inputs[impl], t)()
            _fwdbwd_step(fn, inputs[impl], t)()

    fwd_times = {k: [] for k in records}
    fb_times = {k: [] for k in records}
    for r in range(args.repeat):
        log(f"  timing round {r + 1}/{args.repeat}")
        for impl, fn in impls.items():  # interleaved
            fwd_times[impl].append(timer(_fwd_step(fn, inputs[impl], t)))
            fb_times[impl].append(timer(_fwdbwd_step(fn, inputs[impl], t)))
    for impl, fn in impls.items():
        rec = records[impl]
        rec.fwd_ms = statistics.median(fwd_times[impl])
        rec.fwdbwd_ms = statistics.median(fb_times[impl])
        rec.fwdbwd_over_floor = rec.fwdbwd_ms / floor_fwdbwd
        rec.gbps_fwdbwd = 2 * nbytes / (rec.fwdbwd_ms / 1e3) / 1e9
    eager = records["torch eager"].fwdbwd_ms
    comp = records["torch.compile"].fwdbwd_ms if "torch.compile" in records else None
    for rec in records.values():
        rec.vs_eager = eager / rec.fwdbwd_ms
        rec.vs_compile = comp / rec.fwdbwd_ms if comp else None
    return list(records.values())


def measure_memory(records: List[Record], device: str, compile_baseline: bool) -> None:
    """Extra peak memory of one forward+backward per implementation (harness.measure_peaks)."""
    rec0 = records[0]
    spec = {"shape": rec0.shape, "dtype": rec0.dtype, "device": device,
            "compile": compile_baseline, "impls": [r.impl for r in records]}
    measure_peaks(records, device, spec, "softmax_ce.bench.cases", "_memory_case")


def _memory_case(spec: dict) -> dict:
    device = spec["device"]
    shape = tuple(spec["shape"])
    dtype = DTYPES[spec["dtype"]]
    impls = make_impls(device, spec["compile"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for impl in spec["impls"]:
        fn = impls.get(impl)
        if fn is None:
            continue
        x = torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_()
        if "inplace" in impl:
            x = _as_intermediate(x)
        t = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen).to(device)
        out["logits_bytes"] = x.numel() * x.element_size()
        _fwdbwd_step(fn, x, t)()  # warm: compiled graphs
        softmax_ce.empty_cache()  # a cached output buffer would hide the gradient's memory
        out[impl] = extra_peak_bytes(_fwdbwd_step(fn, x, t), device)
        del x, t
    return out


def bench_softmax(name, shape, dtype_name, device, timer, args) -> List[Record]:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_()
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    out = []
    for op in ("softmax", "log_softmax"):
        pairs = {"softmax_ce": getattr(softmax_ce, op), "torch eager": getattr(F, op)}
        steps = {}
        for impl, fn in pairs.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(x, 1)

            def fb(fn=fn):
                y = fn(x, 1)
                y.backward(g)
                x.grad = None

            steps[impl] = (fwd, fb)
            for _ in range(args.warmup):
                fwd()
                fb()
        times = {k: ([], []) for k in steps}
        for _ in range(args.repeat):
            for impl, (fwd, fb) in steps.items():
                times[impl][0].append(timer(fwd))
                times[impl][1].append(timer(fb))
        y_ref = pairs["torch eager"](x.detach(), 1).double()
        y = pairs["softmax_ce"](x.detach(), 1).double()
        err = (y - y_ref).abs().max().item()
        for impl in steps:
            rec = Record(name, list(shape), dtype_name, device, op, impl)
            rec.fwd_ms = statistics.median(times[impl][0])
            rec.fwdbwd_ms = statistics.median(times[impl][1])
            out.append(rec)
        eager = out[-1].fwdbwd_ms
        out[-2].vs_eager = eager / out[-2].fwdbwd_ms
        out[-1].vs_eager = 1.0
        out[-2].max_err = err
        out[-2].agrees = err <= (1e-5 if dtype == torch.float32 else 2e-2)
    return out


# kind -> the function that benchmarks one case of it (and, after it, softmax / log_softmax on
# the shapes of SOFTMAX_SHAPES)
KINDS = {"cross_entropy": bench_cross_entropy, "linear_cross_entropy": bench_linear}

# kind -> the function that measures the cases' extra peak memory
MEMORY = {"cross_entropy": measure_memory, "linear_cross_entropy": measure_linear_memory}


def case_bytes(case: Case) -> int:
    """The bytes of a case's logits (linear cases: (N, H, C) -> N x C)."""
    shape = case.shape
    if case.kind == "linear_cross_entropy":
        shape = (shape[0], shape[2])
    return torch.Size(shape).numel() * DTYPES[case.dtype].itemsize
