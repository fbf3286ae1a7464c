"""``nn.Module`` losses with torch.nn's constructor signatures.

Each subclasses its torch.nn counterpart, so ``weight`` / ``pos_weight`` are the same buffers (a
``state_dict`` saved from the torch module loads into ours and back) and ``isinstance`` checks
written for torch's classes still hold. Arguments torch validates at the call are validated at the call (as torch); our extensions in
``__init__``. ``forward`` is one call into ``softmax_ce.functional``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _args as A
from . import functional as F
from .linear import linear_cross_entropy
from .tokens import TokenLogProbs, linear_log_probs

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "Softmax", "LogSoftmax",
           "LinearCrossEntropyLoss", "TiedLinearCrossEntropyLoss", "LinearLogProbs"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` plus keyword-only ``z_loss``, ``softcap``,
    ``inplace_backward`` and ``process_group`` (see ``softmax_ce.cross_entropy``)."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        # torch checks reduction and label_smoothing at the call; our extensions are checked here.
        A.check_z_loss_softcap(z_loss, softcap, type(self).__name__)
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.inplace_backward = bool(inplace_backward)
        self.process_group = process_group  # vocab-parallel: see softmax_ce.cross_entropy

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss`` (``weight`` and ``pos_weight`` buffers)."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Optional[Tensor] = None) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class Softmax(torch.nn.Softmax):
    """Drop-in for ``torch.nn.Softmax`` with the hand-written gradient."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """Drop-in for ``torch.nn.LogSoftmax`` with the hand-written gradient."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class _LinearCrossEntropyOptions:
    """The options and the call shared by the two fused linear cross-entropy modules."""

    def _set_options(self, ignore_index, label_smoothing, options, z_loss, softcap, chunk_size,
                     grad_weight_acc_dtype, vocab_chunk_size=None) -> None:
        A.check_z_loss_softcap(z_loss, softcap, type(self).__name__)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.chunk_size = chunk_size
        self.grad_weight_acc_dtype = grad_weight_acc_dtype
        self.vocab_chunk_size = vocab_chunk_size

    def _loss(self, input, linear_weight, target, linear_bias, token_weight):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, z_loss=self.z_loss,
            softcap=self.softcap, chunk_size=self.chunk_size,
            grad_weight_acc_dtype=self.grad_weight_acc_dtype, token_weight=token_weight,
            vocab_chunk_size=self.vocab_chunk_size,
        )


class LinearCrossEntropyLoss(_LinearCrossEntropyOptions, torch.nn.modules.loss._WeightedLoss):
    """A head (``self.linear``) and its cross-entropy in one, the logits never whole: torch
    2.13's ``nn.LinearCrossEntropyLoss`` constructor and attributes (its ``state_dict`` loads into
    ours and back), plus keyword-only ``z_loss``, ``softcap``, ``chunk_size``,
    ``grad_weight_acc_dtype`` and ``vocab_chunk_size`` (see ``softmax_ce.linear_cross_entropy``);
    ``forward(input, target, token_weight=None)``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        grad_weight_acc_dtype: Optional[torch.dtype] = None,
        vocab_chunk_size: Optional[int] = None,
    ) -> None:
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}"
            )
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}"
            )
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self._set_options(ignore_index, label_smoothing, options, z_loss, softcap, chunk_size,
                          grad_weight_acc_dtype, vocab_chunk_size)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        features = num_classes
        for d in self.out_features:
            features *= d
        self.linear = torch.nn.Linear(in_features, features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor,
                token_weight: Optional[Tensor] = None) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        lin_w = self.linear.weight.reshape((*shape, self.linear.in_features))
        lin_b = self.linear.bias.reshape(shape) if self.linear.bias is not None else None
        return self._loss(input, lin_w, target, lin_b, token_weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}")


class TiedLinearCrossEntropyLoss(_LinearCrossEntropyOptions,
                                 torch.nn.modules.loss._WeightedLoss):
    """The fused linear cross-entropy for a head that lives elsewhere (tied embeddings, a
    model's own ``lm_head``): no parameters; ``forward(input, linear_weight, target,
    linear_bias=None)``. Options as ``LinearCrossEntropyLoss``."""

    def __init__(self, *, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None,
                 grad_weight_acc_dtype: Optional[torch.dtype] = None,
                 vocab_chunk_size: Optional[int] = None) -> None:
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self._set_options(ignore_index, label_smoothing, options, z_loss, softcap, chunk_size,
                          grad_weight_acc_dtype, vocab_chunk_size)

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None,
                token_weight: Optional[Tensor] = None) -> Tensor:
        return self._loss(input, linear_weight, target, linear_bias, token_weight)


class LinearLogProbs(torch.nn.Module):
    """A head (``self.linear``) and its per-token outputs in one module, the logits never whole:
    ``forward(input, target)`` returns ``softmax_ce.TokenLogProbs`` (see
    ``softmax_ce.linear_log_probs``). Its call reads the weight, so FSDP's hooks gather and free
    it around the call (``fully_shard`` on this module) and a DTensor weight sharded on the
    vocabulary (tensor parallel) takes the vocab-parallel path."""

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, device=None,
                 dtype=None, temperature: float = 1.0, ignore_index: int = -100,
                 entropy: bool = False, top_k: int = 0, chunk_size: Optional[int] = None,
                 process_group=None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.entropy, self.top_k, self.chunk_size = entropy, top_k, chunk_size
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor) -> TokenLogProbs:
        return linear_log_probs(input, self.linear.weight, target, self.linear.bias,
                                temperature=self.temperature, ignore_index=self.ignore_index,
                                entropy=self.entropy, top_k=self.top_k,
                                chunk_size=self.chunk_size, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.linear.out_features}, "
                f"bias={self.linear.bias is not None}, temperature={self.temperature}, "
                f"entropy={self.entropy}, top_k={self.top_k}")
