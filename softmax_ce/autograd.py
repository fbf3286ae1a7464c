"""``torch.autograd.Function`` s with hand-written gradients.

Forward and backward call only the ops of ``ops.py``; no backward differentiates through an
autograd graph of log_softmax. Every first-order backward is itself a Function whose backward
applies the second-order formula, so double backward (``create_graph=True``, gradgradcheck) works:

* softmax:      y = softmax(x);  dx = J g = y * (g - <g, y>)        (J is symmetric)
* log_softmax:  y = log_softmax(x);  dx = g - exp(y) * sum(g)
* cross-entropy (x' = cap(x), p = softmax(x'), class weights w, eps = label_smoothing):
      dloss/dx'_c = g * [(A + 2 z lse) p_c - b_c],
      A = sum_c b_c  with b = (1-eps) w_y onehot(y) + (eps/C) w   (class-index targets)
                     or   b = w * ((1-eps) t + eps/C)              (probability targets);
  its derivative in x' is the softmax Jacobian applied to the cotangent, scaled:
      H u = (A + 2 z lse) J u + 2 z p <p, u>,  J u = p * (u - <u, p>)  (the softmax backward op);
  soft-capping chains cap'(x) = 1 - tanh(x/s)^2 and cap''(x) = -2 tanh(x/s) cap'(x) / s.
* sigmoid cross-entropy: dloss/dx = g * w * [(pw y + 1 - y) sigmoid(x) - pw y].

Tensors arrive already in the kernels' layout (``[outer, C, inner]``, see ``functional.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .reference import acc_dtype

__all__ = [
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "SoftmaxCrossEntropyFunction",
    "ReducedCrossEntropyFunction",
    "SigmoidCrossEntropyFunction",
]


# ------------------------------------------------------------------------------------------
# softmax / log_softmax
# ------------------------------------------------------------------------------------------


class SoftmaxFunction(torch.autograd.Function):
    """y = softmax(x) over dim 1 of an ``[outer, C, inner]`` tensor."""

    @staticmethod
    def forward(ctx, x):
        y = ops.softmax_fwd(x, False)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _SoftmaxBackward.apply(grad_y, y)


class _SoftmaxBackward(torch.autograd.Function):
    """dx = y * (g - <g, y>), a function of (g, y)."""

    @staticmethod
    def forward(ctx, grad_y, y):
        ctx.save_for_backward(grad_y, y)
        return ops.softmax_bwd(grad_y, y, False)

    @staticmethod
    def backward(ctx, v):
        grad_y, y = ctx.saved_tensors
        d_grad = d_y = None
        if ctx.needs_input_grad[0]:
            d_grad = _SoftmaxBackward.apply(v, y)  # J is symmetric
        if ctx.needs_input_grad[1]:
            acc = acc_dtype(y.dtype)
            g, ya, va = grad_y.to(acc), y.to(acc), v.to(acc)
            d_y = va * (g - (g * ya).sum(1, keepdim=True)) - g * (va * ya).sum(1, keepdim=True)
            d_y = d_y.to(y.dtype)
        return d_grad, d_y


class LogSoftmaxFunction(torch.autograd.Function):
    """y = log_softmax(x) over dim 1 of an ``[outer, C, inner]`` tensor."""

    @staticmethod
    def forward(ctx, x):
        y = ops.softmax_fwd(x, True)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _LogSoftmaxBackward.apply(grad_y, y)


class _LogSoftmaxBackward(torch.autograd.Function):
    """dx = g - exp(y) * sum(g), a function of (g, y)."""

    @staticmethod
    def forward(ctx, grad_y, y):
        ctx.save_for_backward(grad_y, y)
        return ops.softmax_bwd(grad_y, y, True)

    @staticmethod
    def backward(ctx, v):
        grad_y, y = ctx.saved_tensors
        acc = acc_dtype(y.dtype)
        p, va = torch.exp(y.to(acc)), v.to(acc)
        d_grad = d_y = None
        if ctx.needs_input_grad[0]:
            d_grad = (va - (va * p).sum(1, keepdim=True)).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            d_y = (-va * p * grad_y.to(acc).sum(1, keepdim=True)).to(y.dtype)
        return d_grad, d_y


# ------------------------------------------------------------------------------------------
# softmax cross-entropy
# ------------------------------------------------------------------------------------------


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """Per-position loss ``[outer, inner]`` (accumulation dtype) of logits ``[outer, C, inner]``.

    ``target`` holds class indices ``[outer, inner]`` (int32/int64) or probabilities
    ``[outer, C, inner]`` (floating). ``weight`` is ``[C]`` in the accumulation dtype or None.
    ``softcap`` 0 disables soft-capping. With ``inplace_backward`` the first-order backward writes
    the gradient into the logits' storage and bumps their version counter, so any other saved use
    of those logits fails loudly instead of reading a gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                inplace_backward=False):
        prob = target.is_floating_point()
        if prob:
            loss, lse = ops.ce_prob_fwd(logits, target, weight, label_smoothing, z_loss, softcap)
        else:
            loss, lse = ops.ce_fwd(
                logits, target, weight, ignore_index, label_smoothing, z_loss, softcap
            )
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.params = (prob, ignore_index, label_smoothing, z_loss, softcap)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        prob, ignore_index, eps, z_loss, softcap = ctx.params
        grad_logits = grad_target = None
        # The target's gradient first: it reads the logits, which an in-place backward destroys.
        if prob and ctx.needs_input_grad[1]:
            grad_target = _prob_target_grad(grad_loss, logits, target, weight, eps, softcap)
        if ctx.needs_input_grad[0]:
            if ctx.inplace_backward and not torch.is_grad_enabled():
                _ce_grad_inplace(grad_loss, logits, target, weight, lse, *ctx.params)
                grad_logits = logits.detach()
            else:
                grad_logits = _CrossEntropyBackward.apply(
                    grad_loss, logits, target, weight, lse, *ctx.params
                )
        return grad_logits, grad_target, None, None, None, None, None, None


