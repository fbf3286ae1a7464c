"""torch-compatible functions: argument handling, validation and reductions.

Signatures are torch's own (positional order and deprecated ``size_average`` / ``reduce``
included) plus keyword-only extensions. Validation looks only at shapes, dtypes and Python
values, never at tensor data, so ``torch.compile(fullgraph=True)`` traces every function without a
graph break; out-of-range class indices are caught inside the kernels.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .autograd import (
    LogSoftmaxFunction,
    ReducedCrossEntropyFunction,
    SigmoidCrossEntropyFunction,
    SoftmaxCrossEntropyFunction,
    SoftmaxFunction,
    without_jvp,
)
from . import ops
from .fixed_sum import fixed_order_sum
from .reference import acc_dtype
from .switches import gradient_in_forward, gradient_in_forward_enabled

__all__ = [
    "cross_entropy",
    "softmax",
    "log_softmax",
    "binary_cross_entropy_with_logits",
    "gradient_in_forward",
]

_REDUCTIONS = ("none", "mean", "sum")
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        # torch's legacy mapping, with its deprecation warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _check_floating(tensor: Tensor, name: str, fn: str) -> None:
    if not tensor.is_floating_point():
        raise NotImplementedError(
            f"{fn}: argument '{name}' must be a floating point tensor (float64, float32, "
            f"bfloat16 or float16), got {tensor.dtype}"
        )


def _check_no_grad(tensor: Optional[Tensor], name: str, fn: str) -> None:
    if tensor is not None and tensor.requires_grad:
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def _check_device(tensor: Optional[Tensor], name: str, input: Tensor, fn: str) -> None:
    if tensor is not None and tensor.device != input.device:
        raise RuntimeError(
            f"{fn}: argument '{name}' is on {tensor.device} but 'input' is on {input.device}"
        )


def _autocast_to_float32(input: Tensor) -> bool:
    """Whether autocast is on for the input's device (loss functions then run in float32)."""
    if input.device.type == "meta":  # linear_cross_entropy's argument checks (never autocast)
        return False
    return input.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(input.device.type)


def _check_extensions(label_smoothing, z_loss, softcap, fn) -> float:
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(
            f"{fn}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
        )
    return _check_z_loss_softcap(z_loss, softcap, fn)


