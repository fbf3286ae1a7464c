"""The fused linear head over vocabulary slices: ``linear_cross_entropy(..., process_group=group)``
with plain tensors, and ``linear_cross_entropy`` with a DTensor weight sharded on the vocabulary
(tensor parallel).

Each rank holds a slice of the head's rows (``weight [C_local, H]``); the input is either the
same on every rank (replicated) or sharded on positions (sequence parallel: this rank's rows,
gathered inside the Function in the call's first collective, their gradient reduce-scattered
back). The statistics pass runs a chunk of rows at a time (``chunk_logits``: the logits never
whole on any rank), then the payload all-gather, then the gradient pass (the GEMM recomputed)
forms the gradients; the input's gradient, a partial sum on each rank, is summed over the group
(an all-reduce, or a reduce-scatter for a sequence-parallel input).

Collectives per forward in a steady state: replicated input, the payload all-gather (and the
all-reduce of the input's gradient for a ``mean`` / ``sum`` loss whose input requires grad);
sequence-parallel input, the input's all-gather, the payload all-gather (and the reduce-scatter).
``reduction='none'`` moves the gradient's reduction to backward; nothing else runs in backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .. import _args as A
from .._chunks import Needs, chunk_logits, default_chunk_size
from .._linear_core import check_shapes, chunk_option
from ..autograd import input_grads
from ..fixed_sum import fixed_order_sum
from ..reference import acc_dtype, capped
from . import protocol as P
from .dtensor import class_shard, replicated_local
from .group import target_grad
from .._slices import Column, Combined, combine, index_payload, prob_payload, slice_grad, weight_slice

__all__ = ["HeadArgs", "linear_cross_entropy_over_group", "linear_cross_entropy_dtensor",
           "linear_over_plan", "chunk_rows"]


class _Head(NamedTuple):
    """The non-tensor arguments of the Function below."""

    reduction: str
    opts: A.CeOptions
    plan: P.Plan
    prob: bool
    chunk: int
    needs: Needs  # gradients of (input, weight, bias)
    rows_per_rank: Optional[tuple]  # sequence parallel: each rank's rows of input (else None)
    exchange: P.Exchange


def _bad_targets(t, head: _Head):
    if head.prob:
        return None
    valid = t != head.opts.ignore_index
    return valid & ((t < 0) | (t >= head.plan.classes))


def _gather_input(x_local, t, head: _Head):
    """Sequence parallel: every rank's rows in rank order, in the call's first collective (each
    rank's rows padded to the largest rank's); otherwise the input itself."""
    if head.rows_per_rank is None:
        return x_local
    step = max(head.rows_per_rank)
    pad = step - x_local.shape[0]
    body = torch.cat([x_local, x_local.new_zeros(pad, x_local.shape[1])]) if pad else x_local
    rows = head.exchange.gather(body, _bad_targets(t, head), t)
    return torch.cat([rows[r, :n] for r, n in enumerate(head.rows_per_rank)])


def _statistics(x, lin_w, lin_b, t, w, head: _Head) -> Combined:
    """The statistics pass over chunks, the payload all-gather, the combination."""
    opts, plan = head.opts, head.plan
    w_slice = weight_slice(w, plan)
    N = x.shape[0]
    payload = torch.empty((N, Column.COUNT), dtype=torch.float64, device=x.device)
    for s, e, logits in chunk_logits(x, lin_w, lin_b, head.chunk):
        xa = capped(logits.unsqueeze(-1), opts.softcap)
        if head.prob:
            payload[s:e] = prob_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)
        else:
            payload[s:e] = index_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)[0]
    if head.rows_per_rank is not None:  # the headers went with the input
        data = P.all_gather(payload, plan)
    else:
        data = head.exchange.gather(payload, _bad_targets(t, head), t)
    return combine(data, None if head.prob else t != opts.ignore_index, opts, plan)


def _reduce_input_grad(gx, head: _Head):
    """The input's gradient summed over the group: all of it (replicated input), or this rank's
    rows (sequence parallel: a reduce-scatter of the rows padded as they were gathered)."""
    if head.rows_per_rank is None:
        dist.all_reduce(gx, group=head.plan.group)
        return gx
    rows, world = head.rows_per_rank, head.plan.world
    step = max(rows)
    full = gx.new_zeros((world, step, gx.shape[1]))
    start = 0
    for r, n in enumerate(rows):
        full[r, :n] = gx[start:start + n]
        start += n
    mine = gx.new_empty((step, gx.shape[1]))
    dist.reduce_scatter_tensor(mine, full.view(world * step, -1), group=head.plan.group)
    return mine[:rows[head.plan.rank]]


def _grads(x, lin_w, lin_b, t, w, comb, g, head: _Head, want_target: bool):
    """The gradient pass (the GEMM recomputed per chunk): the input's gradient reduced over the
    group, the weight's / bias's of this rank's slice, and a probability target's slice."""
    opts, plan, needs = head.opts, head.plan, head.needs
    w_slice = weight_slice(w, plan)
    acc = acc_dtype(x.dtype)
    gx = torch.zeros((x.shape[0], x.shape[1]), dtype=acc, device=x.device) \
        if needs.input else None
    gw = torch.zeros_like(lin_w, dtype=acc) if needs.weight else None
    gb = torch.zeros(plan.size, dtype=acc, device=x.device) if needs.bias else None
    gt = torch.empty_like(t) if want_target else None
    lin_w_acc = lin_w.to(acc) if gx is not None else None  # once, not per chunk
    for s, e, logits in chunk_logits(x, lin_w, lin_b, head.chunk):
        tt = t[s:e].unsqueeze(-1)
        if gt is not None:
            gt[s:e] = target_grad(logits.unsqueeze(-1), tt, w, comb.rows(s, e), g[s:e],
                                   head).squeeze(-1)
        G = slice_grad(logits.unsqueeze(-1), tt, w_slice, comb.rows(s, e), g[s:e], opts, plan,
                       head.prob).squeeze(-1).to(acc)
        if gx is not None:
            gx[s:e] = G @ lin_w_acc
        if gw is not None:
            gw.addmm_(G.t(), x[s:e].to(acc))
        if gb is not None:
            gb += G.sum(dim=0)
    if gx is not None:
        gx = _reduce_input_grad(gx, head).to(x.dtype)
    return (gx, gw.to(lin_w.dtype) if gw is not None else None,
            gb.to(lin_b.dtype) if gb is not None else None, gt)


class _LinearVocabParallel(torch.autograd.Function):
    """mean / sum: every gradient formed in the forward (its collectives there), scaled in
    backward. 'none': the gradient pass (and its reduction) runs in backward."""

    @staticmethod
    def forward(ctx, x_local, lin_w, lin_b, t, w, denom, head: _Head):
        with torch.no_grad():
            x = _gather_input(x_local, t, head)
            comb = _statistics(x, lin_w, lin_b, t, w, head)
            ctx.head = head
            want_target = ctx.needs_input_grad[3]
            if head.reduction == "none":
                ctx.save_for_backward(x, lin_w, lin_b, t, w, comb.lse, comb.coef, comb.ref)
                return comb.loss.to(acc_dtype(x.dtype))
            total = fixed_order_sum(comb.loss)
            scale = A.reduction_scale(head.reduction, denom, x.device)
            ctx.grads = _grads(x, lin_w, lin_b, t, w, comb, scale.expand(comb.lse.shape), head,
                               want_target)
        return (total * scale).to(acc_dtype(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        head = ctx.head
        if head.reduction == "none":
            x, lin_w, lin_b, t, w, lse, coef, ref = ctx.saved_tensors
            comb = Combined(None, lse, coef, ref)
            return input_grads(ctx, *_grads(x, lin_w, lin_b, t, w, comb, grad_out.double(), head,
                                            ctx.needs_input_grad[3]))
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("vocab-parallel linear_cross_entropy: a second backward through "
                               "the same graph (retain_graph=True) is not supported")
        return input_grads(ctx, *(gr.mul_(grad_out.to(gr.dtype)) if gr is not None else None
                                  for gr in grads))


class HeadArgs(NamedTuple):
    """``linear_cross_entropy``'s options as the caller passed them (checked inside the
    fail-together guard)."""

    reduction: str = "mean"
    ignore_index: Optional[int] = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    chunk_size: Optional[int] = None
    options: object = None
    grad_weight_acc_dtype: Optional[torch.dtype] = None
    token_weight: object = None
    vocab_chunk_size: object = None


def chunk_rows(positions: int, world: int) -> tuple:
    """torch.chunk's split of ``positions`` rows over ``world`` ranks: each rank's count."""
    step = -(-positions // world) if world else 0
    return tuple(max(0, min(step, positions - r * step)) for r in range(world))


def linear_over_plan(x_local, lin_w, lin_b, target, weight, args: HeadArgs, plan,
                     rows_per_rank, fn):
    """The fused head over ``plan``'s vocabulary slices, on local tensors: ``x_local`` ``[N, H]``
    (replicated: ``rows_per_rank`` None) or ``[rows_per_rank[rank], H]`` (sequence parallel: this
    rank's rows of the batch; the N rows are every rank's in rank order), ``lin_w`` / ``lin_b``
    this rank's slice, ``target`` all N positions in that order (the same on every rank;
    probabilities sliced like the local logits). Every check runs inside the fail-together guard.
    Returns the loss in the accumulation dtype (``none``: all N positions)."""
    ex = P.Exchange(plan, fn, x_local.device)
    sequence_parallel = rows_per_rank is not None
    try:
        P.unsupported_transforms(fn)
        reduction = A.reduction_of(None, None, args.reduction)
        if args.options is not None or args.grad_weight_acc_dtype is not None \
                or args.token_weight is not None or args.vocab_chunk_size is not None:
            raise NotImplementedError(f"{fn}: options, grad_weight_acc_dtype, token_weight and "
                                      "vocab_chunk_size are not supported with a process group "
                                      "or a DTensor weight (each rank accumulates its own slice)")
        if lin_w.dim() != 2:
            raise NotImplementedError(f"{fn}: K-dimensional out_features are not supported with "
                                      "a process group or a DTensor weight")
        check_shapes(x_local, lin_w, lin_b, fn)
        if target.is_floating_point() and args.ignore_index is not None:
            raise RuntimeError(f"{fn}: ignore_index cannot be specified when target contains "
                               "probabilities")
        opts = A.ce_options(-100 if args.ignore_index is None else args.ignore_index,
                            args.label_smoothing, args.z_loss, args.softcap, fn)
        chunk = chunk_option(None, args.chunk_size, fn)
        rows = x_local.shape[0] if x_local.dim() == 2 else 1
        N = rows
        if sequence_parallel:
            if x_local.dim() != 2:
                raise RuntimeError(f"{fn}: a sequence-parallel input must be 2-D (this rank's "
                                   f"rows, in_features), got shape {tuple(x_local.shape)}")
            N = target.shape[0] if target.dim() > 0 else 0
            if sum(rows_per_rank) != N or rows != rows_per_rank[plan.rank]:
                raise RuntimeError(
                    f"{fn}: with a sequence-parallel input, rank {plan.rank} must hold "
                    f"{rows_per_rank[plan.rank]} of the target's {N} positions (torch.chunk's "
                    f"split over {plan.world} ranks), got {rows} rows of 'input'")
        batched = x_local.dim() == 2
        logical = (N, x_local.shape[-1]) if batched else (x_local.shape[-1],)
        meta = torch.empty((*logical[:-1], plan.classes), dtype=x_local.dtype, device="meta")
        P.check_global_args(meta, (*logical[:-1], plan.size), target, weight, reduction,
                            opts.ignore_index, opts.label_smoothing, opts.z_loss,
                            opts.softcap or None, fn)
        prob = target.is_floating_point()
        grads = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad for a in (x_local, lin_w, lin_b, target))
        needs = Needs(grads and x_local.requires_grad, grads and lin_w.requires_grad,
                      grads and lin_b is not None and lin_b.requires_grad)
        flags = (P.FLAG_INPUT_GRAD if needs.input else 0) | \
            (P.FLAG_SEQUENCE_PARALLEL if sequence_parallel else 0)
        step = max(rows_per_rank) if sequence_parallel else rows
        header = P.make_header(plan, positions=N,
                               kind=P.TargetKind.PROB if prob else P.TargetKind.INDEX,
                               reduction=reduction, dtype=x_local.dtype, opts=opts,
                               in_features=x_local.shape[-1], local_rows=step, flags=flags)
    except Exception as error:  # noqa: BLE001 (re-raised once every rank knows)
        ex.fail(error)
    if sequence_parallel:  # the first collective carries this rank's rows, padded to step
        nbytes = P.body_bytes(step * x_local.shape[1], x_local.element_size())
    else:  # it carries the payload
        nbytes = P.body_bytes(N * Column.COUNT, 8)
    ex.settle(header, nbytes)
    x = x_local if batched else x_local.unsqueeze(0)
    t = target if batched else target.unsqueeze(0)
    if prob:
        t = t.to(x_local.dtype)
        opts = opts.without_ignore_index()
    elif t.dtype == torch.uint8:
        t = t.to(torch.int64)
    w = weight.to(acc_dtype(x_local.dtype)) if weight is not None else None
    if chunk is None:
        chunk = default_chunk_size(N, plan.size, x.shape[1], x.dtype, acc_dtype(x.dtype))
    head = _Head(reduction, opts, plan, prob, chunk, needs, rows_per_rank, ex)
    if reduction == "mean":
        denom = (torch.full((), float(N), dtype=torch.float64, device=x.device) if prob
                 else A.mean_denominator(t.view(N, 1), w, opts.ignore_index, plan.classes))
    else:
        denom = None
    if grads:
        loss = _LinearVocabParallel.apply(x.contiguous(), lin_w, lin_b, t, w, denom, head)
    else:
        with torch.no_grad():
            full = _gather_input(x.contiguous(), t, head)
            loss = _statistics(full, lin_w, lin_b, t, w, head).loss.to(acc_dtype(x.dtype))
        if reduction != "none":
            total = fixed_order_sum(loss)
            loss = total / denom if reduction == "mean" else total
    if reduction == "none" and not batched:
        loss = loss.reshape(())
    return loss


def linear_cross_entropy_over_group(input, linear_weight, target, linear_bias, weight,
                                    args: HeadArgs, process_group, sequence_parallel, fn):
    """``linear_cross_entropy(..., process_group=group)``: ``linear_weight`` / ``linear_bias`` are
    this rank's slice of the vocabulary rows (slices of one size, in rank order); ``input`` is the
    same on every rank, or with ``sequence_parallel=True`` this rank's rows (rank r the r-th of
    torch.chunk's split of the N positions); ``target`` holds every position, the same on every
    rank."""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    plan = P.equal_plan(process_group, linear_weight.shape[0] if linear_weight.dim() else 0)
    rows = None
    if sequence_parallel:
        rows = chunk_rows(target.shape[0] if target.dim() > 0 else 0, plan.world)
    loss = linear_over_plan(input, linear_weight, linear_bias, target, weight, args, plan, rows,
                            fn)
    return loss.to(input.dtype)


def _positions_in_rank_order(shape, dim: int, world: int) -> torch.Tensor:
    """The logical index of each position of an input ``shape[:-1]`` sharded on ``dim`` (torch.chunk
    split over ``world`` ranks), in the order the ranks' rows are gathered (rank-major, then each
    rank's local order)."""
    index = torch.arange(math.prod(shape[:-1])).view(*shape[:-1])
    return torch.cat([part.reshape(-1) for part in index.chunk(world, dim)])


