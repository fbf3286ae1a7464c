"""The vocab-parallel protocol: where each rank's slice sits (``Plan``), what every rank tells the
others (``Header``), and the exchange that carries it (``Exchange``), so that every rank issues the
same collectives with the same sizes and raises the same error together.

Each call's first collective carries every rank's header in front of its data (the payload of
per-position statistics, or the sequence-parallel input). Its size comes only from what the ranks
last agreed on for this group and entry point (an ``Agreement``), never from this rank's own
arguments, so a rank whose batch size changed alone still matches its peers' collective:

* steady state (this rank's header is the one last agreed): one collective, the header in front
  of the real data;
* this rank's header changed (new shapes or options, or its own argument checks failed, or the
  first call): it sends its header with a dummy body of the agreed size (nothing the first
  time). Every rank that reads the headers finds out: if all ranks changed the same way, the new
  header is agreed and the data exchanged again; otherwise every rank raises, naming the ranks
  and the argument.

Where the headers are read: on the host for CPU tensors (free), and for any tensor when this rank's
header changed. A steady step on CUDA reads nothing on the host: the gathered headers are compared
with the agreed ones on the device, and a mismatch (a peer that changed alone, and raised) makes
every position NaN; an out-of-range class index makes its position NaN (as the single-device CUDA
kernels do); on the CPU both raise.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _args as A
from .. import _core, ops

__all__ = ["Plan", "equal_plan", "chunk_plan", "TargetKind", "Header", "make_header", "Exchange",
           "body_bytes", "all_gather", "check_global_args", "unsupported_transforms",
           "HOST_CHECK_DEVICES"]

# Device types whose gathered headers are read on the host at every call (a read costs nothing
# there). Others are read only when this rank's header changed (tests add "cpu"'s absence to
# exercise the steady-state device check).
HOST_CHECK_DEVICES = {"cpu"}


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


def chunk_plan(group, rank: int, world: int, classes: int) -> Plan:
    """DTensor's split of ``classes`` over ``world`` ranks (torch.chunk sizes: the trailing
    shards may be short or empty)."""
    step = -(-classes // world)
    bounds = tuple((min(r * step, classes), max(0, min(step, classes - r * step)))
                   for r in range(world))
    return Plan(group, rank, world, bounds, classes, False)


class TargetKind:
    """The header's code for the kind of target."""

    INDEX = 1.0  # class indices
    PROB = 2.0  # class probabilities
    TOKENS = 3.0  # class indices, per-token outputs (log_probs)


REDUCTION_CODES = {"none": 0.0, "mean": 1.0, "sum": 2.0}
DTYPE_CODES = {torch.float64: 1.0, torch.float32: 2.0, torch.bfloat16: 3.0, torch.float16: 4.0}
FLAG_INPUT_GRAD = 1  # the input's gradient is formed (the fused head's reduction of it)
FLAG_SEQUENCE_PARALLEL = 2  # the input is sharded on positions


class Header(NamedTuple):
    """What each rank tells the others (float64 on the wire). The fields up to ``flags`` are the
    call's constants (what is agreed); the last three are this call's."""

    slice_size: float  # this rank's number of classes
    classes: float  # the global class count it assumes
    positions: float  # positions of the whole batch (rows of the payload)
    kind: float  # TargetKind
    reduction: float  # REDUCTION_CODES
    dtype: float  # DTYPE_CODES of the input
    ignore_index: float
    label_smoothing: float
    z_loss: float
    softcap: float
    temperature: float  # per-token outputs' temperature (1 for the loss)
    top_k: float  # per-token outputs' k (0 for the loss)
    in_features: float  # the fused head's H (0 for logits)
    local_rows: float  # the fused head's rows of input on this rank (sequence parallel)
    flags: float  # FLAG_* bits
    failed: float  # 1: this rank's own argument checks failed (its error says why)
    bad_targets: float  # class indices outside [0, C) that are not ignore_index
    first_bad_target: float  # the first of them (0 when none)


HEADER_SIZE = len(Header._fields)
CONSTANT_SIZE = Header._fields.index("failed")  # the agreed part

# fields every rank must hold alike, and the words an error uses for them
_ALIKE = (("classes", "the global number of classes"), ("positions", "the number of positions"),
          ("kind", "the target kind (class indices or probabilities)"),
          ("reduction", "reduction"), ("dtype", "the input's dtype"),
          ("ignore_index", "ignore_index"), ("label_smoothing", "label_smoothing"),
          ("z_loss", "z_loss"), ("softcap", "softcap"), ("temperature", "temperature"),
          ("top_k", "top_k"), ("in_features", "in_features"),
          ("local_rows", "the number of rows of input on each rank"),
          ("flags", "whether the input requires grad or is sequence-parallel"))
_NAMES = {v: k for k, v in REDUCTION_CODES.items()}
_NAMES.update({v: str(k).replace("torch.", "") for k, v in DTYPE_CODES.items()})


