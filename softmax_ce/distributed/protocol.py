"""The vocab-parallel protocol: where each rank's slice sits (``Plan``), what it tells the others
(``Header``), the one collective (``exchange``), the checks every rank runs on every rank's header
(so all raise the same error together), and the guard for a rank whose own arguments fail
(``fail_together``: it still takes part in the collective, then every rank raises).

Every rank issues the same collective in the same order whatever its data. Each rank's message is
its header followed by its payload (``slices.Column``: a few float64 per position), gathered with
one ``all_gather_into_tensor``.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _args as A
from .. import _core, ops

__all__ = ["Plan", "equal_plan", "TargetKind", "Header", "make_header", "exchange",
           "fail_together", "check_global_args", "unsupported_transforms"]


class Plan(NamedTuple):
    """Where this rank's slice of the class dimension sits."""

    group: Optional[object]  # the process group (a mesh dimension's group for DTensor)
    rank: int  # this rank's index in the group
    world: int  # the group's size
    bounds: Tuple[Tuple[int, int], ...]  # each rank's (offset, size) along the class dimension
    classes: int  # the global class count C
    equal_slices: bool  # slices of one size (the process_group API): checked across ranks

    @property
    def offset(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def size(self) -> int:
        return self.bounds[self.rank][1]


def equal_plan(group, local_classes: int) -> Plan:
    """The process_group API's plan: rank r holds classes [r * C_local, (r + 1) * C_local)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    bounds = tuple((r * local_classes, local_classes) for r in range(world))
    return Plan(group, rank, world, bounds, world * local_classes, True)


class TargetKind:
    """The header's code for the kind of target."""

    INDEX = 1.0  # class indices
    PROB = 2.0  # class probabilities


class Header(NamedTuple):
    """What each rank tells the others before they use its payload (float64 on the wire)."""

    slice_size: float  # this rank's number of classes
    classes: float  # the global class count it assumes
    positions: float  # rows of its payload
    kind: float  # TargetKind
    ignore_index: float
    label_smoothing: float
    z_loss: float
    softcap: float
    failed: float  # 1: this rank's own argument checks failed (its error says why)
    bad_targets: float  # class indices outside [0, C) that are not ignore_index
    first_bad_target: float  # the first of them (0 when none)


HEADER_SIZE = len(Header._fields)

# the fields every rank must agree on, with the words an error uses for each
_AGREED = (("classes", "the global number of classes"), ("positions", "the number of positions"),
           ("kind", "the target kind"), ("ignore_index", "ignore_index"),
           ("label_smoothing", "label_smoothing"), ("z_loss", "z_loss"), ("softcap", "softcap"))


def make_header(plan: Plan, positions: int, kind: float, opts: A.CeOptions,
                bad: Optional[Tensor], target: Optional[Tensor], device,
                failed: bool = False) -> Tensor:
    """This rank's header as a float64 tensor on ``device``; ``bad``: the mask of out-of-range
    class indices (counted and the first reported, on the device)."""
    known = [float(plan.size), float(plan.classes), float(positions), kind,
             float(opts.ignore_index), opts.label_smoothing, opts.z_loss, opts.softcap,
             float(failed)]
    head = torch.tensor(known, dtype=torch.float64).to(device)
    if bad is not None and bad.numel() > 0:
        flat = bad.reshape(-1)
        first = target.reshape(-1)[torch.argmax(flat.to(torch.uint8))]  # the first True
        tail = torch.stack([flat.sum().double(), first.double()])
    else:
        tail = torch.zeros(2, dtype=torch.float64, device=device)
    return torch.cat([head, tail])


def exchange(payload: Tensor, header: Tensor, plan: Plan, fn: str,
             error: Optional[BaseException] = None) -> Tensor:
    """The one collective: every rank's header and payload ``[positions, k]``; checks the
    headers (every rank sees the same and raises the same error; ``error``: this rank's own
    failed argument check, raised here after the others have heard of it). Returns the payloads
    ``[world, positions, k]``."""
    rows, k = payload.shape
    mine = torch.cat([header, payload.reshape(-1)])
    out = torch.empty(plan.world * mine.numel(), dtype=torch.float64, device=payload.device)
    _all_gather(out, mine, plan.group)
    out = out.view(plan.world, -1)
    heads = [Header(*h) for h in out[:, :HEADER_SIZE].cpu().tolist()]  # a few floats per rank
    _check_headers(heads, plan, fn, error)
    return out[:, HEADER_SIZE:].reshape(plan.world, rows, k)


def _all_gather(out: Tensor, mine: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _check_headers(heads: List[Header], plan: Plan, fn: str,
                   error: Optional[BaseException]) -> None:
    sizes = [h.slice_size for h in heads]
    if plan.equal_slices and len(set(sizes)) > 1:
        raise RuntimeError(
            f"{fn}: every rank of the process group must hold a slice of the class dimension "
            f"of the same size; got sizes {[int(s) for s in sizes]} (rank order)")
    if error is not None:
        raise error
    failed = [r for r, h in enumerate(heads) if h.failed > 0]
    if failed:
        raise RuntimeError(f"{fn}: the argument checks failed on rank(s) {failed} of the process "
                           "group (their error says why)")
    for field, words in _AGREED:
        values = [getattr(h, field) for h in heads]
        if not all(_same(v, values[0]) for v in values):
            raise RuntimeError(f"{fn}: the ranks disagree on {words}: {values} (rank order); "
                               "target, weight and options must be the same on every rank")
    for r, h in enumerate(heads):
        if h.bad_targets > 0:
            raise IndexError(
                f"Target {int(h.first_bad_target)} is out of bounds: argument 'target' must hold "
                f"class indices in [0, {plan.classes}) (the global class count of the process "
                f"group) or ignore_index ({int(h.ignore_index)}); found on rank {r}")


def fail_together(device, plan: Plan, fn: str, error: BaseException, positions: int,
                  columns: int):
    """This rank's arguments are wrong: it still sends a header (flagged) and a payload of the
    size the others expect, then every rank raises (this one its own error)."""
    payload = torch.zeros((positions, columns), dtype=torch.float64, device=device)
    opts = A.CeOptions(-100, 0.0, 0.0, 0.0)
    header = make_header(plan, positions, 0.0, opts, None, None, device, failed=True)
    exchange(payload, header, plan, fn, error)
    raise error  # not reached: exchange raises


def check_global_args(meta: Tensor, local_shape, target, weight, reduction, ignore_index,
                      label_smoothing, z_loss, softcap, fn) -> None:
    """cross_entropy's checks and errors on the global logits ``meta`` (a meta tensor); a
    probability target (sliced like the local logits, ``local_shape``) is checked at the global
    shape."""
    if tuple(target.shape) == tuple(local_shape) and target.is_floating_point():
        t = torch.empty(meta.shape, dtype=target.dtype, device="meta")
    else:
        t = target.detach().to("meta")
    w = weight.detach().to("meta") if weight is not None else None
    _core.cross_entropy(meta, t, w, reduction, ignore_index, label_smoothing, z_loss, softcap,
                        False, fn)


def unsupported_transforms(fn: str) -> None:
    """torch.func transforms, forward-mode AD and torch.compile would need rules for the
    collective that this path does not have: a clear error, never a number."""
    if ops.functorch_active():
        raise NotImplementedError(f"{fn}: torch.func transforms (grad, vmap, jacrev, ...) are not "
                                  "supported with a process group or DTensor logits")
    if torch.autograd.forward_ad._current_level >= 0:
        raise NotImplementedError(f"{fn}: forward-mode AD is not supported with a process group "
                                  "or DTensor logits")
    if torch.compiler.is_compiling():
        raise NotImplementedError(f"{fn}: torch.compile is not supported with a process group "
                                  "or DTensor logits (call it outside the compiled region)")
