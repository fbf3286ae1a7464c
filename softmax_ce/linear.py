"""Fused linear + cross-entropy: ``cross_entropy(linear(input, W, b), target)`` without the logits
ever existing whole (a drop-in for torch's ``F.linear_cross_entropy``, plus z-loss, soft-capping
and a chunk size). How it works: ``_linear_core`` (the chunk loop, its ops and Functions) and
docs/linear.md; over a process group: ``softmax_ce.distributed.linear_head``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _args as A
from ._linear_core import (
    check_shapes,
    chunk_option,
    default_chunk_size,
    linear_cross_entropy_acc,
)

__all__ = ["linear_cross_entropy", "default_chunk_size"]


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    grad_weight_acc_dtype: Optional[torch.dtype] = None,
    process_group=None,
) -> Tensor:
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` with the logits
    computed a chunk of rows at a time, never whole; torch 2.13's ``F.linear_cross_entropy``
    signature and semantics (``ignore_index=None`` means -100 for class indices).

    input ``(N, H)`` or ``(H,)``; linear_weight ``(C, H)`` (or ``(C, d_1, ..., d_K, H)``: the
    composite runs); target class indices ``(N,)`` / ``()`` (int64 or int32) or probabilities
    ``(N, C)`` / ``(C,)``. ``options`` (torch's ``LinearCrossEntropyOptions``): its
    ``batch_chunk_size`` and ``acc_dtype`` are honoured, the rest accepted.

    Keyword-only extensions: ``z_loss``, ``softcap`` (as in ``cross_entropy``); ``chunk_size``
    (rows per chunk; default: ``default_chunk_size``); ``grad_weight_acc_dtype`` (float32, the
    default for half inputs, or the input's dtype). Results do not depend on the chunk size
    beyond rounding.

    ``process_group`` (vocab-parallel): ``linear_weight`` (and ``linear_bias``) hold this rank's
    slice of the vocabulary rows, ``[r * C_local, (r + 1) * C_local)`` on rank r, slices of one
    size; ``input``, ``target`` (global class indices, or probabilities sliced like the local
    logits) and ``weight`` (all classes) are the same on every rank. The logits are never whole
    on any rank. The input's gradient is the full one, already summed over the group inside
    this function (do not all-reduce it again); the weight's and bias's are this rank's slice.
    Collectives: one all-gather of a few floats per row and one all-reduce of the input's
    gradient, both in the forward for a ``mean`` / ``sum`` loss (``softmax_ce.distributed``).
    """
    if process_group is not None:
        from .distributed import linear_cross_entropy_over_group

        fn = "linear_cross_entropy"
        reduction = A.reduction_of(None, None, reduction)
        check_shapes(input, linear_weight, linear_bias, fn)
        if options is not None or grad_weight_acc_dtype is not None:
            raise NotImplementedError(f"{fn}: options and grad_weight_acc_dtype are not "
                                      "supported with a process group")
        opts = A.ce_options(-100 if ignore_index is None else ignore_index, label_smoothing,
                            z_loss, softcap, fn)
        return linear_cross_entropy_over_group(
            input, linear_weight, target, linear_bias, weight, reduction, opts,
            chunk_option(None, chunk_size, fn), process_group, fn)
    loss = linear_cross_entropy_acc(input, linear_weight, target, linear_bias, weight, reduction,
                                    ignore_index, label_smoothing, options, z_loss, softcap,
                                    chunk_size, grad_weight_acc_dtype)
    return loss.to(input.dtype)