def make_header(plan: Plan, *, positions: int, kind: float, reduction: str, dtype: torch.dtype,
                opts: A.CeOptions, in_features: int = 0, local_rows: int = 0, flags: int = 0,
                temperature: float = 1.0, top_k: int = 0) -> Header:
    """This rank's header for a call (the per-call fields zero)."""
    return Header(float(plan.size), float(plan.classes), float(positions), kind,
                  REDUCTION_CODES[reduction], DTYPE_CODES.get(dtype, 0.0),
                  float(opts.ignore_index), opts.label_smoothing, opts.z_loss, opts.softcap,
                  float(temperature), float(top_k), float(in_features), float(local_rows),
                  float(flags), 0.0, 0.0, 0.0)


class Agreement(NamedTuple):
    """What the ranks last agreed on for one group and entry point."""

    group: object  # kept so that the id used as key cannot be reused by another group
    mine: Tuple[float, ...]  # this rank's constant header fields
    body_bytes: int  # this rank's body in the first collective
    everyone: Tuple[Tuple[float, ...], ...]  # every rank's constant fields, rank order
    on_device: Dict[torch.device, Tuple[Tensor, Tensor]]  # (mine, everyone) cached per device


_AGREED: Dict[Tuple[int, str], Agreement] = {}
_HEADER_BYTES = HEADER_SIZE * 8


