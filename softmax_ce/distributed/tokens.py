"""``linear_log_probs`` over vocabulary slices (``process_group=``, or a DTensor weight sharded on
the vocabulary): each rank holds a slice of the head's rows, the logits are never whole on any
rank, one all-gather of per-row statistics per forward (a second one for the top-k), and in
backward one all-reduce of the input's gradient.

Per position each rank computes from its slice of s = z / T (``Column``): its log-sum-exp lse_r,
its maximum and the class holding it, the entropy H_r of its own softmax, and s_y where it holds
the target. Every rank combines them alike:

    lse = logsumexp_r lse_r,    w_r = exp(lse_r - lse),
    H = sum_r w_r (H_r + lse - lse_r)      (no cancellation: each term is >= 0),
    log_prob = s_y - lse,       argmax: the largest maximum, the lowest rank on ties,

and the top-k from every rank's k largest. The gradient of the slice is
``reference.token_gradient`` with the global lse and entropy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import _args as A
from .. import reference
from .._chunks import Needs, chunk_logits
from .._linear_core import chunk_option
from .._slices import ownership, row_lse
from .._tokens_core import (TokenOptions, check_linear_args, check_token_target,
                            token_chunk_size, token_options)
from ..autograd import input_grads
from ..reference import acc_dtype
from . import protocol as P
from .dtensor import class_shard, replicated_local

__all__ = ["linear_log_probs_sharded"]


class Column:
    """The payload's columns, per position (float64)."""

    LSE = 0  # log-sum-exp of the slice
    MAX = 1  # the slice's largest s (-inf for an empty slice)
    ARGMAX = 2  # the global class of that maximum
    ENTROPY = 3  # the entropy of the slice's own softmax
    TARGET = 4  # s_y where the slice holds the target (0 elsewhere)
    COUNT = 5


class _Call(NamedTuple):
    opts: TokenOptions
    plan: P.Plan
    chunk: int
    needs: Needs
    exchange: P.Exchange


def _slice_rows(z, t, opts: TokenOptions, plan: P.Plan):
    """The payload ``[n, Column.COUNT]`` of this rank's logits ``z`` ``[n, C_l]``, its top-k
    (values of s and global classes ``[n, k]``, -inf / -1 where the slice has fewer than k), and
    the mask of out-of-range targets."""
    n, C_l = z.shape
    s = z.to(acc_dtype(z.dtype)) / opts.temperature
    f64 = dict(dtype=torch.float64, device=z.device)
    if C_l:
        raw = s.amax(1)
        argmax = (z.argmax(1) + plan.offset).double()
        ref = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
        e = torch.exp(s - ref.unsqueeze(1))
        S = e.sum(1)
        lse_r = ref.double() + torch.log(S).double()
        poison = torch.isnan(raw) | (raw == math.inf)
        lse_r = torch.where(poison, torch.full_like(lse_r, math.nan), lse_r)
        offset = torch.where(e > 0, e * (s - ref.unsqueeze(1)), torch.zeros_like(e)).sum(1)
        H_r = torch.where(S > 0, torch.log(S) - offset / S, torch.zeros_like(S)).double()
    else:
        raw = torch.full((n,), -math.inf, **f64)
        argmax = torch.full((n,), -1.0, **f64)
        lse_r = torch.full((n,), -math.inf, **f64)
        H_r = torch.zeros((n,), **f64)
    valid, owned, local = ownership(t, opts.ignore_index, plan)
    s_y = s.gather(1, local.unsqueeze(1)).squeeze(1).double() if C_l else torch.zeros((n,), **f64)
    s_y = torch.where(owned, s_y, torch.zeros_like(s_y))
    payload = torch.stack([lse_r, raw.double(), argmax, H_r, s_y], dim=1)
    top = None
    if opts.top_k:
        kk = min(opts.top_k, C_l)
        values = torch.full((n, opts.top_k), -math.inf, **f64)
        classes = torch.full((n, opts.top_k), -1.0, **f64)
        if kk:
            v, i = torch.topk(s, kk, dim=1)
            values[:, :kk], classes[:, :kk] = v.double(), (i + plan.offset).double()
        top = torch.stack([values, classes], dim=2)
    bad = valid & ((t < 0) | (t >= plan.classes))
    return payload, top, bad


