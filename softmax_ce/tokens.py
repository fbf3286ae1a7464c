"""Per-token outputs for RL and evaluation: each position's log-probability of its target under
``softmax(z / T)``, the log-sum-exp, the entropy, the argmax and the top-k, from the logits
(``log_probs``) or from the head's input and weight without the logits ever whole
(``linear_log_probs``), differentiable with hand-written gradients (docs/tokens.md)."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from . import _args as A
from ._linear_core import chunk_option
from ._tokens_core import (TokenOptions, check_linear_args, check_token_target, token_chunk_size,
                           token_options, tokens)

__all__ = ["TokenLogProbs", "log_probs", "linear_log_probs"]


class TokenLogProbs(NamedTuple):
    """Per-token outputs, each shaped like the target (top-k: ``(..., k)``); float32 for
    bfloat16 / float16 inputs, the input's dtype otherwise."""

    log_prob: Tensor  # log softmax(z / T)[target]; 0 where target == ignore_index
    lse: Tensor  # logsumexp(z / T)
    argmax: Tensor  # int64, the most probable class (the lowest index on ties)
    entropy: Optional[Tensor]  # -sum p log p of softmax(z / T), or None
    top_k_log_probs: Optional[Tensor]  # (..., k), descending, or None
    top_k_indices: Optional[Tensor]  # (..., k) int64, or None


def _result(outs, positions, opts: TokenOptions) -> TokenLogProbs:
    lp, lse, am, H, vals, idx = outs
    shape = tuple(positions)
    return TokenLogProbs(lp.reshape(shape), lse.reshape(shape), am.reshape(shape),
                         H.reshape(shape) if opts.entropy else None,
                         vals.reshape(*shape, opts.top_k) if opts.top_k else None,
                         idx.reshape(*shape, opts.top_k) if opts.top_k else None)


def log_probs(logits: Tensor, target: Tensor, *, temperature: float = 1.0,
              ignore_index: int = -100, entropy: bool = False, top_k: int = 0) -> TokenLogProbs:
    """Per-token outputs of ``logits`` ``(..., C)`` (classes last) for ``target`` ``(...)``:
    ``log_prob`` = log softmax(logits / T)[target] (0 and no gradient where target ==
    ignore_index), ``lse`` = logsumexp(logits / T), ``argmax``, and with ``entropy=True`` /
    ``top_k=k`` the entropy of softmax(logits / T) and its k largest log-probabilities with their
    classes. ``log_prob``, ``lse``, ``entropy`` and ``top_k_log_probs`` are differentiable, in any
    combination (one backward pass, the rows a chunk at a time)."""
    fn = "log_probs"
    A.check_floating(logits, "logits", fn)
    if logits.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'logits' must have a class dimension (last), got a "
                           "0-dim tensor")
    C = logits.shape[-1]
    positions = tuple(logits.shape[:-1])
    t = check_token_target(target, positions, logits, fn)
    opts = token_options(temperature, ignore_index, entropy, top_k, C, fn)
    if C == 0 and A.numel(positions) > 0:
        raise RuntimeError(f"{fn}: argument 'logits' has no classes (shape {list(logits.shape)})")
    z = logits.reshape(-1, C)
    rows = token_chunk_size(z.shape[0], C, z.dtype)
    outs = tokens(z, None, None, t.reshape(-1), opts, rows, A.tracks_grad(z))
    return _result(outs, positions, opts)


def linear_log_probs(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                     *, temperature: float = 1.0, ignore_index: int = -100,
                     entropy: bool = False, top_k: int = 0, chunk_size: Optional[int] = None,
                     process_group=None) -> TokenLogProbs:
    """``log_probs(input @ weightᵀ + bias, target, ...)`` with the logits a chunk of rows at a
    time, never whole: ``input`` ``(..., H)``, ``weight`` ``(C, H)``, ``bias`` ``(C,)``,
    ``target`` ``(...)``. Gradients of ``input``, ``weight`` and ``bias`` (the chunk's logits
    recomputed in backward). ``process_group`` (or a DTensor ``weight`` sharded on the
    vocabulary): ``weight`` / ``bias`` hold this rank's slice of the vocabulary rows, as in
    ``linear_cross_entropy`` (docs/distributed.md)."""
    fn = "linear_log_probs"
    if process_group is not None or A.is_dtensor(weight) or A.is_dtensor(input):
        from . import distributed

        outs = distributed.linear_log_probs_sharded(
            input, weight, target, bias, temperature, ignore_index, entropy, top_k, chunk_size,
            process_group, fn)  # every argument checked there, on every rank together
        return _result(outs, tuple(input.shape[:-1]),
                       TokenOptions(float(temperature), ignore_index, entropy, int(top_k)))
    check_linear_args(input, weight, bias, fn)
    C, H = weight.shape
    positions = tuple(input.shape[:-1])
    t = check_token_target(target, positions, input, fn)
    opts = token_options(temperature, ignore_index, entropy, top_k, C, fn)
    chunk = chunk_option(None, chunk_size, fn)
    x = input.reshape(-1, H).contiguous()
    rows = chunk if chunk is not None else token_chunk_size(x.shape[0], C, x.dtype)
    outs = tokens(x, weight.contiguous(), bias, t.reshape(-1), opts, max(1, rows),
                  A.tracks_grad(x, weight, bias))
    return _result(outs, positions, opts)