def _check_z_loss_softcap(z_loss, softcap, fn) -> float:
    """Our extensions' arguments; returns the softcap as a float (0.0: none)."""
    if not isinstance(z_loss, (int, float)) or not (0.0 <= z_loss < math.inf):
        raise ValueError(f"{fn}: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is None:
        return 0.0
    if not isinstance(softcap, (int, float)) or not (0.0 < softcap < math.inf):
        raise ValueError(f"{fn}: softcap must be None or a finite float > 0, got {softcap}")
    return float(softcap)


def _tracks_grad(*tensors) -> bool:
    """Whether autograd may record this call: grad mode on and some input requires grad, or a
    torch.func transform or forward-mode AD is running. Calls it does not record skip the
    autograd.Function (a few microseconds per call) and run the op."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return ops.functorch_active() or torch.autograd.forward_ad._current_level >= 0


def _inplace_allowed(input: Tensor) -> bool:
    """Whether the backward may write the gradient into the logits' storage: not under
    ``torch.compile`` or a ``torch.func`` transform, and not when that storage belongs to a leaf
    (a parameter or a user's tensor: its values would be destroyed and its ``.grad`` would share
    its storage); the gradient then goes to a fresh buffer."""
    if torch.compiler.is_compiling() or ops.functorch_active():
        return False
    base = input._base if input._base is not None else input
    return not base.is_leaf


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


# The Functions' jvp-free twins, applied under torch.compile (autograd.without_jvp).
_CE_FOR_COMPILE = without_jvp(SoftmaxCrossEntropyFunction)
_SOFTMAX_FOR_COMPILE = without_jvp(SoftmaxFunction)
_LOG_SOFTMAX_FOR_COMPILE = without_jvp(LogSoftmaxFunction)
_BCE_FOR_COMPILE = without_jvp(SigmoidCrossEntropyFunction)


class CeOptions(NamedTuple):
    """The options every cross-entropy op and Function takes, in their positional order."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: no soft-capping

    def for_probabilities(self):
        """The options of the probability-target ops (no ignore_index)."""
        return self.label_smoothing, self.z_loss, self.softcap


def _ce_per_position(x3, t, w, opts: CeOptions, inplace: bool):
    """Per-position loss [outer, inner]."""
    if _tracks_grad(x3, t):
        function = _CE_FOR_COMPILE if torch.compiler.is_compiling() else SoftmaxCrossEntropyFunction
        loss, _ = function.apply(x3, t, w, *opts, inplace)
        return loss
    if t.is_floating_point():
        return ops.ce_prob_fwd(x3, t, w, *opts.for_probabilities())[0]
    return ops.ce_fwd(x3, t, w, *opts)[0]


def _reduced_ce(x3, t, w, denom, reduction: str, opts: CeOptions, inplace: bool):
    """The mean / sum loss: through ReducedCrossEntropyFunction (gradient formed in the forward)
    where it applies, else the per-position Function and a reduction. ``denom``: the mean's
    denominator (tensor or number)."""

    def reduce(loss):
        total = fixed_order_sum(loss)
        return total / denom if reduction == "mean" else total

    if _fuse_gradient(x3, reduction, inplace):
        acc = acc_dtype(x3.dtype)
        if reduction == "mean" and isinstance(denom, Tensor):
            scale = torch.reciprocal(denom.to(acc))
        elif reduction == "mean":  # a fill, not a host-to-device copy (CUDA-graph capturable)
            scale = torch.full((), 1.0 / denom, dtype=acc, device=x3.device)
        else:
            scale = torch.ones((), dtype=acc, device=x3.device)
        scale = scale.expand(x3.shape[0], x3.shape[2])
        return ReducedCrossEntropyFunction.apply(x3, t, w, scale, reduce, *opts)
    return reduce(_ce_per_position(x3, t, w, opts, inplace))


def _index(value, name: str, fn: str) -> int:
    """An integer argument: anything ``operator.index`` takes (int, NumPy integers, ...)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{fn}: argument '{name}' must be an integer, got {type(value).__name__}"
        ) from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n = n * s
    return n


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    process_group=None,
) -> Tensor:
    """Fused softmax cross-entropy; a drop-in for ``torch.nn.functional.cross_entropy``.

    Same arguments and semantics as torch (class-index or probability targets, ``weight``,
    ``ignore_index``, reductions, ``label_smoothing``, K-dim and unbatched inputs), computed in
    float32 (float64 for float64 input) with the hand-written gradient ``softmax - target``.

    Keyword-only extensions:
      z_loss: adds ``z_loss * lse**2`` per (non-ignored) position, lse = logsumexp of the
        logits; part of the returned loss.
      softcap: replaces logits x by ``softcap * tanh(x / softcap)`` before everything else.
      inplace_backward: the backward writes the gradient into the logits' storage (no second
        N x C buffer). The logits' contents are destroyed by backward and their version counter
        is bumped, so any other autograd use of them raises. Ignored under ``torch.compile``
        and with ``create_graph=True`` (falls back to a fresh gradient).
      process_group: a ``torch.distributed`` group over which the class dimension is split
        (vocab-parallel): ``input`` holds this rank's slice, classes ``[r * C_local,
        (r + 1) * C_local)`` on rank r, slices of one size; ``target`` (global class indices, or
        probabilities sliced like ``input``) and ``weight`` (all ``C`` classes) the same on every
        rank. The loss equals the gathered logits' and is bit-identical on every rank; the
        gradient is this rank's slice. One all-gather of a few floats per position per forward,
        none in backward (``softmax_ce.distributed``). DTensor logits sharded on the class
        dimension take this path without the argument.

    With a ``mean`` or ``sum`` reduction and logits that require grad, the gradient is formed in
    the forward pass (one read of the logits, one write of the gradient) and handed over by
    backward; see ``gradient_in_forward``.
    """
    if (size_average is None and reduce is None and softcap is None and process_group is None
            and not inplace_backward and (reduction == "mean" or reduction == "sum")):
        loss = _host_cross_entropy(input, target, weight, ignore_index, label_smoothing, z_loss,
                                   reduction == "mean")
        if loss is not None:
            return loss
    reduction = _reduction(size_average, reduce, reduction)
    if process_group is not None or _is_dtensor(input):
        from . import distributed

        if process_group is None:
            return distributed.cross_entropy_dtensor(
                input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                inplace_backward, "cross_entropy")
        return distributed.cross_entropy_over_group(
            input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
            inplace_backward, process_group, "cross_entropy")
    return _cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                          softcap, inplace_backward, "cross_entropy")


_HOST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _host_cross_entropy(input, target, weight, ignore_index, label_smoothing, z_loss, mean):
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


def _is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(t, cls)


def _cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                   softcap, inplace_backward, fn):
    """cross_entropy after its legacy arguments, errors naming ``fn``."""
    _check_floating(input, "input", fn)
    if input.dim() == 0:
        raise RuntimeError(
            f"{fn}: argument 'input' must have at least 1 dimension (the class dimension), "
            "got a 0-dim tensor"
        )
    cap = _check_extensions(label_smoothing, z_loss, softcap, fn)
    opts = CeOptions(_index(ignore_index, "ignore_index", fn), float(label_smoothing),
                     float(z_loss), cap)
    inplace = bool(inplace_backward) and _inplace_allowed(input)
    C = _classes(input)
    if weight is not None:
        _check_device(weight, "weight", input, fn)
        if weight.dim() != 1 or weight.shape[0] != C:
            raise RuntimeError(
                f"{fn}: weight tensor should be defined either for all {C} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
    _check_device(target, "target", input, fn)
    if tuple(input.shape) == tuple(target.shape):
        return _ce_probability_targets(input, target, weight, reduction, opts, inplace, fn)
    return _ce_class_indices(input, target, weight, reduction, opts, inplace, fn)


def _classes(input: Tensor) -> int:
    return input.shape[1] if input.dim() >= 2 else input.shape[0]


def _kernel_layout(input: Tensor):
    """(outer, C, inner) of the kernels' ``[outer, C, inner]`` view, and the spatial dims."""
    spatial = tuple(input.shape[2:])
    outer = input.shape[0] if input.dim() >= 2 else 1
    return outer, _classes(input), _numel(spatial), spatial


