"""Process-wide switches of the package (worker threads see the caller's setting)."""

from __future__ import annotations

import os

__all__ = ["gradient_in_forward", "chunk_memory"]


class _Setting:
    """A process-wide setting changed by a call; as a context manager, restored on exit. A
    subclass keeps the value in the class attribute ``_value`` and sets it in ``__init__`` after
    ``super().__init__()``."""

    _value = None

    def __init__(self):
        self.previous = type(self)._value

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        type(self)._value = self.previous
        return False


class gradient_in_forward(_Setting):
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

    _value = True  # the process-wide setting

    def __init__(self, enabled: bool = True):
        super().__init__()
        gradient_in_forward._value = bool(enabled)


def gradient_in_forward_enabled() -> bool:
    """The current setting of ``gradient_in_forward``."""
    return gradient_in_forward._value


def _limit_from_environment() -> int:
    text = os.environ.get("SOFTMAX_CE_CHUNK_MEMORY_MIB", "")
    try:
        mib = float(text) if text else 256.0
    except ValueError:
        raise ValueError(f"SOFTMAX_CE_CHUNK_MEMORY_MIB must be a number of MiB, got {text!r}") \
            from None
    if not mib > 0:
        raise ValueError(f"SOFTMAX_CE_CHUNK_MEMORY_MIB must be > 0, got {text!r}")
    return int(mib * (1 << 20))


class chunk_memory(_Setting):
    """The most working memory the fused linear head's default chunk takes (its logits, plus
    their float32 copies for a half-precision head), in bytes: 256 MiB unless the environment
    variable ``SOFTMAX_CE_CHUNK_MEMORY_MIB`` says otherwise. The default chunk is otherwise 1/11
    of what the whole logits would take, which grows with the token count; this bounds it.
    ``softmax_ce.chunk_memory(64 << 20)`` sets it process-wide from then on; as a context manager
    it restores the previous value on exit. An explicit ``chunk_size`` is used as given."""

    _value = _limit_from_environment()

    def __init__(self, limit_bytes: int):
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 1:
            raise ValueError(f"chunk_memory: the limit must be a positive number of bytes, got "
                             f"{limit_bytes!r}")
        super().__init__()
        chunk_memory._value = limit_bytes


def chunk_memory_limit() -> int:
    """The current setting of ``chunk_memory``, in bytes."""
    return chunk_memory._value
