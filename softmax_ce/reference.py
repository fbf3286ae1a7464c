"""Pure-PyTorch kernels with exactly the ops' contracts.

They are registered as the default (``CompositeExplicitAutograd``) implementation of every
``softmax_ce::*`` op, so they serve any device without a compiled kernel, and they are the oracle
the tests hold the compiled kernels to.

Contracts (see ``ops.py`` for the schemas):

* logits are ``[outer, C, inner]`` (the class dimension in the middle), any strides;
* class-index targets are ``[outer, inner]`` int32/int64, probability targets ``[outer, C, inner]``
  in the logits' dtype;
* ``weight`` is ``[C]`` in the accumulation dtype (float64 for float64 logits, else float32);
* per-position loss and grad_loss are ``[outer, inner]`` in the accumulation dtype; ``lse`` is
  ``[outer, inner]`` float64 for every input dtype, so that the backward can form
  ``x - lse`` exactly even where ``|x|`` is large (a float32 lse at |x| ~ 3e4 is off by ~2e-3,
  which would be the relative error of every probability);
* ``softcap == 0`` means no soft-capping; ``x -> softcap * tanh(x / softcap)`` otherwise.

All arithmetic happens in the accumulation dtype; the gradient is rounded to the logits' dtype
once, at the end.

Non-finite rows: ``lse`` is NaN when the row maximum is not finite (a row of ``-inf``, a ``+inf`` or
a NaN logit), as torch's ``log_softmax`` is. Ignored positions have loss 0 whatever their logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype all arithmetic is done in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def capped(logits: Tensor, softcap: float) -> Tensor:
    """x' = softcap * tanh(x / softcap) in the accumulation dtype (x itself without capping), in
    differentiable torch ops (autograd.py differentiates it too)."""
    x = logits.to(acc_dtype(logits.dtype))
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    return x


def _capped_derivative(logits: Tensor, softcap: float) -> Optional[Tensor]:
    """d(softcap * tanh(x / softcap)) / dx = 1 - tanh(x / softcap)^2, or None without capping."""
    if softcap <= 0:
        return None
    th = torch.tanh(logits.to(acc_dtype(logits.dtype)) / softcap)
    return 1 - th * th


def _row_stats(x: Tensor):
    """Row maximum m and log(sum(exp(x - m))) over dim 1, kept apart so that x - lse is formed
    as (x - m) - log_s without cancellation. m is NaN where it is not finite (a row of -inf, a
    +inf or a NaN logit), which makes everything derived from it NaN, as in torch."""
    if x.shape[1] == 0:
        nan = x.new_full((x.shape[0], 1, x.shape[2]), float("nan"))
        return nan, nan
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.full_like(m, float("nan")))
    log_s = torch.log(torch.exp(x - m).sum(dim=1, keepdim=True))
    return m, log_s


def _lse64(m: Tensor, log_s: Tensor) -> Tensor:
    return (m.double() + log_s.double()).squeeze(1)


def _probs(x: Tensor, lse: Tensor) -> Tensor:
    """softmax from the saved float64 lse, in x's dtype."""
    return torch.exp(x.double() - lse.unsqueeze(1)).to(x.dtype)


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise IndexError for a class index outside [0, C) that is not ignore_index (host sync)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(
            f"Target {value} is out of bounds: argument 'target' must hold class indices in "
            f"[0, {num_classes}) or ignore_index ({ignore_index})."
        )


