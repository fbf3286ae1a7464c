"""A sum in a fixed order: the reductions of the losses (``mean`` / ``sum``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fixed_order_sum"]

_SUM_CHUNK = 4096


def fixed_order_sum(values: Tensor) -> Tensor:
    """Sum in a fixed order, bit-identical whatever the number of threads: torch's CPU sum of a
    long vector splits it by thread. Rows of a fixed width are summed (one thread per row, a
    fixed order inside), then the row sums, until one row is left. Under ``torch.compile``,
    inductor's own sum: the loop's size-dependent branches would be guards, and every new row
    count above 4096 would recompile."""
    flat = values.reshape(-1)
    if torch.compiler.is_compiling():
        return flat.sum()
    while flat.numel() > _SUM_CHUNK:
        pad = (-flat.numel()) % _SUM_CHUNK
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        flat = flat.view(-1, _SUM_CHUNK).sum(dim=1)
    return flat.sum()