class ReducedCrossEntropyFunction(torch.autograd.Function):
    """The ``mean`` / ``sum`` loss (0-dim, accumulation dtype) with its gradient formed in the
    forward pass.

    ``grad_scale`` ``[outer, inner]`` is d(reduced loss)/d(per-position loss): 1 for ``sum``,
    1 / denominator for ``mean`` (usually a broadcast 0-dim tensor). The forward writes the
    gradient for a unit upstream gradient while each row is still in cache (one read of the
    logits, one write of the gradient: the traffic floor of forward + backward); the backward
    hands that gradient over: as it is when the upstream gradient is 1 (the common
    ``loss.backward()``; checked on the device), else recomputed in its buffer for the actual
    upstream gradient by the backward kernel (``ce_bwd_rescaled_``: one rounding, and the same
    bits a recomputing backward gives). A second backward (``retain_graph=True``) or a
    differentiable one (``create_graph=True``) recomputes the gradient from the saved logits and
    lse, as ``SoftmaxCrossEntropyFunction`` does. ``reduce(per_position_loss)`` gives the reduced
    loss (fixed summation order).
    """

    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, reduce, ignore_index, label_smoothing,
                z_loss, softcap):
        prob = target.is_floating_point()
        if prob:
            loss, lse, grad = ops.ce_prob_fwd_bwd(
                grad_scale, logits, target, weight, label_smoothing, z_loss, softcap
            )
        else:
            loss, lse, grad = ops.ce_fwd_bwd(
                grad_scale, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap
            )
        # The gradient is kept like any tensor saved for backward, so saved-tensor hooks (CPU
        # offload, activation checkpointing) see it; the first plain backward hands it over.
        ctx.save_for_backward(logits, target, weight, lse, grad_scale, grad)
        ctx.params = (prob, ignore_index, label_smoothing, z_loss, softcap)
        ctx.handed_over = False
        return reduce(loss)

    @staticmethod
    def backward(ctx, grad_total):
        logits, target, weight, lse, grad_scale, fused = ctx.saved_tensors
        prob, ignore_index, eps, z_loss, softcap = ctx.params
        grad_logits = grad_target = None
        grad_loss = grad_total * grad_scale  # upstream x d(reduced)/d(per-position loss)
        if prob and ctx.needs_input_grad[1]:
            grad_target = _prob_target_grad(grad_loss, logits, target, weight, eps, softcap)
        if ctx.needs_input_grad[0]:
            if not ctx.handed_over and not torch.is_grad_enabled():
                ctx.handed_over = True
                # Redone in its buffer for the actual upstream gradient (nothing when it is 1).
                # The version counter is kept: the buffer is handed over, and a later backward
                # (retain_graph) must still be able to unpack the saved tensors (it recomputes).
                with torch.autograd._unsafe_preserve_version_counter(fused):
                    if prob:
                        ops.ce_prob_bwd_rescaled_(grad_total, grad_loss, logits, target, weight,
                                                  lse, eps, z_loss, softcap, fused)
                    else:
                        ops.ce_bwd_rescaled_(grad_total, grad_loss, logits, target, weight, lse,
                                             ignore_index, eps, z_loss, softcap, fused)
                grad_logits = fused
            else:
                grad_logits = _CrossEntropyBackward.apply(
                    grad_loss, logits, target, weight, lse, *ctx.params
                )
        return grad_logits, grad_target, None, None, None, None, None, None, None


