"""The sigmoid (binary) cross-entropy's ``torch.autograd.Function`` s, in the style of
``autograd.py`` (setup_context, jvp, a generated vmap rule; every backward differentiable again):

    loss = w * [(1 - y) x + (1 + (pw - 1) y) log(1 + exp(-x))]      (torch's BCE-with-logits)
    dloss/dx = g * w * [(pw y + 1 - y) sigmoid(x) - pw y]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .autograd import SavesInputs, acc_cast, input_grads

__all__ = ["SigmoidCrossEntropyFunction"]


class SigmoidCrossEntropyFunction(SavesInputs, torch.autograd.Function):
    """Elementwise w * [(1-y) x + (1 + (pw-1) y) log(1 + exp(-x))], torch's BCE-with-logits.

    ``weight`` and ``pos_weight`` broadcast to the logits' shape; all tensors share one dtype.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, pos_weight):
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
            grad_target = (grad_loss * _bce_target_derivative(logits, weight, pos_weight))
            grad_target = grad_target.to(target.dtype)
        return input_grads(ctx, grad_logits, grad_target)

    @staticmethod
    def jvp(ctx, d_logits, d_target, *_):
        logits, target, weight, pos_weight = ctx.saved_tensors
        out = torch.zeros_like(logits)
        if d_logits is not None:
            out = out + ops.sigmoid_ce_bwd(d_logits, logits, target, weight, pos_weight)
        if d_target is not None:
            out = out + d_target * _bce_target_derivative(logits, weight, pos_weight)
        return out


def _bce_target_derivative(logits, weight, pos_weight):
    """dloss/dy = w * [-x + (pw - 1) log(1 + exp(-x))]."""
    d = -logits
    if pos_weight is not None:
        d = d + (pos_weight - 1) * F.softplus(-logits)
    if weight is not None:
        d = d * weight
    return d


class _BceSecondOrder:
    """d/d(g, x, y) of grad = g w [c sigmoid(x) - pw y], c = pw y + 1 - y: all diagonal."""

    def __init__(self, grad_loss, logits, target, weight, pos_weight):
        x, y, self.g = acc_cast(logits, target, grad_loss)
        self.s = torch.sigmoid(x)
        pw = pos_weight.to(x.dtype) if pos_weight is not None else None
        self.pw = pw
        self.c = pw * y + 1 - y if pw is not None else torch.ones_like(y)
        self.y = y
        self.w = weight.to(x.dtype) if weight is not None else None

    def weighted(self, v):
        return v * self.w if self.w is not None else v

    def by_grad_loss(self):
        return self.c * self.s - (self.pw * self.y if self.pw is not None else self.y)

    def by_logits(self):
        return self.g * self.c * self.s * (1 - self.s)

    def by_target(self):
        dy = (self.pw - 1) * self.s - self.pw if self.pw is not None else -torch.ones_like(self.s)
        return self.g * dy


class _SigmoidCrossEntropyBackward(SavesInputs, torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, logits, target, weight, pos_weight):
        return ops.sigmoid_ce_bwd(grad_loss, logits, target, weight, pos_weight)

    @staticmethod
    def backward(ctx, v):
        grad_loss, logits, target, weight, pos_weight = ctx.saved_tensors
        so = _BceSecondOrder(grad_loss, logits, target, weight, pos_weight)
        va = so.weighted(v.to(so.s.dtype))
        d_grad = d_logits = d_target = None
        if ctx.needs_input_grad[0]:
            d_grad = (va * so.by_grad_loss()).to(grad_loss.dtype)
        if ctx.needs_input_grad[1]:
            d_logits = (va * so.by_logits()).to(logits.dtype)
        if ctx.needs_input_grad[2]:
            d_target = (va * so.by_target()).to(target.dtype)
        return input_grads(ctx, d_grad, d_logits, d_target)

    @staticmethod
    def jvp(ctx, d_grad, d_logits, d_target, *_):
        grad_loss, logits, target, weight, pos_weight = ctx.saved_tensors
        so = _BceSecondOrder(grad_loss, logits, target, weight, pos_weight)
        out = torch.zeros_like(so.s)
        for tangent, factor in ((d_grad, so.by_grad_loss), (d_logits, so.by_logits),
                                (d_target, so.by_target)):
            if tangent is not None:
                out = out + tangent.to(out.dtype) * factor()
        return so.weighted(out).to(logits.dtype)
