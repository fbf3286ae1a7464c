"""The maths of vocabulary slices: what each slice of the logits yields per position, how those
values combine into the loss, and the slice's gradient. Used by the vocab-parallel paths
(``distributed/``: a rank's slice) and by the fused head's bounded weight-gradient accumulator
(``_vocab_chunks``: slices of one device's vocabulary).

Per position, with b_c the target's coefficient of class c (class indices: b_c = (1 - eps) w_y
[c = y] + (eps / C) w_c; probabilities: b_c = w_c ((1 - eps) t_c + eps / C)), each rank r
computes from its slice only (in float64, relative to its slice's maximum ``ref_r`` so that no
term cancels) the payload's four columns (``Column``):

    LSE   lse_r = log-sum-exp of the slice
    REF   ref_r = the slice's maximum (0 for an empty or all -inf slice)
    GAP   P_r   = sum over the slice of b_c (ref_r - x_c)
    MASS  B_r   = sum over the slice of b_c

and, gathered from every rank, every rank combines them in rank order (the same ops on the same
data, so the loss is bit-identical everywhere):

    lse  = logsumexp_r lse_r
    loss = sum_r (B_r (lse - ref_r) + P_r) + z lse^2          (0 at ignored positions)

torch's formula term for term: sum_c b_c (lse - x_c) split by slice. The gradient of a slice needs
only the global lse and the row coefficient sum_r B_r + 2 z lse (``reference.row_coefficient``);
it is ``reference.index_gradient`` / ``prob_gradient`` on the slice's probabilities, the one
Python definition of the cross-entropy gradient.

Arithmetic: float64 for the per-position statistics and the combination, the accumulation dtype
(float32 for half inputs) for the per-element work.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _args as A
from . import reference
from .reference import acc_dtype

__all__ = ["Column", "Combined", "index_payload", "prob_payload", "combine", "slice_grad",
           "weight_slice", "ownership", "row_lse", "finish_rows"]

# ``plan`` below: anything with ``offset`` / ``size`` (this slice's classes), ``classes`` (the
# global C) and ``rank``: distributed.protocol.Plan for a rank's slice, or _vocab_chunks' slices
# of one device's vocabulary.
Plan = object


class Column:
    """The payload's columns, per position (float64)."""

    LSE = 0  # log-sum-exp of the slice
    REF = 1  # the slice's maximum, which the other columns are relative to
    GAP = 2  # sum over the slice of b_c (ref - x_c)
    MASS = 3  # sum over the slice of b_c
    COUNT = 4


class Combined(NamedTuple):
    """The gathered statistics combined, per position (float64)."""

    loss: Optional[Tensor]  # the loss (None once only the gradient is wanted)
    lse: Tensor  # the global log-sum-exp
    coef: Tensor  # the coefficient of p_c in the gradient (before the upstream gradient)
    ref: Tensor  # this rank's slice maximum

    def rows(self, start: int, end: int) -> "Combined":
        return Combined(None, self.lse[start:end], self.coef[start:end], self.ref[start:end])


def weight_slice(w: Optional[Tensor], plan: Plan) -> Optional[Tensor]:
    return w[plan.offset:plan.offset + plan.size] if w is not None else None


def _slice_stats(xa: Tensor):
    """(ref, lse_r) of x ``[n, C_l, inner]`` in the accumulation dtype: ref = the slice maximum
    where finite (0 for an empty or all -inf slice), lse_r in float64, NaN where the slice holds a
    NaN or +inf (which makes the row NaN, as in torch)."""
    n, C_l, inner = xa.shape
    if C_l == 0:
        ref = xa.new_zeros((n, inner))
        return ref, torch.full((n, inner), -math.inf, dtype=torch.float64, device=xa.device)
    m = xa.amax(dim=1)
    ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_s = torch.log((xa - ref.unsqueeze(1)).exp_().sum(dim=1))
    lse_r = ref.double() + log_s.double()
    poison = torch.isnan(m) | (m == math.inf)
    return ref, torch.where(poison, torch.full_like(lse_r, math.nan), lse_r)


def ownership(t: Tensor, ignore_index: int, plan: Plan):
    """(valid, owned, local): positions not ignored, those whose target class lies in this rank's
    slice, and that class's index within the slice (0 elsewhere)."""
    lo, C_l = plan.offset, plan.size
    valid = t != ignore_index
    owned = valid & (t >= lo) & (t < lo + C_l)
    return valid, owned, torch.where(owned, t - lo, torch.zeros_like(t)).long()


def _target_weight(w_slice, local, like):
    """w_y of the slice's classes (ones without class weights)."""
    return w_slice[local] if w_slice is not None else torch.ones(local.shape, dtype=like.dtype,
                                                                 device=like.device)


def _columns(lse_r, ref, gap, mass) -> Tensor:
    return torch.stack([lse_r, ref.double(), gap, mass], dim=-1).reshape(-1, Column.COUNT)


