"""Vocab-parallel cross-entropy over ``torch.distributed``: each rank holds a slice of the class
dimension of the logits (a tensor-parallel head), one collective per forward.

Per position every rank computes, from its slice only (in float64, relative to its slice's
maximum ``ref_r`` so that no term cancels):

    lse_r   log-sum-exp of the slice
    q_r     ref_r - x_y            where the rank owns the target class y (0 elsewhere)
    P_r     sum_c b_c (ref_r - x_c) over the slice, with b_c = w_c (smoothing of class indices)
            or w_c ((1 - eps) t_c + eps / C) (probability targets)
    B_r     sum_c b_c over the slice (probability targets)

and a header (its slice size, the global class count, the number of positions, the options and
any out-of-range target). One ``all_gather_into_tensor`` of these few floats per position gives
every rank every rank's values; each rank then combines them in rank order with the same ops on
the same data, so the loss is bit-identical everywhere:

    lse  = logsumexp_r lse_r
    loss = (1 - eps) w_y ((lse - ref_own) + q_own) + (eps / C) sum_r (W_r (lse - ref_r) + P_r)
           + z lse^2                                   (class indices; W_r = sum of w over slice r)
    loss = sum_r (B_r (lse - ref_r) + P_r) + z lse^2   (probabilities)

torch's formulas, term for term (``F.cross_entropy`` on the gathered logits). The gradient of
each rank's slice needs only the global lse and the row's constants: for a ``mean`` / ``sum``
loss it is formed in the forward right after the collective, and backward scales it (no
collective in backward); ``reduction='none'`` forms it in backward from the saved lse, locally.
Every rank issues the same collective whatever its data (a rank that owns no target sends
zeros), and errors found in the gathered headers (slice sizes that differ, a target outside the
global range, options that differ) are raised on every rank alike.

The fused linear head (``linear_cross_entropy(..., process_group=...)``) runs the same statistics
a chunk of rows at a time from ``input @ linear_weightᵀ`` (the logits never whole on any rank),
the same single all-gather, then a second pass over the chunks (the GEMM recomputed) forms the
gradients; the input's gradient, a partial sum on each rank, is summed over the group by an
all-reduce inside the function (the only other collective).

Arithmetic: float64 for the per-position statistics and the combination, the accumulation dtype
(float32 for half inputs) for the per-element work; the compiled single-device kernels are not
used here.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .fixed_sum import fixed_order_sum
from .reference import acc_dtype, capped

__all__ = ["vocab_parallel_cross_entropy"]

_HEADER = 11  # floats at the head of each rank's payload
_KIND_INDEX, _KIND_PROB = 1.0, 2.0


class Plan(NamedTuple):
    """Where this rank's slice sits: its rank in the group, the group's size, each rank's
    (offset, size) along the class dimension, the global class count."""
    group: Optional[object]
    rank: int
    world: int
    bounds: Tuple[Tuple[int, int], ...]
    classes: int
    equal: bool  # slices of one size (the process_group API): checked across ranks

    @property
    def offset(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def size(self) -> int:
        return self.bounds[self.rank][1]


def equal_plan(group, local_classes: int) -> Plan:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    bounds = tuple((r * local_classes, local_classes) for r in range(world))
    return Plan(group, rank, world, bounds, world * local_classes, True)


# ---------------------------------------------------------------------------------------------
# per-position statistics of this rank's slice
# ---------------------------------------------------------------------------------------------


def _slice_stats(xa: Tensor):
    """(ref, lse_r) of x ``[n, C_l, inner]`` in the accumulation dtype: ref = the slice maximum
    where finite (0 for an empty or all -inf slice), lse_r in float64, NaN where the slice holds a
    NaN or +inf (which makes the row NaN, as in torch)."""
    n, C_l, inner = xa.shape
    if C_l == 0:
        ref = xa.new_zeros((n, inner))
        return ref, torch.full((n, inner), -math.inf, dtype=torch.float64, device=xa.device)
    m = xa.amax(dim=1)
    ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_s = torch.log((xa - ref.unsqueeze(1)).exp_().sum(dim=1))
    lse_r = ref.double() + log_s.double()
    poison = torch.isnan(m) | (m == math.inf)
    return ref, torch.where(poison, torch.full_like(lse_r, math.nan), lse_r)


def _weight_slice(w: Optional[Tensor], plan: Plan) -> Optional[Tensor]:
    return w[plan.offset:plan.offset + plan.size] if w is not None else None


def _ownership(t: Tensor, opts, plan: Plan):
    """(valid, owned, local): positions not ignored, those whose target class lies in this rank's
    slice, and that class's index within the slice (0 elsewhere)."""
    lo, C_l = plan.offset, plan.size
    valid = t != opts.ignore_index
    owned = valid & (t >= lo) & (t < lo + C_l)
    return valid, owned, torch.where(owned, t - lo, torch.zeros_like(t)).long()


