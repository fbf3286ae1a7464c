"""The fused linear head with its weight's gradient accumulated one slice of the vocabulary at a
time (``linear_cross_entropy(..., vocab_chunk_size=V)``): the float32 accumulator of a
half-precision head is ``V x H`` instead of ``C x H`` (2 GiB for Llama 3's head).

A row's softmax needs every class, so the loss comes from two passes, as over the ranks of a
vocab-parallel head (``_slices``: the same maths): the statistics pass runs every vocabulary
slice over every chunk of rows and combines each slice's log-sum-exp and partial sums into the
rows' lse, loss and gradient coefficient; the gradient pass then takes one slice at a time, every
chunk of rows, forming that slice's gradient with the global lse and accumulating its weight
gradient (and the input's). Four GEMMs in all (the logits twice) against the usual three.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _args as A
from ._chunks import Needs, chunk_logits
from ._slices import (Column, Combined, finish_rows, index_payload, prob_payload, row_lse,
                      slice_grad, weight_slice)
from .autograd import input_grads
from .fixed_sum import fixed_order_sum
from .reference import acc_dtype, capped

__all__ = ["vocab_chunked"]


class _Slice(NamedTuple):
    """One device's vocabulary slice, in the shape ``_slices`` expects of a plan."""

    offset: int
    size: int
    classes: int
    rank: int = 0


def _slices(C: int, vocab_rows: int):
    return [_Slice(o, min(vocab_rows, C - o), C) for o in range(0, C, vocab_rows)]


def _statistics(x, W, b, t, w, opts: A.CeOptions, rows: int, vocab_rows: int, prob: bool):
    """(loss, lse, coef) per row in float64, over the whole vocabulary a slice at a time:
    loss = (sum_c b_c) lse - sum_c b_c x_c (+ z lse^2), combined online from each slice's
    (lse_r, ref_r, P_r = sum b (ref_r - x), B_r = sum b)."""
    N, C = x.shape[0], W.shape[0]
    f64 = dict(dtype=torch.float64, device=x.device)
    lse = torch.full((N,), -math.inf, **f64)
    mass = torch.zeros((N,), **f64)  # sum of b_c
    rest = torch.zeros((N,), **f64)  # - sum of b_c x_c
    bad = torch.zeros(N, dtype=torch.bool, device=x.device)
    for sl in _slices(C, vocab_rows):
        v = slice(sl.offset, sl.offset + sl.size)
        for i, j, z in chunk_logits(x, W[v], b[v] if b is not None else None, rows):
            xa = capped(z.unsqueeze(-1), opts.softcap)
            if prob:
                payload = prob_payload(xa, t[i:j, v].unsqueeze(-1), weight_slice(w, sl), opts,
                                       sl)
            else:
                payload, bad_rows = index_payload(xa, t[i:j].unsqueeze(-1),
                                                  weight_slice(w, sl), opts, sl)
                bad[i:j] |= bad_rows.squeeze(-1)
            lse[i:j] = torch.logaddexp(lse[i:j], payload[:, Column.LSE])
            mass[i:j] += payload[:, Column.MASS]
            rest[i:j] += payload[:, Column.GAP] - payload[:, Column.MASS] * payload[:, Column.REF]
    if x.device.type == "cpu" and not prob and bool(bad.any()):  # as the kernels raise
        value = int(t[bad][0])
        raise IndexError(f"Target {value} is out of bounds: argument 'target' must hold class "
                         f"indices in [0, {C}) or ignore_index ({opts.ignore_index}).")
    lse = row_lse(lse)
    loss, coef = finish_rows(mass * lse + rest, lse, mass, None if prob else t != opts.ignore_index,
                             opts)
    return loss, lse, coef


