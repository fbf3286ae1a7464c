"""``linear_cross_entropy(..., process_group=group)``: the fused linear head over vocabulary
slices. Each rank holds a slice of the head's rows; the statistics pass runs a chunk of rows at a
time from ``input @ linear_weightᵀ`` (the logits never whole on any rank, ``chunk_logits``), then
the one all-gather, then a second pass over the chunks (the GEMM recomputed) forms the gradients.
The input's gradient, a partial sum on each rank, is summed over the group by an all-reduce inside
the Function (the only other collective)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _args as A
from .._linear_core import chunk_logits, default_chunk_size
from ..autograd import input_grads
from ..fixed_sum import fixed_order_sum
from ..reference import acc_dtype, capped
from . import protocol as P
from .slices import Column, Combined, combine, index_payload, prob_payload, slice_grad, weight_slice

__all__ = ["linear_cross_entropy_over_group"]


def _forward(x, lin_w, lin_b, t, w, opts, plan, prob, chunk, fn) -> Combined:
    """The statistics pass over chunks, the one all-gather, the combination."""
    w_slice = weight_slice(w, plan)
    N = x.shape[0]
    payload = torch.empty((N, Column.COUNT), dtype=torch.float64, device=x.device)
    bad = torch.zeros(N, dtype=torch.bool, device=x.device) if not prob else None
    for s, e, logits in chunk_logits(x, lin_w, lin_b, chunk):
        xa = capped(logits.unsqueeze(-1), opts.softcap)
        if prob:
            payload[s:e] = prob_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)
        else:
            rows, bad_rows = index_payload(xa, t[s:e].unsqueeze(-1), w_slice, opts, plan)
            payload[s:e] = rows
            bad[s:e] = bad_rows.squeeze(-1)
    kind = P.TargetKind.PROB if prob else P.TargetKind.INDEX
    header = P.make_header(plan, N, kind, opts, bad, t, x.device)
    data = P.exchange(payload, header, plan, fn)
    return combine(data, None if prob else t != opts.ignore_index, opts, plan)


def _grads(x, lin_w, lin_b, t, w, comb, g, opts, plan, prob, chunk, needs):
    """The gradient pass (the GEMM recomputed per chunk): grad_input summed over the group (an
    all-reduce), grad_weight / grad_bias of this rank's slice."""
    w_slice = weight_slice(w, plan)
    acc = acc_dtype(x.dtype)
    gx = torch.zeros_like(x, dtype=acc) if needs[0] else None
    gw = torch.zeros_like(lin_w, dtype=acc) if needs[1] else None
    gb = torch.zeros(plan.size, dtype=acc, device=x.device) if needs[2] else None
    lin_w_acc = lin_w.to(acc) if gx is not None else None  # once, not per chunk
    for s, e, logits in chunk_logits(x, lin_w, lin_b, chunk):
        tt = t[s:e].unsqueeze(-1)
        G = slice_grad(logits.unsqueeze(-1), tt, w_slice, comb.rows(s, e), g[s:e], opts, plan,
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
            comb = _forward(x, lin_w, lin_b, t, w, opts, plan, prob, chunk, fn)
            ctx.reduction = reduction
            if reduction == "none":
                ctx.save_for_backward(x, lin_w, lin_b, t, w, comb.lse, comb.coef, comb.ref)
                ctx.args = (opts, plan, prob, chunk, needs)
                return comb.loss.to(acc_dtype(x.dtype))
            total = fixed_order_sum(comb.loss)
            scale = (1.0 / denom.double() if reduction == "mean"
                     else torch.ones((), dtype=torch.float64, device=x.device))
            ctx.grads = _grads(x, lin_w, lin_b, t, w, comb, scale.expand(comb.lse.shape), opts,
                               plan, prob, chunk, needs)
        return (total * scale).to(acc_dtype(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            x, lin_w, lin_b, t, w, lse, coef, ref = ctx.saved_tensors
            opts, plan, prob, chunk, needs = ctx.args
            comb = Combined(None, lse, coef, ref)
            return input_grads(ctx, *_grads(x, lin_w, lin_b, t, w, comb, grad_out.double(), opts,
                                            plan, prob, chunk, needs))
        grads = ctx.grads
        ctx.grads = None
        if grads is None:
            raise RuntimeError("vocab-parallel linear_cross_entropy: a second backward through "
                               "the same graph (retain_graph=True) is not supported")
        return input_grads(ctx, *(gr.mul_(grad_out.to(gr.dtype)) if gr is not None else None
                                  for gr in grads))


def linear_cross_entropy_over_group(input, linear_weight, target, linear_bias, weight,
                                    reduction, opts, chunk, process_group, fn):
    """``linear_cross_entropy(..., process_group=group)``: ``linear_weight`` / ``linear_bias`` are
    this rank's slice of the vocabulary rows (slices of one size, in rank order); ``input`` and
    ``target`` are replicated. Called by ``linear.linear_cross_entropy`` after its checks."""
    P.unsupported_transforms(fn)
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    plan = P.equal_plan(process_group, linear_weight.shape[0])
    try:
        if linear_weight.dim() != 2:
            raise NotImplementedError(f"{fn}: K-dimensional out_features are not supported with "
                                      "a process group")
        shape = (*input.shape[:-1], plan.classes)
        meta = torch.empty(shape, dtype=input.dtype, device="meta")
        P.check_global_args(meta, (*input.shape[:-1], plan.size), target, weight, reduction,
                            opts.ignore_index, opts.label_smoothing, opts.z_loss,
                            opts.softcap or None, fn)
    except Exception as error:  # noqa: BLE001 (re-raised once every rank knows)
        positions = input.shape[0] if input.dim() == 2 else 1
        P.fail_together(input.device, plan, fn, error, positions, Column.COUNT)
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
        chunk = default_chunk_size(N, plan.size, x.shape[1], x.dtype, acc_dtype(x.dtype))
    if reduction == "mean":
        denom = (torch.full((), float(N), dtype=torch.float64, device=x.device) if prob
                 else A.mean_denominator(t.view(N, 1), w, opts.ignore_index, plan.classes))
    else:
        denom = None
    grads = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (x, linear_weight, linear_bias))
    if grads:
        loss = _LinearVocabParallel.apply(x.contiguous(), linear_weight, linear_bias, t, w, denom,
                                          reduction, opts, plan, prob, chunk, fn)
    else:
        comb = _forward(x, linear_weight, linear_bias, t, w, opts, plan, prob, chunk, fn)
        loss = comb.loss.to(acc_dtype(x.dtype))
        if reduction != "none":
            total = fixed_order_sum(loss)
            loss = total / denom if reduction == "mean" else total
    if reduction == "none" and not batched:
        loss = loss.reshape(())
    return loss.to(input.dtype)