def class_terms(target, weight, ignore_index, dtype):
    """valid mask, safe class index, and w_y (weight of the target class, 1 without weight)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    if weight is None:
        w_y = torch.ones(target.shape, dtype=dtype, device=target.device)
    else:
        w_y = weight[safe]
    return valid, safe, w_y


def ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    C = logits.shape[1]
    check_targets(target, C, ignore_index)
    if C == 0:  # every position is ignored (any other target is out of range)
        acc = acc_dtype(logits.dtype)
        shape = (logits.shape[0], logits.shape[2])
        return logits.new_zeros(shape, dtype=acc), logits.new_full(shape, float("nan"), dtype=torch.float64)
    x = capped(logits, softcap)
    m, log_s = _row_stats(x)
    nlp = (m - x) + log_s  # -log_softmax, without cancellation
    valid, safe, w_y = class_terms(target, weight, ignore_index, x.dtype)
    loss = (1 - label_smoothing) * w_y * nlp.gather(1, safe.unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        w = weight.view(1, C, 1) if weight is not None else 1.0
        loss = loss + (label_smoothing / C) * (w * nlp).sum(dim=1)
    lse = _lse64(m, log_s)
    if z_loss > 0:
        loss = loss + z_loss * (lse * lse).to(x.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, lse


def target_mass(w_y, w_sum, label_smoothing, C):
    """A = sum_c b_c for a class-index target, b_c = (1 - eps) w_y [c = y] + (eps / C) w_c:
    (1 - eps) w_y + (eps / C) sum_c w_c."""
    return (1 - label_smoothing) * w_y + (label_smoothing / C) * w_sum


def row_coefficient(mass, z_loss, lse, valid=None):
    """A + 2 z lse, the coefficient of p_c in the gradient (``mass`` = A = sum_c b_c); 0 at
    ignored positions (``valid`` False)."""
    coef = mass + 2 * z_loss * lse
    return coef if valid is None else torch.where(valid, coef, torch.zeros_like(coef))


def index_gradient(p, g, coef, valid, index, owned, w_y, weight, label_smoothing, C,
                   inplace=False):
    """The class-index gradient over the classes of ``p`` ``[n, C_p, inner]``:

        g [coef p_c - (eps / C) w_c - (1 - eps) w_y [c = y]]

    ``coef`` from ``row_coefficient``; ``index`` the target's column in ``p`` where ``owned``
    (all of ``valid`` on one device; on a slice of the vocabulary only where the slice holds y);
    ``weight`` the class weights of ``p``'s columns (or None); ``C`` the global class count.
    Ignored positions get 0 whatever ``g`` is (an infinite ``g``, the ``mean`` of a batch that is
    all ignored, never forms inf * 0). Computed in ``p``'s dtype, written over ``p`` with
    ``inplace=True`` (a temporary the caller no longer needs); differentiable otherwise (the
    in-place steps write only the fresh result)."""
    zero = torch.zeros_like(g)
    row = torch.where(valid, g * coef, zero).to(p.dtype).unsqueeze(1)
    grad = p.mul_(row) if inplace else row * p
    if label_smoothing > 0:
        w = weight.view(1, -1, 1) if weight is not None else 1.0
        kept = torch.where(valid, g, zero).to(p.dtype).unsqueeze(1)
        grad.sub_((label_smoothing / C) * kept * w)
    true_class = torch.where(owned, g * (1 - label_smoothing) * w_y, zero).to(p.dtype)
    return grad.scatter_add_(1, index.unsqueeze(1), -true_class.unsqueeze(1))


def prob_gradient(p, g, coef, b, inplace=False):
    """The probability-target gradient g [coef p_c - b_c] (``b`` from ``smoothed_target`` over
    ``p``'s columns, ``coef`` from ``row_coefficient`` of its global sum), in ``p``'s dtype
    (written over ``p`` with ``inplace=True``)."""
    g, coef = g.to(p.dtype).unsqueeze(1), coef.to(p.dtype).unsqueeze(1)
    if inplace:
        return p.mul_(coef).sub_(b).mul_(g)
    return g * (coef * p - b)


def prob_target_gradient(logp, g, weight, label_smoothing):
    """dloss/dt_c = -g (1 - eps) w_c log p_c, the gradient of a probability target (``logp``
    ``[n, C_p, inner]``: log-probabilities of the capped logits; ``weight``: the weights of its
    columns)."""
    scale = g.unsqueeze(1) * (1 - label_smoothing)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1)
    return -scale * logp


def ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap):
    """dloss/dx_c = g * [(A + 2 z lse) p_c - (eps/C) w_c - (1 - eps) w_y [c = y]] * cap'(x_c)."""
    C = logits.shape[1]
    check_targets(target, C, ignore_index)
    if C == 0:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    x = capped(logits, softcap)
    p = _probs(x, lse)
    valid, safe, w_y = class_terms(target, weight, ignore_index, x.dtype)
    w_sum = weight.sum() if weight is not None else float(C)
    coef = row_coefficient(target_mass(w_y, w_sum, label_smoothing, C), z_loss,
                           lse.to(x.dtype))
    grad = index_gradient(p, grad_loss.to(x.dtype), coef, valid, safe, valid, w_y, weight,
                          label_smoothing, C)
    d = _capped_derivative(logits, softcap)
    if d is not None:
        grad = grad * d
    return grad.to(logits.dtype).contiguous()


def ce_bwd_(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap):
    logits.copy_(
        ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap)
    )