def _gradients(x, W, b, t, w, opts, rows, vocab_rows, prob, lse, coef, g, needs: Needs, acc):
    """The gradients for the per-row upstream gradient ``g`` (float64): each vocabulary slice's
    weight gradient accumulated in ``acc`` over the row chunks, then rounded once into the
    weight's dtype."""
    N, H = x.shape
    C = W.shape[0]
    gi = torch.zeros((N, H), dtype=acc, device=x.device) if needs.input else None
    gW = torch.empty_like(W) if needs.weight else None
    gb = torch.empty_like(b) if needs.bias else None
    for sl in _slices(C, vocab_rows):
        v = slice(sl.offset, sl.offset + sl.size)
        W_v = W[v]
        W_acc = W_v.to(acc) if gi is not None else None
        gw_v = torch.zeros((sl.size, H), dtype=acc, device=x.device) if needs.weight else None
        gb_v = torch.zeros(sl.size, dtype=acc, device=x.device) if needs.bias else None
        for i, j, z in chunk_logits(x, W_v, b[v] if b is not None else None, rows):
            z3 = z.unsqueeze(-1)
            m = capped(z3, opts.softcap).amax(1).squeeze(-1).double()
            ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            tt = t[i:j, v].unsqueeze(-1) if prob else t[i:j].unsqueeze(-1)
            G = slice_grad(z3, tt, weight_slice(w, sl), Combined(None, lse[i:j], coef[i:j], ref),
                           g[i:j], opts, sl, prob).squeeze(-1).to(acc)
            if gi is not None:
                gi[i:j] += G @ W_acc
            if gw_v is not None:
                gw_v.addmm_(G.t(), x[i:j].to(acc))
            if gb_v is not None:
                gb_v += G.sum(0)
        if gW is not None:
            gW[v] = gw_v
        if gb is not None:
            gb[v] = gb_v
    return gi.to(x.dtype) if gi is not None else None, gW, gb


class _Call(NamedTuple):
    reduction: str
    opts: A.CeOptions
    rows: int
    vocab_rows: int
    prob: bool
    acc: torch.dtype


class _VocabChunked(torch.autograd.Function):
    """mean / sum: the gradients formed in the forward, scaled in backward; 'none': the gradient
    pass in backward with the per-row upstream gradient."""

    @staticmethod
    def forward(ctx, x, W, b, t, w, tw, denom, call: _Call):
        needs = Needs(*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and b is not None)
        loss, lse, coef = _statistics(x, W, b, t, w, call.opts, call.rows, call.vocab_rows,
                                      call.prob)
        ctx.call = call
        out_dtype = acc_dtype(x.dtype)
        if call.reduction == "none":
            ctx.save_for_backward(x, W, b, t, w, tw, lse, coef)
            rows = loss.to(out_dtype)
            return rows if tw is None else rows * tw
        scale = A.reduction_scale(call.reduction, denom, x.device)
        g = scale.expand(loss.shape) if tw is None else scale * tw.double()
        ctx.grads = _gradients(x, W, b, t, w, call.opts, call.rows, call.vocab_rows, call.prob,
                               lse, coef, g, needs, call.acc)
        total = fixed_order_sum(loss if tw is None else loss * tw.double())
        return (total * scale).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        call = ctx.call
        if call.reduction == "none":
            x, W, b, t, w, tw, lse, coef = ctx.saved_tensors
            needs = Needs(*ctx.needs_input_grad[:2], ctx.needs_input_grad[2] and b is not None)
            g = grad_out.double() if tw is None else grad_out.double() * tw.double()
            return input_grads(ctx, *_gradients(x, W, b, t, w, call.opts, call.rows,
                                                call.vocab_rows, call.prob, lse, coef, g, needs,
                                                call.acc))
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy(vocab_chunk_size=...): a second backward "
                               "through the same graph (retain_graph=True) is not supported")
        return input_grads(ctx, *(gr.mul_(grad_out.to(gr.dtype)) if gr is not None else None
                                  for gr in grads))


def vocab_chunked(x, W, b, t, w, tw, denom, reduction, opts, rows, vocab_rows, prob, acc,
                  grads: bool) -> Tensor:
    """The loss (accumulation dtype) with the weight's gradient accumulated ``vocab_rows`` rows
    of the vocabulary at a time."""
    call = _Call(reduction, opts, rows, vocab_rows, prob, acc)
    if grads:
        return _VocabChunked.apply(x, W, b, t, w, tw, denom, call)
    with torch.no_grad():
        loss, _, _ = _statistics(x, W, b, t, w, opts, rows, vocab_rows, prob)
        if tw is not None:
            loss = loss * tw.double()
        if reduction == "none":
            return loss.to(acc_dtype(x.dtype))
        total = fixed_order_sum(loss)
        return (total / denom.double() if reduction == "mean" else total).to(acc_dtype(x.dtype))


def check_vocab_chunk(vocab_chunk_size, fn) -> Optional[int]:
    if vocab_chunk_size is None:
        return None
    if isinstance(vocab_chunk_size, bool) or not isinstance(vocab_chunk_size, int) \
            or vocab_chunk_size < 1:
        raise ValueError(f"{fn}: vocab_chunk_size must be a positive int or None, got "
                         f"{vocab_chunk_size!r}")
    if torch.compiler.is_compiling():
        raise NotImplementedError(f"{fn}: vocab_chunk_size is not supported under "
                                  "torch.compile (call it outside the compiled region)")
    return vocab_chunk_size
