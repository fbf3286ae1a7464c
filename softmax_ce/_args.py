"""What every entry point shares: argument checks with torch's exception types and messages, the
options of the cross-entropy ops, the kernels' layout and the ``mean``'s denominator.

The bottom of the Python layers (docs/architecture.md): ``functional``, ``linear``, ``nn``,
``distributed`` and the integrations import from here, never a private name of one another.
Every check looks only at shapes, dtypes and Python values, never at tensor data, so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops
from .fixed_sum import fixed_order_sum
from .reference import acc_dtype

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)
AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


class CeOptions(NamedTuple):
    """The options every cross-entropy op and Function takes, in their positional order."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: no soft-capping

    def for_probabilities(self):
        """The options of the probability-target ops (no ignore_index)."""
        return self.label_smoothing, self.z_loss, self.softcap

    def without_ignore_index(self) -> "CeOptions":
        """The same options ignoring no class (probability targets). Not ``_replace``: torch
        2.8's dynamo refuses to trace into ``collections``."""
        return CeOptions(-100, self.label_smoothing, self.z_loss, self.softcap)


def reduction_of(size_average, reduce, reduction: str) -> str:
    """The reduction, after torch's legacy ``size_average`` / ``reduce`` (with its warning)."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def check_floating(tensor: Tensor, name: str, fn: str) -> None:
    if not tensor.is_floating_point():
        raise NotImplementedError(
            f"{fn}: argument '{name}' must be a floating point tensor (float64, float32, "
            f"bfloat16 or float16), got {tensor.dtype}"
        )


def check_no_grad(tensor: Optional[Tensor], name: str, fn: str) -> None:
    if tensor is not None and tensor.requires_grad:
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def check_device(tensor: Optional[Tensor], name: str, input: Tensor, fn: str) -> None:
    if tensor is not None and tensor.device != input.device:
        raise RuntimeError(
            f"{fn}: argument '{name}' is on {tensor.device} but 'input' is on {input.device}"
        )


def autocast_to_float32(input: Tensor) -> bool:
    """Whether autocast is on for the input's device (loss functions then run in float32)."""
    if input.device.type == "meta":  # argument checks on meta tensors (never autocast)
        return False
    return input.dtype in AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(input.device.type)


def check_extensions(label_smoothing, z_loss, softcap, fn) -> float:
    """label_smoothing and our extensions' arguments; returns the softcap as a float (0.0: none)."""
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(
            f"{fn}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
        )
    return check_z_loss_softcap(z_loss, softcap, fn)


