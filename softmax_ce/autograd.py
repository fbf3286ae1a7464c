"""``torch.autograd.Function`` s with hand-written gradients.

Forward and backward call only the ops of ``ops.py``; no backward differentiates through an
autograd graph of log_softmax. Every first-order backward is itself a Function whose backward
applies the second-order formula, so double backward (``create_graph=True``, gradgradcheck) works;
the second-order formulas are differentiable torch ops (and the softmax Function), so third and
higher derivatives are exact too. Each Function also has a ``jvp`` (the same formulas, for
forward-mode AD) and a generated vmap rule, for ``torch.func``:

* softmax:      y = softmax(x);  dx = J g = y * (g - <g, y>)        (J is symmetric)
* log_softmax:  y = log_softmax(x);  dx = g - exp(y) * sum(g)
* cross-entropy (x' = cap(x), p = softmax(x'), class weights w, eps = label_smoothing):
      dloss/dx'_c = g * [(A + 2 z lse) p_c - b_c],
      A = sum_c b_c  with b = (1-eps) w_y onehot(y) + (eps/C) w   (class-index targets)
                     or   b = w * ((1-eps) t + eps/C)              (probability targets);
  its derivative in x' is the softmax Jacobian applied to the cotangent, scaled:
      H u = (A + 2 z lse) J u + 2 z p <p, u>,  J u = p * (u - <u, p>)  (the softmax backward);
  H is symmetric, so the same product serves the vjp and the jvp;
  soft-capping chains cap'(x) = 1 - tanh(x/s)^2 and cap''(x) = -2 tanh(x/s) cap'(x) / s.
(the sigmoid cross-entropy's Functions are in autograd_sigmoid.py)

Tensors arrive already in the kernels' layout (``[outer, C, inner]``, see ``functional.py``).
"""

from __future__ import annotations

import torch

from . import ops
from . import reference
from .reference import acc_dtype

__all__ = [
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "SoftmaxCrossEntropyFunction",
    "ReducedCrossEntropyFunction",
    "SavesInputs",
    "acc_cast",
    "input_grads",
    "without_jvp",
]


# ------------------------------------------------------------------------------------------
# softmax / log_softmax
# ------------------------------------------------------------------------------------------
#
# The Functions below (all but ReducedCrossEntropyFunction) are written in torch.func's style:
# forward without ctx, setup_context, a generated vmap rule (the ops have vmap rules, ops.py) and a
# jvp for forward-mode AD, so vmap, grad, jacrev, jacfwd, jvp and torch.autograd.forward_ad work
# through them as through torch's own functions.


def acc_cast(*tensors):
    """The tensors in their accumulation dtype (float64 for float64, else float32)."""
    acc = acc_dtype(tensors[0].dtype)
    return [None if t is None else t.to(acc) for t in tensors]


class SavesInputs:
    """A Function mixin: setup_context saves every input for backward and for forward AD."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)


class SoftmaxFunction(torch.autograd.Function):
    """y = softmax(x) over dim 1 of an ``[outer, C, inner]`` tensor."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return ops.softmax_fwd(x, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _SoftmaxBackward.apply(grad_y, y)

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return ops.softmax_bwd(dx, y, False)  # J dx, J symmetric


class _SoftmaxBackward(SavesInputs, torch.autograd.Function):
    """dx = y * (g - <g, y>), a function of (g, y)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, y):
        return ops.softmax_bwd(grad_y, y, False)

    @staticmethod
    def backward(ctx, v):
        grad_y, y = ctx.saved_tensors
        d_grad = d_y = None
        if ctx.needs_input_grad[0]:
            d_grad = _SoftmaxBackward.apply(v, y)  # J is symmetric
        if ctx.needs_input_grad[1]:
            g, ya, va = acc_cast(grad_y, y, v)
            d_y = va * (g - (g * ya).sum(1, keepdim=True)) - g * (va * ya).sum(1, keepdim=True)
            d_y = d_y.to(y.dtype)
        return d_grad, d_y

    @staticmethod
    def jvp(ctx, dg, dy):
        grad_y, y = ctx.saved_tensors
        g, ya = acc_cast(grad_y, y)
        out = torch.zeros_like(ya)
        if dg is not None:
            (dga,) = acc_cast(dg)
            out = out + ya * (dga - (dga * ya).sum(1, keepdim=True))
        if dy is not None:
            (dya,) = acc_cast(dy)
            out = out + dya * (g - (g * ya).sum(1, keepdim=True))
            out = out - ya * (g * dya).sum(1, keepdim=True)
        return out.to(y.dtype)


class LogSoftmaxFunction(torch.autograd.Function):
    """y = log_softmax(x) over dim 1 of an ``[outer, C, inner]`` tensor."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return ops.softmax_fwd(x, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _LogSoftmaxBackward.apply(grad_y, y)

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        ya, dxa = acc_cast(y, dx)
        return (dxa - (dxa * torch.exp(ya)).sum(1, keepdim=True)).to(y.dtype)