def _index_payload(xa, t, w_slice, opts, plan):
    """Columns [lse_r, ref_r, q_r, P_r] (float64, ``[n * inner, 4]``) and the number of targets
    outside [0, C) with the first of them, for class-index targets ``t`` ``[n, inner]``."""
    C_l = plan.size
    ref, lse_r = _slice_stats(xa)
    valid, owned, local = _ownership(t, opts, plan)
    if C_l > 0:
        x_y = xa.gather(1, local.unsqueeze(1)).squeeze(1)
        q = torch.where(owned, (ref - x_y).double(), torch.zeros_like(lse_r))
    else:
        q = torch.zeros_like(lse_r)
    if opts.label_smoothing > 0 and C_l > 0:
        d = ref.unsqueeze(1) - xa
        if w_slice is not None:
            d = d * w_slice.view(1, C_l, 1)
        P = d.double().sum(dim=1)
    else:
        P = torch.zeros_like(lse_r)
    bad = valid & ((t < 0) | (t >= plan.classes))
    return torch.stack([lse_r, ref.double(), q, P], dim=-1).reshape(-1, 4), bad


def _smoothed_slice(t3, w_slice, eps, C):
    """b = w ((1 - eps) t + eps / C) over the slice, in the accumulation dtype."""
    b = t3.to(acc_dtype(t3.dtype))
    if eps > 0:
        b = b * (1 - eps) + eps / C
    if w_slice is not None:
        b = b * w_slice.view(1, -1, 1)
    return b


def _prob_payload(xa, t3, w_slice, opts, plan):
    """Columns [lse_r, ref_r, P_r, B_r] for probability targets ``t3`` ``[n, C_l, inner]``."""
    ref, lse_r = _slice_stats(xa)
    b = _smoothed_slice(t3, w_slice, opts.label_smoothing, plan.classes)
    if xa.shape[1] > 0:
        P = (b * (ref.unsqueeze(1) - xa)).double().sum(dim=1)
        B = b.double().sum(dim=1)
    else:
        P = B = torch.zeros_like(lse_r)
    return torch.stack([lse_r, ref.double(), P, B], dim=-1).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# the collective and the combination
# ---------------------------------------------------------------------------------------------


def _header(plan, positions, kind, opts, bad, target, device, failed=False):
    """This rank's header: slice size, global C, positions, kind, options, whether its own
    argument checks failed, the number of targets out of range and the first of them (no host
    synchronisation)."""
    values = [float(plan.size), float(plan.classes), float(positions), kind,
              float(opts.ignore_index), opts.label_smoothing, opts.z_loss, opts.softcap,
              float(failed)]
    head = torch.tensor(values, dtype=torch.float64).to(device)
    if bad is not None and bad.numel() > 0:
        flat = bad.reshape(-1)
        first = target.reshape(-1)[torch.argmax(flat.to(torch.uint8))]  # the first True
        tail = torch.stack([flat.sum().double(), first.double()])
    else:
        tail = torch.zeros(2, dtype=torch.float64, device=device)
    return torch.cat([head, tail])


def _exchange(payload: Tensor, header: Tensor, plan: Plan, fn: str,
              error: Optional[BaseException] = None) -> Tensor:
    """The one collective: every rank's header and payload; checks the headers (every rank sees
    the same and raises the same error; ``error``: this rank's own failed argument check, raised
    here after the others have heard of it). Returns the payloads ``[world, positions, k]``."""
    rows, k = payload.shape
    mine = torch.cat([header, payload.reshape(-1)])
    out = torch.empty(plan.world * mine.numel(), dtype=torch.float64, device=payload.device)
    _all_gather(out, mine, plan.group)
    out = out.view(plan.world, -1)
    heads = out[:, :_HEADER].cpu().tolist()  # a few floats per rank (on CUDA: one small copy)
    _check_headers(heads, plan, fn, error)
    return out[:, _HEADER:].reshape(plan.world, rows, k)