def _as_bytes(t: Tensor) -> Tensor:
    """A contiguous float tensor's bytes, padded to a multiple of 8 (so that every rank's part
    of the gathered buffer starts 8-byte aligned)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 8
    return torch.cat([raw, raw.new_zeros(pad)]) if pad else raw


def body_bytes(numel: int, element_size: int) -> int:
    """The bytes a body of ``numel`` elements takes in the collective (padded as ``_as_bytes``
    pads): what ``Exchange.settle`` must be told, since a rank that changed sends a dummy body of
    the agreed size."""
    n = numel * element_size
    return n + (-n) % 8


class Exchange:
    """One call's first collective on ``plan``'s group for the entry point ``fn``: ``settle``
    (agree on this call's header, if it is not the agreed one), then ``gather`` (every rank's
    header and body in one collective)."""

    def __init__(self, plan: Plan, fn: str, device: torch.device):
        self.plan, self.fn, self.device = plan, fn, torch.device(device)
        self.key = (id(plan.group), fn)
        agreed = _AGREED.get(self.key)
        self.agreed = agreed if agreed is not None and agreed.group is plan.group else None

    def _host_reads(self) -> bool:
        return self.device.type in HOST_CHECK_DEVICES

    def fail(self, error: BaseException) -> None:
        """This rank's arguments are wrong: it still takes part in the collective its peers
        expect (a flagged header, a dummy body), then every rank raises (this one ``error``)."""
        if self.agreed is not None:
            header = Header(*self.agreed.mine, 1.0, 0.0, 0.0)
        else:
            header = Header(float(self.plan.size), *([0.0] * (CONSTANT_SIZE - 1)), 1.0, 0.0, 0.0)
        self._agree(header, 0, error)
        raise error  # not reached: _agree raises

    def settle(self, header: Header, nbytes: int) -> None:
        """Before any collective whose size depends on the call: unless this rank's header and
        body size are the agreed ones, exchange headers (with a dummy body of the agreed size)
        until every rank agrees, or raise on every rank. ``nbytes``: this rank's body
        (``body_bytes``)."""
        mine = tuple(header[:CONSTANT_SIZE])
        if self.agreed is not None and self.agreed.mine == mine \
                and self.agreed.body_bytes == nbytes:
            return
        self._agree(header, nbytes, None)

    def _agree(self, header: Header, nbytes: int, error: Optional[BaseException]) -> None:
        size = self.agreed.body_bytes if self.agreed is not None else 0
        # plain tensors even inside a torch.func transform (whose refusal still exchanges a
        # header): torch 2.8 wraps the gathered bytes, which then have no storage to read
        with torch._C._DisableFuncTorch():
            dummy = torch.zeros(size, dtype=torch.uint8, device=self.device)
            head = _as_bytes(torch.tensor(list(header), dtype=torch.float64).to(self.device))
            out = self._all_gather(torch.cat([head, dummy]))
            heads = self._read_headers(out)
        check_headers(heads, self.plan, self.fn, error)
        everyone = tuple(tuple(h[:CONSTANT_SIZE]) for h in heads)
        _AGREED[self.key] = self.agreed = Agreement(
            self.plan.group, tuple(header[:CONSTANT_SIZE]), nbytes, everyone, {})

    @staticmethod
    def _read_headers(out: Tensor) -> List[Header]:
        rows = out[:, :_HEADER_BYTES].contiguous().view(torch.float64).cpu().tolist()
        return [Header(*row) for row in rows]

    def _all_gather(self, mine: Tensor) -> Tensor:
        out = torch.empty(self.plan.world * mine.numel(), dtype=mine.dtype, device=mine.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, mine, group=self.plan.group)
        return out.view(self.plan.world, -1)

    def _device_constants(self) -> Tuple[Tensor, Tensor]:
        cached = self.agreed.on_device.get(self.device)
        if cached is None:  # once per agreement and device (a host-to-device copy)
            cached = (torch.tensor(self.agreed.mine, dtype=torch.float64).to(self.device),
                      torch.tensor(self.agreed.everyone, dtype=torch.float64).to(self.device))
            self.agreed.on_device[self.device] = cached
        return cached

    def gather(self, body: Tensor, bad: Optional[Tensor] = None,
               target: Optional[Tensor] = None) -> Tensor:
        """The call's collective, after ``settle``: every rank's header and ``body`` (a float
        tensor of this rank's agreed size). Returns the bodies ``[world, *body.shape]`` in
        ``body``'s dtype. ``bad``: the mask of out-of-range class indices of ``target``
        (reported in the header: an IndexError on every rank where headers are read)."""
        mine, everyone = self._device_constants()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        if bad is not None and bad.numel() > 0:
            flat = bad.reshape(-1)
            first = target.reshape(-1)[torch.argmax(flat.to(torch.uint8))]  # the first True
            tail = torch.stack([zero, flat.sum().double(), first.double()])
        else:
            tail = torch.stack([zero, zero, zero])
        header = torch.cat([mine, tail])
        out = self._all_gather(torch.cat([_as_bytes(header), _as_bytes(body)]))
        n = body.numel() * body.element_size()
        bodies = out[:, _HEADER_BYTES:_HEADER_BYTES + n].contiguous().view(body.dtype)
        bodies = bodies.view(self.plan.world, *body.shape)
        if self._host_reads():
            heads = self._read_headers(out)
            check_headers(heads, self.plan, self.fn, None)
            if tuple(tuple(h[:CONSTANT_SIZE]) for h in heads) != self.agreed.everyone:
                raise RuntimeError(f"{self.fn}: the ranks' calls changed without agreeing; "
                                   "every rank must pass the same shapes and options")
            return bodies
        # a steady step on CUDA: no host read; a header that is not the agreed one (a peer whose
        # call changed alone, and which raised) makes every value NaN
        heads = out[:, :_HEADER_BYTES].contiguous().view(torch.float64)
        ok = (heads[:, :CONSTANT_SIZE] == everyone).all() & (heads[:, CONSTANT_SIZE] == 0).all()
        return torch.where(ok, bodies, torch.full_like(bodies, math.nan))


def all_gather(t: Tensor, plan: Plan) -> Tensor:
    """A later collective of a call, after its first one agreed on the sizes: every rank's ``t``
    (the same shape on every rank), ``[world, *t.shape]``."""
    t = t.contiguous()
    out = torch.empty((plan.world * t.numel(),), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.reshape(-1), group=plan.group)
    return out.view(plan.world, *t.shape)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _show(field: str, value: float) -> str:
    if field in ("reduction", "dtype"):
        return _NAMES.get(value, str(value))
    return str(int(value)) if float(value).is_integer() else str(value)


def check_headers(heads: List[Header], plan: Plan, fn: str,
                  error: Optional[BaseException]) -> None:
    """Every rank runs this on the same headers and raises the same error (``error``: this
    rank's own failed argument check, raised after the others have heard of it)."""
    if error is not None:
        raise error
    failed = [r for r, h in enumerate(heads) if h.failed > 0]
    if failed:
        raise RuntimeError(f"{fn}: the argument checks failed on rank(s) {failed} of the process "
                           "group (their error says why)")
    sizes = [h.slice_size for h in heads]
    if plan.equal_slices and len(set(sizes)) > 1:
        raise RuntimeError(
            f"{fn}: every rank of the process group must hold a slice of the class dimension "
            f"of the same size; got sizes {[int(s) for s in sizes]} (rank order)")
    for field, words in _ALIKE:
        values = [getattr(h, field) for h in heads]
        if not all(_same(v, values[0]) for v in values):
            odd = [r for r, v in enumerate(values) if not _same(v, values[0])]
            raise RuntimeError(
                f"{fn}: the ranks disagree on {words}: "
                f"{[_show(field, v) for v in values]} (rank order; rank(s) {odd} differ from "
                "rank 0); every rank must pass the same shapes and options")
    for r, h in enumerate(heads):
        if h.bad_targets > 0:
            raise IndexError(
                f"Target {int(h.first_bad_target)} is out of bounds: argument 'target' must hold "
                f"class indices in [0, {plan.classes}) (the global class count of the process "
                f"group) or ignore_index ({int(h.ignore_index)}); found on rank {r}")


def check_global_args(meta: Tensor, local_shape, target, weight, reduction, ignore_index,
                      label_smoothing, z_loss, softcap, fn) -> None:
    """cross_entropy's checks and errors on the global logits ``meta`` (a meta tensor); a
    probability target (sliced like the local logits, ``local_shape``) is checked at the global
    shape. A weight that requires grad keeps it (so torch's error is raised)."""
    if tuple(target.shape) == tuple(local_shape) and target.is_floating_point():
        t = torch.empty(meta.shape, dtype=target.dtype, device="meta")
    else:
        t = target.detach().to("meta")
    w = None
    if weight is not None:
        w = weight.detach().to("meta").requires_grad_(weight.requires_grad)
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
