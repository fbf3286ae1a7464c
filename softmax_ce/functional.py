"""torch-compatible functions: ``cross_entropy``, ``softmax``, ``log_softmax`` and
``binary_cross_entropy_with_logits``.

Signatures are torch's own (positional order and deprecated ``size_average`` / ``reduce``
included) plus keyword-only extensions. ``cross_entropy`` sends a call to the CPU host fast path,
the vocab-parallel path (``softmax_ce.distributed``: a process group or DTensor logits) or the
single-device path (``_core``); the argument checks live in ``_args``. Validation looks only at
shapes, dtypes and Python values, never at tensor data, so ``torch.compile(fullgraph=True)``
traces every function without a graph break.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _args as A
from . import _core
from . import ops
from .autograd import LogSoftmaxFunction, SoftmaxFunction, without_jvp
from .autograd_sigmoid import SigmoidCrossEntropyFunction
from .fixed_sum import fixed_order_sum
from .switches import gradient_in_forward

__all__ = [
    "cross_entropy",
    "softmax",
    "log_softmax",
    "binary_cross_entropy_with_logits",
    "gradient_in_forward",
]

# The Functions' jvp-free twins, applied under torch.compile (autograd.without_jvp).
_SOFTMAX_FOR_COMPILE = without_jvp(SoftmaxFunction)
_LOG_SOFTMAX_FOR_COMPILE = without_jvp(LogSoftmaxFunction)
_BCE_FOR_COMPILE = without_jvp(SigmoidCrossEntropyFunction)


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
    token_weight: Optional[Tensor] = None,
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
      token_weight: a float factor per position (shaped like a class-index target, or like the
        logits without their class dimension), multiplying each position's loss: ``none``
        returns ``token_weight * loss``, ``sum`` their sum, ``mean`` divides it by the sum of
        ``token_weight * weight[y]`` over the kept positions (of ``token_weight`` for
        probability targets). Folded into the gradient formed in the forward; it gets no
        gradient itself (an error if it requires one).
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
            and token_weight is None and not inplace_backward
            and (reduction == "mean" or reduction == "sum")):
        loss = _core.host_cross_entropy(input, target, weight, ignore_index, label_smoothing,
                                        z_loss, reduction == "mean")
        if loss is not None:
            return loss
    reduction = A.reduction_of(size_average, reduce, reduction)
    if process_group is not None or A.is_dtensor(input):
        from . import distributed

        if token_weight is not None:
            raise NotImplementedError("cross_entropy: token_weight is not supported with a "
                                      "process group or DTensor logits")

        if process_group is None:
            return distributed.cross_entropy_dtensor(
                input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                inplace_backward, "cross_entropy")
        return distributed.cross_entropy_over_group(
            input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
            inplace_backward, process_group, "cross_entropy")
    return _core.cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing,
                               z_loss, softcap, inplace_backward, "cross_entropy", token_weight)



def _softmax_dim(ndim: int, stacklevel: int, name: str) -> int:
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_apply(log: bool, x3):
    if A.tracks_grad(x3):
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
    A.check_floating(input, "input", name)
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
    x3 = input.reshape(A.numel(shape[:dim]), shape[dim], A.numel(shape[dim + 1:]))
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
    reduction = A.reduction_of(size_average, reduce, reduction)
    A.check_floating(input, "input", fn)
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    if not target.is_floating_point():
        raise RuntimeError(
            f"{fn}: argument 'target' must be a floating point tensor, got {target.dtype}"
        )
    A.check_device(target, "target", input, fn)
    for name, extra in (("weight", weight), ("pos_weight", pos_weight)):
        if extra is None:
            continue
        A.check_no_grad(extra, name, fn)
        A.check_device(extra, name, input, fn)
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
    if A.autocast_to_float32(input) and common in A.AUTOCAST_ELIGIBLE:
        common = torch.float32
    x = input if input.dtype == common else input.to(common)
    t = target if target.dtype == common else target.to(common)
    w = weight.to(common) if weight is not None else None
    pw = pos_weight.to(common) if pos_weight is not None else None
    if A.tracks_grad(x, t):
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
