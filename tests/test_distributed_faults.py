"""Bad input on one rank of a vocab-parallel call: every rank raises (naming the rank and the
argument), never an abort, a hang or a number; for cross_entropy over a group, DTensor logits and
the fused linear head, on a first call and after a steady state. The harness's time limit turns
a hang into a failure. Also: the steady-state path that reads no header on the host (what CUDA
runs), simulated on the CPU: a peer that changed alone gives NaN, never a number."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import softmax_ce
from softmax_ce.distributed import protocol
from dist_harness import expect_error, run_cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _ce(group, rank, world, *, N=6, C_local=4, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, C_local * world, generator=g, dtype=torch.float64)
    t = torch.randint(0, C_local * world, (N,), generator=g)
    xl = x[:, rank * C_local:(rank + 1) * C_local].to(dtype).requires_grad_()
    return lambda **over: softmax_ce.cross_entropy(
        over.pop("x", xl), over.pop("t", t), process_group=group, **{**kw, **over})


def _linear(group, rank, world, *, N=6, H=5, C_local=4, **kw):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C_local, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C_local * world, (N,), generator=g)
    return lambda **over: softmax_ce.linear_cross_entropy(
        over.pop("x", x), over.pop("w", w), over.pop("t", t), process_group=group,
        **{**kw, **over})


def _only(rank, world, value, other):
    """``value`` on the last rank, ``other`` on the others."""
    return value if rank == world - 1 else other


def _bad_inputs(rank, world, group, make, words):
    """One bad input after another, on the last rank only; ``words`` maps each kind to the text
    the error must hold on that rank and on the others."""
    out = []
    for kind, (over, mine, others) in words.items():
        call = make(group, rank, world)
        call()  # a steady state first: the cached agreement must not hide the change
        call()
        error_type = mine[0] if rank == world - 1 else others[0]
        text = mine[1] if rank == world - 1 else others[1]
        out.append(expect_error(error_type, text, lambda: call(**over(rank, world))))
        loss = call()  # and the group still works afterwards
        out.append(f"{kind}: {float(loss):.6f}")
    return out


def case_cross_entropy_bad_inputs(rank, world, group):
    last = world - 1
    disagree = (RuntimeError, "disagree")
    kinds = {
        "batch size": (lambda r, w: {"x": torch.randn(_only(r, w, 7, 6), 4),
                                     "t": torch.zeros(_only(r, w, 7, 6), dtype=torch.long)},
                       (RuntimeError, "the number of positions"),
                       (RuntimeError, "the number of positions")),
        "reduction": (lambda r, w: {"reduction": _only(r, w, "sum", "mean")},
                      (RuntimeError, "disagree on reduction"), disagree),
        "label_smoothing": (lambda r, w: {"label_smoothing": _only(r, w, 0.2, 0.0)},
                            (RuntimeError, "label_smoothing"), disagree),
        "dtype": (lambda r, w: {"x": torch.randn(6, 4, dtype=_only(r, w, torch.float32,
                                                                    torch.float64))},
                  (RuntimeError, "dtype"), disagree),
        "slice size": (lambda r, w: {"x": torch.randn(6, _only(r, w, 5, 4),
                                                      dtype=torch.float64)},
                       (RuntimeError, "of the same size"), (RuntimeError, "of the same size")),
        "target shape": (lambda r, w: {"t": torch.zeros(_only(r, w, 5, 6), dtype=torch.long)},
                         (ValueError, "batch_size"), (RuntimeError, f"rank(s) [{last}]")),
        "weight": (lambda r, w: {"weight": torch.ones(_only(r, w, 3, 4 * w),
                                                      dtype=torch.float64)},
                   (RuntimeError, "weight tensor should be defined"),
                   (RuntimeError, f"rank(s) [{last}]")),
        "out of range": (lambda r, w: {"t": torch.tensor([0, 1, _only(r, w, 99, 2), 3, 0, 1])},
                         (IndexError, f"found on rank {last}"),
                         (IndexError, f"found on rank {last}")),
        "bad option": (lambda r, w: {"z_loss": _only(r, w, -1.0, 0.0)},
                       (ValueError, "z_loss"), (RuntimeError, f"rank(s) [{last}]")),
    }
    return _bad_inputs(rank, world, group, _ce, kinds)


def case_linear_bad_inputs(rank, world, group):
    last = world - 1
    disagree = (RuntimeError, "disagree")
    kinds = {
        "batch size": (lambda r, w: {"x": torch.randn(_only(r, w, 7, 6), 5, dtype=torch.float64),
                                     "t": torch.zeros(_only(r, w, 7, 6), dtype=torch.long)},
                       (RuntimeError, "the number of positions"),
                       (RuntimeError, "the number of positions")),
        "in_features": (lambda r, w: {"x": torch.randn(6, _only(r, w, 3, 5),
                                                       dtype=torch.float64),
                                      "w": torch.randn(4, _only(r, w, 3, 5),
                                                       dtype=torch.float64)},
                        (RuntimeError, "in_features"), disagree),
        "input requires grad": (lambda r, w: {"x": torch.randn(6, 5, dtype=torch.float64)
                                              .requires_grad_(r != w - 1)},
                                (RuntimeError, "requires grad"), disagree),
        "reduction": (lambda r, w: {"reduction": _only(r, w, "none", "mean")},
                      (RuntimeError, "disagree on reduction"), disagree),
        "shapes": (lambda r, w: {"w": torch.randn(4, _only(r, w, 3, 5), dtype=torch.float64)},
                   (RuntimeError, "in_features"), (RuntimeError, f"rank(s) [{last}]")),
        "out of range": (lambda r, w: {"t": torch.tensor([0, 1, _only(r, w, -5, 2), 3, 0, 1])},
                         (IndexError, f"found on rank {last}"),
                         (IndexError, f"found on rank {last}")),
        "options": (lambda r, w: {"options": _only(r, w, object(), None)},
                    (NotImplementedError, "options"), (RuntimeError, f"rank(s) [{last}]")),
    }
    return _bad_inputs(rank, world, group, _linear, kinds)


def case_dtensor_bad_inputs(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    last = world - 1
    out = []
    x = distribute_tensor(torch.randn(6, 4 * world, dtype=torch.float64), mesh, [Shard(1)])
    t = torch.randint(0, 4 * world, (6,))
    softmax_ce.cross_entropy(x, t)
    softmax_ce.cross_entropy(x, t)  # steady
    bad = t.clone()
    if rank == last:
        bad[2] = 4 * world
    out.append(expect_error(IndexError, f"found on rank {last}",
                            lambda: softmax_ce.cross_entropy(x, bad)))
    eps = 0.3 if rank == last else 0.0
    out.append(expect_error(RuntimeError, "label_smoothing",
                            lambda: softmax_ce.cross_entropy(x, t, label_smoothing=eps)))
    w = torch.ones(3 if rank == last else 4 * world, dtype=torch.float64)
    text = "weight tensor should be defined" if rank == last else f"rank(s) [{last}]"
    out.append(expect_error(RuntimeError, text, lambda: softmax_ce.cross_entropy(x, t, w)))
    out.append(float(softmax_ce.cross_entropy(x, t).to_local()))
    return out


def case_steady_state_without_host_reads(rank, world, group):
    """What a steady step on CUDA does (no header read on the host), on CPU tensors: a peer that
    changed alone raises, this rank's loss is NaN; an out-of-range class gives that position NaN.
    Then the host reads again and the group works."""
    saved = set(protocol.HOST_CHECK_DEVICES)
    protocol.HOST_CHECK_DEVICES.clear()
    out = []
    try:
        call = _ce(group, rank, world)
        first = call()
        steady = call()
        torch.testing.assert_close(first, steady)
        if rank == world - 1:  # changes alone: it knows, reads the headers, raises
            out.append(expect_error(RuntimeError, "the number of positions",
                                    lambda: call(x=torch.randn(7, 4, dtype=torch.float64),
                                                 t=torch.zeros(7, dtype=torch.long))))
        else:  # steady here: no host read, the mismatch makes the loss NaN
            loss = call()
            assert torch.isnan(loss), loss
            out.append("nan")
        call()  # the changed rank's call agreed anew; this one settles too
        bad = torch.tensor([0, 1, 4 * world + 3, 2, 0, 1])
        rows = call(t=bad, reduction="none")
        rows = call(t=bad, reduction="none")  # steady
        assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all(), rows
        out.append("out-of-range position NaN")
    finally:
        protocol.HOST_CHECK_DEVICES.update(saved)
    out.append(expect_error(IndexError, "out of bounds", lambda: call(t=bad, reduction="none")))
    g = torch.Generator().manual_seed(13)  # the same data on every rank
    x = torch.randn(6, 4 * world, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4 * world, (6,), generator=g)
    loss = softmax_ce.cross_entropy(x[:, rank * 4:(rank + 1) * 4], t, process_group=group)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    return out


CASES = [case_cross_entropy_bad_inputs, case_linear_bad_inputs, case_dtensor_bad_inputs,
         case_steady_state_without_host_reads]


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_on_one_rank_raises_on_every_rank(world, tmp_path):
    results = run_cases(world, tmp_path, CASES)
    assert set(results[0]) == {c.__name__ for c in CASES}
