"""The benchmark and self-check: ``python -m softmax_ce bench``.

For each case (a shape and dtype) it times every available implementation of cross-entropy --
softmax_ce (compiled kernels: by default the gradient formed in the forward pass; ``bwd-grad``
with it formed in the backward, ``softmax_ce.gradient_in_forward(False)``; and with
``inplace_backward=True``, on logits that are an intermediate (the gradient of a leaf is never
written into it), taken with ``autograd.grad`` as a model's head would receive it), the softmax_ce
reference,
``F.cross_entropy`` eager and ``torch.compile(F.cross_entropy)`` -- forward and forward+backward,
as the median of repeated, interleaved runs after warm-up; checks that they agree with eager torch;
measures the extra peak memory of one forward+backward beyond the logits; and compares each time
with the memory-traffic floor: bytes moved (forward: read the logits once; forward+backward: read
once, write the gradient once) divided by the copy bandwidth measured in the same run.
softmax and log_softmax (forward+backward) are compared with torch's own on the same shapes.

Progress goes to stderr; the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import softmax_ce
from softmax_ce import ops

# name, shape, dtype: shapes a user recognises (LLM vocabularies, classification, segmentation).
# The default run: one LLM row, one classifier row, one spatial row (a few minutes on 2 cores).
DEFAULT_CASES = [
    ("llm-32k", (4096, 32000), "float32"),
    ("imagenet-1k", (32768, 1000), "float32"),
    ("segment-21", (16, 21, 128, 128), "float32"),
]
# --full: the whole table of BENCHMARKS.md.
FULL_CASES = [
    ("llm-32k", (4096, 32000), "float32"),
    ("llm-32k", (4096, 32000), "bfloat16"),
    ("llama3-vocab", (4096, 128256), "bfloat16"),
    ("classify-10", (65536, 10), "float32"),
    ("imagenet-1k", (32768, 1000), "float32"),
    ("segment-21", (16, 21, 128, 128), "float32"),
]
QUICK_CASES = [
    ("llm-32k-small", (512, 32000), "float32"),
    ("llm-32k-small", (512, 32000), "bfloat16"),
    ("classify-10", (16384, 10), "float32"),
    ("segment-21", (4, 21, 64, 64), "float32"),
]
GPU_CASES = [
    ("llm-32k", (8192, 32000), "float32"),
    ("llama3-vocab", (4096, 128256), "bfloat16"),
    ("llm-32k", (8192, 32000), "bfloat16"),
    ("imagenet-1k", (32768, 1000), "float32"),
    ("segment-21", (16, 21, 128, 128), "float32"),
]
SOFTMAX_SHAPES = {"(4096, 32000)", "(32768, 1000)", "(16, 21, 128, 128)", "(512, 32000)",
                  "(4, 21, 64, 64)", "(8192, 32000)"}
# torch.compile's on-disk cache does not tell the CPU kernel variants apart: code cached under
# one ATEN_CPU_CAPABILITY and reused under another gave wrong results (torch 2.13, BENCHMARKS.md).
# A variant chosen by hand gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_softmax_ce_{os.environ['ATEN_CPU_CAPABILITY']}")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class Record:
    case: str
    shape: List[int]
    dtype: str
    device: str
    op: str
    impl: str
    fwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    vs_eager: Optional[float] = None
    vs_compile: Optional[float] = None
    floor_fwd_ms: Optional[float] = None
    floor_fwdbwd_ms: Optional[float] = None
    fwdbwd_over_floor: Optional[float] = None
    gbps_fwdbwd: Optional[float] = None
    extra_peak_bytes: Optional[int] = None
    extra_peak_over_logits: Optional[float] = None
    max_err: Optional[float] = None
    agrees: Optional[bool] = None


class Timer:
    """Wall time of fn on the CPU; on CUDA the GPU time between two events around fn, with a
    spin kernel queued first so that the host has issued fn's launches before the GPU reaches
    them: the time a training loop sees when the host runs ahead of the GPU (the host's own
    per-call cost is hidden, as it is there; with an idle GPU it would be added)."""

    SPIN_CYCLES = 2_000_000  # about 1 ms of GPU time: longer than any call's launch overhead

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(self.SPIN_CYCLES)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(nbytes: int, device: str, timer: Timer) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), buffers already touched."""
    n = max(1, min(nbytes, 1 << 30) // 4)
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(7)]
    del src, dst
    return 2 * n * 4 / (statistics.median(times[2:]) / 1e3)