def _all_gather(out: Tensor, mine: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _check_headers(heads: List[List[float]], plan: Plan, fn: str,
                   error: Optional[BaseException]) -> None:
    sizes = [h[0] for h in heads]
    if plan.equal and len(set(sizes)) > 1:
        raise RuntimeError(
            f"{fn}: every rank of the process group must hold a slice of the class dimension "
            f"of the same size; got sizes {[int(s) for s in sizes]} (rank order)")
    if error is not None:
        raise error
    failed = [r for r, h in enumerate(heads) if h[8] > 0]
    if failed:
        raise RuntimeError(f"{fn}: the argument checks failed on rank(s) {failed} of the process "
                           "group (their error says why)")
    for name, column in (("the global number of classes", 1), ("the number of positions", 2),
                         ("the target kind", 3), ("ignore_index", 4),
                         ("label_smoothing", 5), ("z_loss", 6), ("softcap", 7)):
        values = [h[column] for h in heads]
        if any(v != values[0] and not (math.isnan(v) and math.isnan(values[0])) for v in values):
            raise RuntimeError(f"{fn}: the ranks disagree on {name}: {values} (rank order); "
                               "target, weight and options must be the same on every rank")
    for r, h in enumerate(heads):
        if h[9] > 0:
            raise IndexError(
                f"Target {int(h[10])} is out of bounds: argument 'target' must hold class "
                f"indices in [0, {plan.classes}) (the global class count of the process group) "
                f"or ignore_index ({int(h[4])}); found on rank {r}")


def _global_lse(data: Tensor) -> Tensor:
    """logsumexp over ranks of lse_r, NaN where the whole row is -inf (as torch's log_softmax)."""
    lse = torch.logsumexp(data[..., 0], dim=0)
    return torch.where(lse == -math.inf, torch.full_like(lse, math.nan), lse)


def _rank_sums(data: Tensor, lse: Tensor, slice_w: Tensor, column: int) -> Tensor:
    """sum over ranks, in rank order, of slice_w_r (lse - ref_r) + data[r, :, column]
    (slice_w_r: a number per rank, or per rank and position)."""
    total = torch.zeros_like(lse)
    for r in range(data.shape[0]):
        total = total + (slice_w[r] * (lse - data[r, :, 1]) + data[r, :, column])
    return total


def _owner(t: Tensor, plan: Plan) -> Tensor:
    starts = torch.tensor([b[0] for b in plan.bounds[1:]], dtype=t.dtype, device=t.device)
    return torch.bucketize(t, starts, right=True)


class Combined(NamedTuple):
    loss: Optional[Tensor]  # per position, float64
    lse: Tensor  # per position, float64
    row_coef: Tensor  # per position: the coefficient of p_c in the gradient, float64 (before g)
    ref: Tensor  # per position: this rank's slice maximum (its ref_r), float64

    def rows(self, start: int, end: int) -> "Combined":
        return Combined(None, self.lse[start:end], self.row_coef[start:end],
                        self.ref[start:end])


def _combine_index(data, t, w, opts, plan) -> Combined:
    lse = _global_lse(data)
    tf = t.reshape(-1)
    valid = tf != opts.ignore_index
    safe = torch.where(valid, tf, torch.zeros_like(tf)).long().clamp(0, max(plan.classes - 1, 0))
    owner = _owner(safe, plan)
    ref_own = data[:, :, 1].gather(0, owner.unsqueeze(0)).squeeze(0)
    q_own = data[:, :, 2].sum(dim=0)  # one rank's value, zeros elsewhere: exact
    w_y = w.double()[safe] if w is not None else torch.ones_like(lse)
    eps, C = opts.label_smoothing, plan.classes
    loss = (1 - eps) * w_y * ((lse - ref_own) + q_own)
    if w is not None:
        w_total = w.double().sum()
        slice_w = torch.stack([w.double()[o:o + n].sum() for o, n in plan.bounds])
    else:
        w_total = torch.tensor(float(C), dtype=torch.float64, device=lse.device)
        slice_w = torch.tensor([float(n) for _, n in plan.bounds], dtype=torch.float64,
                               device=lse.device)
    if eps > 0:
        loss = loss + (eps / C) * _rank_sums(data, lse, slice_w, 3)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    zero = torch.zeros_like(loss)
    coef = (1 - eps) * w_y + (eps / C) * w_total + 2 * opts.z_loss * lse
    return Combined(torch.where(valid, loss, zero), lse, torch.where(valid, coef, zero),
                    data[plan.rank, :, 1])


def _combine_prob(data, opts, plan) -> Combined:
    lse = _global_lse(data)
    B = data[:, :, 3]  # per rank and position
    loss = _rank_sums(data, lse, B, 2)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    return Combined(loss, lse, B.sum(dim=0) + 2 * opts.z_loss * lse, data[plan.rank, :, 1])


# ---------------------------------------------------------------------------------------------
# the local gradient
# ---------------------------------------------------------------------------------------------


def _slice_grad(x3, t, w_slice, comb, g, opts, plan, prob, out=None):
    """The gradient of this rank's slice ``x3`` ``[n, C_l, inner]`` for the upstream gradient
    ``g`` per position (``[n, inner]``, float64), from the combined statistics ``comb`` (global
    lse, row coefficient, this slice's maximum): g [coef p_c - (eps/C) w_c - (1-eps) w_y [c=y]]
    (class indices; the true-class term only where this rank owns y) or g [coef p_c - b_c]
    (probabilities), times the soft-cap's derivative. ``out``: where to write it (x3 itself for
    the in-place option), else a new tensor in x3's dtype."""
    n, C_l, inner = x3.shape
    if C_l == 0:
        return torch.empty_like(x3) if out is None else out
    acc = acc_dtype(x3.dtype)
    th = torch.tanh(x3.to(acc) / opts.softcap) if opts.softcap > 0 else None
    xa = opts.softcap * th if th is not None else x3.to(acc)
    ref = comb.ref.view(n, inner)
    shift = (comb.lse.view(n, inner) - ref).to(acc)  # small: x - lse as (x - ref) - (lse - ref)
    gg = g.view(n, inner)
    grad = (xa - ref.to(acc).unsqueeze(1)).sub_(shift.unsqueeze(1)).exp_()  # p, one new buffer
    grad.mul_((gg * comb.row_coef.view(n, inner)).to(acc).unsqueeze(1))
    eps, C = opts.label_smoothing, plan.classes
    if prob:
        grad.sub_(gg.to(acc).unsqueeze(1) * _smoothed_slice(t, w_slice, eps, C))
    else:
        valid, owned, local = _ownership(t, opts, plan)
        if eps > 0:
            w = w_slice.view(1, C_l, 1) if w_slice is not None else 1.0
            gv = torch.where(valid, gg, torch.zeros_like(gg)).to(acc)
            grad.sub_((eps / C) * gv.unsqueeze(1) * w)
        w_y = (w_slice[local] if w_slice is not None
               else torch.ones(local.shape, dtype=acc, device=x3.device))
        true = torch.where(owned, gg.to(acc) * (1 - eps) * w_y, torch.zeros_like(w_y))
        grad.scatter_add_(1, local.unsqueeze(1), -true.unsqueeze(1))
    if th is not None:
        grad.mul_(1 - th * th)
    if out is not None:
        out.copy_(grad)
        return out
    return grad.to(x3.dtype)


# ---------------------------------------------------------------------------------------------
# forward of the loss over slices
# ---------------------------------------------------------------------------------------------


def _forward(x3, t, w, opts, plan, prob, fn):
    """Per-position loss and (lse, row coefficient) for this rank's slice: one collective."""
    w_slice = _weight_slice(w, plan)
    xa = capped(x3, opts.softcap)
    if prob:
        payload, bad = _prob_payload(xa, t, w_slice, opts, plan), None
    else:
        payload, bad = _index_payload(xa, t, w_slice, opts, plan)
    header = _header(plan, payload.shape[0], _KIND_PROB if prob else _KIND_INDEX, opts, bad, t,
                     payload.device)
    data = _exchange(payload, header, plan, fn)
    return _combine_prob(data, opts, plan) if prob else _combine_index(data, t, w, opts, plan)


class _VocabParallelReduced(torch.autograd.Function):
    """A mean / sum loss: the gradient formed in the forward and scaled in backward; with the
    in-place option, formed in backward into the logits' storage from the saved lse (the
    collective stays in the forward either way)."""

    @staticmethod
    def forward(ctx, x3, t, w, denom, reduction, opts, plan, prob, inplace, fn):
        with torch.no_grad():
            comb = _forward(x3, t, w, opts, plan, prob, fn)
            total = fixed_order_sum(comb.loss.reshape(-1))
            scale = (1.0 / denom.double() if reduction == "mean"
                     else torch.ones((), dtype=torch.float64, device=x3.device))
            w_slice = _weight_slice(w, plan)
            comb = comb._replace(loss=None)
            ctx.args = (t, w_slice, comb, scale, opts, plan, prob)
            ctx.inplace = inplace
            if inplace:
                ctx.save_for_backward(x3)
                ctx.grad = None
            else:
                ctx.grad = _slice_grad(x3, t, w_slice, comb, scale.expand(comb.lse.shape), opts,
                                       plan, prob)
        return (total * scale).to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        none = (None,) * 9
        if ctx.inplace:
            (x3,) = ctx.saved_tensors
            t, w_slice, comb, scale, opts, plan, prob = ctx.args
            g = (scale * grad_loss.double()).expand(comb.lse.shape)
            _slice_grad(x3, t, w_slice, comb, g, opts, plan, prob, out=x3)
            torch.autograd.graph.increment_version(x3)
            return (x3,) + none
        grad = ctx.grad
        ctx.grad = None
        if grad is None:
            raise RuntimeError("vocab-parallel cross_entropy: a second backward through the "
                               "same graph (retain_graph=True) is not supported")
        return (grad.mul_(grad_loss.to(grad.dtype)),) + none


class _VocabParallelRows(torch.autograd.Function):
    """reduction='none': the gradient formed in backward from the saved lse (no collective)."""

    @staticmethod
    def forward(ctx, x3, t, w, opts, plan, prob, fn):
        with torch.no_grad():
            comb = _forward(x3, t, w, opts, plan, prob, fn)
        ctx.save_for_backward(x3, t, w, comb.lse, comb.row_coef, comb.ref)
        ctx.opts, ctx.plan, ctx.prob = opts, plan, prob
        return comb.loss.to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        x3, t, w, lse, coef, ref = ctx.saved_tensors
        grad = _slice_grad(x3, t, _weight_slice(w, ctx.plan), Combined(None, lse, coef, ref),
                           grad_rows.reshape(-1).double(), ctx.opts, ctx.plan, ctx.prob)
        return grad, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def _unsupported_transforms(fn):
    """torch.func transforms, forward-mode AD and torch.compile would need rules for the
    collective that this path does not have: a clear error, never a number."""
    from . import ops

    if ops.functorch_active():
        raise NotImplementedError(f"{fn}: torch.func transforms (grad, vmap, jacrev, ...) are not "
                                  "supported with a process group or DTensor logits")
    if torch.autograd.forward_ad._current_level >= 0:
        raise NotImplementedError(f"{fn}: forward-mode AD is not supported with a process group "
                                  "or DTensor logits")
    if torch.compiler.is_compiling():
        raise NotImplementedError(f"{fn}: torch.compile is not supported with a process group "
                                  "or DTensor logits (call it outside the compiled region)")


def vocab_parallel_cross_entropy(input, target, weight, reduction, opts, inplace, plan, fn):
    """``cross_entropy`` on logits whose class dimension is split over ``plan``'s group; called
    by ``softmax_ce.cross_entropy(..., process_group=...)`` and by the DTensor path after their
    argument checks (on the global shapes)."""
    from .functional import _kernel_layout, _mean_denominator

    _unsupported_transforms(fn)
    outer, C_l, inner, spatial = _kernel_layout(input)
    prob = input.dim() > 0 and tuple(target.shape) == tuple(input.shape) \
        and target.is_floating_point()
    out_dtype = input.dtype
    x3 = input.reshape(outer, C_l, inner)
    if prob:
        t = target.to(input.dtype).reshape(outer, C_l, inner)
        opts = opts._replace(ignore_index=-100)
    else:
        t = (target.to(torch.int64) if target.dtype == torch.uint8 else target)
        t = t.reshape(outer, inner)
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    if reduction == "none":
        if input.requires_grad and torch.is_grad_enabled():
            rows = _VocabParallelRows.apply(x3, t, w, opts, plan, prob, fn)
        else:
            with torch.no_grad():
                rows = _forward(x3, t, w, opts, plan, prob, fn).loss.to(acc_dtype(input.dtype))
        shape = (outer,) + spatial if input.dim() >= 2 else ()
        return rows.reshape(shape).to(out_dtype)
    if reduction == "mean":
        denom = (torch.full((), float(outer * inner), dtype=torch.float64, device=input.device)
                 if prob else _mean_denominator(t, w, opts.ignore_index, plan.classes))
    else:
        denom = None
    if input.requires_grad and torch.is_grad_enabled():
        inplace = inplace and x3.data_ptr() == input.data_ptr() and x3.is_contiguous()
        loss = _VocabParallelReduced.apply(x3, t, w, denom, reduction, opts, plan, prob, inplace,
                                           fn)
    else:
        with torch.no_grad():
            comb = _forward(x3, t, w, opts, plan, prob, fn)
            total = fixed_order_sum(comb.loss.reshape(-1))
            loss = total / denom.double() if reduction == "mean" else total
    return loss.to(out_dtype)


def cross_entropy_over_group(input, target, weight, reduction, ignore_index, label_smoothing,
                             z_loss, softcap, inplace_backward, process_group, fn):
    """``cross_entropy(..., process_group=group)``: ``input`` is this rank's slice of the class
    dimension (slices of one size, in rank order). torch's argument checks run on the global
    shapes (meta tensors); a rank whose checks fail still takes part in the collective, so that
    every rank raises instead of waiting."""
    from .functional import CeOptions, _check_extensions, _index, _inplace_allowed

    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the class "
                           "dimension), got a 0-dim tensor")
    plan = equal_plan(process_group, input.shape[1] if input.dim() >= 2 else input.shape[0])
    error = None
    try:
        _global_checks(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                       softcap, plan, fn)
        cap = _check_extensions(label_smoothing, z_loss, softcap, fn)
        opts = CeOptions(_index(ignore_index, "ignore_index", fn), float(label_smoothing),
                         float(z_loss), cap)
    except Exception as caught:  # noqa: BLE001 (re-raised once every rank knows)
        error = caught
    if error is not None:
        _fail_together(input, plan, fn, error)
    inplace = bool(inplace_backward) and _inplace_allowed(input)
    return vocab_parallel_cross_entropy(input, target, weight, reduction, opts, inplace, plan, fn)