def index_payload(xa, t, w_slice, opts: A.CeOptions, plan: Plan):
    """The payload ``[n * inner, Column.COUNT]`` of class-index targets ``t`` ``[n, inner]`` and
    the mask of targets outside [0, C). The target's own term comes from its gathered logit (not
    from b over the whole slice): a masked (-inf) logit elsewhere in the row must not meet a zero
    coefficient (0 * inf)."""
    C_l, eps, C = plan.size, opts.label_smoothing, plan.classes
    ref, lse_r = _slice_stats(xa)
    valid, owned, local = ownership(t, opts.ignore_index, plan)
    zero = torch.zeros_like(lse_r)
    w_y = _target_weight(w_slice, local, xa).double()
    true_w = torch.where(owned, (1 - eps) * w_y, zero)  # (1 - eps) w_y on the owner, else 0
    if C_l > 0:
        x_y = xa.gather(1, local.unsqueeze(1)).squeeze(1)
        gap = torch.where(owned, true_w * (ref - x_y).double(), zero)
    else:
        gap = zero
    mass = true_w
    if eps > 0 and C_l > 0:
        d = ref.unsqueeze(1) - xa
        if w_slice is not None:
            d = d * w_slice.view(1, C_l, 1)
        w_total = w_slice.double().sum() if w_slice is not None else float(C_l)
        gap = gap + (eps / C) * d.double().sum(dim=1)
        mass = mass + (eps / C) * w_total
    bad = valid & ((t < 0) | (t >= C))
    # an out-of-range class: the host raises an IndexError where it reads the headers; where it
    # does not (a steady CUDA step) the position's loss and gradient are NaN, as on one device
    nan = torch.full_like(gap, math.nan)
    gap, mass = torch.where(bad, nan, gap), torch.where(bad, nan, mass)
    return _columns(lse_r, ref, gap, mass), bad  # ignored positions: masked by combine


def prob_payload(xa, t3, w_slice, opts: A.CeOptions, plan: Plan):
    """The payload ``[n * inner, Column.COUNT]`` of probability targets ``t3`` ``[n, C_l,
    inner]``."""
    ref, lse_r = _slice_stats(xa)
    b = reference.smoothed_target(t3, w_slice, opts.label_smoothing, plan.classes)
    if xa.shape[1] > 0:
        gap = (b * (ref.unsqueeze(1) - xa)).double().sum(dim=1)
        mass = b.double().sum(dim=1)
    else:
        gap = mass = torch.zeros_like(lse_r)
    return _columns(lse_r, ref, gap, mass)


def combine(data: Tensor, valid: Optional[Tensor], opts: A.CeOptions, plan: Plan) -> Combined:
    """The gathered payloads ``[world, positions, Column.COUNT]`` combined in rank order;
    ``valid``: the kept positions (class indices) or None (probabilities)."""
    lse = row_lse(torch.logsumexp(data[..., Column.LSE], dim=0))
    loss = torch.zeros_like(lse)
    for r in range(data.shape[0]):  # in rank order: the same bits on every rank
        loss = loss + (data[r, :, Column.MASS] * (lse - data[r, :, Column.REF])
                       + data[r, :, Column.GAP])
    mass = data[:, :, Column.MASS].sum(dim=0)
    loss, coef = finish_rows(loss, lse, mass, None if valid is None else valid.reshape(-1), opts)
    return Combined(loss, lse, coef, data[plan.rank, :, Column.REF])


def row_lse(lse: Tensor) -> Tensor:
    """The rows' combined log-sum-exp, NaN where every logit is -inf (as log_softmax)."""
    return torch.where(lse == -math.inf, torch.full_like(lse, math.nan), lse)


def finish_rows(loss: Tensor, lse: Tensor, mass: Tensor, valid: Optional[Tensor],
                opts: A.CeOptions):
    """(loss, coef) per row from the combined cross-entropy terms: the z-loss added, ignored
    rows (``valid`` False) zero, and the gradient's row coefficient."""
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, reference.row_coefficient(mass, opts.z_loss, lse, valid)


def slice_grad(x3, t, w_slice, comb: Combined, g, opts: A.CeOptions, plan: Plan, prob: bool,
               out=None):
    """The gradient of this rank's slice ``x3`` ``[n, C_l, inner]`` for the upstream gradient
    ``g`` per position (``[n, inner]``, float64), from the combined statistics: the reference's
    gradient on the slice's probabilities p = exp(x' - lse), times the soft-cap's derivative.
    ``out``: where to write it (x3 itself for the in-place option), else a new tensor in x3's
    dtype."""
    n, C_l, inner = x3.shape
    if C_l == 0:
        return torch.empty_like(x3) if out is None else out
    acc = acc_dtype(x3.dtype)
    th = torch.tanh(x3.to(acc) / opts.softcap) if opts.softcap > 0 else None
    xa = opts.softcap * th if th is not None else x3.to(acc)
    ref = comb.ref.view(n, inner)
    shift = (comb.lse.view(n, inner) - ref).to(acc)  # small: x - lse as (x - ref) - (lse - ref)
    p = (xa - ref.to(acc).unsqueeze(1)).sub_(shift.unsqueeze(1)).exp_()  # one new buffer
    gg, coef = g.view(n, inner), comb.coef.view(n, inner)
    eps, C = opts.label_smoothing, plan.classes
    if prob:
        b = reference.smoothed_target(t, w_slice, eps, C)
        grad = reference.prob_gradient(p, gg, coef, b, inplace=True)
    else:
        valid, owned, local = ownership(t, opts.ignore_index, plan)
        w_y = _target_weight(w_slice, local, p)
        grad = reference.index_gradient(p, gg, coef, valid, local, owned, w_y, w_slice, eps, C,
                                        inplace=True)
    if th is not None:
        grad.mul_(1 - th * th)
    if out is not None:
        out.copy_(grad)
        return out
    return grad.to(x3.dtype)
