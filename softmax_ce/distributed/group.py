"""``cross_entropy(..., process_group=group)``: logits whose class dimension is split over the
ranks of a process group, and the autograd Functions of the vocab-parallel loss (also used by
``dtensor``).

One collective per forward in a steady state (``protocol.Exchange``), none in backward: for a
``mean`` / ``sum`` loss the slice's gradient is formed in the forward right after the collective
and backward scales it; ``reduction='none'`` forms it in backward from the saved statistics,
locally. A probability target that requires grad gets its slice's gradient, locally too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import _args as A
from .. import reference
from ..autograd import input_grads
from ..fixed_sum import fixed_order_sum
from ..reference import acc_dtype, capped
from . import protocol as P
from .._slices import Column, Combined, combine, index_payload, prob_payload, slice_grad, weight_slice

__all__ = ["cross_entropy_over_group", "vocab_parallel_cross_entropy", "guarded_call",
           "target_grad"]


class _Call(NamedTuple):
    """The non-tensor arguments of the Functions below."""

    reduction: str
    opts: A.CeOptions
    plan: P.Plan
    prob: bool
    inplace: bool
    exchange: P.Exchange


def _forward(x3, t, w, call: _Call) -> Combined:
    """Per-position loss and statistics of this rank's slice: one collective."""
    opts, plan = call.opts, call.plan
    xa = capped(x3, opts.softcap)
    if call.prob:
        payload, bad = prob_payload(xa, t, weight_slice(w, plan), opts, plan), None
    else:
        payload, bad = index_payload(xa, t, weight_slice(w, plan), opts, plan)
    data = call.exchange.gather(payload, bad, t)
    return combine(data, None if call.prob else t != opts.ignore_index, opts, plan)


def target_grad(x3, t, w, comb: Combined, g, call: _Call):
    """The gradient of this rank's slice of a probability target, -g (1 - eps) w_c log p_c,
    with log p_c = (x'_c - ref) - (lse - ref) (the global lse)."""
    n, _, inner = x3.shape
    acc = acc_dtype(x3.dtype)
    ref = comb.ref.view(n, 1, inner)
    logp = (capped(x3, call.opts.softcap) - ref.to(acc)) - (comb.lse.view(n, 1, inner)
                                                         - ref).to(acc)
    grad = reference.prob_target_gradient(logp, g.view(n, inner).to(acc),
                                          weight_slice(w, call.plan), call.opts.label_smoothing)
    return grad.to(t.dtype)


class _VocabParallelReduced(torch.autograd.Function):
    """A mean / sum loss: the gradient formed in the forward and scaled in backward; with the
    in-place option, formed in backward into the logits' storage from the saved statistics (the
    collective stays in the forward either way)."""

    @staticmethod
    def forward(ctx, x3, t, w, denom, call: _Call):
        with torch.no_grad():
            comb = _forward(x3, t, w, call)
            total = fixed_order_sum(comb.loss.reshape(-1))
            scale = A.reduction_scale(call.reduction, denom, x3.device)
            comb = comb._replace(loss=None)
            ctx.call, ctx.comb, ctx.scale = call, comb, scale
            keep_logits = call.inplace or ctx.needs_input_grad[1]
            ctx.save_for_backward(x3 if keep_logits else None, t, w)
            ctx.grad = None
            if not call.inplace and ctx.needs_input_grad[0]:
                ctx.grad = slice_grad(x3, t, weight_slice(w, call.plan), comb,
                                      scale.expand(comb.lse.shape), call.opts, call.plan,
                                      call.prob)
            ctx.handed_over = False
        return (total * scale).to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x3, t, w = ctx.saved_tensors
        call, comb = ctx.call, ctx.comb
        g = (ctx.scale * grad_loss.double()).expand(comb.lse.shape)
        grad_t = target_grad(x3, t, w, comb, g, call) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return input_grads(ctx, None, grad_t)
        if ctx.handed_over:
            raise RuntimeError("vocab-parallel cross_entropy: a second backward through the "
                               "same graph (retain_graph=True) is not supported")
        ctx.handed_over = True
        if call.inplace:  # the target's gradient above read the logits first
            slice_grad(x3, t, weight_slice(w, call.plan), comb, g, call.opts, call.plan,
                       call.prob, out=x3)
            torch.autograd.graph.increment_version(x3)
            return input_grads(ctx, x3, grad_t)
        grad, ctx.grad = ctx.grad, None
        return input_grads(ctx, grad.mul_(grad_loss.to(grad.dtype)), grad_t)