def _global_checks(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                   softcap, plan, fn):
    """cross_entropy's checks and errors for the gathered logits, on meta tensors."""
    shape = list(input.shape)
    shape[1 if input.dim() >= 2 else 0] = plan.classes
    meta = torch.empty(shape, dtype=input.dtype, device="meta")
    _global_checks_meta(meta, input.shape, target, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, fn)


def _global_checks_meta(meta, local_shape, target, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, fn):
    """``_cross_entropy``'s checks on the global logits ``meta``; a probability target (sliced
    like the local logits, ``local_shape``) is checked at the global shape."""
    from .functional import _cross_entropy

    if tuple(target.shape) == tuple(local_shape) and target.is_floating_point():
        t = torch.empty(meta.shape, dtype=target.dtype, device="meta")
    else:
        t = target.detach().to("meta")
    w = weight.detach().to("meta") if weight is not None else None
    _cross_entropy(meta, t, w, reduction, ignore_index, label_smoothing, z_loss, softcap, False,
                   fn)


def _fail_together(input, plan, fn, error, positions=None):
    """This rank's arguments are wrong: it still sends a header (flagged) and a payload of the
    size the others expect, then every rank raises."""
    from .functional import CeOptions

    if positions is None:
        positions = input.numel() // max(plan.size, 1) if input.dim() > 0 else 0
    payload = torch.zeros((positions, 4), dtype=torch.float64, device=input.device)
    opts = CeOptions(-100, 0.0, 0.0, 0.0)
    header = _header(plan, positions, 0.0, opts, None, None, input.device, failed=True)
    _exchange(payload, header, plan, fn, error)
    raise error  # not reached: _exchange raises


