"""Drop-in for code we don't own: ``patch()`` routes ``torch.nn.functional.cross_entropy``, and with
it ``torch.nn.CrossEntropyLoss`` (whose ``forward`` calls it), through ``softmax_ce.cross_entropy``.

    softmax_ce.patch()              # from now on, process-wide
    softmax_ce.unpatch()            # torch's own again

    with softmax_ce.patch():        # only inside the block
        trainer.fit(model)

Training loops of other libraries (timm, Lightning, Hugging Face's Trainer) call
``torch.nn.functional.cross_entropy`` by attribute at each call and so get ours. Code that bound
the function itself before the patch (``from torch.nn.functional import cross_entropy``) keeps
torch's. Calls whose arguments have a ``__torch_function__`` override (tensor subclasses) or are
DTensors go to torch's function, which dispatches them as before, and so do calls on a device
that the compiled kernels do not serve (a warning says so once per device type). Patches nest: the last exit
(or ``unpatch()``) restores torch's function.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as _torch_F
from torch import Tensor

from . import _args as A
from . import functional, ops

__all__ = ["patch", "unpatch", "is_patched"]

_lock = threading.Lock()
_original = [None]  # torch's function while patched
_depth = [0]


def _cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                   size_average=None, ignore_index: int = -100, reduce=None,
                   reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    if _defer_to_torch(input, target, weight) or not _compiled_for(input):
        return _original[0](input, target, weight, size_average, ignore_index, reduce, reduction,
                            label_smoothing)
    return functional.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                                    reduction, label_smoothing)


def _defer_to_torch(*tensors) -> bool:
    """Arguments torch's function must see: ``__torch_function__`` overrides, and DTensors
    (sharded tensors, which our ops do not know how to split)."""
    if torch.overrides.has_torch_function_variadic(*tensors):
        return True
    return any(A.is_dtensor(t) for t in tensors)


_compiled = {}  # device type -> whether the compiled kernels serve it


def _compiled_for(input) -> bool:
    """Whether the compiled kernels serve the input's device. Where they do not (a CUDA device
    without the CUDA kernels built, the extension missing), torch's function is faster than our
    pure-PyTorch reference: the call goes there, with a warning once per device type."""
    if not isinstance(input, Tensor):
        return True  # torch's checks, through ours
    kind = input.device.type
    known = _compiled.get(kind)
    if known is None:
        known = _compiled[kind] = ops.implementation(kind) == "compiled"
        if not known:
            warnings.warn(
                f"softmax_ce.patch(): no compiled kernels for {kind} tensors (`python -m "
                "softmax_ce info` says why); torch.nn.functional.cross_entropy runs torch's own "
                "function for them", RuntimeWarning, stacklevel=3)
    return known


_cross_entropy.__doc__ = (
    "torch.nn.functional.cross_entropy, routed through softmax_ce.cross_entropy by "
    "softmax_ce.patch() (softmax_ce.unpatch() restores torch's).")


class _Patch:
    """What ``patch()`` returns: the patch is on already; as a context manager it is undone at
    the end of the block."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _release()
        return False


def patch() -> _Patch:
    """Route ``torch.nn.functional.cross_entropy`` (and ``nn.CrossEntropyLoss``) through
    softmax_ce. Returns a handle that also works as a context manager."""
    with _lock:
        if _depth[0] == 0:
            _original[0] = _torch_F.cross_entropy
            _torch_F.cross_entropy = _cross_entropy
        _depth[0] += 1
    return _Patch()


def _release() -> None:
    with _lock:
        if _depth[0] == 0:
            return
        _depth[0] -= 1
        if _depth[0] == 0:
            _torch_F.cross_entropy = _original[0]
            _original[0] = None


def unpatch() -> None:
    """Restore torch's ``cross_entropy`` whatever the number of ``patch()`` calls."""
    with _lock:
        if _depth[0] > 0:
            _torch_F.cross_entropy = _original[0]
            _original[0] = None
            _depth[0] = 0


def is_patched() -> bool:
    return _depth[0] > 0
