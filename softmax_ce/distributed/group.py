"""``cross_entropy(..., process_group=group)``: logits whose class dimension is split over the
ranks of a process group, and the autograd Functions of the vocab-parallel loss (also used by
``dtensor``).

One collective per forward (``protocol.exchange``), none in backward: for a ``mean`` / ``sum``
loss the slice's gradient is formed in the forward right after the collective and backward scales
it; ``reduction='none'`` forms it in backward from the saved statistics, locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _args as A
from ..autograd import input_grads
from ..fixed_sum import fixed_order_sum
from ..reference import acc_dtype, capped
from . import protocol as P
from .slices import Column, Combined, combine, index_payload, prob_payload, slice_grad, weight_slice

__all__ = ["cross_entropy_over_group", "vocab_parallel_cross_entropy"]


def _forward(x3, t, w, opts, plan, prob, fn) -> Combined:
    """Per-position loss and statistics of this rank's slice: one collective."""
    w_slice = weight_slice(w, plan)
    xa = capped(x3, opts.softcap)
    if prob:
        payload, bad = prob_payload(xa, t, w_slice, opts, plan), None
    else:
        payload, bad = index_payload(xa, t, w_slice, opts, plan)
    kind = P.TargetKind.PROB if prob else P.TargetKind.INDEX
    header = P.make_header(plan, payload.shape[0], kind, opts, bad, t, payload.device)
    data = P.exchange(payload, header, plan, fn)
    return combine(data, None if prob else t != opts.ignore_index, opts, plan)


class _VocabParallelReduced(torch.autograd.Function):
    """A mean / sum loss: the gradient formed in the forward and scaled in backward; with the
    in-place option, formed in backward into the logits' storage from the saved statistics (the
    collective stays in the forward either way)."""

    @staticmethod
    def forward(ctx, x3, t, w, denom, reduction, opts, plan, prob, inplace, fn):
        with torch.no_grad():
            comb = _forward(x3, t, w, opts, plan, prob, fn)
            total = fixed_order_sum(comb.loss.reshape(-1))
            scale = (1.0 / denom.double() if reduction == "mean"
                     else torch.ones((), dtype=torch.float64, device=x3.device))
            w_slice = weight_slice(w, plan)
            comb = comb._replace(loss=None)
            ctx.args = (t, w_slice, comb, scale, opts, plan, prob)
            ctx.inplace = inplace
            if inplace:
                ctx.save_for_backward(x3)
                ctx.grad = None
            else:
                ctx.grad = slice_grad(x3, t, w_slice, comb, scale.expand(comb.lse.shape), opts,
                                      plan, prob)
        return (total * scale).to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.inplace:
            (x3,) = ctx.saved_tensors
            t, w_slice, comb, scale, opts, plan, prob = ctx.args
            g = (scale * grad_loss.double()).expand(comb.lse.shape)
            slice_grad(x3, t, w_slice, comb, g, opts, plan, prob, out=x3)
            torch.autograd.graph.increment_version(x3)
            return input_grads(ctx, x3)
        grad = ctx.grad
        ctx.grad = None
        if grad is None:
            raise RuntimeError("vocab-parallel cross_entropy: a second backward through the "
                               "same graph (retain_graph=True) is not supported")
        return input_grads(ctx, grad.mul_(grad_loss.to(grad.dtype)))


class _VocabParallelRows(torch.autograd.Function):
    """reduction='none': the gradient formed in backward from the saved statistics (no
    collective)."""

    @staticmethod
    def forward(ctx, x3, t, w, opts, plan, prob, fn):
        with torch.no_grad():
            comb = _forward(x3, t, w, opts, plan, prob, fn)
        ctx.save_for_backward(x3, t, w, comb.lse, comb.coef, comb.ref)
        ctx.opts, ctx.plan, ctx.prob = opts, plan, prob
        return comb.loss.to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        x3, t, w, lse, coef, ref = ctx.saved_tensors
        grad = slice_grad(x3, t, weight_slice(w, ctx.plan), Combined(None, lse, coef, ref),
                          grad_rows.reshape(-1).double(), ctx.opts, ctx.plan, ctx.prob)
        return input_grads(ctx, grad)


def vocab_parallel_cross_entropy(input, target, weight, reduction, opts, inplace, plan, fn):
    """``cross_entropy`` on logits whose class dimension is split over ``plan``'s group; called
    by ``cross_entropy_over_group`` and by the DTensor path after their argument checks (on the
    global shapes)."""
    P.unsupported_transforms(fn)
    outer, C_l, inner, spatial = A.kernel_layout(input)
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
                 if prob else A.mean_denominator(t, w, opts.ignore_index, plan.classes))
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
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the class "
                           "dimension), got a 0-dim tensor")
    plan = P.equal_plan(process_group, A.classes(input))
    try:
        shape = list(input.shape)
        shape[1 if input.dim() >= 2 else 0] = plan.classes
        meta = torch.empty(shape, dtype=input.dtype, device="meta")
        P.check_global_args(meta, input.shape, target, weight, reduction, ignore_index,
                            label_smoothing, z_loss, softcap, fn)
        opts = A.ce_options(ignore_index, label_smoothing, z_loss, softcap, fn)
    except Exception as error:  # noqa: BLE001 (re-raised once every rank knows)
        positions = input.numel() // max(plan.size, 1)
        P.fail_together(input.device, plan, fn, error, positions, Column.COUNT)
    inplace = bool(inplace_backward) and A.inplace_allowed(input)
    return vocab_parallel_cross_entropy(input, target, weight, reduction, opts, inplace, plan, fn)
