"""The per-token outputs' machinery (``tokens.py`` holds the public functions): a chunk of rows at
a time, from the logits or from ``input @ weightᵀ`` (the fused head: the logits never whole), the
outputs of ``reference.token_outputs`` in the forward, the gradient of ``reference.token_gradient``
in the backward (the chunk's logits recomputed), each pass one custom op so that
``torch.compile`` and ``torch.export`` see one node.

The upstream gradients of per-token outputs are not known in the forward (they come from the
caller's objective), so the gradient is formed in the backward: one more GEMM per chunk for the
fused head (four in all, against the loss's three). A differentiable backward
(``create_graph=True``) runs the composite, ``reference.token_outputs`` on the whole logits, so
second and higher derivatives are exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args as A
from . import reference
from ._chunks import GradSums, Needs, chunk_logits, default_chunk_size
from .autograd import input_grads
from .reference import acc_dtype

__all__ = ["TokenOptions", "tokens", "token_options", "check_token_target", "check_linear_args",
           "token_chunk_size"]


class TokenOptions(NamedTuple):
    temperature: float
    ignore_index: int
    entropy: bool
    top_k: int


def _chunks(x, lin_w, lin_b, rows: int):
    """(start, end, logits) per chunk of rows: slices of ``x`` (the logits, ``lin_w`` None) or
    ``x @ lin_wᵀ (+ lin_b)`` in a reused buffer."""
    if lin_w is None:
        for i in range(0, x.shape[0], rows):
            yield i, min(x.shape[0], i + rows), x[i:i + rows]
    else:
        yield from chunk_logits(x, lin_w, lin_b, rows)


def token_forward(x, lin_w, lin_b, target, opts: TokenOptions, rows: int):
    """(log_prob, lse, argmax, entropy, top-k log-probabilities, top-k indices, lse in float64)
    of every row, a chunk at a time; entropy ``[0]`` and the top-k ``[N, 0]`` when not asked."""
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    out = dict(dtype=acc, device=x.device)
    log_prob, lse = torch.empty(N, **out), torch.empty(N, **out)
    argmax = torch.empty(N, dtype=torch.int64, device=x.device)
    H = torch.empty(N if opts.entropy else 0, **out)
    values = torch.empty((N, opts.top_k), **out)
    indices = torch.empty((N, opts.top_k), dtype=torch.int64, device=x.device)
    lse64 = torch.empty(N, dtype=torch.float64, device=x.device)
    scratch = lin_w is not None  # the chunk's logits are our buffer (else the caller's logits)
    for i, j, z in _chunks(x, lin_w, lin_b, rows):
        lp, l_, am, h, v, ix, l64 = reference.token_outputs(
            z, target[i:j], opts.temperature, opts.ignore_index, opts.entropy, opts.top_k,
            inplace=scratch)
        log_prob[i:j], lse[i:j], argmax[i:j], lse64[i:j] = lp, l_, am, l64
        if opts.entropy:
            H[i:j] = h
        if opts.top_k:
            values[i:j], indices[i:j] = v, ix
    return log_prob, lse, argmax, H, values, indices, lse64


def token_backward(x, lin_w, lin_b, target, lse64, H, topk_index, upstream, opts: TokenOptions,
                   rows: int, needs: Needs):
    """The gradients (x, lin_w, lin_b; empty where not asked) of the outputs for the upstream
    gradients ``upstream`` = (g_lp, g_lse, g_entropy, g_topk), each None for zero."""
    g_lp, g_lse, g_H, g_k = upstream
    if lin_w is None:
        gi = torch.empty_like(x, memory_format=torch.contiguous_format) if needs.input \
            else x.new_empty((0,))
        sums = None
    else:
        sums = GradSums(x, lin_w, lin_b, needs, acc_dtype(x.dtype))
    for i, j, z in _chunks(x, lin_w, lin_b, rows):
        t = target[i:j]
        valid = t != opts.ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t)).long()
        k_index = topk_index[i:j] if g_k is not None else None
        G = reference.token_gradient(
            reference.token_log_p(z, opts.temperature, lse64[i:j], inplace=sums is not None),
            opts.temperature, inplace=True,
            g_lp=None if g_lp is None else g_lp[i:j], valid=valid, index=safe, owned=valid,
            g_lse=None if g_lse is None else g_lse[i:j],
            g_entropy=None if g_H is None else g_H[i:j], entropy=H[i:j] if g_H is not None
            else None, g_topk=None if g_k is None else g_k[i:j], topk_index=k_index,
            topk_owned=None if k_index is None else torch.ones_like(k_index, dtype=torch.bool))
        if sums is None:
            if needs.input:
                gi[i:j] = G
        else:
            sums.add(i, j, G.to(x.dtype))
    if sums is None:
        return gi, x.new_empty((0,)), x.new_empty((0,))
    return sums.result()


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("softmax_ce::token_fwd", mutates_args=())
def _token_fwd(x: Tensor, lin_w: Optional[Tensor], lin_b: Optional[Tensor], target: Tensor, *,
               temperature: float, ignore_index: int, entropy: bool, top_k: int,
               chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """token_forward as one op."""
    return token_forward(x, lin_w, lin_b, target,
                         TokenOptions(temperature, ignore_index, entropy, top_k), chunk)


@_token_fwd.register_fake
def _token_fwd_fake(x, lin_w, lin_b, target, *, temperature, ignore_index, entropy, top_k,
                    chunk):
    N = x.shape[0]
    acc = acc_dtype(x.dtype)
    rows = x.new_empty((N,), dtype=acc)
    return (rows, torch.empty_like(rows), x.new_empty((N,), dtype=torch.int64),
            x.new_empty((N if entropy else 0,), dtype=acc), x.new_empty((N, top_k), dtype=acc),
            x.new_empty((N, top_k), dtype=torch.int64), x.new_empty((N,), dtype=torch.float64))


@torch.library.custom_op("softmax_ce::token_bwd", mutates_args=())
def _token_bwd(x: Tensor, lin_w: Optional[Tensor], lin_b: Optional[Tensor], target: Tensor,
               lse64: Tensor, entropy: Tensor, topk_index: Tensor, g_lp: Optional[Tensor],
               g_lse: Optional[Tensor], g_entropy: Optional[Tensor], g_topk: Optional[Tensor], *,
               temperature: float, ignore_index: int, top_k: int, chunk: int, grad_input: bool,
               grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """token_backward as one op."""
    opts = TokenOptions(temperature, ignore_index, entropy.numel() > 0, top_k)
    return token_backward(x, lin_w, lin_b, target, lse64, entropy, topk_index,
                          (g_lp, g_lse, g_entropy, g_topk), opts, chunk,
                          Needs(grad_input, grad_weight, grad_bias))


@_token_bwd.register_fake
def _token_bwd_fake(x, lin_w, lin_b, target, lse64, entropy, topk_index, g_lp, g_lse,
                    g_entropy, g_topk, *, grad_input, grad_weight, grad_bias, **_):
    return (x.new_empty(x.shape if grad_input else (0,)),
            x.new_empty(lin_w.shape if grad_weight and lin_w is not None else (0,)),
            x.new_empty(lin_b.shape if grad_bias and lin_b is not None else (0,)))


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


def _composite(x, lin_w, lin_b, target, opts: TokenOptions):
    z = x if lin_w is None else F.linear(x, lin_w, lin_b)
    return reference.token_outputs(z, target, opts.temperature, opts.ignore_index, opts.entropy,
                                   opts.top_k)


def _present(g, like):
    """An upstream gradient, None where autograd passed none or the output is empty."""
    return None if g is None or like.numel() == 0 else g


class _Tokens(torch.autograd.Function):
    """Per-token outputs of the logits (``lin_w`` None) or of the fused head."""

    @staticmethod
    def forward(ctx, x, lin_w, lin_b, target, opts: TokenOptions, chunk: int):
        lp, lse, am, H, vals, idx, lse64 = _token_fwd(
            x, lin_w, lin_b, target, temperature=opts.temperature,
            ignore_index=opts.ignore_index, entropy=opts.entropy, top_k=opts.top_k, chunk=chunk)
        ctx.save_for_backward(x, lin_w, lin_b, target, lse64, H, idx)
        ctx.opts, ctx.chunk = opts, chunk
        ctx.mark_non_differentiable(am, idx)
        return lp, lse, am, H, vals, idx

    @staticmethod
    def backward(ctx, g_lp, g_lse, _g_argmax, g_H, g_k, _g_index):
        x, lin_w, lin_b, target, lse64, H, idx = ctx.saved_tensors
        opts = ctx.opts
        needs = Needs(*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and lin_b is not None)
        upstream = (g_lp, g_lse, _present(g_H, H), _present(g_k, idx))
        if torch.is_grad_enabled():  # a differentiable backward: the composite's gradients
            inputs = [t for t, need in zip((x, lin_w, lin_b), needs) if need]
            with torch.enable_grad():
                outs = _composite(x, lin_w, lin_b, target, opts)
            pairs = [(o, g) for o, g in zip((outs[0], outs[1], outs[3], outs[4]), upstream)
                     if g is not None and o is not None]
            got = iter(torch.autograd.grad([o for o, _ in pairs], inputs,
                                           [g for _, g in pairs], create_graph=True))
            return input_grads(ctx, *(next(got) if need else None for need in needs))
        gi, gw, gb = _token_bwd(
            x, lin_w, lin_b, target, lse64, H, idx, *upstream, temperature=opts.temperature,
            ignore_index=opts.ignore_index, top_k=opts.top_k, chunk=ctx.chunk,
            grad_input=needs.input, grad_weight=needs.weight, grad_bias=needs.bias)
        return input_grads(ctx, *(g if need else None for g, need in zip((gi, gw, gb), needs)))


def tokens(x, lin_w, lin_b, target, opts: TokenOptions, chunk: int, grads: bool):
    """The six outputs (entropy / top-k empty when not asked), through the Function when
    autograd records the call."""
    if grads:
        return _Tokens.apply(x, lin_w, lin_b, target, opts, chunk)
    return _token_fwd(x, lin_w, lin_b, target, temperature=opts.temperature,
                      ignore_index=opts.ignore_index, entropy=opts.entropy, top_k=opts.top_k,
                      chunk=chunk)[:6]


def token_chunk_size(rows: int, classes: int, dtype: torch.dtype) -> int:
    """Rows per chunk of the token passes: the fused loss's rule (``default_chunk_size``: the
    chunk's logits under 1/11 of the whole logits, under ``softmax_ce.chunk_memory``). The passes
    work in place, so their working memory is about 2.25 chunks of logits (the chunk, one
    temporary of its size in the accumulation dtype, a mask)."""
    return default_chunk_size(rows, classes, 0, dtype, dtype)


def token_options(temperature, ignore_index, entropy, top_k, classes, fn) -> TokenOptions:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (0.0 < temperature < math.inf):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(entropy, bool):
        raise TypeError(f"{fn}: entropy must be a bool, got {type(entropy).__name__}")
    k = A.index(top_k, "top_k", fn)
    if not 0 <= k <= classes:
        raise ValueError(f"{fn}: top_k must be in [0, {classes}] (the number of classes), got {k}")
    return TokenOptions(float(temperature), A.index(ignore_index, "ignore_index", fn), entropy, k)


def check_token_target(target, positions, input, fn):
    if not isinstance(target, Tensor) or target.dtype not in A.INDEX_DTYPES:
        raise RuntimeError(f"{fn}: argument 'target' must hold class indices (int64, int32 or "
                           f"uint8), got {getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(positions):
        raise RuntimeError(f"{fn}: argument 'target' must have the shape of the positions, "
                           f"{list(positions)}, got {list(target.shape)}")
    A.check_device(target, "target", input, fn)
    return target.to(torch.int64) if target.dtype == torch.uint8 else target


def check_linear_args(input, weight, bias, fn) -> None:
    """input ``(..., H)``, weight ``(C, H)``, bias ``(C,)`` or None, one dtype and device."""
    A.check_floating(input, "input", fn)
    if input.dim() == 0 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{fn}: expected input (..., H) and weight (C, H), got input "
                           f"{list(input.shape)} and weight {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"{fn}: expected bias of shape ({weight.shape[0]},), got "
                           f"{list(bias.shape)}")
    A.check_same_dtype(input, (("weight", weight), ("bias", bias)), fn)
    A.check_device(weight, "weight", input, fn)
    A.check_device(bias, "bias", input, fn)