def _combine(data, top, t, opts: TokenOptions, out_dtype):
    """The gathered statistics ``[world, N, COUNT]`` (and top-k ``[world, N, k, 2]``) combined,
    in the same order on every rank: the six outputs and the float64 lse."""
    lse = row_lse(torch.logsumexp(data[..., Column.LSE], dim=0))
    w = torch.exp(data[..., Column.LSE] - lse)
    terms = w * (data[..., Column.ENTROPY] + lse - data[..., Column.LSE])
    H = torch.where(w > 0, terms, torch.zeros_like(terms)).sum(0)
    valid = t != opts.ignore_index
    log_prob = torch.where(valid, data[..., Column.TARGET].sum(0) - lse, torch.zeros_like(lse))
    winner = data[..., Column.MAX].argmax(0)
    argmax = data[..., Column.ARGMAX].gather(0, winner.unsqueeze(0)).squeeze(0).long()
    values = indices = torch.empty((lse.shape[0], 0), dtype=out_dtype, device=lse.device)
    if opts.top_k:
        world, N, k, _ = top.shape
        cand = top.permute(1, 0, 2, 3).reshape(N, world * k, 2)
        best, where = torch.topk(cand[..., 0], k, dim=1)
        values = (best - lse.unsqueeze(1)).to(out_dtype)
        indices = cand[..., 1].gather(1, where).long()
    H_out = H.to(out_dtype) if opts.entropy else torch.empty(0, dtype=out_dtype,
                                                           device=lse.device)
    return (log_prob.to(out_dtype), lse.to(out_dtype), argmax, H_out, values,
            indices if opts.top_k else torch.empty((lse.shape[0], 0), dtype=torch.int64,
                                                   device=lse.device), lse, H)


def _forward(x, lin_w, lin_b, t, call: _Call):
    N = x.shape[0]
    opts, plan = call.opts, call.plan
    payload = torch.empty((N, Column.COUNT), dtype=torch.float64, device=x.device)
    top = torch.empty((N, opts.top_k, 2), dtype=torch.float64, device=x.device)
    bad = torch.zeros(N, dtype=torch.bool, device=x.device)
    for s, e, z in chunk_logits(x, lin_w, lin_b, call.chunk):
        rows, tk, b = _slice_rows(z, t[s:e], opts, plan)
        payload[s:e], bad[s:e] = rows, b
        if opts.top_k:
            top[s:e] = tk
    data = call.exchange.gather(payload, bad, t)
    top_all = P.all_gather(top, plan) if opts.top_k else None  # the second collective
    return _combine(data, top_all, t, opts, acc_dtype(x.dtype))


class _ShardedTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lin_w, lin_b, t, call: _Call):
        with torch.no_grad():
            lp, lse, am, H, vals, idx, lse64, H64 = _forward(x, lin_w, lin_b, t, call)
        ctx.save_for_backward(x, lin_w, lin_b, t, lse64, H64, idx)
        ctx.call = call
        ctx.mark_non_differentiable(am, idx)
        return lp, lse, am, H, vals, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_lse, _g_argmax, g_H, g_k, _g_index):
        x, lin_w, lin_b, t, lse64, H64, idx = ctx.saved_tensors
        call = ctx.call
        opts, plan, needs = call.opts, call.plan, call.needs
        g_H = g_H if opts.entropy else None
        g_k = g_k if opts.top_k else None
        acc = acc_dtype(x.dtype)
        gx = torch.zeros((x.shape[0], x.shape[1]), dtype=acc, device=x.device) \
            if needs.input else None
        gw = torch.zeros_like(lin_w, dtype=acc) if needs.weight else None
        gb = torch.zeros(plan.size, dtype=acc, device=x.device) if needs.bias else None
        lin_w_acc = lin_w.to(acc) if gx is not None else None
        for s, e, z in chunk_logits(x, lin_w, lin_b, call.chunk):
            valid, owned, local = ownership(t[s:e], opts.ignore_index, plan)
            k_idx = k_owned = None
            if g_k is not None:
                k_owned = (idx[s:e] >= plan.offset) & (idx[s:e] < plan.offset + plan.size)
                k_idx = torch.where(k_owned, idx[s:e] - plan.offset, torch.zeros_like(idx[s:e]))
            G = reference.token_gradient(
                reference.token_log_p(z, opts.temperature, lse64[s:e], inplace=True),
                opts.temperature, inplace=True,
                g_lp=None if g_lp is None else g_lp[s:e], valid=valid, index=local,
                owned=owned, g_lse=None if g_lse is None else g_lse[s:e],
                g_entropy=None if g_H is None else g_H[s:e],
                entropy=None if g_H is None else H64[s:e],
                g_topk=None if g_k is None else g_k[s:e], topk_index=k_idx, topk_owned=k_owned)
            G = G.to(acc)
            if gx is not None:
                gx[s:e] = G @ lin_w_acc
            if gw is not None:
                gw.addmm_(G.t(), x[s:e].to(acc))
            if gb is not None:
                gb += G.sum(0)
        if gx is not None:  # agreed in the header: every rank reduces
            dist.all_reduce(gx, group=plan.group)
        return input_grads(ctx, gx.to(x.dtype) if gx is not None else None,
                           gw.to(lin_w.dtype) if gw is not None else None,
                           gb.to(lin_b.dtype) if gb is not None else None)


