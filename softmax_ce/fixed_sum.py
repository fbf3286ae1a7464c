"""A sum in a fixed order: the reductions of the losses (``mean`` / ``sum``)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

__all__ = ["fixed_order_sum"]

_SUM_CHUNK = 4096
_HOST_DTYPES = (torch.float32, torch.float64)


def fixed_order_sum(values: Tensor) -> Tensor:
    """Sum in a fixed order, bit-identical whatever the number of threads: torch's CPU sum of a
    long vector splits it by thread. Float32 / float64 values on the CPU with the compiled kernels:
    ``softmax_ce::fixed_sum`` (chunks summed in double, one call; the host fast path of
    ``cross_entropy`` sums with it too, so both paths give the same bits). Elsewhere rows of a
    fixed width are summed (one thread per row, a fixed order inside), then the row sums, until
    one row is left (also under torch.func transforms and forward-mode AD, which the op does not
    implement). Under ``torch.compile``, inductor's own sum: the loop's size-dependent
    branches would be guards, and every new row count above 4096 would recompile."""
    flat = values.reshape(-1)
    if torch.compiler.is_compiling():
        return flat.sum()
    if (flat.device.type == "cpu" and flat.dtype in _HOST_DTYPES and ops.host_fast_path()
            and not ops.functorch_active() and torch.autograd.forward_ad._current_level < 0):
        return ops.fixed_sum(flat)
    while flat.numel() > _SUM_CHUNK:
        pad = (-flat.numel()) % _SUM_CHUNK
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        flat = flat.view(-1, _SUM_CHUNK).sum(dim=1)
    return flat.sum()