def ce_fwd_bwd(grad_loss, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    """ce_fwd and ce_bwd in one call: (loss, lse, gradient for grad_loss)."""
    loss, lse = ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    grad = ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss,
                  softcap)
    return loss, lse, grad


def smoothed_target(target, weight, label_smoothing, C):
    """b = w * ((1 - eps) t + eps / C), the probability target's coefficient of each class of
    ``target`` ``[n, C_t, inner]`` (``weight``: the weights of those classes; ``C``: the global
    class count, which a vocabulary slice's C_t is not)."""
    acc = acc_dtype(target.dtype)
    t = target.to(acc)
    if label_smoothing > 0:
        t = t * (1 - label_smoothing) + label_smoothing / C
    if weight is not None:
        t = t * weight.view(1, -1, 1)
    return t


def ce_prob_fwd(logits, target, weight, label_smoothing, z_loss, softcap):
    C = logits.shape[1]
    x = capped(logits, softcap)
    m, log_s = _row_stats(x)
    wt = smoothed_target(target, weight, label_smoothing, C)
    loss = (wt * ((m - x) + log_s)).sum(dim=1)
    lse = _lse64(m, log_s)
    if z_loss > 0:
        loss = loss + z_loss * (lse * lse).to(x.dtype)
    return loss, lse


def ce_prob_bwd(grad_loss, logits, target, weight, lse, label_smoothing, z_loss, softcap):
    """dloss/dx_c = g * [(S + 2 z lse) p_c - w_c t~_c] * cap'(x_c), S = sum_c w_c t~_c."""
    C = logits.shape[1]
    x = capped(logits, softcap)
    p = _probs(x, lse)
    b = smoothed_target(target, weight, label_smoothing, C)
    coef = row_coefficient(b.sum(dim=1), z_loss, lse.to(x.dtype))
    grad = prob_gradient(p, grad_loss.to(x.dtype), coef, b)
    d = _capped_derivative(logits, softcap)
    if d is not None:
        grad = grad * d
    return grad.to(logits.dtype).contiguous()


def ce_prob_bwd_(grad_loss, logits, target, weight, lse, label_smoothing, z_loss, softcap):
    logits.copy_(ce_prob_bwd(grad_loss, logits, target, weight, lse, label_smoothing, z_loss, softcap))


def ce_prob_fwd_bwd(grad_loss, logits, target, weight, label_smoothing, z_loss, softcap):
    """ce_prob_fwd and ce_prob_bwd in one call: (loss, lse, gradient for grad_loss)."""
    loss, lse = ce_prob_fwd(logits, target, weight, label_smoothing, z_loss, softcap)
    grad = ce_prob_bwd(grad_loss, logits, target, weight, lse, label_smoothing, z_loss, softcap)
    return loss, lse, grad


def ce_bwd_redo_(upstream, grad_loss, logits, target, weight, lse, ignore_index,
                     label_smoothing, z_loss, softcap, out):
    """out = ce_bwd(grad_loss, ...) unless the 0-dim upstream gradient is 1 (out then already holds
    the gradient, formed in the forward pass)."""
    if upstream.item() != 1:
        out.copy_(ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                         z_loss, softcap))


def ce_prob_bwd_redo_(upstream, grad_loss, logits, target, weight, lse, label_smoothing,
                          z_loss, softcap, out):
    """As ce_bwd_redo_ for probability targets."""
    if upstream.item() != 1:
        out.copy_(ce_prob_bwd(grad_loss, logits, target, weight, lse, label_smoothing, z_loss,
                              softcap))