# ---------------------------------------------------------------------------------------------
# DTensor logits
# ---------------------------------------------------------------------------------------------


def cross_entropy_dtensor(input, target, weight, reduction, ignore_index, label_smoothing,
                          z_loss, softcap, inplace_backward, fn):
    """``cross_entropy`` of DTensor logits sharded on the class dimension along one mesh
    dimension (Replicate on the others; uneven shards as DTensor splits them). ``target`` and
    ``weight``: plain tensors (the same on every rank) or replicated DTensors. Returns the loss
    as a replicated DTensor; the logits' gradient is a DTensor with their placements."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from .functional import CeOptions, _check_extensions, _index, _inplace_allowed

    mesh, placements = input.device_mesh, input.placements
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the class "
                           "dimension), got a 0-dim tensor")
    class_dim = 1 if input.dim() >= 2 else 0
    sharded = [i for i, p in enumerate(placements)
               if isinstance(p, Shard) and p.dim % input.dim() == class_dim]
    if len(sharded) != 1 or any(not isinstance(p, Replicate) for i, p in enumerate(placements)
                                if i != sharded[0]):
        raise NotImplementedError(
            f"{fn}: DTensor logits must be sharded on the class dimension ({class_dim}) along "
            f"exactly one mesh dimension and replicated along the others; got {placements}")
    target = _replicated_local(target, "target", fn)
    weight = _replicated_local(weight, "weight", fn)
    mesh_dim = sharded[0]
    world = mesh.size(mesh_dim)
    C = input.shape[class_dim]
    step = -(-C // world)  # DTensor's split: torch.chunk sizes, trailing shards may be short
    bounds = tuple((min(r * step, C), max(0, min(step, C - r * step))) for r in range(world))
    plan = Plan(mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim), world, bounds, C, False)
    full = torch.empty(tuple(input.shape), dtype=input.dtype, device="meta")
    _global_checks_meta(full, input.shape, target, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, fn)
    local = input.to_local(grad_placements=placements)
    if tuple(target.shape) == tuple(input.shape) and target.is_floating_point():
        o, n = bounds[plan.rank]  # probabilities: all C classes given, this rank's slice used
        target = target.narrow(class_dim, o, n)
    cap = _check_extensions(label_smoothing, z_loss, softcap, fn)
    opts = CeOptions(_index(ignore_index, "ignore_index", fn), float(label_smoothing),
                     float(z_loss), cap)
    inplace = bool(inplace_backward) and _inplace_allowed(local)
    loss = vocab_parallel_cross_entropy(local, target, weight, reduction, opts, inplace, plan, fn)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _replicated_local(t, name, fn):
    from torch.distributed.tensor import DTensor, Replicate

    if t is None or not isinstance(t, DTensor):
        return t
    if any(not isinstance(p, Replicate) for p in t.placements):
        raise NotImplementedError(f"{fn}: argument '{name}' must be a plain tensor or a "
                                  f"replicated DTensor, got placements {t.placements}")
    return t.to_local()


# ---------------------------------------------------------------------------------------------
# the fused linear head over vocab slices
# ---------------------------------------------------------------------------------------------


def _linear_chunks(x, lin_w, lin_b, chunk):
    """(start, end, logits [n, C_l, 1]) per chunk of rows, computed in the input's dtype."""
    for s in range(0, x.shape[0], chunk):
        e = min(s + chunk, x.shape[0])
        logits = x[s:e] @ lin_w.t()
        if lin_b is not None:
            logits = logits + lin_b
        yield s, e, logits.unsqueeze(-1)


