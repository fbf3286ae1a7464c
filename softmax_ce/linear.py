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
from ._chunks import default_chunk_size
from ._linear_core import linear_cross_entropy_acc

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
    sequence_parallel: bool = False,
    token_weight: Optional[Tensor] = None,
    vocab_chunk_size: Optional[int] = None,
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
    beyond rounding. ``token_weight``: a float factor per position (shaped like the positions of
    ``input``), multiplying each position's loss: ``none`` returns ``token_weight * loss``,
    ``sum`` their sum, ``mean`` divides it by the sum of ``token_weight * weight[y]`` over the
    kept positions; folded into the gradient formed in the forward, no second pass; it gets no
    gradient itself. ``vocab_chunk_size``: accumulate the weight's gradient that many vocabulary
    rows at a time (its float32 accumulator for a half-precision head is then
    ``vocab_chunk_size x H``, not ``C x H``), at the cost of computing the logits twice.

    ``process_group`` (vocab-parallel): ``linear_weight`` (and ``linear_bias``) hold this rank's
    slice of the vocabulary rows, ``[r * C_local, (r + 1) * C_local)`` on rank r, slices of one
    size; ``input`` is the same on every rank, or with ``sequence_parallel=True`` this rank's rows
    of the batch (rank r the r-th of torch.chunk's split of the N positions); ``target`` (every
    position's global class index, or probabilities sliced like the local logits) and ``weight``
    (all classes) are the same on every rank. The logits are never whole on any rank. The
    input's gradient is already summed over the group inside this function (do not all-reduce
    it again); the weight's and bias's are this rank's slice. A ``linear_weight`` that is a
    DTensor sharded on the vocabulary takes this path without the argument (``input`` a plain
    tensor, a replicated DTensor or a DTensor sharded on positions); the loss is then a
    replicated DTensor and each gradient has its input's placements. docs/distributed.md lists
    the collectives per step.
    """
    if process_group is not None or A.is_dtensor(linear_weight) or A.is_dtensor(input):
        from . import distributed

        fn = "linear_cross_entropy"
        args = distributed.HeadArgs(reduction, ignore_index, label_smoothing, z_loss, softcap,
                                    chunk_size, options, grad_weight_acc_dtype, token_weight,
                                    vocab_chunk_size)
        if process_group is not None:
            return distributed.linear_cross_entropy_over_group(
                input, linear_weight, target, linear_bias, weight, args, process_group,
                sequence_parallel, fn)
        if not A.is_dtensor(linear_weight) or sequence_parallel:
            raise NotImplementedError(
                f"{fn}: a DTensor 'input' needs a DTensor 'linear_weight' sharded on the "
                "vocabulary, and sequence_parallel=True a process_group (a DTensor input sharded "
                "on positions is sequence-parallel by its placements)")
        return distributed.linear_cross_entropy_dtensor(input, linear_weight, target,
                                                        linear_bias, weight, args, fn)
    if sequence_parallel:
        raise ValueError("linear_cross_entropy: sequence_parallel=True needs a process_group")
    loss = linear_cross_entropy_acc(input, linear_weight, target, linear_bias, weight, reduction,
                                    ignore_index, label_smoothing, options, z_loss, softcap,
                                    chunk_size, grad_weight_acc_dtype, token_weight,
                                    vocab_chunk_size)
    return loss.to(input.dtype)