class _LogSoftmaxBackward(SavesInputs, torch.autograd.Function):
    """dx = g - exp(y) * sum(g), a function of (g, y)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, y):
        return ops.softmax_bwd(grad_y, y, True)

    @staticmethod
    def backward(ctx, v):
        grad_y, y = ctx.saved_tensors
        ya, va = acc_cast(y, v)
        p = torch.exp(ya)
        d_grad = d_y = None
        if ctx.needs_input_grad[0]:
            d_grad = (va - (va * p).sum(1, keepdim=True)).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            d_y = (-va * p * grad_y.to(va.dtype).sum(1, keepdim=True)).to(y.dtype)
        return d_grad, d_y

    @staticmethod
    def jvp(ctx, dg, dy):
        grad_y, y = ctx.saved_tensors
        g, ya = acc_cast(grad_y, y)
        p = torch.exp(ya)
        out = torch.zeros_like(ya)
        if dg is not None:
            (dga,) = acc_cast(dg)
            out = out + dga - p * dga.sum(1, keepdim=True)
        if dy is not None:
            (dya,) = acc_cast(dy)
            out = out - p * dya * g.sum(1, keepdim=True)
        return out.to(y.dtype)


# ------------------------------------------------------------------------------------------
# softmax cross-entropy
# ------------------------------------------------------------------------------------------


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """Per-position loss ``[outer, inner]`` (accumulation dtype) of logits ``[outer, C, inner]``.

    ``target`` holds class indices ``[outer, inner]`` (int32/int64) or probabilities
    ``[outer, C, inner]`` (floating). ``weight`` is ``[C]`` in the accumulation dtype or None.
    ``softcap`` 0 disables soft-capping. With ``inplace_backward`` the first-order backward writes
    the gradient into the logits' storage and bumps their version counter, so any other saved use
    of those logits fails loudly instead of reading a gradient (not under torch.func transforms).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                inplace_backward=False):
        if target.is_floating_point():
            return ops.ce_prob_fwd(logits, target, weight, label_smoothing, z_loss, softcap)
        return ops.ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs[:7]
        inplace_backward = inputs[7] if len(inputs) > 7 else False
        lse = output[1]
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.save_for_forward(logits, target, weight, lse)
        ctx.params = (target.is_floating_point(), ignore_index, label_smoothing, z_loss, softcap)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(lse)

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
        return input_grads(ctx, grad_logits, grad_target)

    @staticmethod
    def jvp(ctx, d_logits, d_target, *_):
        """d loss = <dloss/dx, dx> + <dloss/dt, dt>; lse is not differentiable."""
        logits, target, weight, lse = ctx.saved_tensors
        prob, ignore_index, eps, z_loss, softcap = ctx.params
        acc = acc_dtype(logits.dtype)
        d_loss = torch.zeros(lse.shape, dtype=acc, device=lse.device)
        if d_logits is not None:
            ones = torch.ones_like(d_loss)
            g1 = _ce_grad(ones, logits, target, weight, lse, *ctx.params)
            d_loss = d_loss + (g1.to(acc) * d_logits.to(acc)).sum(1)
        if prob and d_target is not None:
            logp = reference.capped(logits, softcap) - lse.unsqueeze(1).to(acc)
            coef = -(1 - eps) * logp
            if weight is not None:
                coef = coef * weight.view(1, -1, 1)
            d_loss = d_loss + (coef * d_target.to(acc)).sum(1)
        return d_loss, None


