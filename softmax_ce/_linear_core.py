"""The fused linear + cross-entropy's machinery: chunk sizing, the chunk iterator, the forward and
backward passes over it, their custom ops and autograd Functions (``linear.py`` holds the public
function; ``distributed.linear_head`` reuses the chunk iterator and sizing).

The rows go a chunk at a time (``chunk_logits``): one GEMM writes the chunk's logits into a reused
buffer; the cross-entropy kernels form the rows' losses and lse and, where gradients are wanted
for a ``mean`` or ``sum`` loss, overwrite the buffer with the logits' gradient G for a unit
upstream gradient; then ``grad_input[chunk] = G @ W``, ``grad_weight += Gᵀ @ input[chunk]``,
``grad_bias += Σ G`` (``GradSums``). Three GEMMs in all, no recomputation; backward hands the
gradients over, scaled in place by the upstream gradient (a device multiply, no host
synchronisation). ``reduction='none'`` saves the rows' lse and runs ``backward_chunks`` in
backward with the per-position upstream gradient folded in; a second backward
(``retain_graph=True``) of a ``mean`` / ``sum`` loss recomputes the same way.

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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args as A
from . import _core, ops
from .autograd import input_grads
from ._chunks import ChunkSpec, GradSums, Needs, chunk_logits, default_chunk_size
from ._vocab_chunks import check_vocab_chunk, vocab_chunked
from .fixed_sum import fixed_order_sum
from .reference import acc_dtype

__all__ = ["default_chunk_size", "linear_cross_entropy_acc", "check_shapes", "chunk_option"]

# ---------------------------------------------------------------------------------------------
# the two passes over the chunks (_chunks.chunk_logits)
# ---------------------------------------------------------------------------------------------


def _views(logits: Tensor, target: Tensor, i: int, j: int):
    """The chunk's logits and target in the kernels' layout ``[r, C, 1]`` / ``[r, 1]``."""
    r, C = logits.shape
    t = target[i:j]
    return logits.view(r, C, 1), (t.view(r, C, 1) if t.is_floating_point() else t.view(r, 1))


def _gradient_in_place(logits3, t, weight, lse, g, opts: A.CeOptions) -> None:
    """The chunk's logits become their gradient for the per-row upstream gradient ``g``."""
    if t.is_floating_point():
        ops.ce_prob_bwd_(g, logits3, t, weight, lse, *opts.for_probabilities())
    else:
        ops.ce_bwd_(g, logits3, t, weight, lse, *opts)


_COMPACT_FROM = 8  # compact when at least 1/8 of the rows are ignored (a gather and a scatter)


def _kept_rows(x, lin_w, lin_b, target, opts: A.CeOptions) -> Optional[Tensor]:
    """The rows whose target is not ignore_index, when enough rows are ignored to be worth
    skipping (CPU only: reading the targets costs nothing there; on CUDA it would synchronise).
    None where every row runs: no compaction, or a non-finite value that would spread NaN from
    an ignored row (an ignored row's hidden state, or the head), as torch's gradient does."""
    if x.device.type != "cpu" or target.is_floating_point() or x.shape[0] == 0:
        return None
    ignored = target == opts.ignore_index
    n_ignored = int(ignored.sum())
    if n_ignored * _COMPACT_FROM < x.shape[0]:
        return None
    if not (torch.isfinite(x[ignored]).all() and torch.isfinite(lin_w).all()
            and (lin_b is None or torch.isfinite(lin_b).all())):
        return None
    return (~ignored).nonzero().squeeze(1)