def _prob_target_grad(grad_loss, logits, target, weight, eps, softcap):
    """dloss/dt_c = -(1 - eps) w_c log_softmax(x')_c, through our differentiable Function."""
    logp = LogSoftmaxFunction.apply(_capped(logits, softcap))
    scale = grad_loss.unsqueeze(1) * (1 - eps)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1)
    return (-scale * logp).to(target.dtype)


def _ce_grad_inplace(grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss,
                     softcap):
    if prob:
        ops.ce_prob_bwd_(grad_loss, logits, target, weight, lse, eps, z_loss, softcap)
    else:
        ops.ce_bwd_(grad_loss, logits, target, weight, lse, ignore_index, eps, z_loss, softcap)
    # The logits now hold their gradient: make every other saved use of them fail loudly.
    torch.autograd.graph.increment_version(logits)


def _ce_grad(grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss, softcap):
    if prob:
        return ops.ce_prob_bwd(grad_loss, logits, target, weight, lse, eps, z_loss, softcap)
    return ops.ce_bwd(grad_loss, logits, target, weight, lse, ignore_index, eps, z_loss, softcap)


def _capped(logits, softcap):
    """x' = softcap * tanh(x / softcap) in differentiable torch ops (x itself without capping)."""
    if softcap > 0:
        return softcap * torch.tanh(logits / softcap)
    return logits


class _CrossEntropyBackward(torch.autograd.Function):
    """grad_logits as a function of (grad_loss, logits, target); its backward is the second
    derivative of the loss (see the module docstring)."""

    @staticmethod
    def forward(ctx, grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss,
                softcap):
        ctx.save_for_backward(grad_loss, logits, target, weight, lse)
        ctx.params = (prob, ignore_index, eps, z_loss, softcap)
        return _ce_grad(grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss,
                        softcap)

    @staticmethod
    def backward(ctx, v):
        grad_loss, logits, target, weight, lse = ctx.saved_tensors
        prob, ignore_index, eps, z_loss, softcap = ctx.params
        acc = acc_dtype(logits.dtype)
        C = logits.shape[1]
        x = logits.to(acc)
        va = v.to(acc)
        g = grad_loss.to(acc).unsqueeze(1)
        if softcap > 0:
            th = torch.tanh(x / softcap)
            xs, d1 = softcap * th, 1 - th * th
            d2 = -2 * th * d1 / softcap
            u = va * d1
        else:
            xs, d1, d2, u = x, None, None, va
        # lse recomputed from x (not the saved one, a constant to autograd), so that this
        # backward is itself exactly differentiable: third and higher derivatives are correct.
        lse1 = torch.logsumexp(xs.double(), dim=1, keepdim=True)
        p = torch.exp(xs.double() - lse1).to(acc)
        lse1 = lse1.to(acc)
        w = weight.view(1, C, 1) if weight is not None else None

        # b: the target-dependent part of the gradient, A = sum_c b_c; zc = 2 z (0 if ignored).
        if prob:
            t = target.to(acc)
            if eps > 0:
                t = t * (1 - eps) + eps / C
            b = t * w if w is not None else t
            a = b.sum(1, keepdim=True)
            zc = torch.full_like(a, 2 * z_loss)
        else:
            valid = (target != ignore_index).unsqueeze(1)
            safe = torch.where(valid, target.unsqueeze(1), torch.zeros_like(target.unsqueeze(1)))
            onehot = torch.zeros_like(x).scatter_(1, safe.long(), 1.0)
            w_y = w.expand_as(x).gather(1, safe.long()) if w is not None else torch.ones_like(lse1)
            b = (1 - eps) * w_y * onehot
            if eps > 0:
                b = b + (eps / C) * (w if w is not None else 1.0)
            b = b * valid
            a = b.sum(1, keepdim=True)
            zc = valid * (2 * z_loss)
        k = a + zc * lse1
        g1 = k * p - b  # gradient w.r.t. x' at unit upstream gradient

        d_grad_loss = d_logits = d_target = None
        if ctx.needs_input_grad[0]:
            contrib = va * g1 if d1 is None else va * g1 * d1
            d_grad_loss = contrib.sum(1).to(grad_loss.dtype)
        if ctx.needs_input_grad[1]:
            ju = _SoftmaxBackward.apply(u, p)  # J u = p * (u - <u, p>), differentiable
            hu = k * ju + zc * p * (u * p).sum(1, keepdim=True)
            if d1 is not None:
                hu = hu * d1 + g1 * d2 * va
            d_logits = (g * hu).to(logits.dtype)
        if prob and ctx.needs_input_grad[2]:
            up = (u * p).sum(1, keepdim=True)
            d_t = g * (1 - eps) * (up - u)
            if w is not None:
                d_t = d_t * w
            d_target = d_t.to(target.dtype)
        return d_grad_loss, d_logits, d_target, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------