class ReducedCrossEntropyFunction(torch.autograd.Function):
    """The ``mean`` / ``sum`` loss (0-dim, accumulation dtype) with its gradient formed in the
    forward pass.

    ``grad_scale`` ``[outer, inner]`` is d(reduced loss)/d(per-position loss): 1 for ``sum``,
    1 / denominator for ``mean`` (usually a broadcast 0-dim tensor). The forward writes the
    gradient for a unit upstream gradient while each row is still in cache (one read of the
    logits, one write of the gradient: the traffic floor of forward + backward); the backward
    hands that gradient over: as it is when the upstream gradient is 1 (the common
    ``loss.backward()``; checked on the device), else recomputed in its buffer for the actual
    upstream gradient by the backward kernel (``ce_bwd_redo_``: one rounding, and the same
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
                        ops.ce_prob_bwd_redo_(grad_total, grad_loss, logits, target, weight,
                                                  lse, eps, z_loss, softcap, fused)
                    else:
                        ops.ce_bwd_redo_(grad_total, grad_loss, logits, target, weight, lse,
                                             ignore_index, eps, z_loss, softcap, fused)
                grad_logits = fused
            else:
                grad_logits = _CrossEntropyBackward.apply(
                    grad_loss, logits, target, weight, lse, *ctx.params
                )
        return input_grads(ctx, grad_logits, grad_target)


def _prob_target_grad(grad_loss, logits, target, weight, eps, softcap):
    """dloss/dt_c = -(1 - eps) w_c log_softmax(x')_c, through our differentiable Function."""
    logp = LogSoftmaxFunction.apply(reference.capped(logits, softcap))
    return reference.prob_target_gradient(logp, grad_loss, weight, eps).to(target.dtype)


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


class _SecondOrder:
    """The pieces of the cross-entropy's second derivative at (grad_loss, logits, target), all
    in differentiable torch ops (the lse is recomputed from x, not taken from the saved constant),
    so products with them can be differentiated again: third and higher derivatives are exact."""

    def __init__(self, grad_loss, logits, target, weight, prob, ignore_index, eps, z_loss,
                 softcap):
        acc = acc_dtype(logits.dtype)
        C = logits.shape[1]
        x = logits.to(acc)
        self.g = grad_loss.to(acc).unsqueeze(1)
        if softcap > 0:
            th = torch.tanh(x / softcap)
            xs, self.d1 = softcap * th, 1 - th * th
            self.d2 = -2 * th * self.d1 / softcap
        else:
            xs, self.d1, self.d2 = x, None, None
        lse = torch.logsumexp(xs.double(), dim=1, keepdim=True)
        self.p = torch.exp(xs.double() - lse).to(acc)
        lse = lse.to(acc)
        w = weight.view(1, C, 1) if weight is not None else None
        self.w, self.eps = w, eps
        # k = A + 2 z lse, zc = 2 z (0 at ignored positions) and the unit gradient g1: the
        # reference's definitions (reference.row_coefficient, index_gradient, prob_gradient).
        ones = torch.ones_like(lse.squeeze(1))
        if prob:
            b = reference.smoothed_target(target, weight, eps, C)
            k = reference.row_coefficient(b.sum(1), z_loss, lse.squeeze(1))
            self.zc = torch.full_like(lse, 2 * z_loss)
            self.g1 = reference.prob_gradient(self.p, ones, k, b)
        else:
            valid, safe, w_y = reference.class_terms(target, weight, ignore_index, acc)
            w_sum = weight.sum() if weight is not None else float(C)
            mass = reference.target_mass(w_y, w_sum, eps, C)
            k = reference.row_coefficient(mass, z_loss, lse.squeeze(1), valid)
            self.zc = valid.unsqueeze(1) * (2 * z_loss)
            self.g1 = reference.index_gradient(self.p, ones, k, valid, safe, valid, w_y, weight,
                                               eps, C)
        self.k = k.unsqueeze(1)  # gradient w.r.t. x' at a unit upstream gradient: g1

    def unit_gradient(self):
        """dloss/dx at a unit upstream gradient, [outer, C, inner]."""
        return self.g1 if self.d1 is None else self.g1 * self.d1

    def hessian_product(self, v):
        """g * H v (H the Hessian of the loss in x, symmetric): the vjp and the jvp in x."""
        u = v if self.d1 is None else v * self.d1
        ju = _SoftmaxBackward.apply(u, self.p)  # J u = p * (u - <u, p>), differentiable
        hu = self.k * ju + self.zc * self.p * (u * self.p).sum(1, keepdim=True)
        if self.d1 is not None:
            hu = hu * self.d1 + self.g1 * self.d2 * v
        return self.g * hu

    def target_vjp(self, v):
        """<v, d grad / d t> for probability targets."""
        u = v if self.d1 is None else v * self.d1
        d_t = self.g * (1 - self.eps) * ((u * self.p).sum(1, keepdim=True) - u)
        return d_t * self.w if self.w is not None else d_t

    def target_jvp(self, dt):
        """(d grad / d t) dt for probability targets."""
        wdt = (1 - self.eps) * (dt * self.w if self.w is not None else dt)
        out = self.g * (wdt.sum(1, keepdim=True) * self.p - wdt)
        return out if self.d1 is None else out * self.d1


class _CrossEntropyBackward(torch.autograd.Function):
    """grad_logits as a function of (grad_loss, logits, target); its backward is the second
    derivative of the loss (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss, softcap):
        return _ce_grad(grad_loss, logits, target, weight, lse, prob, ignore_index, eps, z_loss,
                        softcap)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_loss, logits, target, weight = inputs[:4]  # the saved lse is not needed: the
        ctx.save_for_backward(grad_loss, logits, target, weight)  # second order recomputes it
        ctx.save_for_forward(grad_loss, logits, target, weight)
        ctx.params = inputs[5:]

    @staticmethod
    def backward(ctx, v):
        grad_loss, logits, target, weight = ctx.saved_tensors
        prob = ctx.params[0]
        so = _SecondOrder(grad_loss, logits, target, weight, *ctx.params)
        va = v.to(so.p.dtype)
        d_grad_loss = d_logits = d_target = None
        if ctx.needs_input_grad[0]:
            d_grad_loss = (va * so.unit_gradient()).sum(1).to(grad_loss.dtype)
        if ctx.needs_input_grad[1]:
            d_logits = so.hessian_product(va).to(logits.dtype)
        if prob and ctx.needs_input_grad[2]:
            d_target = so.target_vjp(va).to(target.dtype)
        return input_grads(ctx, d_grad_loss, d_logits, d_target)

    @staticmethod
    def jvp(ctx, d_grad_loss, d_logits, d_target, *_):
        grad_loss, logits, target, weight = ctx.saved_tensors
        prob = ctx.params[0]
        so = _SecondOrder(grad_loss, logits, target, weight, *ctx.params)
        out = torch.zeros_like(so.p)
        if d_grad_loss is not None:
            out = out + d_grad_loss.to(out.dtype).unsqueeze(1) * so.unit_gradient()
        if d_logits is not None:
            out = out + so.hessian_product(d_logits.to(out.dtype))
        if prob and d_target is not None:
            out = out + so.target_jvp(d_target.to(out.dtype))
        return out.to(logits.dtype)


def _ce_bwd_differentiable(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing,
                           z_loss, softcap):
    """softmax_ce::ce_bwd_differentiable: the class-index gradient through
    _CrossEntropyBackward, so autograd records its second derivative."""
    return _CrossEntropyBackward.apply(grad_loss, logits, target, weight, lse, False,
                                       ignore_index, label_smoothing, z_loss, softcap)


_impl = torch.library.Library("softmax_ce", "IMPL")
_impl.impl("ce_bwd_differentiable", _ce_bwd_differentiable, "CompositeImplicitAutograd")


def input_grads(ctx, *grads):
    """A backward's return value: ``grads`` for the first inputs of forward, None for every
    other (as many as ``ctx.needs_input_grad`` has entries: no hand-counted tail)."""
    return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - len(grads))


def without_jvp(cls):
    """The same Function without its jvp, for torch.compile: dynamo cannot trace a Function that
    defines one (forward-mode AD does not run under torch.compile anyway)."""
    return type(cls.__name__, (cls,), {"jvp": torch.autograd.Function.jvp,
                                       "__doc__": cls.__doc__, "__module__": cls.__module__})