def _ce_probability_targets(input, target, weight, reduction, opts, inplace, fn):
    if not target.is_floating_point():
        raise RuntimeError(
            f"{fn}: Expected floating point type for target with class probabilities, "
            f"got {_dtype_name(target.dtype)} (argument 'target')"
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
    if _autocast_to_float32(input):
        dtypes = [torch.float32 if d in _AUTOCAST_ELIGIBLE else d for d in dtypes]
    out_dtype = dtypes[0]
    for d in dtypes[1:]:
        out_dtype = torch.promote_types(out_dtype, d)
    x = input if input.dtype == out_dtype else input.to(out_dtype)
    t = target if target.dtype == out_dtype else target.to(out_dtype)
    w = weight.to(acc_dtype(x.dtype)) if weight is not None else None
    outer, C, inner, spatial = _kernel_layout(input)
    x3 = x.reshape(outer, C, inner)
    t3 = t.reshape(outer, C, inner)
    opts = opts._replace(ignore_index=-100)
    if reduction == "none":
        loss = _ce_per_position(x3, t3, w, opts, inplace)
        shape = (outer,) + spatial if input.dim() >= 2 else ()
        return loss.reshape(shape).to(out_dtype)
    # torch's mean over probability targets divides by the number of positions
    return _reduced_ce(x3, t3, w, outer * inner, reduction, opts, inplace).to(out_dtype)


def _ce_class_indices(input, target, weight, reduction, opts, inplace, fn):
    if target.dtype not in _INDEX_DTYPES:
        raise RuntimeError(
            f"{fn}: expected argument 'target' to hold class indices (int64, int32 or uint8) "
            f"or class probabilities (floating point, same shape as input), but got dtype "
            f"{target.dtype} and shape {list(target.shape)} for input of shape "
            f"{list(input.shape)}"
        )
    _check_target_shape(input, target, fn)
    _check_no_grad(weight, "weight", fn)
    autocast = _autocast_to_float32(input)
    out_dtype = torch.float32 if autocast else input.dtype
    if weight is not None:
        wdtype = torch.float32 if autocast and weight.dtype in _AUTOCAST_ELIGIBLE else weight.dtype
        if wdtype != out_dtype:
            raise RuntimeError(
                f"{fn}: expected scalar type {_dtype_name(out_dtype)} but found "
                f"{_dtype_name(weight.dtype)} (argument 'weight' must have the dtype of 'input')"
            )
    w = weight.to(acc_dtype(input.dtype)) if weight is not None else None
    t = target.to(torch.int32) if target.dtype == torch.uint8 else target
    outer, C, inner, _ = _kernel_layout(input)
    x3 = input.reshape(outer, C, inner)
    t2 = t.reshape(outer, inner)
    if reduction == "none":
        loss = _ce_per_position(x3, t2, w, opts, inplace)
        return loss.reshape(target.shape if input.dim() >= 2 else ()).to(out_dtype)
    denom = _mean_denominator(t2, w, opts.ignore_index, C) if reduction == "mean" else None
    return _reduced_ce(x3, t2, w, denom, reduction, opts, inplace).to(out_dtype)


def _mean_denominator(t2, w, ignore_index, C):
    """torch's mean over class indices divides by the sum of w[y] over the kept positions (their
    number without weights); a 0-dim tensor, no host synchronisation."""
    valid = t2 != ignore_index
    if w is None or C == 0:
        return valid.sum()
    # Clamped: an out-of-range class (an IndexError from the CPU kernel, NaN and a recorded value
    # on CUDA) must not index `weight` here (a device-side assert on CUDA).
    safe = torch.where(valid, t2, torch.zeros_like(t2)).long().clamp(0, C - 1)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return fixed_order_sum(torch.where(valid, w[safe], zero))


def _dtype_name(dtype: torch.dtype) -> str:
    names = {
        torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
        torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
        torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    }
    return names.get(dtype, str(dtype))


def _check_target_shape(input: Tensor, target: Tensor, fn: str) -> None:
    """torch's (CPU) shape rules for class-index targets, with its exception types: a batch-size
    mismatch is a ValueError, any other shape mismatch a RuntimeError."""
    where = f"(argument 'target' has shape {list(target.shape)}, 'input' {list(input.shape)})"
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError(
                f"{fn}: 0D or 1D target tensor expected, multi-target not supported {where}"
            )
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"{fn}: for 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]} {where}"
            )
        return
    batch = target.shape[0] if target.dim() > 0 else 0
    if input.shape[0] != batch:
        raise ValueError(
            f"{fn}: Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({batch}) {where}."
        )
    if input.dim() == 2:
        if target.dim() != 1:
            raise RuntimeError(
                f"{fn}: 0D or 1D target tensor expected, multi-target not supported {where}"
            )
        return
    expected = [input.shape[0]] + list(input.shape[2:])
    if list(target.shape) != expected:
        raise RuntimeError(f"{fn}: Expected target size {expected}, got {list(target.shape)} {where}")


