"""softmax_ce: softmax and cross-entropy as one fused operation with a hand-written gradient.

    loss = lse(x) - x_y,   dloss/dx = softmax(x) - onehot(y)

Drop-in for ``torch.nn.functional.cross_entropy`` / ``nn.CrossEntropyLoss`` (plus z-loss,
logit soft-capping and opt-in in-place gradients), ``binary_cross_entropy_with_logits``,
``softmax`` and ``log_softmax``. Compiled CPU/CUDA kernels serve the ops where the extension is
built; a pure-PyTorch reference serves everything else (see ``implementation()``).
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# The extension must load before the Python op definitions refer to its kernels' namespace; it
# registers CPU/CUDA kernels only (TORCH_LIBRARY_IMPL), the schemas live in ops.py.
extension_error = None
if os.environ.get("SOFTMAX_CE_DISABLE_EXTENSION", "0") not in ("", "0"):
    _C = None
    extension_error = "disabled by SOFTMAX_CE_DISABLE_EXTENSION"
else:
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        from . import _C
    except ImportError as error:  # not built: the reference serves every device
        _C = None
        extension_error = str(error)

from . import nn, ops  # noqa: E402
from .autograd import (  # noqa: E402
    LogSoftmaxFunction,
    ReducedCrossEntropyFunction,
    SoftmaxCrossEntropyFunction,
    SoftmaxFunction,
)
from .autograd_sigmoid import SigmoidCrossEntropyFunction  # noqa: E402
from .functional import (  # noqa: E402
    binary_cross_entropy_with_logits,
    cross_entropy,
    gradient_in_forward,
    log_softmax,
    softmax,
)
from .switches import chunk_memory  # noqa: E402
from .linear import linear_cross_entropy  # noqa: E402
from .tokens import TokenLogProbs, linear_log_probs, log_probs  # noqa: E402
from .patch import is_patched, patch, unpatch  # noqa: E402
from .ops import force_reference, implementation  # noqa: E402


def cuda_take_target_error():
    """The out-of-range class index the CUDA kernels met since the last call, or None.

    On the GPU an out-of-range target never triggers a device-side assert (which would poison
    the CUDA context) and no kernel synchronises to check: the position gets a NaN loss and
    gradient, and the first offending value is recorded on the device. This reads and clears it,
    ordered after the work queued on the current stream (and waiting for it): call it in the
    stream context of the loss, where you would check a loss anyway.
    """
    if _C is None:
        return None
    return _C.cuda_take_target_error()


def empty_cache() -> None:
    """Release the output buffers the CPU kernels keep for reuse.

    The backward's gradient (and softmax's output) are large, freshly allocated buffers; freed
    ones are kept (at most four) and reused by later calls, so that a training loop does not pay
    first-touch page faults on every step. This returns them to the system.
    """
    if _C is not None:
        _C.empty_cache()


def build_info() -> dict:
    """What the extension was built with and which implementation serves each device."""
    info = {
        "version": __version__,
        "extension": _C is not None,
        "extension_error": extension_error,
        "cpu": implementation("cpu"),
        "cuda": implementation("cuda"),
    }
    if _C is not None:
        info["cpu_isa"] = _C.cpu_isa()
        info["cuda_compiled"] = _C.cuda_compiled()
    return info


__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "log_probs",
    "linear_log_probs",
    "TokenLogProbs",
    "patch",
    "unpatch",
    "is_patched",
    "binary_cross_entropy_with_logits",
    "softmax",
    "log_softmax",
    "nn",
    "ops",
    "implementation",
    "force_reference",
    "gradient_in_forward",
    "chunk_memory",
    "build_info",
    "cuda_take_target_error",
    "empty_cache",
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "SoftmaxCrossEntropyFunction",
    "ReducedCrossEntropyFunction",
    "SigmoidCrossEntropyFunction",
]