def forward_chunks(x, lin_w, lin_b, target, weight, opts: A.CeOptions, spec: ChunkSpec,
                   grad_scale: Tensor, needs: Needs):
    """Per-row losses [N] (accumulation dtype) and lse [N] (float64), and the gradients of
    ``sum(grad_scale * loss)`` that ``needs`` asks for (``grad_scale`` per row or a 0-dim
    broadcast): (rows, lse, grad_input, grad_weight, grad_bias), empty where not asked. Rows
    whose target is ignored take no GEMM work on the CPU (``_kept_rows``): their loss is 0, their
    gradient 0 and their lse not computed (0)."""
    kept = _kept_rows(x, lin_w, lin_b, target, opts)
    if kept is not None:
        N = x.shape[0]
        scale = grad_scale if grad_scale.dim() == 0 else grad_scale[kept]
        rows_k, lse_k, gi_k, gw, gb = forward_chunks(x[kept], lin_w, lin_b, target[kept], weight,
                                                     opts, spec, scale, needs._replace())
        rows = rows_k.new_zeros(N).index_copy_(0, kept, rows_k)
        lse = lse_k.new_zeros(N).index_copy_(0, kept, lse_k)
        gi = x.new_zeros(x.shape).index_copy_(0, kept, gi_k) if needs.input else gi_k
        return rows, lse, gi, gw, gb
    N = x.shape[0]
    rows = x.new_empty((N,), dtype=acc_dtype(x.dtype))
    lse_all = x.new_empty((N,), dtype=torch.float64)
    sums = GradSums(x, lin_w, lin_b, needs, spec.acc(x.dtype))
    for i, j, logits in chunk_logits(x, lin_w, lin_b, spec.rows):
        logits3, t = _views(logits, target, i, j)
        if t.is_floating_point():
            loss, lse = ops.ce_prob_fwd(logits3, t, weight, *opts.for_probabilities())
        else:
            loss, lse = ops.ce_fwd(logits3, t, weight, *opts)
        rows[i:j] = loss.view(-1)
        lse_all[i:j] = lse.view(-1)
        if needs.any():
            g = grad_scale.expand(N)[i:j].view(-1, 1)
            _gradient_in_place(logits3, t, weight, lse, g, opts)
            sums.add(i, j, logits)
    return (rows, lse_all, *sums.result())


def backward_chunks(x, lin_w, lin_b, target, weight, opts: A.CeOptions, spec: ChunkSpec,
                    lse: Tensor, grad_rows: Tensor, needs: Needs):
    """The gradients of ``sum(grad_rows * loss)`` (``grad_rows`` [N] or 0-dim, accumulation
    dtype) from the saved lse, the logits recomputed a chunk at a time: (grad_input,
    grad_weight, grad_bias), empty where not asked. Ignored rows are skipped as in the
    forward."""
    kept = _kept_rows(x, lin_w, lin_b, target, opts)
    if kept is not None:
        g = grad_rows if grad_rows.dim() == 0 else grad_rows[kept]
        gi_k, gw, gb = backward_chunks(x[kept], lin_w, lin_b, target[kept], weight, opts, spec,
                                       lse[kept], g, needs)
        gi = x.new_zeros(x.shape).index_copy_(0, kept, gi_k) if needs.input else gi_k
        return gi, gw, gb
    N = x.shape[0]
    sums = GradSums(x, lin_w, lin_b, needs, spec.acc(x.dtype))
    for i, j, logits in chunk_logits(x, lin_w, lin_b, spec.rows):
        logits3, t = _views(logits, target, i, j)
        g = grad_rows.expand(N)[i:j].view(-1, 1)
        _gradient_in_place(logits3, t, weight, lse[i:j].view(-1, 1), g, opts)
        sums.add(i, j, logits)
    return sums.result()


# ---------------------------------------------------------------------------------------------
# custom ops: torch.compile and torch.export see one node per call; the options keyword-only
# ---------------------------------------------------------------------------------------------


def _op_options(opts: A.CeOptions, spec: ChunkSpec, needs: Needs) -> dict:
    return dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                z_loss=opts.z_loss, softcap=opts.softcap, chunk=spec.rows,
                acc_fp32=spec.acc_fp32, grad_input=needs.input, grad_weight=needs.weight,
                grad_bias=needs.bias)