# ----------------------------------------------------------------------------------------------
# peak memory of one forward+backward beyond the logits
# ----------------------------------------------------------------------------------------------


def _rss_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def extra_peak_bytes(step: Callable[[], None], device: str) -> Optional[int]:
    """Extra peak memory of one call of step (which leaves nothing allocated behind). On the CPU:
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set
    before the call. On CUDA: torch.cuda.max_memory_allocated above the allocation before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_kb("VmRSS")
    if base is None or not _reset_peak_rss():
        return None
    step()
    peak = _rss_kb("VmHWM")
    return None if peak is None else max(0, (peak - base) * 1024)


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------


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
    """Extra peak memory of one forward+backward per implementation. CUDA: in this process
    (the caching allocator's peak statistics are exact). CPU: in a child process per case, whose
    glibc serves every allocation above 128 KB with its own mmap (MALLOC_MMAP_THRESHOLD_), so that
    the peak resident set measures the allocations and not a heap warmed by earlier cases."""
    rec0 = records[0]
    spec = {"shape": rec0.shape, "dtype": rec0.dtype, "device": device,
            "compile": compile_baseline, "impls": [r.impl for r in records]}
    if device.startswith("cuda"):
        result = _memory_case(spec)
    else:
        import subprocess

        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
        code = "import sys, json; from softmax_ce.bench import _memory_case; " \
               "print(json.dumps(_memory_case(json.loads(sys.argv[1]))))"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"  memory measurement failed: {proc.stderr.strip()[-500:]}")
            return
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in records:
        peak = result.get(r.impl)
        if peak is not None:
            r.extra_peak_bytes = int(peak)
            r.extra_peak_over_logits = peak / result["logits_bytes"]


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


def parse_shapes(text: str):
    cases = []
    for item in text.split(","):
        item = item.strip()
        if item:
            shape = tuple(int(v) for v in item.lower().split("x"))
            if len(shape) < 2:
                raise SystemExit(f"--shapes: {item!r} needs at least (N, C)")
            cases.append(("custom", shape))
    return cases


def format_table(records: List[Record], info: dict) -> str:
    lines = []
    head = (f"device: {info['device_name']} | threads: {info['threads']} | torch {info['torch']} | "
            f"copy bandwidth {info['copy_gbps']:.1f} GB/s (read + write) | softmax_ce "
            f"{info['softmax_ce']} | {info['date']}")
    lines.append("")
    lines.append("%bw: bytes the operation must move (forward: the logits once; forward+backward: "
                 "the logits once and the gradient once) / time, as a share of the copy bandwidth; "
                 "x floor: time / that floor; extra mem: peak memory of forward+backward beyond "
                 "the logits.")
    lines.append(head)
    lines.append("")
    cols = ["case", "shape", "dtype", "op", "impl", "fwd ms", "fwd+bwd ms", "x eager",
            "x compile", "fwd %bw", "f+b GB/s", "f+b %bw", "f+b x floor", "extra mem (x logits)",
            "max err", "ok"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    def pct(floor, t):  # share of the measured copy bandwidth achieved
        return None if floor is None or not t else 100.0 * floor / t

    for r in records:
        lines.append("| " + " | ".join([
            r.case, "x".join(map(str, r.shape)), r.dtype, r.op, r.impl, f(r.fwd_ms),
            f(r.fwdbwd_ms), f(r.vs_eager, "{:.1f}x"), f(r.vs_compile, "{:.1f}x"),
            f(pct(r.floor_fwd_ms, r.fwd_ms), "{:.0f}%"), f(r.gbps_fwdbwd, "{:.0f}"),
            f(pct(r.floor_fwdbwd_ms, r.fwdbwd_ms), "{:.0f}%"), f(r.fwdbwd_over_floor, "{:.2f}"),
            f(r.extra_peak_over_logits, "{:.2f}"), f(r.max_err, "{:.1e}"),
            "" if r.agrees is None else ("yes" if r.agrees else "NO"),
        ]) + " |")
    return "\n".join(lines)


def machine_info(device: str, bw: float) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "softmax_ce": softmax_ce.__version__,
        "build": softmax_ce.build_info(),
        "copy_gbps": bw / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    cases = ", ".join(f"{n} {'x'.join(map(str, s))} {d}" for n, s, d in DEFAULT_CASES)
    p.description = (p.description or "") + "\n\n" + textwrap.fill(
        f"Default cases: {cases}. --full runs the whole table of BENCHMARKS.md (tens of "
        "minutes on 2 cores), --quick small shapes (a smoke test). Progress goes to stderr, the "
        "table to stdout; the exit status is 1 if any implementation disagrees with torch.", 78)
    p.add_argument("--full", action="store_true", help="every case of BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats")
    p.add_argument("--cases", help="only the cases whose name contains one of these "
                                   "(comma-separated), e.g. llm,segment")
    p.add_argument("--shapes", help="comma-separated shapes instead of the cases, e.g. "
                                    "4096x32000,16x21x128x128")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="dtype for --shapes (default float32), or a filter on the cases")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE ('-': "
                                                   "stdout, instead of the table)")
    p.add_argument("--plot", metavar="FILE", help="plot speed-ups and the share of the traffic "
                                                   "floor to FILE (PNG; needs matplotlib: "
                                                   "pip install .[plot])")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 5; quick 3; "
                                                            "full 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-softmax", action="store_true", help="skip softmax / log_softmax")
    p.add_argument("--impls", nargs="*", help="only these implementations (eager always runs; "
                                              "the reference runs by default with --full only)")


def _select_cases(args, device):
    if args.shapes:
        return [("custom", s, args.dtype or "float32") for _, s in parse_shapes(args.shapes)]
    if args.quick:
        base = QUICK_CASES
    elif device.startswith("cuda"):
        base = GPU_CASES
    else:
        base = FULL_CASES if args.full else DEFAULT_CASES
    cases = [c for c in base if args.dtype is None or c[2] == args.dtype]
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c[0] for w in wanted)]
        if not cases:
            names = sorted({c[0] for c in base})
            raise SystemExit(f"--cases {args.cases!r} matches none of: {', '.join(names)}")
    return cases


def run(args) -> int:
    if args.repeat is None:
        args.repeat = 3 if args.quick else (7 if args.full else 5)
    if args.impls is None and not (args.full or args.quick or args.shapes):
        # the reference is the tests' oracle, not a contender: timed with --full
        args.impls = [name for name in make_impls(args.device, not args.no_compile)
                      if "reference" not in name]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib (or .[plot])")

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    cases = _select_cases(args, device)
    timer = Timer(device)
    sizes = [torch.Size(s).numel() * DTYPES[d].itemsize for _, s, d in cases]
    log(f"softmax_ce bench on {device}: {len(cases)} case(s); measuring copy bandwidth")
    bw = copy_bandwidth(max(sizes), device, timer)
    info = machine_info(device, bw)
    names = [n for n in make_impls(device, not args.no_compile)
             if args.impls is None or n in args.impls or n == "torch eager"]
    log(f"copy bandwidth {bw / 1e9:.1f} GB/s; kernels: {info['build'].get('cpu_isa', 'none')}; "
        f"implementations: {', '.join(names)}")

    # the memory measurement (a child process per case) is about as long as the timing
    steps = len(cases) * (1 if args.no_memory else 2)
    weights = sizes + ([] if args.no_memory else sizes)
    start = time.perf_counter()

    def progress(step: int, what: str) -> None:
        done = sum(weights[:step])
        left = ""
        if step and done:
            elapsed = time.perf_counter() - start
            left = f", about {_minutes(elapsed * (sum(weights) - done) / done)} left"
        log(f"[{step + 1}/{steps}{left}] {what}")

    records: List[Record] = []
    memory_work = []
    for i, (name, shape, dtype_name) in enumerate(cases):
        progress(i, f"{name} {tuple(shape)} {dtype_name}: timing")
        torch._dynamo.reset()  # one compiled baseline per case: no recompile-limit warnings
        recs = bench_cross_entropy(name, shape, dtype_name, device, timer, bw, args)
        records += recs
        memory_work.append(recs)
        if not args.no_softmax and str(tuple(shape)) in SOFTMAX_SHAPES and dtype_name == "float32":
            log("  softmax, log_softmax")
            records += bench_softmax(name, shape, dtype_name, device, timer, args)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    if not args.no_memory:
        for i, recs in enumerate(memory_work):
            progress(len(cases) + i, f"{recs[0].case} {tuple(recs[0].shape)} {recs[0].dtype}: "
                                     "peak memory")
            measure_memory(recs, device, not args.no_compile)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    log(f"done in {_minutes(time.perf_counter() - start)}")
    payload = {"machine": info, "records": [asdict(r) for r in records]}
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.json == "-":
        print(json.dumps(payload, indent=1))
    else:
        print(format_table(records, info))
    if args.plot:
        plot(records, info, args.plot)
        log(f"plot written to {args.plot}")
    bad = [r for r in records if r.agrees is False]
    for r in bad:
        log(f"DISAGREEMENT: {r.case} {r.shape} {r.dtype} {r.op} {r.impl}: max err {r.max_err:.2e}")
    checked = sum(r.agrees is True for r in records)
    stream = sys.stderr if args.json == "-" else sys.stdout  # stdout holds only the JSON then
    if bad:
        print(f"\n{len(bad)} of {checked + len(bad)} checked results DISAGREE with torch "
              "(see above)", file=stream)
    else:
        print(f"\nall {checked} checked results agree with torch (loss and gradient)",
              file=stream)
    return 1 if bad else 0


def plot(records: List[Record], info: dict, path: str) -> None:
    """Per cross-entropy case: softmax_ce's speed-up over torch eager and torch.compile
    (forward+backward), and its share of the memory-traffic floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.op == "cross_entropy" and r.impl == "softmax_ce"]
    labels = [f"{r.case}\n{'x'.join(map(str, r.shape))}\n{r.dtype}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9, 3.2 * len(rows)), 4.6))
    pos = range(len(rows))
    ax1.bar([p - 0.2 for p in pos], [r.vs_eager or 0 for r in rows], 0.4, label="vs torch eager")
    ax1.bar([p + 0.2 for p in pos], [r.vs_compile or 0 for r in rows], 0.4,
            label="vs torch.compile")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_ylabel("speed-up, forward+backward (x)")
    ax1.set_ylim(0, 1.25 * max([r.vs_eager or 0 for r in rows] + [1.0]))
    ax1.legend(fontsize=8, loc="upper right")
    share = [100 / r.fwdbwd_over_floor if r.fwdbwd_over_floor else 0 for r in rows]
    ax2.bar(list(pos), share, 0.5, color="tab:green")
    ax2.axhline(100, color="grey", lw=0.8)
    ax2.set_ylabel("share of the memory-traffic floor (%)")
    for ax in (ax1, ax2):
        ax.set_xticks(list(pos))
        ax.set_xticklabels(labels, fontsize=8)
    fig.suptitle(f"softmax_ce on {info['device_name']} ({info['threads']} threads, "
                 f"{info['build'].get('cpu_isa', '')}), {info['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softmax_ce bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