def softmax_fwd(x, log):
    xa = x.to(acc_dtype(x.dtype))
    m, log_s = _row_stats(xa)
    y = (xa - m) - log_s
    return (y if log else torch.exp(y)).to(x.dtype).contiguous()


def softmax_bwd(grad_y, y, log):
    """softmax: y * (g - <g, y>); log_softmax: g - exp(y) * sum(g)."""
    acc = acc_dtype(y.dtype)
    g = grad_y.to(acc)
    ya = y.to(acc)
    if log:
        gx = g - torch.exp(ya) * g.sum(dim=1, keepdim=True)
    else:
        gx = ya * (g - (g * ya).sum(dim=1, keepdim=True))
    return gx.to(y.dtype).contiguous()


def _softplus_neg(x):
    """log(1 + exp(-x)), overflow-free."""
    return torch.log1p(torch.exp(-x.abs())) + torch.clamp(-x, min=0)


def sigmoid_ce_fwd(logits, target, weight, pos_weight):
    """w * [(1 - y) x + (1 + (pw - 1) y) log(1 + exp(-x))], torch's formula."""
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    y = target.to(acc)
    if pos_weight is not None:
        lw = 1 + (pos_weight.to(acc) - 1) * y
        loss = (1 - y) * x + lw * _softplus_neg(x)
    else:
        loss = (1 - y) * x + _softplus_neg(x)
    if weight is not None:
        loss = loss * weight.to(acc)
    return loss.to(logits.dtype).expand(logits.shape).contiguous()


def sigmoid_ce_bwd(grad_loss, logits, target, weight, pos_weight):
    """g * w * [(pw y + 1 - y) sigmoid(x) - pw y]  (pw = 1: g * w * (sigmoid(x) - y))."""
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    y = target.to(acc)
    s = torch.sigmoid(x)
    if pos_weight is not None:
        pwy = pos_weight.to(acc) * y
        grad = (pwy + 1 - y) * s - pwy
    else:
        grad = s - y
    grad = grad * grad_loss.to(acc)
    if weight is not None:
        grad = grad * weight.to(acc)
    return grad.to(logits.dtype).expand(logits.shape).contiguous()


# ---------------------------------------------------------------------------------------------
# per-token outputs of softmax(z / T): log-probability of the target, lse, entropy, top-k
# ---------------------------------------------------------------------------------------------


def token_outputs(z, target, temperature, ignore_index, entropy, top_k, inplace=False):
    """The per-token outputs of logits ``z`` ``[n, C]`` (torch ops in the accumulation dtype,
    differentiable unless ``inplace``): (log_prob, lse, argmax, entropy or None, top-k
    log-probabilities or None, top-k indices or None, lse in float64). With s = z / T,
    p = softmax(s):

        log_prob = s_y - lse (0 where y == ignore_index),  lse = logsumexp(s),
        entropy = -sum_c p_c log p_c (0 log 0 = 0),  top-k: the k largest log p_c, descending.

    ``argmax`` is torch.argmax of the logits (the lowest index on ties). The row maximum m and
    log_s = log sum exp(s - m) are kept apart so that log p = (s - m) - log_s has no
    cancellation. ``inplace``: ``z`` is scratch the caller owns; every step then writes into it
    or into one temporary of its size (no allocation per step: the fast path's form)."""
    argmax = z.argmax(1)
    acc = acc_dtype(z.dtype)
    if inplace:
        s = (z if z.dtype == acc else z.to(acc)).div_(temperature)
    else:
        s = z.to(acc) / temperature
    m = s.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.full_like(m, float("nan")))
    sm = s.sub_(m) if inplace else s - m
    e = torch.exp(sm)
    S = e.sum(1, keepdim=True)
    log_s = torch.log(S)
    logp = sm.sub_(log_s) if inplace else sm - log_s
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    log_prob = torch.where(valid, picked, torch.zeros_like(picked))
    lse = (m + log_s).squeeze(1)
    values = indices = None
    if top_k:
        values, indices = torch.topk(logp, top_k, dim=1)
    H = None
    if entropy:
        p = e.div_(S) if inplace else e / S
        plogp = p.mul_(logp) if inplace else p * logp
        masked = logp == -math.inf  # p = 0 there: 0 log 0 = 0, not 0 * -inf
        plogp = plogp.masked_fill_(masked, 0.0) if inplace else plogp.masked_fill(masked, 0.0)
        H = -plogp.sum(1)
        H = torch.where(torch.isnan(lse), lse, H)  # a NaN row has a NaN entropy
    lse64 = (m.double() + log_s.double()).squeeze(1)
    return log_prob, lse, argmax, H, values, indices, lse64