@torch.library.custom_op("softmax_ce::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(x: Tensor, lin_w: Tensor, lin_b: Optional[Tensor], target: Tensor,
                   weight: Optional[Tensor], grad_scale: Tensor, *, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float, chunk: int,
                   acc_fp32: bool, grad_input: bool, grad_weight: bool,
                   grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """forward_chunks as one op."""
    return forward_chunks(x, lin_w, lin_b, target, weight,
                          A.CeOptions(ignore_index, label_smoothing, z_loss, softcap),
                          ChunkSpec(chunk, acc_fp32), grad_scale,
                          Needs(grad_input, grad_weight, grad_bias))


def _grads_fake(x, lin_w, lin_b, needs: Needs):
    return (x.new_empty(x.shape if needs.input else (0,)),
            lin_w.new_empty(lin_w.shape if needs.weight else (0,)),
            x.new_empty(lin_b.shape if needs.bias and lin_b is not None else (0,)))


@_linear_ce_fwd.register_fake
def _linear_ce_fwd_fake(x, lin_w, lin_b, target, weight, grad_scale, *, grad_input,
                        grad_weight, grad_bias, **_):
    N = x.shape[0]
    rows = x.new_empty((N,), dtype=acc_dtype(x.dtype))
    lse = x.new_empty((N,), dtype=torch.float64)
    return (rows, lse, *_grads_fake(x, lin_w, lin_b, Needs(grad_input, grad_weight, grad_bias)))


@torch.library.custom_op("softmax_ce::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd(x: Tensor, lin_w: Tensor, lin_b: Optional[Tensor], target: Tensor,
                   weight: Optional[Tensor], lse: Tensor, grad_rows: Tensor, *,
                   ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                   chunk: int, acc_fp32: bool, grad_input: bool, grad_weight: bool,
                   grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """backward_chunks as one op."""
    return backward_chunks(x, lin_w, lin_b, target, weight,
                           A.CeOptions(ignore_index, label_smoothing, z_loss, softcap),
                           ChunkSpec(chunk, acc_fp32), lse, grad_rows,
                           Needs(grad_input, grad_weight, grad_bias))


@_linear_ce_bwd.register_fake
def _linear_ce_bwd_fake(x, lin_w, lin_b, target, weight, lse, grad_rows, *, grad_input,
                        grad_weight, grad_bias, **_):
    return _grads_fake(x, lin_w, lin_b, Needs(grad_input, grad_weight, grad_bias))


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    """The non-tensor arguments of the Functions below."""

    reduction: str
    opts: A.CeOptions
    spec: ChunkSpec


def _needs(ctx, lin_b) -> Needs:
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return Needs(need_x, need_w, need_b and lin_b is not None)


def _composite_grads(ctx, grad_out, x, lin_w, lin_b, target, weight, tw):
    """A differentiable backward (create_graph=True): the composite's gradients."""
    needs = ctx.needs_input_grad[:3]
    inputs = [t for t, need in zip((x, lin_w, lin_b), needs) if need]
    # the class weight in the input's dtype again, as the caller gave it (the Functions hold it
    # in the accumulation dtype, an exact widening): cross_entropy requires the input's dtype
    weight = weight.to(x.dtype) if weight is not None else None
    with torch.enable_grad():
        loss = composite(x, lin_w, lin_b, target, weight, ctx.config.reduction, ctx.config.opts,
                         tw)
    got = iter(torch.autograd.grad(loss, inputs, grad_out, create_graph=True))
    return [next(got) if need else None for need in needs]


def _asked(grads, needs: Needs):
    return [g if need else None for g, need in zip(grads, needs)]


class _LinearCrossEntropyReduced(torch.autograd.Function):
    """The ``mean`` / ``sum`` loss with its gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, target, weight, tw, denom, config: _Config):
        acc = acc_dtype(x.dtype)
        if config.reduction == "mean":
            scale = torch.reciprocal(denom.to(acc))
        else:
            scale = torch.ones((), dtype=acc, device=x.device)
        if tw is not None:  # the token weights folded into each row's upstream gradient
            scale = scale * tw
        needs = _needs(ctx, lin_b)
        rows, lse, gi, gw, gb = _linear_ce_fwd(x, lin_w, lin_b, target, weight, scale,
                                               **_op_options(config.opts, config.spec, needs))
        ctx.save_for_backward(x, lin_w, lin_b, target, weight, tw, scale, lse, gi, gw, gb)
        ctx.config = config
        ctx.handed_over = False
        ctx.compiled = torch.compiler.is_compiling()
        return reduce_rows(rows, denom, config.reduction, tw)

    @staticmethod
    def backward(ctx, grad_out):
        x, lin_w, lin_b, target, weight, tw, scale, lse, gi, gw, gb = ctx.saved_tensors
        needs = _needs(ctx, lin_b)
        if torch.is_grad_enabled():
            return input_grads(ctx, *_composite_grads(ctx, grad_out, x, lin_w, lin_b, target,
                                                      weight, tw))
        if ctx.compiled:  # a traced backward runs as often as it is called: nothing in place
            return input_grads(ctx, *_asked([g * grad_out for g in (gi, gw, gb)], needs))
        if not ctx.handed_over:
            ctx.handed_over = True
            # scaled in their buffers and handed over; a later backward recomputes, so the
            # saved tensors keep their version
            for g, need in zip((gi, gw, gb), needs):
                if need and g.numel() > 0:
                    with torch.autograd._unsafe_preserve_version_counter(g):
                        g.mul_(grad_out)
            return input_grads(ctx, *_asked((gi, gw, gb), needs))
        grads = _linear_ce_bwd(x, lin_w, lin_b, target, weight, lse, scale * grad_out,
                               **_op_options(ctx.config.opts, ctx.config.spec, needs))
        return input_grads(ctx, *_asked(grads, needs))


class _LinearCrossEntropyRows(torch.autograd.Function):
    """The per-row loss (``reduction='none'``); backward runs the chunks once more with the
    per-row upstream gradient."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, target, weight, tw, config: _Config):
        rows, lse = _rows_and_lse(x, lin_w, lin_b, target, weight, config)
        ctx.save_for_backward(x, lin_w, lin_b, target, weight, tw, lse)
        ctx.config = config
        return rows if tw is None else rows * tw

    @staticmethod
    def backward(ctx, grad_rows):
        x, lin_w, lin_b, target, weight, tw, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            return input_grads(ctx, *_composite_grads(ctx, grad_rows, x, lin_w, lin_b, target,
                                                      weight, tw))
        needs = _needs(ctx, lin_b)
        g = grad_rows.to(acc_dtype(x.dtype))
        g = (g if tw is None else g * tw).contiguous()
        grads = _linear_ce_bwd(x, lin_w, lin_b, target, weight, lse, g,
                               **_op_options(ctx.config.opts, ctx.config.spec, needs))
        return input_grads(ctx, *_asked(grads, needs))


def _rows_and_lse(x, lin_w, lin_b, target, weight, config: _Config):
    """The per-row losses and lse with no gradient work (autograd records nothing)."""
    scale = torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device)
    rows, lse, _, _, _ = _linear_ce_fwd(x, lin_w, lin_b, target, weight, scale,
                                        **_op_options(config.opts, config.spec, Needs()))
    return rows, lse


def reduce_rows(rows: Tensor, denom, reduction: str, tw: Optional[Tensor] = None) -> Tensor:
    total = fixed_order_sum(rows if tw is None else rows * tw)
    return total / denom if reduction == "mean" else total


# ---------------------------------------------------------------------------------------------
# the composite, the argument checks, the checked entry point
# ---------------------------------------------------------------------------------------------


def composite(x, lin_w, lin_b, target, weight, reduction, opts: A.CeOptions, tw=None):
    """``cross_entropy(F.linear(x, lin_w, lin_b), target, ...)`` with the whole logits."""
    H = lin_w.shape[-1]
    logits = F.linear(x, lin_w.reshape(-1, H), None if lin_b is None else lin_b.reshape(-1))
    if lin_w.dim() > 2:  # K-dim out_features: (N, C * d_1 * ... * d_K) -> (N, C, d_1, ..., d_K)
        logits = logits.reshape(*x.shape[:-1], *lin_w.shape[:-1])
    if tw is not None:  # one factor per position of the logits (all but the class dimension)
        tw = tw.reshape(logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ())
    return _core.cross_entropy(logits, target, weight, reduction, opts.ignore_index,
                               opts.label_smoothing, opts.z_loss, opts.softcap or None, False,
                               "linear_cross_entropy", tw)


def check_shapes(input, linear_weight, linear_bias, fn):
    """torch's own checks and messages (RuntimeError); returns the K-dim out_features."""
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
    A.check_same_dtype(input, (("linear_weight", linear_weight), ("linear_bias", linear_bias)),
                       fn)
    return out_features


def chunk_option(options, chunk_size, fn):
    """Rows per chunk from ``chunk_size`` or torch's ``options.batch_chunk_size`` (None: the
    default)."""
    from_options = getattr(options, "batch_chunk_size", None) if options is not None else None
    if chunk_size is not None and from_options is not None and chunk_size != from_options:
        raise ValueError(f"{fn}: chunk_size={chunk_size} and options.batch_chunk_size="
                         f"{from_options} disagree")
    chunk = chunk_size if chunk_size is not None else from_options
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk!r}")
    return chunk