def check_z_loss_softcap(z_loss, softcap, fn) -> float:
    """Our extensions' arguments; returns the softcap as a float (0.0: none)."""
    if not isinstance(z_loss, (int, float)) or not (0.0 <= z_loss < math.inf):
        raise ValueError(f"{fn}: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is None:
        return 0.0
    if not isinstance(softcap, (int, float)) or not (0.0 < softcap < math.inf):
        raise ValueError(f"{fn}: softcap must be None or a finite float > 0, got {softcap}")
    return float(softcap)


def index(value, name: str, fn: str) -> int:
    """An integer argument: anything ``operator.index`` takes (int, NumPy integers, ...)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{fn}: argument '{name}' must be an integer, got {type(value).__name__}"
        ) from None


def ce_options(ignore_index, label_smoothing, z_loss, softcap, fn) -> CeOptions:
    """The checked options of a cross-entropy call."""
    cap = check_extensions(label_smoothing, z_loss, softcap, fn)
    return CeOptions(index(ignore_index, "ignore_index", fn), float(label_smoothing),
                     float(z_loss), cap)


def tracks_grad(*tensors) -> bool:
    """Whether autograd may record this call: grad mode on and some input requires grad, or a
    torch.func transform or forward-mode AD is running. Calls it does not record skip the
    autograd.Function (a few microseconds per call) and run the op."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return ops.functorch_active() or torch.autograd.forward_ad._current_level >= 0


def inplace_allowed(input: Tensor) -> bool:
    """Whether the backward may write the gradient into the logits' storage: not under
    ``torch.compile`` or a ``torch.func`` transform, and not when that storage belongs to a leaf
    (a parameter or a user's tensor: its values would be destroyed and its ``.grad`` would share
    its storage); the gradient then goes to a fresh buffer."""
    if torch.compiler.is_compiling() or ops.functorch_active():
        return False
    base = input._base if input._base is not None else input
    return not base.is_leaf


def numel(shape) -> int:
    n = 1
    for s in shape:
        n = n * s
    return n


def classes(input: Tensor) -> int:
    """C: dim 1 of a batched input, dim 0 of an unbatched one."""
    return input.shape[1] if input.dim() >= 2 else input.shape[0]


def kernel_layout(input: Tensor):
    """(outer, C, inner) of the kernels' ``[outer, C, inner]`` view, and the spatial dims."""
    spatial = tuple(input.shape[2:])
    outer = input.shape[0] if input.dim() >= 2 else 1
    return outer, classes(input), numel(spatial), spatial


def mean_denominator(t2: Tensor, w: Optional[Tensor], ignore_index: int, C: int,
                     token_weight: Optional[Tensor] = None) -> Tensor:
    """torch's mean over class indices divides by the sum of w[y] over the kept positions (their
    number without weights); with token weights, of token_weight * w[y]. A 0-dim tensor, no
    host synchronisation."""
    valid = t2 != ignore_index
    if token_weight is None and (w is None or C == 0):
        return valid.sum()
    tw = token_weight.reshape(t2.shape) if token_weight is not None else None
    if w is None or C == 0:
        picked = tw
    else:
        # Clamped: an out-of-range class (an IndexError from the CPU kernel, NaN and a recorded
        # value on CUDA) must not index `weight` here (a device-side assert on CUDA).
        safe = torch.where(valid, t2, torch.zeros_like(t2)).long().clamp(0, C - 1)
        picked = w[safe] if tw is None else w[safe] * tw
    zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
    return fixed_order_sum(torch.where(valid, picked, zero))


def check_same_dtype(input: Tensor, named, fn: str) -> None:
    """Each ``(name, tensor or None)`` of ``named`` has the dtype of ``input``."""
    for name, t in named:
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{fn}: expected '{name}' to have the dtype of 'input' "
                               f"({input.dtype}), got {t.dtype}")


def reduction_scale(reduction: str, denom: Optional[Tensor], device) -> Tensor:
    """d(reduced loss)/d(sum of the losses), float64 0-dim: 1 / ``denom`` for ``mean`` (a
    tensor: no host synchronisation), 1 for ``sum`` (``denom`` None)."""
    if reduction == "mean":
        return 1.0 / denom.double()
    return torch.ones((), dtype=torch.float64, device=device)


def check_token_weight(token_weight: Optional[Tensor], positions, input: Tensor,
                       fn: str) -> Optional[Tensor]:
    """A float tensor with one factor per position (``positions``: their shape), on the input's
    device, that does not require grad (like torch's class weight); returned in the input's
    accumulation dtype."""
    if token_weight is None:
        return None
    if not isinstance(token_weight, Tensor) or not token_weight.is_floating_point():
        raise TypeError(f"{fn}: argument 'token_weight' must be a floating point tensor, got "
                        f"{getattr(token_weight, 'dtype', type(token_weight).__name__)}")
    if tuple(token_weight.shape) != tuple(positions):
        raise RuntimeError(f"{fn}: argument 'token_weight' must have one value per position, "
                           f"shape {list(positions)}, got {list(token_weight.shape)}")
    check_device(token_weight, "token_weight", input, fn)
    check_no_grad(token_weight, "token_weight", fn)
    return token_weight.to(acc_dtype(input.dtype))


_DTYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
    torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype, as its error messages write it."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def check_target_shape(input: Tensor, target: Tensor, fn: str, input_name="'input'") -> None:
    """torch's (CPU) shape rules for class-index targets, with its exception types: a batch-size
    mismatch is a ValueError, any other shape mismatch a RuntimeError."""
    where = (f"(argument 'target' has shape {list(target.shape)}, {input_name} "
             f"{list(input.shape)})")
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


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(t, cls)
