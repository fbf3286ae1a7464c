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


def _installed_from() -> str:
    """What pip installed this package from (a local checkout or archive: its direct_url.json,
    PEP 610), else its name."""
    import importlib.metadata
    import json

    try:
        url = json.loads(importlib.metadata.distribution("softmax-ce").read_text(
            "direct_url.json") or "{}").get("url", "")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        url = ""
    return url[len("file://"):] if url.startswith("file://") else url or "softmax-ce"


def _load_extension():
    """(the _C module or None, why it is missing, the command that builds it, whether to warn)."""
    import glob
    import importlib.util

    if os.environ.get("SOFTMAX_CE_DISABLE_EXTENSION", "0") not in ("", "0"):
        return None, "disabled by SOFTMAX_CE_DISABLE_EXTENSION", None, False
    import torch  # libtorch must be loaded before the extension

    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.dirname(here)
    if os.path.exists(os.path.join(source, "setup.py")):  # a source checkout (editable)
        fix = f"pip install --no-build-isolation -e {source}"
    else:  # reinstalled from where it came from (pip records it), never from pip's wheel cache
        fix = ("pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "
               f"{_installed_from()}")
    built = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here,
                                                                                  "_C*.pyd")))
    if not built:
        on_purpose = importlib.util.find_spec("softmax_ce._no_extension") is not None
        why = ("not built: installed with SOFTMAX_CE_SKIP_EXTENSION=1" if on_purpose else
               "not built: this install has no compiled kernels (built where torch was not "
               "importable, e.g. pip's isolated build, or not built yet)")
        return None, why, fix, not on_purpose
    try:
        from . import _C as module

        return module, None, None, False
    except ImportError as error:
        why = (f"{os.path.basename(built[0])} does not load with torch {torch.__version__} "
               f"(built against another torch?): {error}")
        return None, why, fix, True


# The extension must load before the Python op definitions refer to its kernels' namespace; it
# registers CPU/CUDA kernels only (TORCH_LIBRARY_IMPL), the schemas live in ops.py.
_C, extension_error, extension_fix, _warn = _load_extension()
if _warn:
    import warnings

    warnings.warn(f"softmax_ce: the compiled kernels are missing ({extension_error}); every op "
                  "runs the pure-PyTorch reference (the same results, slower). Build them "
                  f"against this torch with: {extension_fix}", RuntimeWarning, stacklevel=2)

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
        "torch": __import__("torch").__version__,
        "extension": _C is not None,
        "extension_error": extension_error,
        "extension_fix": extension_fix,
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
