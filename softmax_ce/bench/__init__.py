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

Progress goes to stderr; the table (or ``--json``) to stdout."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import asdict
from typing import List

import torch

from .cases import (
    DEFAULT_CASES, FULL_CASES, GPU_CASES, KINDS, MEMORY, QUICK_CASES, SOFTMAX_SHAPES, Case,
    bench_softmax, case_bytes, make_impls,
)
from .linear_cases import format_linear_table
from .harness import (
    DTYPES, Record, Timer, minutes, copy_bandwidth, format_table, log, machine_info,
    parse_shapes, plot, write_json,
)

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    cases = ", ".join(f"{c.name} {'x'.join(map(str, c.shape))} {c.dtype}" for c in DEFAULT_CASES)
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
    p.add_argument("--tokens", action="store_true", help="per-token outputs against the torch "
                   "way, the ignored-rows ratio and the capped chunk's memory "
                   "(softmax_ce/bench/token_cases.py)")
    p.add_argument("--distributed", action="store_true", help="the vocab-parallel loss, world "
                   "size 2 over gloo, against one process (softmax_ce/bench/distributed.py); "
                   "--shapes NxC (default 4096x32000), --dtype")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-softmax", action="store_true", help="skip softmax / log_softmax")
    p.add_argument("--impls", nargs="*", help="only these implementations (eager always runs; "
                                              "the reference runs by default with --full only)")


def _select_cases(args, device):
    if args.shapes:
        return [Case("custom", s, args.dtype or "float32") for _, s in parse_shapes(args.shapes)]
    if args.quick:
        base = QUICK_CASES
    elif device.startswith("cuda"):
        base = GPU_CASES
    else:
        base = FULL_CASES if args.full else DEFAULT_CASES
    cases = [c for c in base if args.dtype is None or c.dtype == args.dtype]
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
        if not cases:
            names = sorted({c.name for c in base})
            raise SystemExit(f"--cases {args.cases!r} matches none of: {', '.join(names)}")
    return cases


def run(args) -> int:
    if getattr(args, "tokens", False):
        from . import token_cases

        if args.quick:
            result = token_cases.run(((512, 64, 2048),), (1024, 32, 2048), (8192, 16, 2048),
                                     rounds=1)
        else:
            result = token_cases.run(rounds=args.repeat or 3)
        print(token_cases.report(result))
        if args.json:
            write_json(result, args.json)
        return 0 if all(r["agrees"] for r in result["tokens"]) else 1
    if getattr(args, "distributed", False):
        from . import distributed

        N, C = (4096, 32000) if not args.shapes else (
            int(v) for v in args.shapes.split(",")[0].lower().split("x"))
        result = distributed.run(N, C, args.dtype or "float32",
                                 rounds=args.repeat or (3 if args.quick else 5),
                                 head=(256, 64, 4096) if args.quick else (1024, 256, 32000))
        print(distributed.report(result))
        if args.json:
            write_json(result, args.json)
        return 0
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
    sizes = [case_bytes(c) for c in cases]
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
            left = f", about {minutes(elapsed * (sum(weights) - done) / done)} left"
        log(f"[{step + 1}/{steps}{left}] {what}")

    records: List[Record] = []
    memory_work = []
    for i, (name, shape, dtype_name, kind) in enumerate(cases):
        progress(i, f"{name} {tuple(shape)} {dtype_name}: timing")
        torch._dynamo.reset()  # one compiled baseline per case: no recompile-limit warnings
        recs = KINDS[kind](name, shape, dtype_name, device, timer, bw, args)
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
            MEMORY[recs[0].op](recs, device, not args.no_compile)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    log(f"done in {minutes(time.perf_counter() - start)}")
    payload = {"machine": info, "records": [asdict(r) for r in records]}
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.json == "-":
        print(json.dumps(payload, indent=1))
    else:
        print(format_table([r for r in records if r.op != "linear_cross_entropy"], info))
        linear = [r for r in records if r.op == "linear_cross_entropy"]
        if linear:
            print(format_linear_table(linear))
    if args.plot:
        plot([r for r in records if r.op != "linear_cross_entropy"], info, args.plot)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softmax_ce bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
