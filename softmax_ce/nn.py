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

from . import functional as F

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "Softmax", "LogSoftmax"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` plus keyword-only ``z_loss``, ``softcap`` and
    ``inplace_backward`` (see ``softmax_ce.cross_entropy``)."""

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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        # torch checks reduction and label_smoothing at the call; our extensions are checked here.
        F._check_z_loss_softcap(z_loss, softcap, type(self).__name__)
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.inplace_backward = bool(inplace_backward)

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
