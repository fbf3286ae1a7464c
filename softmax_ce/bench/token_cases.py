"""``python -m softmax_ce bench --tokens``: what the fused head costs for RL and evaluation, and
what it no longer spends on what it does not need.

1. Per-token outputs: ``linear_log_probs`` (log-probability of the target, entropy, temperature
   0.7) against the torch way (the whole logits, ``log_softmax``, gather, the written-out
   entropy), forward + backward of ``(log_prob + 0.01 entropy).sum()``: time (median of the
   rounds, interleaved) and the step's extra peak memory beyond the inputs and their gradients
   (resident set in a child process, as the main benchmark measures).
2. Ignored rows: ``linear_cross_entropy`` forward + backward with none and with half of the
   positions ignored (a prompt): the time ratio.
3. The default chunk's memory at a large token count: one forward + backward of
   ``linear_cross_entropy`` with the default chunk capped (``softmax_ce.chunk_memory``, 256 MiB)
   and with the former rule alone (1/11 of the whole logits), its extra peak memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .harness import extra_peak_bytes


def _problem(N, H, C, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(C, H, generator=g) / H ** 0.5,
            torch.randint(0, C, (N,), generator=g))


def _token_step(impl, x, W, t):
    import torch.nn.functional as F

    import softmax_ce

    def step():
        xo, Wo = x.detach().requires_grad_(), W.detach().requires_grad_()
        if impl == "softmax_ce":
            out = softmax_ce.linear_log_probs(xo, Wo, t, temperature=0.7, entropy=True)
            lp, H = out.log_prob, out.entropy
        else:  # the torch way: the whole logits
            logp = F.log_softmax((xo @ Wo.t()) / 0.7, dim=-1)
            lp = logp.gather(1, t.unsqueeze(1)).squeeze(1)
            H = -(logp.exp() * logp).sum(-1)
        (lp + 0.01 * H).sum().backward()
        return xo.grad, Wo.grad

    return step


def _token_memory(impl, N, H, C):
    """In a child: the step's extra peak beyond inputs and gradients."""
    import torch

    torch.set_num_threads(int(os.environ.get("SOFTMAX_CE_BENCH_THREADS", "2")))
    x, W, t = _problem(N, H, C)
    step = _token_step(impl, x, W, t)
    step()  # warm
    grads = (N * H + C * H) * 4
    peak = extra_peak_bytes(step, "cpu")
    return None if peak is None else max(0, peak - grads)


def _cap_memory(N, H, C, capped):
    import torch

    import softmax_ce

    torch.set_num_threads(int(os.environ.get("SOFTMAX_CE_BENCH_THREADS", "2")))
    x, W, t = _problem(N, H, C)

    def step():
        xo, Wo = x.detach().requires_grad_(), W.detach().requires_grad_()
        softmax_ce.linear_cross_entropy(xo, Wo, t).backward()
        return xo.grad, Wo.grad

    limit = None if capped else softmax_ce.chunk_memory(1 << 50)  # the 1/11 rule alone
    try:
        t0 = time.perf_counter()
        peak = extra_peak_bytes(step, "cpu")
        seconds = time.perf_counter() - t0
        chunk = softmax_ce.linear.default_chunk_size(N, C, H, torch.float32, torch.float32)
    finally:
        if limit is not None:
            limit.__exit__()
    grads = (N * H + C * H) * 4
    return {"chunk_rows": chunk, "seconds": seconds,
            "extra_peak": None if peak is None else max(0, peak - grads - N * H * 4)}


def _child(function, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    code = (f"import json, sys; from softmax_ce.bench.token_cases import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time(steps, rounds):
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for name, step in steps.items():  # interleaved
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def run(token_shapes=((4096, 1024, 32000), (8192, 256, 32000)), ignored_shape=(8192, 128, 32000),
        cap_shape=(131072, 32, 32000), rounds=3) -> dict:
    import torch

    import softmax_ce

    result = {"tokens": [], "ignored": None, "cap": None}
    for shape in token_shapes:
        x, W, t = _problem(*shape)
        steps = {impl: _token_step(impl, x, W, t) for impl in ("softmax_ce", "torch")}
        got, want = steps["softmax_ce"](), steps["torch"]()
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        times = _time(steps, rounds)
        result["tokens"].append({
            "shape": list(shape), "max_err": err, "agrees": err < 1e-4,
            "seconds": times, "logits_bytes": shape[0] * shape[2] * 4,
            "extra_peak": {impl: _child("_token_memory", [impl, *shape]) for impl in steps}})
    N, H, C = ignored_shape
    x, W, t = _problem(N, H, C)
    half = t.clone()
    half[: N // 2] = -100

    def loss_step(target):
        def step():
            xo, Wo = x.detach().requires_grad_(), W.detach().requires_grad_()
            softmax_ce.linear_cross_entropy(xo, Wo, target).backward()
        return step

    times = _time({"none ignored": loss_step(t), "half ignored": loss_step(half)}, rounds)
    result["ignored"] = {"shape": list(ignored_shape), "seconds": times,
                         "ratio": times["half ignored"] / times["none ignored"]}
    if cap_shape:
        result["cap"] = {"shape": list(cap_shape),
                         "logits_bytes": cap_shape[0] * cap_shape[2] * 4,
                         "capped": _child("_cap_memory", [*cap_shape, True]),
                         "uncapped": _child("_cap_memory", [*cap_shape, False]),
                         "limit": softmax_ce.switches.chunk_memory_limit()}
    del torch
    return result


def report(result) -> str:
    mib = 1 << 20
    lines = ["per-token outputs (log_prob, entropy, temperature 0.7), forward + backward of "
             "(log_prob + 0.01 entropy).sum(), float32:"]
    for r in result["tokens"]:
        N, H, C = r["shape"]
        s, p = r["seconds"], r["extra_peak"]
        lines.append(f"  (N, H, C) = ({N}, {H}, {C}), whole logits "
                     f"{r['logits_bytes'] / mib:.0f} MiB, agrees with torch: "
                     f"{'yes' if r['agrees'] else 'NO'} (max err {r['max_err']:.1e})")
        for impl in ("softmax_ce", "torch"):
            peak = p[impl]
            lines.append(f"    {impl + ':':12s}{s[impl] * 1e3:9.1f} ms, extra peak "
                         f"{(peak or 0) / mib:8.1f} MiB")
    g = result["ignored"]
    N, H, C = g["shape"]
    lines.append(f"linear_cross_entropy ({N}, {H}, {C}) float32, forward + backward: none ignored "
                 f"{g['seconds']['none ignored'] * 1e3:.1f} ms, half ignored "
                 f"{g['seconds']['half ignored'] * 1e3:.1f} ms: ratio {g['ratio']:.2f}")
    c = result["cap"]
    if c:
        N, H, C = c["shape"]
        lines.append(f"linear_cross_entropy ({N}, {H}, {C}) float32 (whole logits "
                     f"{c['logits_bytes'] / mib:.0f} MiB), one forward + backward:")
        for name, label in (("capped", f"chunk capped at {c['limit'] / mib:.0f} MiB"),
                            ("uncapped", "1/11 of the logits alone")):
            v = c[name]
            lines.append(f"    {label + ':':32s}{v['chunk_rows']:7d} rows per chunk, extra peak "
                         f"{(v['extra_peak'] or 0) / mib:8.1f} MiB, {v['seconds']:.1f} s")
    return "\n".join(lines)
