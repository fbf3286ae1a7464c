"""Cross-entropy on one device: torch's argument handling for each target kind, the path through
the autograd Functions, the reductions, and the CPU host fast path.

Every entry point ends here: ``functional.cross_entropy`` (after its legacy arguments), the fused
linear head's composite and argument checks, and the vocab-parallel paths' checks on the global
shapes (run on meta tensors). Validation reads shapes, dtypes and Python values only, never tensor
data; out-of-range class indices are caught inside the kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _args as A
from . import ops
from .autograd import ReducedCrossEntropyFunction, SoftmaxCrossEntropyFunction, without_jvp
from .fixed_sum import fixed_order_sum
from .reference import acc_dtype
from .switches import gradient_in_forward_enabled

__all__ = ["cross_entropy", "host_cross_entropy"]

# The Function's jvp-free twin, applied under torch.compile (autograd.without_jvp).
_CE_FOR_COMPILE = without_jvp(SoftmaxCrossEntropyFunction)


def _fuse_gradient(x3: Tensor, reduction: str, inplace: bool) -> bool:
    """Whether the mean / sum takes ReducedCrossEntropyFunction (the gradient formed in the
    forward pass): plain reverse-mode autograd in eager mode only."""
    return (
        reduction != "none"
        and not inplace
        and torch.is_grad_enabled()
        and x3.requires_grad
        and x3.numel() > 0
        and not torch.compiler.is_compiling()
        and gradient_in_forward_enabled()
        and not ops.functorch_active()
        and torch.autograd.forward_ad._current_level < 0
    )


def _per_position(x3, t, w, opts: A.CeOptions, inplace: bool):
    """Per-position loss [outer, inner]."""
    if A.tracks_grad(x3, t):
        function = _CE_FOR_COMPILE if torch.compiler.is_compiling() else SoftmaxCrossEntropyFunction
        loss, _ = function.apply(x3, t, w, *opts, inplace)
        return loss
    if t.is_floating_point():
        return ops.ce_prob_fwd(x3, t, w, *opts.for_probabilities())[0]
    return ops.ce_fwd(x3, t, w, *opts)[0]


def _reduced(x3, t, w, denom, reduction: str, opts: A.CeOptions, inplace: bool, tw=None):
    """The mean / sum loss: through ReducedCrossEntropyFunction (gradient formed in the forward)
    where it applies, else the per-position Function and a reduction. ``denom``: the mean's
    denominator (tensor or number); ``tw``: token weights ``[outer, inner]`` or None."""

    def reduce(loss):
        total = fixed_order_sum(loss if tw is None else loss * tw)
        return total / denom if reduction == "mean" else total

    if _fuse_gradient(x3, reduction, inplace):
        acc = acc_dtype(x3.dtype)
        if reduction == "mean" and isinstance(denom, Tensor):
            scale = torch.reciprocal(denom.to(acc))
        elif reduction == "mean":  # a fill, not a host-to-device copy (CUDA-graph capturable)
            scale = torch.full((), 1.0 / denom, dtype=acc, device=x3.device)
        else:
            scale = torch.ones((), dtype=acc, device=x3.device)
        # d(reduced loss)/d(per-position loss): the token weight folded in (one pass still)
        scale = scale.expand(x3.shape[0], x3.shape[2]) if tw is None else scale * tw
        return ReducedCrossEntropyFunction.apply(x3, t, w, scale, reduce, *opts)
    return reduce(_per_position(x3, t, w, opts, inplace))


def cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                  softcap, inplace_backward, fn, token_weight=None, input_name="'input'"):
    """``cross_entropy`` after its legacy arguments (``reduction`` already checked), errors
    naming ``fn`` and the logits ``input_name`` (the fused head's are not its ``input``).
    ``token_weight``: a factor per position (``none``: each loss times it;
    ``sum``: their sum; ``mean``: divided by the kept positions' token weight times class
    weight)."""
    A.check_floating(input, "input", fn)
    if input.dim() == 0:
        raise RuntimeError(
            f"{fn}: argument 'input' must have at least 1 dimension (the class dimension), "
            "got a 0-dim tensor"
        )
    opts = A.ce_options(ignore_index, label_smoothing, z_loss, softcap, fn)
    inplace = bool(inplace_backward) and A.inplace_allowed(input)
    C = A.classes(input)
    if weight is not None:
        A.check_device(weight, "weight", input, fn)
        if weight.dim() != 1 or weight.shape[0] != C:
            raise RuntimeError(
                f"{fn}: weight tensor should be defined either for all {C} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
    A.check_device(target, "target", input, fn)
    if tuple(input.shape) == tuple(target.shape):
        return _probability_targets(input, target, weight, reduction, opts, inplace, fn,
                                    token_weight)
    return _class_indices(input, target, weight, reduction, opts, inplace, fn, token_weight,
                          input_name)


def _probability_targets(input, target, weight, reduction, opts, inplace, fn, token_weight):
    if not target.is_floating_point():
        raise RuntimeError(
            f"{fn}: Expected floating point type for target with class probabilities, "
            f"got {A.dtype_name(target.dtype)} (argument 'target')"
        )
    if opts.ignore_index >= 0:
        raise RuntimeError(
            f"{fn}: ignore_index is not supported for floating point target "
            f"(got ignore_index={opts.ignore_index})"
        )
    if weight is not None and weight.requires_grad:
        raise RuntimeError(
            f"{fn}: argument 'weight' requires grad; softmax_ce does not differentiate "
            "with respect to class weights"
        )
    # torch multiplies log-probabilities, target and weight: the result dtype promotes.
    dtypes = [input.dtype, target.dtype] + ([weight.dtype] if weight is not None else [])
    if A.autocast_to_float32(input):
        dtypes = [torch.float32 if d in A.AUTOCAST_ELIGIBLE else d for d in dtypes]
    out_dtype = dtypes[0]
    for d in dtypes[1:]:
        out_dtype = torch.promote_types(out_dtype, d)
    x = input if input.dtype == out_dtype else input.to(out_dtype)
    t = target if target.dtype == out_dtype else target.to(out_dtype)
    w = weight.to(acc_dtype(x.dtype)) if weight is not None else None
    outer, C, inner, spatial = A.kernel_layout(input)
    positions = (outer,) + spatial if input.dim() >= 2 else ()
    tw = A.check_token_weight(token_weight, positions, input, fn)
    x3 = x.reshape(outer, C, inner)
    t3 = t.reshape(outer, C, inner)
    tw = tw.reshape(outer, inner) if tw is not None else None
    opts = opts.without_ignore_index()
    if reduction == "none":
        loss = _per_position(x3, t3, w, opts, inplace)
        loss = loss if tw is None else loss * tw
        return loss.reshape(positions).to(out_dtype)
    # torch's mean over probability targets divides by the number of positions (their token
    # weights' sum with token weights)
    denom = outer * inner if tw is None else fixed_order_sum(tw)
    return _reduced(x3, t3, w, denom, reduction, opts, inplace, tw).to(out_dtype)


def _class_indices(input, target, weight, reduction, opts, inplace, fn, token_weight,
                   input_name="'input'"):
    if target.dtype not in A.INDEX_DTYPES:
        raise RuntimeError(
            f"{fn}: expected argument 'target' to hold class indices (int64, int32 or uint8) "
            f"or class probabilities (floating point, same shape as {input_name}), but got dtype "
            f"{target.dtype} and shape {list(target.shape)} for {input_name} of shape "
            f"{list(input.shape)}"
        )
    A.check_target_shape(input, target, fn, input_name)
    A.check_no_grad(weight, "weight", fn)
    autocast = A.autocast_to_float32(input)
    out_dtype = torch.float32 if autocast else input.dtype
    if weight is not None:
        wdtype = torch.float32 if autocast and weight.dtype in A.AUTOCAST_ELIGIBLE else weight.dtype
        if wdtype != out_dtype:
            raise RuntimeError(
                f"{fn}: expected scalar type {A.dtype_name(out_dtype)} but found "
                f"{A.dtype_name(weight.dtype)} (argument 'weight' must have the dtype of "
                f"{input_name})"
            )
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    t = target.to(torch.int32) if target.dtype == torch.uint8 else target
    outer, C, inner, _ = A.kernel_layout(input)
    positions = tuple(target.shape) if input.dim() >= 2 else ()
    tw = A.check_token_weight(token_weight, positions, input, fn)
    x3 = input.reshape(outer, C, inner)
    t2 = t.reshape(outer, inner)
    tw = tw.reshape(outer, inner) if tw is not None else None
    if reduction == "none":
        loss = _per_position(x3, t2, w, opts, inplace)
        loss = loss if tw is None else loss * tw
        return loss.reshape(positions).to(out_dtype)
    denom = (A.mean_denominator(t2, w, opts.ignore_index, C, tw) if reduction == "mean"
             else None)
    return _reduced(x3, t2, w, denom, reduction, opts, inplace, tw).to(out_dtype)


_HOST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def host_cross_entropy(input, target, weight, ignore_index, label_smoothing, z_loss, mean):
    """The host fast path: the common call (CPU [N, C] logits, [N] int64 class indices, a mean or
    sum, optional weight, label smoothing and z-loss) in one compiled call with the general
    path's arithmetic (ops.HOST_SCHEMAS; with a gradient, ``ce_loss_host``, an autograd node in
    C++ with ReducedCrossEntropyFunction's behaviour). None when the call is not that one (the
    general path then runs, and raises where torch raises); the conditions read attributes
    only."""
    if not (type(input) is Tensor and type(target) is Tensor and input.is_cpu
            and input.ndim == 2 and target.ndim == 1 and target.dtype is torch.int64
            and input.dtype in _HOST_DTYPES and input.layout is torch.strided
            and target.is_cpu and not input.is_nested and type(ignore_index) is int
            and type(label_smoothing) in (float, int) and 0.0 <= label_smoothing <= 1.0
            and type(z_loss) in (float, int) and 0.0 <= z_loss < math.inf):
        return None
    N, C = input.shape
    if not (N > 0 and C > 0 and target.shape[0] == N):
        return None
    if weight is not None and not (
            type(weight) is Tensor and weight.dtype is input.dtype and weight.ndim == 1
            and weight.shape[0] == C and weight.is_cpu and not weight.requires_grad):
        return None
    # is_compiling first: host_fast_path's first call asks the dispatcher, which dynamo cannot trace
    if (torch.compiler.is_compiling() or not ops.host_fast_path() or ops.functorch_active()
            or torch.autograd.forward_ad._current_level >= 0 or torch.is_autocast_enabled("cpu")):
        return None
    if torch.is_grad_enabled() and input.requires_grad:
        if not gradient_in_forward_enabled():
            return None
        loss = ops.ce_loss_host(input, target, weight, ignore_index, float(label_smoothing),
                                float(z_loss), mean)
        return loss if loss.dtype is input.dtype else loss.to(input.dtype)
    return ops.ce_reduced(input, target, weight, ignore_index, float(label_smoothing),
                          float(z_loss), 0.0, mean)