def linear_log_probs_sharded(input, weight, target, bias, temperature, ignore_index, entropy,
                             top_k, chunk_size, process_group, fn):
    """``linear_log_probs`` with ``weight`` (and ``bias``) this rank's slice of the vocabulary
    rows: plain tensors with ``process_group`` (slices of one size, in rank order), or a DTensor
    sharded on dimension 0 (the outputs then replicated DTensors). ``input`` and ``target`` are
    the same on every rank. Returns the six outputs flat over the positions."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = None
    if isinstance(weight, DTensor):
        _, plan = class_shard(weight, 0, fn, "weight")
        mesh = weight.device_mesh
        if bias is not None and (not isinstance(bias, DTensor)
                                 or tuple(bias.placements) != tuple(weight.placements)):
            raise NotImplementedError(f"{fn}: with a DTensor weight, bias must be a DTensor "
                                      "sharded like it")
        w_local = weight.to_local(grad_placements=weight.placements)
        b_local = bias.to_local(grad_placements=bias.placements) if bias is not None else None
        x = replicated_local(input, "input", fn) if not isinstance(input, DTensor) or all(
            isinstance(p, Replicate) for p in input.placements) else None
        if x is None:
            raise NotImplementedError(f"{fn}: a DTensor 'input' must be replicated, got "
                                      f"{input.placements}")
        if isinstance(input, DTensor):
            x = input.to_local(grad_placements=input.placements)
        target = replicated_local(target, "target", fn)
    else:
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup, got "
                            f"{type(process_group).__name__}")
        plan = P.equal_plan(process_group, weight.shape[0] if weight.dim() else 0)
        w_local, b_local, x = weight, bias, input
    ex = P.Exchange(plan, fn, x.device)
    try:
        P.unsupported_transforms(fn)
        check_linear_args(x, w_local, b_local, fn)
        positions = tuple(x.shape[:-1])
        t = check_token_target(target, positions, x, fn)
        opts = token_options(temperature, ignore_index, entropy, top_k, plan.classes, fn)
        chunk = chunk_option(None, chunk_size, fn)
        H = x.shape[-1]
        N = A.numel(positions)
        grads = torch.is_grad_enabled() and any(
            a is not None and a.requires_grad for a in (x, w_local, b_local))
        needs = Needs(grads and x.requires_grad, grads and w_local.requires_grad,
                      grads and b_local is not None and b_local.requires_grad)
        header = P.make_header(plan, positions=N, kind=P.TargetKind.TOKENS, reduction="none",
                               dtype=x.dtype, opts=A.CeOptions(opts.ignore_index, 0.0, 0.0, 0.0),
                               in_features=H, flags=P.FLAG_INPUT_GRAD if needs.input else 0,
                               temperature=opts.temperature, top_k=opts.top_k)
    except Exception as error:  # noqa: BLE001 (re-raised once every rank knows)
        ex.fail(error)
    ex.settle(header, P.body_bytes(N * Column.COUNT, 8))
    x2 = x.reshape(-1, H).contiguous()
    rows = chunk if chunk is not None else token_chunk_size(N, plan.size, x2.dtype)
    call = _Call(opts, plan, max(1, rows), needs, ex)
    t2 = t.reshape(-1)
    if grads:
        outs = _ShardedTokens.apply(x2, w_local, b_local, t2, call)
    else:
        with torch.no_grad():
            outs = _forward(x2, w_local, b_local, t2, call)[:6]
    if mesh is not None:
        outs = tuple(DTensor.from_local(o, mesh, [Replicate()] * mesh.ndim, run_check=False)
                     for o in outs)
    return outs
