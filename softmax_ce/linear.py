"""Fused linear + cross-entropy: ``cross_entropy(linear(input, W, b), target)`` without the logits
ever existing whole (a drop-in for torch's ``F.linear_cross_entropy``, plus z-loss, soft-capping
and a chunk size).

The rows go a chunk at a time. One GEMM writes the chunk's logits into a reused buffer; the
cross-entropy kernels form the rows' losses and lse and, where gradients are wanted for a ``mean``
or ``sum`` loss, overwrite the buffer with the logits' gradient G for a unit upstream gradient;
then ``grad_input[chunk] = G @ W``, ``grad_weight += Gᵀ @ input[chunk]``, ``grad_bias += Σ G``.
Three GEMMs in all, no recomputation; backward hands the gradients over, scaled in place by the
upstream gradient (a device multiply, no host synchronisation). ``reduction='none'`` saves the
rows' lse and runs the chunk loop in backward with the per-position upstream gradient folded in;
a second backward (``retain_graph=True``) of a ``mean`` / ``sum`` loss recomputes the same way.

Where the chunked path does not apply the composite ``cross_entropy(F.linear(...))`` runs (the
whole logits, differentiable by everything): a differentiable backward (``create_graph=True``),
``torch.func`` transforms, forward-mode AD, autocast, K-dimensional ``out_features``, and targets
or class weights that require grad.

Memory beyond inputs, weight and their gradients: the chunk's logits (``chunk x C``), and for
bfloat16 / float16 a float32 ``grad_weight`` accumulator (the default; ``options.acc_dtype`` or
``grad_weight_acc_dtype`` may name the input's dtype) plus the chunk's float32 copies for its
GEMM. The default chunk keeps that working memory under 1/11 of what the whole logits would take.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .fixed_sum import fixed_order_sum
from .functional import (
    CeOptions,
    _check_device,
    _check_extensions,
    _cross_entropy,
    _index,
    _mean_denominator,
    _reduction,
    _tracks_grad,
)
from .reference import acc_dtype

__all__ = ["linear_cross_entropy", "default_chunk_size"]

_WORK_FRACTION = 11  # the default chunk's working memory: at most 1/11 of the whole logits
_MIN_CHUNK = 32
_MIN_BUDGET = 16 << 20  # small problems: one chunk of up to 16 MiB (tiny GEMMs are slow)


def default_chunk_size(rows: int, classes: int, in_features: int, dtype: torch.dtype,
                       acc: torch.dtype) -> int:
    """Rows per chunk: the largest number whose working memory (the chunk's logits, plus the
    float32 copies of logits and inputs when ``grad_weight`` accumulates in a wider dtype) stays
    under 1/11 of what the whole logits would take (GEMMs of fewer rows run slower: 256 rows
    instead of 372 cost ~8% at (4096, 1024, 32000) float32 on 2 cores), or under 16 MiB for
    small problems; at least 32 rows (or all of them)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_row = classes * size
    if acc != dtype:
        per_row += (classes + in_features) * torch.empty((), dtype=acc).element_size()
    budget = max(rows * classes * size // _WORK_FRACTION, _MIN_BUDGET)
    chunk = budget // max(per_row, 1)
    return int(max(1, min(rows, max(chunk, _MIN_CHUNK))))


# ---------------------------------------------------------------------------------------------
# the chunk loop (one function for the forward and the backward)
# ---------------------------------------------------------------------------------------------


def _chunk_loop(x, lin_w, lin_b, target, weight, opts, chunk, acc, grad_rows, lse_in,
                need_x, need_w, need_b, rows_out=None, lse_out=None):
    """Runs the chunks. ``rows_out`` / ``lse_out`` (given in the forward) receive each row's loss
    and lse. The gradients are formed where a flag asks: for the upstream gradient ``grad_rows``
    (per row, or a broadcast 0-dim), from ``lse_in`` when given (backward) or from the lse just
    computed. Returns (grad_input, grad_weight, grad_bias), empty where not asked."""
    N, H = x.shape
    C = lin_w.shape[0]
    prob = target.is_floating_point()
    grads = need_x or need_w or need_b
    buf = x.new_empty((min(chunk, N), C))
    gi = x.new_empty((N, H)) if need_x else x.new_empty((0,))
    gw_acc = torch.zeros((C, H), dtype=acc, device=x.device) if need_w else None
    gb_acc = torch.zeros((C,), dtype=acc_dtype(x.dtype), device=x.device) if need_b else None
    wt = lin_w.t()
    for i in range(0, N, chunk):
        j = min(N, i + chunk)
        r = j - i
        logits = buf[:r]
        if lin_b is not None:
            torch.addmm(lin_b, x[i:j], wt, out=logits)
        else:
            torch.mm(x[i:j], wt, out=logits)
        logits3 = logits.view(r, C, 1)
        t = target[i:j].view(r, C, 1) if prob else target[i:j].view(r, 1)
        if lse_in is None:
            if prob:
                loss, lse = ops.ce_prob_fwd(logits3, t, weight, *opts.for_probabilities())
            else:
                loss, lse = ops.ce_fwd(logits3, t, weight, *opts)
            rows_out[i:j] = loss.view(r)
            lse_out[i:j] = lse.view(r)
        else:
            lse = lse_in[i:j].view(r, 1)
        if not grads:
            continue
        g = grad_rows.expand(N)[i:j].view(r, 1)
        if prob:
            ops.ce_prob_bwd_(g, logits3, t, weight, lse, *opts.for_probabilities())
        else:
            ops.ce_bwd_(g, logits3, t, weight, lse, *opts)
        # `logits` now holds the gradient G of the chunk's logits
        if need_x:
            torch.mm(logits, lin_w, out=gi[i:j])
        if need_w:
            if acc == logits.dtype:
                gw_acc.addmm_(logits.t(), x[i:j])
            else:
                gw_acc.addmm_(logits.t().to(acc), x[i:j].to(acc))
        if need_b:
            gb_acc.add_(logits.sum(0, dtype=gb_acc.dtype))
    gw = gw_acc.to(lin_w.dtype) if need_w else x.new_empty((0,))
    gb = gb_acc.to(lin_b.dtype) if need_b else x.new_empty((0,))
    return gi, gw, gb


def _opts(ignore_index, label_smoothing, z_loss, softcap):
    return CeOptions(ignore_index, label_smoothing, z_loss, softcap)


def _acc(x, fp32):
    return torch.float32 if fp32 and x.dtype in (torch.bfloat16, torch.float16) else x.dtype


# ---------------------------------------------------------------------------------------------
# custom ops: torch.compile and torch.export see one node per call
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("softmax_ce::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(x: Tensor, lin_w: Tensor, lin_b: Optional[Tensor], target: Tensor,
                   weight: Optional[Tensor], grad_scale: Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float, chunk: int,
                   acc_fp32: bool, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses [N] (accumulation dtype), lse [N] (float64), and the gradients of
    sum(grad_scale * loss) with respect to x, lin_w, lin_b where asked (else empty)."""
    N = x.shape[0]
    rows = x.new_empty((N,), dtype=acc_dtype(x.dtype))
    lse = x.new_empty((N,), dtype=torch.float64)
    opts = _opts(ignore_index, label_smoothing, z_loss, softcap)
    gi, gw, gb = _chunk_loop(x, lin_w, lin_b, target, weight, opts, chunk, _acc(x, acc_fp32),
                             grad_scale, None, need_x, need_w, need_b, rows, lse)
    return rows, lse, gi, gw, gb


@_linear_ce_fwd.register_fake
def _linear_ce_fwd_fake(x, lin_w, lin_b, target, weight, grad_scale, ignore_index,
                        label_smoothing, z_loss, softcap, chunk, acc_fp32, need_x, need_w,
                        need_b):
    N = x.shape[0]
    rows = x.new_empty((N,), dtype=acc_dtype(x.dtype))
    lse = x.new_empty((N,), dtype=torch.float64)
    return (rows, lse, x.new_empty(x.shape if need_x else (0,)),
            lin_w.new_empty(lin_w.shape if need_w else (0,)),
            x.new_empty(lin_b.shape if need_b and lin_b is not None else (0,)))


@torch.library.custom_op("softmax_ce::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd(x: Tensor, lin_w: Tensor, lin_b: Optional[Tensor], target: Tensor,
                   weight: Optional[Tensor], lse: Tensor, grad_rows: Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float, chunk: int,
                   acc_fp32: bool, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of sum(grad_rows * loss) (grad_rows [N] or 0-dim, accumulation dtype) from
    the saved lse, the logits recomputed a chunk at a time."""
    opts = _opts(ignore_index, label_smoothing, z_loss, softcap)
    return _chunk_loop(x, lin_w, lin_b, target, weight, opts, chunk, _acc(x, acc_fp32),
                       grad_rows, lse, need_x, need_w, need_b)


@_linear_ce_bwd.register_fake
def _linear_ce_bwd_fake(x, lin_w, lin_b, target, weight, lse, grad_rows, ignore_index,
                        label_smoothing, z_loss, softcap, chunk, acc_fp32, need_x, need_w,
                        need_b):
    return (x.new_empty(x.shape if need_x else (0,)),
            lin_w.new_empty(lin_w.shape if need_w else (0,)),
            x.new_empty(lin_b.shape if need_b and lin_b is not None else (0,)))


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def _composite_grads(ctx, grad_out, x, lin_w, lin_b, target, weight, denom):
    """A differentiable backward (create_graph=True): the composite's gradients."""
    inputs = [t for t, need in zip((x, lin_w, lin_b), ctx.needs_input_grad[:3]) if need]
    with torch.enable_grad():
        loss = _composite(x, lin_w, lin_b, target, weight, ctx.reduction, ctx.opts)
    got = iter(torch.autograd.grad(loss, inputs, grad_out, create_graph=True))
    return [next(got) if need else None for need in ctx.needs_input_grad[:3]]


def _none_if_empty(grads, needs):
    return [g if need else None for g, need in zip(grads, needs)]


class _LinearCrossEntropyReduced(torch.autograd.Function):
    """The ``mean`` / ``sum`` loss with its gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, target, weight, denom, reduction, opts, chunk, acc_fp32):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and lin_b is not None
        acc = acc_dtype(x.dtype)
        if reduction == "mean":
            scale = torch.reciprocal(denom.to(acc))
        else:
            scale = torch.ones((), dtype=acc, device=x.device)
        rows, lse, gi, gw, gb = _linear_ce_fwd(x, lin_w, lin_b, target, weight, scale, *opts,
                                               chunk, acc_fp32, need_x, need_w, need_b)
        ctx.save_for_backward(x, lin_w, lin_b, target, weight, denom, scale, lse, gi, gw, gb)
        ctx.reduction, ctx.opts, ctx.chunk, ctx.acc_fp32 = reduction, opts, chunk, acc_fp32
        ctx.handed_over = False
        ctx.compiled = torch.compiler.is_compiling()
        return _reduce(rows, denom, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        x, lin_w, lin_b, target, weight, denom, scale, lse, gi, gw, gb = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        tail = [None] * 7
        if torch.is_grad_enabled():
            return (*_composite_grads(ctx, grad_out, x, lin_w, lin_b, target, weight, denom),
                    *tail)
        if ctx.compiled:  # a traced backward runs as often as it is called: nothing in place
            grads = [g * grad_out for g in (gi, gw, gb)]
            return (*_none_if_empty(grads, (needs[0], needs[1], needs[2] and lin_b is not None)),
                    *tail)
        if not ctx.handed_over:
            ctx.handed_over = True
            # scaled in their buffers and handed over; a later backward recomputes, so the
            # saved tensors keep their version
            for g, need in zip((gi, gw, gb), needs):
                if need and g.numel() > 0:
                    with torch.autograd._unsafe_preserve_version_counter(g):
                        g.mul_(grad_out)
            grads = (gi, gw, gb)
            return (*_none_if_empty(grads, (needs[0], needs[1], needs[2] and lin_b is not None)),
                    *tail)
        g_rows = scale * grad_out
        grads = _linear_ce_bwd(x, lin_w, lin_b, target, weight, lse, g_rows, *ctx.opts,
                               ctx.chunk, ctx.acc_fp32, needs[0], needs[1],
                               needs[2] and lin_b is not None)
        return (*_none_if_empty(grads, needs), *tail)


class _LinearCrossEntropyRows(torch.autograd.Function):
    """The per-row loss (``reduction='none'``); backward runs the chunk loop once more with the
    per-row upstream gradient."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, target, weight, opts, chunk, acc_fp32):
        scale = torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device)
        rows, lse, _, _, _ = _linear_ce_fwd(x, lin_w, lin_b, target, weight, scale, *opts, chunk,
                                            acc_fp32, False, False, False)
        ctx.save_for_backward(x, lin_w, lin_b, target, weight, lse)
        ctx.reduction, ctx.opts, ctx.chunk, ctx.acc_fp32 = "none", opts, chunk, acc_fp32
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        x, lin_w, lin_b, target, weight, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        tail = [None] * 5
        if torch.is_grad_enabled():
            return (*_composite_grads(ctx, grad_rows, x, lin_w, lin_b, target, weight, None),
                    *tail)
        g = grad_rows.to(acc_dtype(x.dtype)).contiguous()
        grads = _linear_ce_bwd(x, lin_w, lin_b, target, weight, lse, g, *ctx.opts, ctx.chunk,
                               ctx.acc_fp32, needs[0], needs[1], needs[2] and lin_b is not None)
        return (*_none_if_empty(grads, needs), *tail)


# ---------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------


def _composite(x, lin_w, lin_b, target, weight, reduction, opts):
    H = lin_w.shape[-1]
    logits = F.linear(x, lin_w.reshape(-1, H), None if lin_b is None else lin_b.reshape(-1))
    if lin_w.dim() > 2:  # K-dim out_features: (N, C * d_1 * ... * d_K) -> (N, C, d_1, ..., d_K)
        logits = logits.reshape(*x.shape[:-1], *lin_w.shape[:-1])
    return _cross_entropy(logits, target, weight, reduction, opts.ignore_index,
                          opts.label_smoothing, opts.z_loss, opts.softcap or None, False,
                          "linear_cross_entropy")


def _check_shapes(input, linear_weight, linear_bias, fn):
    """torch's own checks and messages (RuntimeError)."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"{fn}: expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"{fn}: expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            f"{fn}: expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    C = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (C, *out_features):
        raise RuntimeError(f"{fn}: expected linear_bias shape {(C, *out_features)}, got "
                           f"{tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"{fn}: K-dimensional loss defined by linear_weight shape "
            f"{tuple(linear_weight.shape)} requires batched input, (N, {input.shape[-1]}), got "
            f"unbatched input with shape {tuple(input.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{fn}: expected '{name}' to have the dtype of 'input' "
                               f"({input.dtype}), got {t.dtype}")
    return out_features


def _chunk_option(options, chunk_size, fn):
    from_options = getattr(options, "batch_chunk_size", None) if options is not None else None
    if chunk_size is not None and from_options is not None and chunk_size != from_options:
        raise ValueError(f"{fn}: chunk_size={chunk_size} and options.batch_chunk_size="
                         f"{from_options} disagree")
    chunk = chunk_size if chunk_size is not None else from_options
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk!r}")
    return chunk


def _acc_option(options, grad_weight_acc_dtype, dtype, fn):
    acc = grad_weight_acc_dtype
    if acc is None and options is not None:
        acc = getattr(options, "acc_dtype", None)
    if acc is None:
        return True
    if acc not in (torch.float32, dtype):
        raise ValueError(f"{fn}: grad_weight_acc_dtype must be torch.float32 or the input's "
                         f"dtype ({dtype}), got {acc}")
    return acc == torch.float32


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    grad_weight_acc_dtype: Optional[torch.dtype] = None,
    process_group=None,
) -> Tensor:
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` with the logits
    computed a chunk of rows at a time, never whole; torch 2.13's ``F.linear_cross_entropy``
    signature and semantics (``ignore_index=None`` means -100 for class indices).

    input ``(N, H)`` or ``(H,)``; linear_weight ``(C, H)`` (or ``(C, d_1, ..., d_K, H)``: the
    composite runs); target class indices ``(N,)`` / ``()`` (int64 or int32) or probabilities
    ``(N, C)`` / ``(C,)``. ``options`` (torch's ``LinearCrossEntropyOptions``): its
    ``batch_chunk_size`` and ``acc_dtype`` are honoured, the rest accepted.

    Keyword-only extensions: ``z_loss``, ``softcap`` (as in ``cross_entropy``); ``chunk_size``
    (rows per chunk; default: ``default_chunk_size``); ``grad_weight_acc_dtype`` (float32, the
    default for half inputs, or the input's dtype). Results do not depend on the chunk size
    beyond rounding.

    ``process_group`` (vocab-parallel): ``linear_weight`` (and ``linear_bias``) hold this rank's
    slice of the vocabulary rows, ``[r * C_local, (r + 1) * C_local)`` on rank r, slices of one
    size; ``input``, ``target`` (global class indices, or probabilities sliced like the local
    logits) and ``weight`` (all classes) are the same on every rank. The logits are never whole
    on any rank. The input's gradient is the full one, already summed over the group inside
    this function (do not all-reduce it again); the weight's and bias's are this rank's slice.
    Collectives: one all-gather of a few floats per row and one all-reduce of the input's
    gradient, both in the forward for a ``mean`` / ``sum`` loss (``softmax_ce.distributed``).
    """
    if process_group is not None:
        from .distributed import linear_cross_entropy_over_group

        fn = "linear_cross_entropy"
        reduction = _reduction(None, None, reduction)
        _check_shapes(input, linear_weight, linear_bias, fn)
        if options is not None or grad_weight_acc_dtype is not None:
            raise NotImplementedError(f"{fn}: options and grad_weight_acc_dtype are not "
                                      "supported with a process group")
        ignore = -100 if ignore_index is None else _index(ignore_index, "ignore_index", fn)
        cap = _check_extensions(label_smoothing, z_loss, softcap, fn)
        opts = CeOptions(ignore, float(label_smoothing), float(z_loss), cap)
        return linear_cross_entropy_over_group(
            input, linear_weight, target, linear_bias, weight, reduction, opts,
            _chunk_option(None, chunk_size, fn), process_group, fn)
    loss = _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, options, z_loss, softcap,
                                 chunk_size, grad_weight_acc_dtype)
    return loss.to(input.dtype)


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                          ignore_index, label_smoothing, options, z_loss, softcap, chunk_size,
                          grad_weight_acc_dtype) -> Tensor:
    """linear_cross_entropy with the loss in its accumulation dtype (float32 for half inputs,
    before the public function rounds it to the input's dtype)."""
    fn = "linear_cross_entropy"
    reduction = _reduction(None, None, reduction)
    out_features = _check_shapes(input, linear_weight, linear_bias, fn)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias),
                    ("target", target), ("weight", weight)):
        _check_device(t, name, input, fn)
    C = linear_weight.shape[0]
    batched = input.dim() == 2
    logits_shape = (*input.shape[:-1], C, *out_features)
    prob = tuple(target.shape) == logits_shape
    if prob and ignore_index is not None:
        raise RuntimeError(f"{fn}: ignore_index cannot be specified when target contains "
                           "probabilities")
    ignore = -100 if ignore_index is None else _index(ignore_index, "ignore_index", fn)
    cap = _check_extensions(label_smoothing, z_loss, softcap, fn)
    opts = CeOptions(ignore, float(label_smoothing), float(z_loss), cap)
    chunk = _chunk_option(options, chunk_size, fn)
    acc_fp32 = _acc_option(options, grad_weight_acc_dtype, input.dtype, fn)
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(input.device.type):
        # every argument check of cross_entropy, on logits that take no memory (under autocast
        # the composite runs, and checks)
        meta = torch.empty(logits_shape, dtype=input.dtype, device="meta")
        _composite_checks(meta, target, weight, reduction, opts, fn)
    if _needs_composite(input, linear_weight, linear_bias, target, weight, out_features):
        return _composite(input, linear_weight, linear_bias, target, weight, reduction, opts)
    x = input if batched else input.unsqueeze(0)
    t = target if batched else target.unsqueeze(0)
    if not prob and t.dtype == torch.uint8:
        t = t.to(torch.int32)
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    N, H = x.shape
    if chunk is None:
        chunk = default_chunk_size(N, C, H, x.dtype, _acc(x, acc_fp32))
    chunk = max(1, min(chunk, max(N, 1)))
    x = x.contiguous()
    lin_w = linear_weight.contiguous()
    t = t.contiguous()
    grads = _tracks_grad(x, lin_w, linear_bias)
    if reduction == "none":
        if grads:
            rows = _LinearCrossEntropyRows.apply(x, lin_w, linear_bias, t, w, opts, chunk,
                                                 acc_fp32)
        else:
            rows = _losses_alone(x, lin_w, linear_bias, t, w, opts, chunk, acc_fp32)
        return rows if batched else rows.reshape(())
    if reduction == "mean":  # torch's denominators: positions (probabilities), sum of w[y] kept
        denom = (torch.full((), float(N), dtype=acc_dtype(x.dtype), device=x.device) if prob
                 else _mean_denominator(t.view(N, 1), w, ignore, C))
    else:
        denom = torch.ones((), device=x.device)
    if grads:
        loss = _LinearCrossEntropyReduced.apply(x, lin_w, linear_bias, t, w, denom, reduction,
                                                opts, chunk, acc_fp32)
    else:
        loss = _reduce(_losses_alone(x, lin_w, linear_bias, t, w, opts, chunk, acc_fp32),
                       denom, reduction)
    return loss


def _losses_alone(x, lin_w, lin_b, target, weight, opts, chunk, acc_fp32):
    """The per-row losses with no gradient work (autograd records nothing)."""
    scale = torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device)
    return _linear_ce_fwd(x, lin_w, lin_b, target, weight, scale, *opts, chunk, acc_fp32, False,
                          False, False)[0]


def _reduce(rows, denom, reduction):
    total = fixed_order_sum(rows)
    return total / denom if reduction == "mean" else total


def _composite_checks(meta, target, weight, reduction, opts, fn):
    """cross_entropy's argument checks and errors, run on meta tensors."""
    t = target.detach().to("meta")
    w = weight.detach().to("meta") if weight is not None else None
    _cross_entropy(meta, t, w, reduction, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                   opts.softcap or None, False, fn)


def _needs_composite(input, linear_weight, linear_bias, target, weight, out_features) -> bool:
    if out_features or ops.functorch_active() or torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.is_autocast_enabled(input.device.type):
        return True
    if target.requires_grad or (weight is not None and weight.requires_grad):
        return True
    if input.numel() == 0 or linear_weight.shape[0] == 0:
        return True
    return False

