"""``python -m softmax_ce bench --distributed``: the vocab-parallel loss on this machine's CPUs,
world size 2 over gloo (two processes, one thread each), against one process (one thread)
holding the whole logits; and the bytes each scheme communicates per step.

Per rank: the time of a forward+backward of a ``mean`` loss (median of the rounds) on its
``(N, C / world)`` slice, and the extra peak memory of that step (resident set, the allocator
returning freed blocks, as the main benchmark measures). Communication per step, as payload
sizes: ours, one all-gather of a header (18 float64) and 4 N float64 per rank in a steady state;
Megatron's scheme, three all-reduces of N float32 (max, sum of exponentials, target logit).

The fused linear head ``(N, H, C)`` the same way: one process holding the whole head against
two ranks holding half the vocabulary each as a DTensor weight, the input replicated or sharded
on positions (sequence parallel).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

from .harness import extra_peak_bytes


def _step_stats(fn, rounds):
    """(median seconds, extra peak bytes) of fn() after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), extra_peak_bytes(fn, "cpu")


def _case(N, C, dtype_name, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(N, C, generator=g).to(dtype)
    t = torch.randint(0, C, (N,), generator=g)
    return x, t


def _worker(rank, world, folder, N, C, dtype_name, rounds):
    import torch
    import torch.distributed as dist

    import softmax_ce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    x, t = _case(N, C, dtype_name)
    c_local = C // world
    local = x[:, rank * c_local:(rank + 1) * c_local].contiguous()
    group = dist.group.WORLD

    def step():
        xl = local.clone().requires_grad_()
        softmax_ce.cross_entropy(xl, t, process_group=group).backward()

    seconds, peak = _step_stats(step, rounds)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "peak": peak}, f)
    dist.barrier()
    os._exit(0)  # gloo's teardown in torch aborts now and then (docs/distributed.md)


def _head_case(N, H, C, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(C, H, generator=g) / H ** 0.5,
            torch.randint(0, C, (N,), generator=g))


def _head_worker(rank, world, folder, N, H, C, rounds):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import softmax_ce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    x, W, t = _head_case(N, H, C)
    out = {}
    for mode in ("replicated", "sequence"):
        Wd = distribute_tensor(W, mesh, [Shard(0)])
        xd = distribute_tensor(x, mesh, [Shard(0)]) if mode == "sequence" else x

        def step():
            w = Wd.detach().requires_grad_()
            h = xd.detach().requires_grad_()
            softmax_ce.linear_cross_entropy(h, w, t).backward()

        out[mode] = _step_stats(step, rounds)
    with open(os.path.join(folder, f"head{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    os._exit(0)  # gloo's teardown in torch aborts now and then (docs/distributed.md)


def _head_single(N, H, C, rounds):
    """One process, one thread, the whole head."""
    import torch

    import softmax_ce

    torch.set_num_threads(1)
    x, W, t = _head_case(N, H, C)

    def step():
        softmax_ce.linear_cross_entropy(x.clone().requires_grad_(), W.clone().requires_grad_(),
                                        t).backward()

    return _step_stats(step, rounds)


def _single(N, C, dtype_name, rounds):
    """One process, one thread, the whole logits (run in a child, like the ranks)."""
    import torch

    import softmax_ce

    torch.set_num_threads(1)
    x, t = _case(N, C, dtype_name)

    def step():
        xl = x.clone().requires_grad_()
        softmax_ce.cross_entropy(xl, t).backward()

    return _step_stats(step, rounds)


def _child(function, args, env):
    """``function(*args)`` of this module in a child process (the allocator set as for the
    ranks); its JSON result."""
    import subprocess

    code = (f"import json, sys; from softmax_ce.bench.distributed import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawned(worker, args, world, prefix):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(world, folder, *args), nprocs=world, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(folder, f"{prefix}{r}.json"))) for r in range(world)]


def run(N=4096, C=32000, dtype_name="float32", world=2, rounds=5,
        head=(1024, 256, 32000)) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    single_s, single_peak = _child("_single", [N, C, dtype_name, rounds], env)
    head_single = _child("_head_single", [*head, rounds], env)
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_MMAP_THRESHOLD_"]  # the spawned ranks
    try:
        ranks = _spawned(_worker, (N, C, dtype_name, rounds), world, "rank")
        head_ranks = _spawned(_head_worker, (*head, rounds), world, "head")
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    element = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype_name]
    from softmax_ce.distributed.protocol import HEADER_SIZE as header  # float64 fields
    return {
        "shape": [N, C], "dtype": dtype_name, "world": world,
        "logits_bytes": N * C * element,
        "single_seconds": single_s, "single_extra_peak": single_peak,
        "rank_seconds": [r["seconds"] for r in ranks],
        "rank_extra_peak": [r["peak"] for r in ranks],
        "ours_bytes_sent_per_rank": (header + 4 * N) * 8,
        "ours_bytes_received_per_rank": world * (header + 4 * N) * 8,
        "megatron_allreduce_payload_bytes": 3 * N * 4,
        "head_shape": list(head),
        "head_logits_bytes": head[0] * head[2] * 4,
        "head_single": head_single,
        "head_ranks": head_ranks,
    }


def report(result) -> str:
    mib = 1 << 20
    ranks = result["rank_seconds"]
    peaks = result["rank_extra_peak"]
    lines = [
        f"vocab-parallel cross-entropy, world size {result['world']} (gloo, one thread per rank) "
        f"vs one process (one thread), {tuple(result['shape'])} {result['dtype']}, "
        "fwd+bwd of a mean loss:",
        f"  one process, whole logits:  {result['single_seconds'] * 1e3:8.1f} ms, extra peak "
        f"{result['single_extra_peak'] / mib:7.1f} MiB (logits {result['logits_bytes'] / mib:.1f}"
        " MiB)",
    ]
    for r, (s, p) in enumerate(zip(ranks, peaks)):
        lines.append(f"  rank {r}, its slice:          {s * 1e3:8.1f} ms, extra peak "
                     f"{(p or 0) / mib:7.1f} MiB")
    lines.append(
        f"  communicated per step: ours one all-gather, {result['ours_bytes_sent_per_rank']:,} "
        f"bytes sent and {result['ours_bytes_received_per_rank']:,} received per rank; "
        f"Megatron's three all-reduces of N float32: {result['megatron_allreduce_payload_bytes']:,}"
        " bytes of payload (a ring all-reduce sends and receives ~2x its payload per rank)")
    if "head_single" in result:
        N, H, C = result["head_shape"]
        s, p = result["head_single"]
        lines.append(
            f"fused linear cross-entropy (N, H, C) = ({N}, {H}, {C}) float32, world size "
            f"{result['world']}, a DTensor weight sharded on the vocabulary (whole logits "
            f"{result['head_logits_bytes'] / mib:.1f} MiB):")
        lines.append(f"  one process, whole head:    {s * 1e3:8.1f} ms, extra peak "
                     f"{(p or 0) / mib:7.1f} MiB")
        for r, per_rank in enumerate(result["head_ranks"]):
            for mode, (s, p) in per_rank.items():
                lines.append(f"  rank {r}, input {mode + ':':12s}{s * 1e3:8.1f} ms, extra peak "
                             f"{(p or 0) / mib:7.1f} MiB")
    return "\n".join(lines)