def _softmax_dim(ndim: int, stacklevel: int, name: str) -> int:
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_apply(log: bool, x3):
    if _tracks_grad(x3):
        if torch.compiler.is_compiling():
            function = _LOG_SOFTMAX_FOR_COMPILE if log else _SOFTMAX_FOR_COMPILE
        else:
            function = LogSoftmaxFunction if log else SoftmaxFunction
        return function.apply(x3)
    return ops.softmax_fwd(x3, log)


def _softmax_common(log, name, input, dim, stacklevel, dtype):
    if dim is None:
        dim = _softmax_dim(input.dim(), stacklevel + 1, name)
    if dtype is not None:
        input = input.to(dtype)
    _check_floating(input, "input", name)
    if input.dim() == 0:
        if dim not in (0, -1):
            raise IndexError(
                f"Dimension out of range (expected to be in range of [-1, 0], but got {dim})"
            )
        return _softmax_apply(log, input.reshape(1, 1, 1)).reshape(())
    ndim = input.dim()
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], "
            f"but got {dim})"
        )
    dim = dim % ndim
    shape = tuple(input.shape)
    x3 = input.reshape(_numel(shape[:dim]), shape[dim], _numel(shape[dim + 1:]))
    return _softmax_apply(log, x3).reshape(shape)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """softmax(x)_c = exp(x_c - logsumexp(x)); a drop-in for ``torch.nn.functional.softmax``
    with a hand-written gradient (y * (g - <g, y>))."""
    return _softmax_common(False, "softmax", input, dim, _stacklevel, dtype)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """log_softmax(x)_c = x_c - logsumexp(x); a drop-in for ``torch.nn.functional.log_softmax``
    with a hand-written gradient (g - exp(y) * sum(g))."""
    return _softmax_common(True, "log_softmax", input, dim, _stacklevel, dtype)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    """Sigmoid + binary cross-entropy; a drop-in for
    ``torch.nn.functional.binary_cross_entropy_with_logits``.

    loss = w * [(1 - y) x + (1 + (pos_weight - 1) y) log(1 + exp(-x))], gradient
    w * [(pos_weight y + 1 - y) sigmoid(x) - pos_weight y] (sigmoid(x) - y without weights).
    """
    fn = "binary_cross_entropy_with_logits"
    reduction = _reduction(size_average, reduce, reduction)
    _check_floating(input, "input", fn)
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    if not target.is_floating_point():
        raise RuntimeError(
            f"{fn}: argument 'target' must be a floating point tensor, got {target.dtype}"
        )
    _check_device(target, "target", input, fn)
    for name, extra in (("weight", weight), ("pos_weight", pos_weight)):
        if extra is None:
            continue
        _check_no_grad(extra, name, fn)
        _check_device(extra, name, input, fn)
        try:
            shape = torch.broadcast_shapes(extra.shape, input.shape)
        except RuntimeError as error:
            raise RuntimeError(
                f"{fn}: argument '{name}' of shape {list(extra.shape)} does not broadcast to "
                f"the input's shape {list(input.shape)}: {error}"
            ) from None
        if tuple(shape) != tuple(input.shape):
            raise RuntimeError(
                f"{fn}: argument '{name}' of shape {list(extra.shape)} broadcasts to "
                f"{list(shape)}, larger than the input's shape {list(input.shape)}"
            )
    # torch computes this loss in the target's dtype ((1 - target) * input, in place).
    common = target.dtype
    if _autocast_to_float32(input) and common in _AUTOCAST_ELIGIBLE:
        common = torch.float32
    x = input if input.dtype == common else input.to(common)
    t = target if target.dtype == common else target.to(common)
    w = weight.to(common) if weight is not None else None
    pw = pos_weight.to(common) if pos_weight is not None else None
    if _tracks_grad(x, t):
        function = _BCE_FOR_COMPILE if torch.compiler.is_compiling() else SigmoidCrossEntropyFunction
        loss = function.apply(x, t, w, pw)
    else:
        loss = ops.sigmoid_ce_fwd(x, t, w, pw)
    if reduction == "none":
        return loss
    # accumulate in float32 (as torch's sum and mean do for half precision), in a fixed order
    total = fixed_order_sum(loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss)
    if reduction == "mean":
        total = total / loss.numel()
    return total.to(loss.dtype)
