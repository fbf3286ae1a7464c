"""Running test cases on several gloo ranks (CPU): one spawn per world size runs a list of case
functions on every rank, each case's result or traceback written to a file per rank. A file
rendezvous in the test's tmp_path, a process-group timeout, and a hard time limit on the whole
spawn: a hang fails the test instead of stalling the suite.

A case is a module-level function ``case(rank, world, group)`` returning something JSON can
hold; the test compares the ranks' results."""

import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, folder, cases):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    try:
        for case in cases:
            try:
                results[case.__name__] = {"ok": True, "value": case(rank, world,
                                                                   dist.group.WORLD)}
            except Exception:  # noqa: BLE001 (reported to the test)
                results[case.__name__] = {"ok": False, "error": traceback.format_exc()}
    finally:
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        # every rank done, then out without tearing gloo down (docs/distributed.md: gloo's
        # teardown in torch aborts a process now and then after the results are written)
        dist.barrier()
        os._exit(0)


def run_cases(world, folder, cases, timeout=240.0):
    """Runs ``cases`` on ``world`` gloo ranks; returns each rank's ``{name: value}`` after
    failing the test with every rank's traceback if any case raised."""
    context = mp.start_processes(_worker, args=(world, str(folder), list(cases)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"the ranks did not finish within {timeout:.0f} s (a hang)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    results = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(world)]
    failures = [f"rank {r}, {name}:\n{res['error']}" for r, per_rank in enumerate(results)
                for name, res in per_rank.items() if not res["ok"]]
    assert not failures, "\n".join(failures)
    return [{name: res["value"] for name, res in per_rank.items()} for per_rank in results]


def assert_same_on_every_rank(results, except_for=()):
    """Each case returned the same value on every rank (a loss: the same bits)."""
    for name in results[0]:
        if name in except_for:
            continue
        for r in range(1, len(results)):
            assert results[r][name] == results[0][name], (name, r)


def expect_error(kind, match, f):
    """``f()`` must raise ``kind`` with ``match`` in its message; returns a short record."""
    try:
        f()
    except kind as error:
        assert match in str(error), str(error)
        return f"{kind.__name__}: {match}"
    raise AssertionError(f"no {kind.__name__} raised (expected {match!r})")


def count_collectives():
    """A context manager counting the torch.distributed collectives called inside it: yields
    the list of their names, in order."""
    import contextlib

    names = ["all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
             "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
             "scatter", "reduce", "barrier"]

    @contextlib.contextmanager
    def counting():
        calls = []
        originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

        def wrap(name, f):
            def wrapper(*args, **kwargs):
                calls.append(name)
                return f(*args, **kwargs)
            return wrapper

        for n, f in originals.items():
            setattr(dist, n, wrap(n, f))
        try:
            yield calls
        finally:
            for n, f in originals.items():
                setattr(dist, n, f)

    return counting()


GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def torch_leaf_grad_placements(mesh, shape, placements):
    """The placements torch itself gives the gradient of a DTensor leaf of this layout that comes
    back through ``to_local(grad_placements=...)``: the leaf's own on torch 2.13, Replicate for
    an uneven shard on torch 2.8 (its gradient accumulation). The oracle for a test that checks
    the placements of softmax_ce's DTensor gradients on the torch that runs it."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    leaf = distribute_tensor(torch.zeros(shape, dtype=torch.float64), mesh,
                             list(placements)).requires_grad_()
    local = leaf.to_local(grad_placements=leaf.placements)
    total = DTensor.from_local(local.sum().reshape(()), mesh, [Replicate()] * mesh.ndim,
                               run_check=False)
    total.backward()
    return tuple(leaf.grad.placements)