def _linear_forward(x, lin_w, lin_b, t, w, opts, plan, prob, chunk, fn):
    """The statistics pass over chunks, the one all-gather, the combination."""
    w_slice = _weight_slice(w, plan)
    N = x.shape[0]
    payload = torch.empty((N, 4), dtype=torch.float64, device=x.device)
    bad = torch.zeros(N, dtype=torch.bool, device=x.device) if not prob else None
    for s, e, logits in _linear_chunks(x, lin_w, lin_b, chunk):
        xa = capped(logits, opts.softcap)
        if prob:
            payload[s:e] = _prob_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)
        else:
            rows, bad_rows = _index_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)
            payload[s:e] = rows
            bad[s:e] = bad_rows.squeeze(-1)
    kind = _KIND_PROB if prob else _KIND_INDEX
    header = _header(plan, N, kind, opts, bad, t, x.device)
    data = _exchange(payload, header, plan, fn)
    return _combine_prob(data, opts, plan) if prob else _combine_index(data, t, w, opts, plan)


def _linear_grads(x, lin_w, lin_b, t, w, comb, g, opts, plan, prob, chunk, needs):
    """The gradient pass (the GEMM recomputed per chunk): grad_input summed over the group (an
    all-reduce), grad_weight / grad_bias of this rank's slice."""
    w_slice = _weight_slice(w, plan)
    acc = acc_dtype(x.dtype)
    gx = torch.zeros_like(x, dtype=acc) if needs[0] else None
    gw = torch.zeros_like(lin_w, dtype=acc) if needs[1] else None
    gb = torch.zeros(plan.size, dtype=acc, device=x.device) if needs[2] else None
    lin_w_acc = lin_w.to(acc) if gx is not None else None  # once, not per chunk
    for s, e, logits in _linear_chunks(x, lin_w, lin_b, chunk):
        tt = t[s:e].unsqueeze(-1)
        G = _slice_grad(logits, tt, w_slice, comb.rows(s, e), g[s:e], opts, plan,
                        prob).squeeze(-1).to(acc)
        if gx is not None:
            gx[s:e] = G @ lin_w_acc
        if gw is not None:
            gw.addmm_(G.t(), x[s:e].to(acc))
        if gb is not None:
            gb += G.sum(dim=0)
    if gx is not None:
        dist.all_reduce(gx, group=plan.group)  # the input is replicated: its gradient sums
        gx = gx.to(x.dtype)
    return (gx, gw.to(lin_w.dtype) if gw is not None else None,
            gb.to(lin_b.dtype) if gb is not None else None)