# sigmoid (binary) cross-entropy
# ------------------------------------------------------------------------------------------


class SigmoidCrossEntropyFunction(torch.autograd.Function):
    """Elementwise w * [(1-y) x + (1 + (pw-1) y) log(1 + exp(-x))], torch's BCE-with-logits.

    ``weight`` and ``pos_weight`` broadcast to the logits' shape; all tensors share one dtype.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, pos_weight):
        ctx.save_for_backward(logits, target, weight, pos_weight)
        return ops.sigmoid_ce_fwd(logits, target, weight, pos_weight)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, weight, pos_weight = ctx.saved_tensors
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = _SigmoidCrossEntropyBackward.apply(
                grad_loss, logits, target, weight, pos_weight
            )
        if ctx.needs_input_grad[1]:
            # dloss/dy = w * [-x + (pw - 1) log(1 + exp(-x))]
            d = -logits
            if pos_weight is not None:
                d = d + (pos_weight - 1) * F.softplus(-logits)
            if weight is not None:
                d = d * weight
            grad_target = (grad_loss * d).to(target.dtype)
        return grad_logits, grad_target, None, None


class _SigmoidCrossEntropyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_loss, logits, target, weight, pos_weight):
        ctx.save_for_backward(grad_loss, logits, target, weight, pos_weight)
        return ops.sigmoid_ce_bwd(grad_loss, logits, target, weight, pos_weight)

    @staticmethod
    def backward(ctx, v):
        grad_loss, logits, target, weight, pos_weight = ctx.saved_tensors
        acc = acc_dtype(logits.dtype)
        x, y, va, g = logits.to(acc), target.to(acc), v.to(acc), grad_loss.to(acc)
        s = torch.sigmoid(x)
        pw = pos_weight.to(acc) if pos_weight is not None else None
        c = pw * y + 1 - y if pw is not None else torch.ones_like(y)
        if weight is not None:
            va = va * weight.to(acc)
        d_grad = d_logits = d_target = None
        if ctx.needs_input_grad[0]:
            d_grad = (va * (c * s - (pw * y if pw is not None else y))).to(grad_loss.dtype)
        if ctx.needs_input_grad[1]:
            d_logits = (va * g * c * s * (1 - s)).to(logits.dtype)
        if ctx.needs_input_grad[2]:
            dy = (pw - 1) * s - pw if pw is not None else -torch.ones_like(s)
            d_target = (va * g * dy).to(target.dtype)
        return d_grad, d_logits, d_target, None, None
