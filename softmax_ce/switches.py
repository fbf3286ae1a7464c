"""Process-wide switches of the package (worker threads see the caller's setting)."""

from __future__ import annotations

__all__ = ["gradient_in_forward"]


class gradient_in_forward:
    """Whether ``cross_entropy`` with a ``mean`` or ``sum`` reduction forms the logits' gradient
    in its forward pass when they require grad (default: yes). A process-wide setting (worker
    threads of ``nn.DataParallel`` and of a user's thread pool see the caller's choice), usable as
    a call (``softmax_ce.gradient_in_forward(False)`` sets it from then on) or as a context
    manager (restores the previous setting on exit).

    With it the forward reads the logits once and writes their gradient once, and
    ``loss.backward()`` only hands that gradient over: the least memory traffic a forward plus
    backward can have. The gradient is held from the forward to the backward (the same peak
    memory as computing it in the backward) and is wasted work if no backward follows. An
    upstream gradient other than 1 costs one more pass (the gradient is redone for it): a loop
    that always scales its loss before ``backward()`` (gradient accumulation by ``loss / k``,
    ``GradScaler``, a sum divided by the number of tokens) moves more memory with it than
    without it, and should turn it off. Without it the forward reads the logits and the backward
    reads them again and writes the gradient. Not used under ``torch.compile`` or a
    ``torch.func`` transform, with ``inplace_backward=True`` or with ``reduction='none'``.
    """

    _enabled = True  # the process-wide setting

    def __init__(self, enabled: bool = True):
        self.previous = gradient_in_forward._enabled
        gradient_in_forward._enabled = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        gradient_in_forward._enabled = self.previous
        return False


def gradient_in_forward_enabled() -> bool:
    """The current setting of ``gradient_in_forward``."""
    return gradient_in_forward._enabled