class _LinearVocabParallel(torch.autograd.Function):
    """mean / sum: every gradient formed in the forward (both collectives there), scaled in
    backward. 'none': the gradient pass (and its all-reduce) runs in backward."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, t, w, denom, reduction, opts, plan, prob, chunk, fn):
        needs = (x.requires_grad, lin_w.requires_grad,
                 lin_b is not None and lin_b.requires_grad)
        with torch.no_grad():
            comb = _linear_forward(x, lin_w, lin_b, t, w, opts, plan, prob, chunk, fn)
            ctx.reduction = reduction
            if reduction == "none":
                ctx.save_for_backward(x, lin_w, lin_b, t, w, comb.lse, comb.row_coef,
                                      comb.ref)
                ctx.args = (opts, plan, prob, chunk, needs)
                return comb.loss.to(acc_dtype(x.dtype))
            total = fixed_order_sum(comb.loss)
            scale = (1.0 / denom.double() if reduction == "mean"
                     else torch.ones((), dtype=torch.float64, device=x.device))
            ctx.grads = _linear_grads(x, lin_w, lin_b, t, w, comb, scale.expand(comb.lse.shape),
                                      opts, plan, prob, chunk, needs)
        return (total * scale).to(acc_dtype(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        none = (None,) * 9
        if ctx.reduction == "none":
            x, lin_w, lin_b, t, w, lse, coef, ref = ctx.saved_tensors
            opts, plan, prob, chunk, needs = ctx.args
            comb = Combined(None, lse, coef, ref)
            grads = _linear_grads(x, lin_w, lin_b, t, w, comb, grad_out.double(), opts, plan,
                                  prob, chunk, needs)
            return grads + none
        grads = ctx.grads
        ctx.grads = None
        if grads is None:
            raise RuntimeError("vocab-parallel linear_cross_entropy: a second backward through "
                               "the same graph (retain_graph=True) is not supported")
        return tuple(gr.mul_(grad_out.to(gr.dtype)) if gr is not None else None
                     for gr in grads) + none


def linear_cross_entropy_over_group(input, linear_weight, target, linear_bias, weight,
                                    reduction, opts, chunk, process_group, fn):
    """``linear_cross_entropy(..., process_group=group)``: ``linear_weight`` / ``linear_bias`` are
    this rank's slice of the vocabulary rows (slices of one size, in rank order); ``input`` and
    ``target`` are replicated. Called by ``linear.linear_cross_entropy`` after its checks."""
    from .functional import _mean_denominator

    _unsupported_transforms(fn)
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    plan = equal_plan(process_group, linear_weight.shape[0])
    try:
        if linear_weight.dim() != 2:
            raise NotImplementedError(f"{fn}: K-dimensional out_features are not supported with "
                                      "a process group")
        shape = (*input.shape[:-1], plan.classes)
        meta = torch.empty(shape, dtype=input.dtype, device="meta")
        _global_checks_meta(meta, (*input.shape[:-1], plan.size), target, weight, reduction,
                            opts.ignore_index, opts.label_smoothing, opts.z_loss,
                            opts.softcap or None, fn)
    except Exception as caught:  # noqa: BLE001 (re-raised once every rank knows)
        _fail_together(input, plan, fn, caught, input.shape[0] if input.dim() == 2 else 1)
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    t = target if batched else target.unsqueeze(0)
    prob = t.is_floating_point()
    if prob:
        t = t.to(input.dtype)
        opts = opts._replace(ignore_index=-100)
    elif t.dtype == torch.uint8:
        t = t.to(torch.int64)
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    N = x.shape[0]
    if chunk is None:
        from .linear import default_chunk_size

        chunk = default_chunk_size(N, plan.size, x.shape[1], x.dtype, acc_dtype(x.dtype))
    if reduction == "mean":
        denom = (torch.full((), float(N), dtype=torch.float64, device=x.device) if prob
                 else _mean_denominator(t.view(N, 1), w, opts.ignore_index, plan.classes))
    else:
        denom = None
    grads = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (x, linear_weight, linear_bias))
    if grads:
        loss = _LinearVocabParallel.apply(x.contiguous(), linear_weight, linear_bias, t, w, denom,
                                          reduction, opts, plan, prob, chunk, fn)
    else:
        comb = _linear_forward(x, linear_weight, linear_bias, t, w, opts, plan, prob, chunk, fn)
        loss = comb.loss.to(acc_dtype(x.dtype))
        if reduction != "none":
            total = fixed_order_sum(loss)
            loss = total / denom if reduction == "mean" else total
    if reduction == "none" and not batched:
        loss = loss.reshape(())
    return loss.to(input.dtype)