def acc_option(options, grad_weight_acc_dtype, dtype, fn) -> bool:
    """Whether grad_weight accumulates in float32 (the default) or in the input's dtype."""
    acc = grad_weight_acc_dtype
    if acc is None and options is not None:
        acc = getattr(options, "acc_dtype", None)
    if acc is None:
        return True
    if acc not in (torch.float32, dtype):
        raise ValueError(f"{fn}: grad_weight_acc_dtype must be torch.float32 or the input's "
                         f"dtype ({dtype}), got {acc}")
    return acc == torch.float32


# what the fused head's errors call the logits it never holds (its 'input' is the hidden states)
LOGITS_NAME = "the logits ('input' @ 'linear_weight'.T)"


def _composite_checks(meta, target, weight, reduction, opts, fn):
    """cross_entropy's argument checks and errors, run on meta tensors."""
    t = target.detach().to("meta")
    w = weight.detach().to("meta") if weight is not None else None
    _core.cross_entropy(meta, t, w, reduction, opts.ignore_index, opts.label_smoothing,
                        opts.z_loss, opts.softcap or None, False, fn, input_name=LOGITS_NAME)


def _needs_composite(input, linear_weight, target, weight, out_features) -> bool:
    if out_features or ops.functorch_active() or torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.is_autocast_enabled(input.device.type):
        return True
    if target.requires_grad or (weight is not None and weight.requires_grad):
        return True
    return input.numel() == 0 or linear_weight.shape[0] == 0