def linear_cross_entropy_dtensor(input, linear_weight, target, linear_bias, weight,
                                 args: HeadArgs, fn, keep_acc: bool = False):
    """``linear_cross_entropy`` with ``linear_weight`` a DTensor sharded on the vocabulary
    (dimension 0) along one mesh dimension and replicated along the others, ``linear_bias`` None
    or sharded alike, ``input`` ``(..., H)`` a plain tensor (the same on every rank), a replicated
    DTensor, or a DTensor sharded on a positions dimension along the weight's mesh dimension
    (sequence parallel: ``(B, S, H)`` sharded on S too; the targets are permuted to the order the
    rows are gathered in and the per-position losses back). ``target``: every position, shaped
    like ``input.shape[:-1]``. Returns the loss as a replicated DTensor (``keep_acc``: in the
    accumulation dtype); the gradients come back with each input's placements."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh_dim, plan = class_shard(linear_weight, 0, fn, "linear_weight")
    mesh = linear_weight.device_mesh
    if linear_bias is not None and (not isinstance(linear_bias, DTensor)
                                    or tuple(linear_bias.placements)
                                    != tuple(linear_weight.placements)):
        raise NotImplementedError(f"{fn}: with a DTensor linear_weight, linear_bias must be a "
                                  "DTensor sharded like it")
    H = input.shape[-1]
    order = None
    if isinstance(input, DTensor):
        if input.device_mesh != mesh:
            raise NotImplementedError(f"{fn}: 'input' and 'linear_weight' must be DTensors on "
                                      "the same device mesh")
        others = [p for i, p in enumerate(input.placements) if i != mesh_dim]
        mine = input.placements[mesh_dim]
        positions = isinstance(mine, Shard) and mine.dim % input.dim() < input.dim() - 1
        if any(not isinstance(p, Replicate) for p in others) or not (
                isinstance(mine, Replicate) or positions):
            raise NotImplementedError(
                f"{fn}: a DTensor 'input' must be replicated, or sharded on a positions "
                f"dimension along the weight's mesh dimension; got {input.placements}")
        local = input.to_local(grad_placements=input.placements)
        if positions:  # each rank's rows as DTensor splits them (torch.chunk along the dim)
            dim = mine.dim % input.dim()
            order = _positions_in_rank_order(tuple(input.shape), dim, plan.world)
            parts = torch.empty(tuple(input.shape[:-1]), device="meta").chunk(plan.world, dim)
            rows = tuple(p.numel() for p in parts) + (0,) * (plan.world - len(parts))
        x_local = local.reshape(-1, H) if local.dim() > 1 else local
    else:
        x_local = input.reshape(-1, H) if input.dim() > 2 else input
    w_local = linear_weight.to_local(grad_placements=linear_weight.placements)
    b_local = (linear_bias.to_local(grad_placements=linear_bias.placements)
               if linear_bias is not None else None)
    target = replicated_local(target, "target", fn)
    weight = replicated_local(weight, "weight", fn)
    t = target
    if input.dim() > 2:  # every position flattened (probabilities keep their last dimension)
        t = target.reshape(-1, *target.shape[input.dim() - 1:])
    if order is not None:
        t = t[order.to(t.device)]
    loss = linear_over_plan(x_local, w_local, b_local, t, weight, args, plan,
                            rows if order is not None else None, fn)
    if loss.dim() > 0 and order is not None:  # 'none': back to the logical order
        unpermuted = torch.empty_like(loss)
        unpermuted[order.to(loss.device)] = loss
        loss = unpermuted
    if loss.dim() > 0 and input.dim() > 2:
        loss = loss.reshape(input.shape[:-1])
    if not keep_acc:
        loss = loss.to(input.dtype)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