class _VocabParallelRows(torch.autograd.Function):
    """reduction='none': the gradient formed in backward from the saved statistics (no
    collective)."""

    @staticmethod
    def forward(ctx, x3, t, w, call: _Call):
        with torch.no_grad():
            comb = _forward(x3, t, w, call)
        ctx.save_for_backward(x3, t, w, comb.lse, comb.coef, comb.ref)
        ctx.call = call
        return comb.loss.to(acc_dtype(x3.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        x3, t, w, lse, coef, ref = ctx.saved_tensors
        call, comb = ctx.call, Combined(None, lse, coef, ref)
        g = grad_rows.reshape(-1).double()
        grad_t = target_grad(x3, t, w, comb, g, call) if ctx.needs_input_grad[1] else None
        grad = None
        if ctx.needs_input_grad[0]:
            grad = slice_grad(x3, t, weight_slice(w, call.plan), comb, g, call.opts, call.plan,
                              call.prob)
        return input_grads(ctx, grad, grad_t)


def settle_logits(ex: P.Exchange, plan: P.Plan, input, target, reduction, opts) -> None:
    """Agree on this call's header (the logits path: a payload of Column.COUNT float64 per
    position)."""
    outer, _, inner, _ = A.kernel_layout(input)
    prob = tuple(target.shape) == tuple(input.shape) and target.is_floating_point()
    header = P.make_header(plan, positions=outer * inner,
                           kind=P.TargetKind.PROB if prob else P.TargetKind.INDEX,
                           reduction=reduction, dtype=input.dtype, opts=opts)
    ex.settle(header, P.body_bytes(outer * inner * Column.COUNT, 8))


def vocab_parallel_cross_entropy(input, target, weight, reduction, opts, inplace, plan, ex):
    """``cross_entropy`` on logits whose class dimension is split over ``plan``'s group, after
    the argument checks (on the global shapes) and ``settle_logits``."""
    outer, C_l, inner, spatial = A.kernel_layout(input)
    prob = tuple(target.shape) == tuple(input.shape) and target.is_floating_point()
    out_dtype = input.dtype
    x3 = input.reshape(outer, C_l, inner)
    if prob:
        t = target.to(input.dtype).reshape(outer, C_l, inner)
        opts = opts.without_ignore_index()
    else:
        t = (target.to(torch.int64) if target.dtype == torch.uint8 else target)
        t = t.reshape(outer, inner)
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    grads = torch.is_grad_enabled() and (input.requires_grad or (prob and target.requires_grad))
    call = _Call(reduction, opts, plan, prob, False, ex)
    if reduction == "none":
        if grads:
            rows = _VocabParallelRows.apply(x3, t, w, call)
        else:
            with torch.no_grad():
                rows = _forward(x3, t, w, call).loss.to(acc_dtype(input.dtype))
        shape = (outer,) + spatial if input.dim() >= 2 else ()
        return rows.reshape(shape).to(out_dtype)
    if reduction == "mean":
        denom = (torch.full((), float(outer * inner), dtype=torch.float64, device=input.device)
                 if prob else A.mean_denominator(t, w, opts.ignore_index, plan.classes))
    else:
        denom = None
    if grads:
        inplace = inplace and x3.data_ptr() == input.data_ptr() and x3.is_contiguous()
        return _VocabParallelReduced.apply(x3, t, w, denom, call._replace(inplace=inplace)
                                           ).to(out_dtype)
    with torch.no_grad():
        comb = _forward(x3, t, w, call)
        total = fixed_order_sum(comb.loss.reshape(-1))
        loss = total / denom.double() if reduction == "mean" else total
    return loss.to(out_dtype)


def guarded_call(ex: P.Exchange, plan: P.Plan, local, target, weight, reduction, ignore_index,
                 label_smoothing, z_loss, softcap, inplace_backward, fn, prepare):
    """The vocab-parallel loss of the local logits ``local`` with every check inside the
    fail-together guard: ``prepare(target, weight)`` (the entry point's own checks, returning the
    target and weight to use and the global logits' shape), torch's argument checks on the global
    shapes, then the header agreement."""
    try:
        P.unsupported_transforms(fn)
        target, weight, global_shape = prepare(target, weight)
        meta = torch.empty(global_shape, dtype=local.dtype, device="meta")
        P.check_global_args(meta, local.shape, target, weight, reduction, ignore_index,
                            label_smoothing, z_loss, softcap, fn)
        opts = A.ce_options(ignore_index, label_smoothing, z_loss, softcap, fn)
    except Exception as error:  # noqa: BLE001 (re-raised once every rank knows)
        ex.fail(error)
    settle_logits(ex, plan, local, target, reduction, opts)
    inplace = bool(inplace_backward) and A.inplace_allowed(local)
    return vocab_parallel_cross_entropy(local, target, weight, reduction, opts, inplace, plan, ex)


def cross_entropy_over_group(input, target, weight, reduction, ignore_index, label_smoothing,
                             z_loss, softcap, inplace_backward, process_group, fn):
    """``cross_entropy(..., process_group=group)``: ``input`` is this rank's slice of the class
    dimension (slices of one size, in rank order)."""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    plan = P.equal_plan(process_group, A.classes(input) if input.dim() > 0 else 0)

    def prepare(target, weight):
        if input.dim() == 0:
            raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the "
                               "class dimension), got a 0-dim tensor")
        shape = list(input.shape)
        shape[1 if input.dim() >= 2 else 0] = plan.classes
        return target, weight, shape

    return guarded_call(P.Exchange(plan, fn, input.device), plan, input, target, weight,
                        reduction, ignore_index, label_smoothing, z_loss, softcap,
                        inplace_backward, fn, prepare)