def linear_cross_entropy_acc(input, linear_weight, target, linear_bias=None, weight=None,
                             reduction="mean", ignore_index=None, label_smoothing=0.0,
                             options=None, z_loss=0.0, softcap=None, chunk_size=None,
                             grad_weight_acc_dtype=None, token_weight=None,
                             vocab_chunk_size=None) -> Tensor:
    """``linear_cross_entropy`` with the loss in its accumulation dtype (float32 for half
    inputs; the public function rounds it to the input's dtype)."""
    fn = "linear_cross_entropy"
    reduction = A.reduction_of(None, None, reduction)
    out_features = check_shapes(input, linear_weight, linear_bias, fn)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias),
                    ("target", target), ("weight", weight)):
        A.check_device(t, name, input, fn)
    C = linear_weight.shape[0]
    batched = input.dim() == 2
    logits_shape = (*input.shape[:-1], C, *out_features)
    prob = tuple(target.shape) == logits_shape
    if prob and ignore_index is not None:
        raise RuntimeError(f"{fn}: ignore_index cannot be specified when target contains "
                           "probabilities")
    ignore = -100 if ignore_index is None else ignore_index
    opts = A.ce_options(ignore, label_smoothing, z_loss, softcap, fn)
    chunk = chunk_option(options, chunk_size, fn)
    acc_fp32 = acc_option(options, grad_weight_acc_dtype, input.dtype, fn)
    vocab_rows = check_vocab_chunk(vocab_chunk_size, fn)
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(input.device.type):
        # every argument check of cross_entropy, on logits that take no memory (under autocast
        # the composite runs, and checks)
        meta = torch.empty(logits_shape, dtype=input.dtype, device="meta")
        _composite_checks(meta, target, weight, reduction, opts, fn)
    tw = A.check_token_weight(token_weight, (*input.shape[:-1], *out_features), input, fn)
    if _needs_composite(input, linear_weight, target, weight, out_features):
        return composite(input, linear_weight, linear_bias, target, weight, reduction, opts, tw)
    x = input if batched else input.unsqueeze(0)
    t = target if batched else target.unsqueeze(0)
    tw = tw.reshape(-1) if tw is not None else None
    if not prob and t.dtype == torch.uint8:
        t = t.to(torch.int32)
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    N, H = x.shape
    spec = ChunkSpec(1, acc_fp32)
    if chunk is None:
        chunk = default_chunk_size(N, C, H, x.dtype, spec.acc(x.dtype))
    config = _Config(reduction, opts, spec._replace(rows=max(1, min(chunk, max(N, 1)))))
    x = x.contiguous()
    lin_w = linear_weight.contiguous()
    t = t.contiguous()
    grads = A.tracks_grad(x, lin_w, linear_bias)
    if vocab_rows is not None:  # the weight's gradient accumulated a vocabulary slice at a time
        denom = None
        if reduction == "mean":
            denom = (torch.full((), float(N), dtype=torch.float64, device=x.device)
                     if prob and tw is None else fixed_order_sum(tw) if prob
                     else A.mean_denominator(t.view(N, 1), w, opts.ignore_index, C,
                                             tw.view(N, 1) if tw is not None else None))
        loss = vocab_chunked(x, lin_w, linear_bias, t, w, tw, denom, reduction, opts,
                             config.spec.rows, vocab_rows, prob, config.spec.acc(x.dtype), grads)
        return loss if batched or reduction != "none" else loss.reshape(())
    if reduction == "none":
        if grads:
            rows = _LinearCrossEntropyRows.apply(x, lin_w, linear_bias, t, w, tw, config)
        else:
            rows = _rows_and_lse(x, lin_w, linear_bias, t, w, config)[0]
            rows = rows if tw is None else rows * tw
        return rows if batched else rows.reshape(())
    if reduction == "mean":  # torch's denominators: positions (probabilities), sum of w[y] kept
        if prob:
            denom = (torch.full((), float(N), dtype=acc_dtype(x.dtype), device=x.device)
                     if tw is None else fixed_order_sum(tw))
        else:
            denom = A.mean_denominator(t.view(N, 1), w, opts.ignore_index, C,
                                       tw.view(N, 1) if tw is not None else None)
    else:
        denom = torch.ones((), device=x.device)
    if grads:
        return _LinearCrossEntropyReduced.apply(x, lin_w, linear_bias, t, w, tw, denom, config)
    return reduce_rows(_rows_and_lse(x, lin_w, linear_bias, t, w, config)[0], denom, reduction,
                       tw)
