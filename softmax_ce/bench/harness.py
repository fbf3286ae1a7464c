"""The benchmark's harness: timers (CPU wall time; CUDA events behind a spin kernel), the copy
bandwidth that defines the memory-traffic floor, peak-memory measurement, machine information, and
the table and plot of the records. The cases (what is timed) are in cases.py."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import softmax_ce

# torch.compile's on-disk cache does not tell the CPU kernel variants apart: code cached under
# one ATEN_CPU_CAPABILITY and reused under another gave wrong results (torch 2.13,
# docs/bench-history/2026-11-29-cpu.md). A variant chosen by hand gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_softmax_ce_{os.environ['ATEN_CPU_CAPABILITY']}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def minutes(seconds: float) -> str:
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
    """Wall time of fn on the CPU (for a call under MIN_SECONDS, the mean of a loop); on CUDA the
    GPU time between two events around fn, with a spin kernel queued first so that the host has
    issued fn's launches before the GPU reaches them: the time a training loop sees when the host
    runs ahead of the GPU (the host's own per-call cost is hidden, as it is there; with an idle
    GPU it would be added)."""

    SPIN_CYCLES = 2_000_000  # about 1 ms of GPU time: longer than any call's launch overhead
    MIN_SECONDS = 0.005  # CPU: calls shorter than this are timed as the mean of a loop

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
        once = time.perf_counter() - t0
        if once >= self.MIN_SECONDS:
            return once * 1e3
        # a short call (a tiny shape, or the copy of a small tensor that defines its floor): the
        # mean over a loop of calls lasting about MIN_SECONDS, as the perf_counter resolution and
        # the timer's own cost would otherwise dominate
        reps = min(10000, int(self.MIN_SECONDS / max(once, 1e-7)) + 1)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3


def copy_bandwidth(nbytes: int, device: str, timer: Timer) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), buffers already touched."""
    n = max(1, min(nbytes, 1 << 30) // 4)
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(7)]
    del src, dst
    return 2 * n * 4 / (statistics.median(times[2:]) / 1e3)


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


def write_json(result, path: str) -> None:
    """The records as JSON to ``path`` ('-': stdout)."""
    import json

    text = json.dumps(result, indent=1)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def measure_peaks(records: List[Record], device: str, spec: dict, module: str,
                  function: str) -> None:
    """Fills the records' extra peak memory from ``module.function(spec)``: a dict from
    implementation to bytes, plus "logits_bytes" (what the extra is a share of). On CUDA in this
    process; on the CPU in a child process whose glibc serves every allocation above 128 KB with
    its own mmap (MALLOC_MMAP_THRESHOLD_), so that the peak resident set measures the
    allocations and not a heap warmed by earlier cases."""
    if device.startswith("cuda"):
        import importlib

        result = getattr(importlib.import_module(module), function)(spec)
    else:
        import json
        import subprocess

        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
        code = (f"import sys, json; from {module} import {function}; "
                f"print(json.dumps({function}(json.loads(sys.argv[1]))))")
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

    def ms(v):  # three significant digits for the short calls of small shapes
        return "" if v is None else ("{:.2f}".format(v) if v >= 1 else "{:.3g}".format(v))

    def pct(floor, t):  # share of the measured copy bandwidth achieved
        return None if floor is None or not t else 100.0 * floor / t

    for r in records:
        lines.append("| " + " | ".join([
            r.case, "x".join(map(str, r.shape)), r.dtype, r.op, r.impl, ms(r.fwd_ms),
            ms(r.fwdbwd_ms), f(r.vs_eager, "{:.1f}x"), f(r.vs_compile, "{:.1f}x"),
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