def token_log_p(z, temperature, lse64, inplace=False):
    """log p = s - lse of logits ``z`` ``[n, C]`` from the saved float64 lse (split into hi + lo
    in the accumulation dtype so that large logits keep their precision); ``inplace``: into
    ``z``'s storage where it is the accumulation dtype."""
    acc = acc_dtype(z.dtype)
    hi = lse64.to(acc)
    lo = (lse64 - hi.double()).to(acc)
    if inplace:
        s = (z if z.dtype == acc else z.to(acc)).div_(temperature)
        return s.sub_(hi.unsqueeze(1)).sub_(lo.unsqueeze(1))
    s = z.to(acc) / temperature
    return (s - hi.unsqueeze(1)) - lo.unsqueeze(1)


def token_gradient(logp, temperature, *, g_lp=None, valid=None, index=None, owned=None,
                   g_lse=None, g_entropy=None, entropy=None, g_topk=None, topk_index=None,
                   topk_owned=None, inplace=False):
    """The gradient of any mix of the per-token outputs with respect to the logits of ``logp``
    ``[n, C]`` (log p over those columns), for upstream gradients g_lp, g_lse, g_H, g_k (each
    None for zero):

        dz_c = (1/T) [p_c (a - g_H (log p_c + H)) + g_lp [c = y] + sum_i g_k,i [c = i]],
        a = g_lse - g_lp - sum_i g_k,i

    ``index`` / ``topk_index``: the target's and the top-k's columns in ``logp`` where ``owned``
    / ``topk_owned`` (on one device every kept target and every top-k; on a slice of the
    vocabulary the ones the slice holds); ``valid``: positions not ignored (g_lp is 0 there).
    ``inplace``: ``logp`` is scratch (overwritten), the result one more temporary."""
    p = torch.exp(logp)
    a = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    if g_lse is not None:
        a = a + g_lse.to(logp.dtype)
    if g_lp is not None:
        g_lp = torch.where(valid, g_lp, torch.zeros_like(g_lp)).to(logp.dtype)
        a = a - g_lp
    if g_topk is not None:
        g_topk = g_topk.to(logp.dtype)
        a = a - g_topk.sum(1)
    term = None
    if g_entropy is not None:  # g_H p_c (log p_c + H); 0 where p_c is 0 (a masked logit)
        masked = p == 0
        H = entropy.to(logp.dtype).unsqueeze(1)
        term = logp.add_(H).mul_(p) if inplace else (logp + H) * p
        term = term.masked_fill_(masked, 0.0) if inplace else term.masked_fill(masked, 0.0)
        g_H = g_entropy.to(logp.dtype).unsqueeze(1)
        term = term.mul_(g_H) if inplace else term * g_H
    grad = p.mul_(a.unsqueeze(1)) if inplace else p * a.unsqueeze(1)
    if term is not None:
        grad = grad.sub_(term) if inplace else grad - term
    if g_lp is not None:
        src = torch.where(owned, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)
        grad = grad.scatter_add_(1, index.unsqueeze(1), src) if inplace \
            else grad.scatter_add(1, index.unsqueeze(1), src)
    if g_topk is not None:
        src = torch.where(topk_owned, g_topk, torch.zeros_like(g_topk))
        grad = grad.scatter_add_(1, topk_index, src) if inplace \
            else grad.scatter_add(1, topk_index, src)
    return grad.div_(temperature) if inplace else grad / temperature
