"""The op layer: one schema per kernel in the ``softmax_ce`` namespace.

Each op is defined once, here. Its default implementation (``CompositeExplicitAutograd``) is the
pure-PyTorch reference in ``reference.py``; the compiled extension (``softmax_ce._C``) registers
``CPU`` / ``CUDA`` kernels for the same schemas with ``TORCH_LIBRARY_IMPL``, so the dispatcher picks
a compiled kernel where one exists and the reference everywhere else. Fake (meta)
implementations make the ops traceable by ``torch.compile`` and ``torch.export``.

The ops are not differentiable by themselves: ``autograd.py`` wraps them in
``torch.autograd.Function`` s with hand-written gradients.

``ce_fwd_bwd`` / ``ce_prob_fwd_bwd`` are the forward and the backward in one pass over the logits
(the gradient for a ``grad_loss`` known at forward time, written while the row is in cache);
``ce_bwd_redo_`` / ``ce_prob_bwd_redo_`` redo such a gradient in its buffer for the actual
upstream gradient (a recomputation, so one rounding, not a rescaling of the rounded values), and
do nothing when that 0-dim tensor holds 1 (checked on the device by the CUDA kernels, without a
host synchronisation).

``HOST_SCHEMAS`` are the CPU kernels' host fast path (one call for a whole small mean / sum
loss, and the fixed-order sum): CPU kernels only, used by functional.py in eager mode.

Shapes follow DESIGN.md's kernel contracts: logits ``[outer, C, inner]``; per-position loss and
grad_loss ``[outer, inner]`` in the accumulation dtype (float64 for float64 logits, else
float32); the saved ``lse`` ``[outer, inner]`` is float64 for every dtype (see reference.py).
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from . import reference

_lib = torch.library.Library("softmax_ce", "DEF")

_CE_ARGS = "int ignore_index, float label_smoothing, float z_loss, float softcap"
_PROB_ARGS = "float label_smoothing, float z_loss, float softcap"

SCHEMAS = {
    "ce_fwd": f"ce_fwd(Tensor logits, Tensor target, Tensor? weight, {_CE_ARGS}) -> (Tensor, Tensor)",
    "ce_bwd": (
        "ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        f"{_CE_ARGS}) -> Tensor"
    ),
    "ce_bwd_": (
        "ce_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, "
        f"{_CE_ARGS}) -> ()"
    ),
    "ce_prob_fwd": (
        f"ce_prob_fwd(Tensor logits, Tensor target, Tensor? weight, {_PROB_ARGS}) -> (Tensor, Tensor)"
    ),
    "ce_prob_bwd": (
        "ce_prob_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        f"{_PROB_ARGS}) -> Tensor"
    ),
    "ce_prob_bwd_": (
        "ce_prob_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, "
        f"Tensor lse, {_PROB_ARGS}) -> ()"
    ),
    "ce_fwd_bwd": (
        "ce_fwd_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        f"{_CE_ARGS}) -> (Tensor, Tensor, Tensor)"
    ),
    "ce_prob_fwd_bwd": (
        "ce_prob_fwd_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        f"{_PROB_ARGS}) -> (Tensor, Tensor, Tensor)"
    ),
    "ce_bwd_redo_": (
        "ce_bwd_redo_(Tensor upstream, Tensor grad_loss, Tensor logits, Tensor target, "
        f"Tensor? weight, Tensor lse, {_CE_ARGS}, Tensor(a!) out) -> ()"
    ),
    "ce_prob_bwd_redo_": (
        "ce_prob_bwd_redo_(Tensor upstream, Tensor grad_loss, Tensor logits, Tensor target, "
        f"Tensor? weight, Tensor lse, {_PROB_ARGS}, Tensor(a!) out) -> ()"
    ),
    "softmax_fwd": "softmax_fwd(Tensor x, bool log) -> Tensor",
    "softmax_bwd": "softmax_bwd(Tensor grad_y, Tensor y, bool log) -> Tensor",
    "sigmoid_ce_fwd": (
        "sigmoid_ce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight) -> Tensor"
    ),
    "sigmoid_ce_bwd": (
        "sigmoid_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor? pos_weight) -> Tensor"
    ),
}

def _non_differentiable(fn):
    """The ops are kernels, not differentiable functions (autograd.py differentiates them); the
    reference must not record an autograd graph of its internal torch ops."""

    def kernel(*args):
        _reference_notice(fn.__name__, args[0])
        with torch.no_grad():
            return fn(*args)

    kernel.__name__ = fn.__name__
    return kernel


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_noticed = set()  # the device types whose first reference call has been looked at


def _has_compiled_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"softmax_ce::{name}", key)


def _reference_notice(name: str, tensor) -> None:
    """Once per device type: a RuntimeWarning when the compiled extension is loaded but the
    reference serves this device (a CUDA tensor with an extension built without the CUDA
    kernels). Where the extension is missing, importing softmax_ce said so already; where it was
    disabled (SOFTMAX_CE_DISABLE_EXTENSION=1), that was asked for."""
    kind = tensor.device.type
    if kind in _noticed:
        return
    _noticed.add(kind)
    key = _DISPATCH_KEYS.get(kind)
    if key is None or _extension_module() is None or _has_compiled_kernel(name, key):
        return
    warnings.warn(
        f"softmax_ce: the compiled extension has no kernels for {kind} tensors (built without "
        f"them; `python -m softmax_ce info` says why): the pure-PyTorch reference serves them (the "
        "same results, slower)", RuntimeWarning, stacklevel=2)


def _extension_module():
    return sys.modules.get(f"{__package__}._C")


_REFERENCE_KERNELS = {name: _non_differentiable(getattr(reference, name)) for name in SCHEMAS}
for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _REFERENCE_KERNELS[_name], "CompositeExplicitAutograd")


# The host fast path of the compiled CPU kernels: a whole mean / sum cross-entropy of [N, C] logits
# and [N] class indices in one call (``ce_reduced``: the loss without a gradient; ``ce_loss_host``:
# the loss as an autograd node written in C++), and the fixed-order sum of float32 / float64
# values (``fixed_sum``), all with the arithmetic of the general path (_core.py). CPU kernels
# only, no reference, fake or vmap implementation: called only where ``host_fast_path()`` says the
# kernels are there, in eager mode outside torch.func transforms (_core.py, fixed_sum.py).
HOST_SCHEMAS = {
    "fixed_sum": "fixed_sum(Tensor values) -> Tensor",
    "ce_reduced": (
        f"ce_reduced(Tensor logits, Tensor target, Tensor? weight, {_CE_ARGS}, bool mean) -> Tensor"
    ),
    "ce_loss_host": (
        "ce_loss_host(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float z_loss, bool mean) -> Tensor"
    ),
}

for _schema in HOST_SCHEMAS.values():
    _lib.define(_schema)

# ce_bwd as a differentiable function (autograd.py registers it: the Function whose backward is
# the second derivative). The host node's backward calls it under create_graph=True, so that C++
# path has no formula of its own.
_lib.define(f"ce_bwd_differentiable(Tensor grad_loss, Tensor logits, Tensor target, "
            f"Tensor? weight, Tensor lse, {_CE_ARGS}) -> Tensor")


def _fixed_sum_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _fixed_sum_backward(ctx, grad):
    return grad.expand(ctx.shape)


torch.library.register_autograd("softmax_ce::fixed_sum", _fixed_sum_backward,
                                setup_context=_fixed_sum_setup)


# --------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only, never data.
# --------------------------------------------------------------------------------------------


def _check_3d(logits, name="logits"):
    torch._check(logits.dim() == 3, lambda: f"{name} must be [outer, C, inner], got {logits.dim()}-D")


def _per_position(logits, dtype=None):
    return logits.new_empty(
        (logits.shape[0], logits.shape[2]), dtype=dtype or reference.acc_dtype(logits.dtype)
    )


@torch.library.register_fake("softmax_ce::ce_fwd")
def _ce_fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    _check_3d(logits)
    torch._check(target.shape == (logits.shape[0], logits.shape[2]), lambda: "target shape")
    return _per_position(logits), _per_position(logits, torch.float64)


@torch.library.register_fake("softmax_ce::ce_bwd")
def _ce_bwd_fake(grad_loss, logits, target, weight, lse, *args):
    _check_3d(logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("softmax_ce::ce_bwd_")
def _ce_bwd_inplace_fake(grad_loss, logits, target, weight, lse, *args):
    _check_3d(logits)


@torch.library.register_fake("softmax_ce::ce_prob_fwd")
def _ce_prob_fwd_fake(logits, target, weight, label_smoothing, z_loss, softcap):
    _check_3d(logits)
    torch._check(target.shape == logits.shape, lambda: "target shape")
    return _per_position(logits), _per_position(logits, torch.float64)


@torch.library.register_fake("softmax_ce::ce_prob_bwd")
def _ce_prob_bwd_fake(grad_loss, logits, target, weight, lse, *args):
    _check_3d(logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("softmax_ce::ce_prob_bwd_")
def _ce_prob_bwd_inplace_fake(grad_loss, logits, target, weight, lse, *args):
    _check_3d(logits)


@torch.library.register_fake("softmax_ce::ce_fwd_bwd")
def _ce_fwd_bwd_fake(grad_loss, logits, target, weight, *args):
    loss, lse = _ce_fwd_fake(logits, target, weight, *args)
    return loss, lse, _ce_bwd_fake(grad_loss, logits, target, weight, lse, *args)


@torch.library.register_fake("softmax_ce::ce_prob_fwd_bwd")
def _ce_prob_fwd_bwd_fake(grad_loss, logits, target, weight, *args):
    loss, lse = _ce_prob_fwd_fake(logits, target, weight, *args)
    return loss, lse, _ce_prob_bwd_fake(grad_loss, logits, target, weight, lse, *args)


@torch.library.register_fake("softmax_ce::ce_bwd_redo_")
def _ce_bwd_redo_fake(upstream, grad_loss, logits, *args):
    _check_3d(logits)


@torch.library.register_fake("softmax_ce::ce_prob_bwd_redo_")
def _ce_prob_bwd_redo_fake(upstream, grad_loss, logits, *args):
    _check_3d(logits)


@torch.library.register_fake("softmax_ce::softmax_fwd")
def _softmax_fwd_fake(x, log):
    _check_3d(x, "x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("softmax_ce::softmax_bwd")
def _softmax_bwd_fake(grad_y, y, log):
    _check_3d(y, "y")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("softmax_ce::sigmoid_ce_fwd")
def _sigmoid_ce_fwd_fake(logits, target, weight, pos_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("softmax_ce::sigmoid_ce_bwd")
def _sigmoid_ce_bwd_fake(grad_loss, logits, target, weight, pos_weight):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# vmap rules (torch.func.vmap, and the generated vmap rules of autograd.py's Functions). The ops
# that write into an argument have none: vmap over them raises torch's error.
# --------------------------------------------------------------------------------------------

# The arguments with a leading per-position dimension (outer); every other tensor argument
# (weight) is shared by all positions.
_PER_POSITION = {
    "ce_fwd": (0, 1), "ce_prob_fwd": (0, 1),
    "ce_bwd": (0, 1, 2, 4), "ce_prob_bwd": (0, 1, 2, 4),
    "ce_fwd_bwd": (0, 1, 2), "ce_prob_fwd_bwd": (0, 1, 2),
    "softmax_fwd": (0,), "softmax_bwd": (0, 1),
}


def _vmap_loop(op, batch_size, in_dims, args):
    """One call per batch element, results stacked: the rule for a batched shared argument."""
    results = []
    for i in range(batch_size):
        results.append(op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
    if isinstance(results[0], tuple):
        return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0


def _fold_rule(name):
    """The batch dimension folded into the outer one: one call for the whole batch."""
    op = getattr(torch.ops.softmax_ce, name).default
    per_position = _PER_POSITION[name]

    def rule(info, in_dims, *args):
        B = info.batch_size
        shared_batched = any(d is not None for i, d in enumerate(in_dims) if i not in per_position)
        if shared_batched:
            return _vmap_loop(op, B, in_dims, args)
        args = list(args)
        outer = None
        for i in per_position:
            a, d = args[i], in_dims[i]
            a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(B, *a.shape)
            outer = a.shape[1]
            args[i] = a.reshape(B * outer, *a.shape[2:])
        out = op(*args)

        def unfold(t):
            return t.reshape(B, outer, *t.shape[1:])

        if isinstance(out, tuple):
            return tuple(unfold(t) for t in out), (0,) * len(out)
        return unfold(out), 0

    return rule


def _elementwise_rule(name, logits_index, full_shape_args):
    """The sigmoid ops: the batch dimension in front, broadcast arguments lined up under it."""
    op = getattr(torch.ops.softmax_ce, name).default

    def rule(info, in_dims, *args):
        B = info.batch_size
        x, dx = args[logits_index], in_dims[logits_index]
        ndim = x.dim() - (dx is not None)  # the logical shape's rank
        out_args = []
        for i, (a, d) in enumerate(zip(args, in_dims)):
            if not isinstance(a, torch.Tensor):
                out_args.append(a)
                continue
            if d is not None:
                a = a.movedim(d, 0)
                a = a.reshape(B, *([1] * (ndim - (a.dim() - 1))), *a.shape[1:])
            elif i in full_shape_args:
                a = a.unsqueeze(0).expand(B, *a.shape)
            out_args.append(a)
        return op(*out_args), 0

    return rule


for _name in _PER_POSITION:
    torch.library.register_vmap(f"softmax_ce::{_name}", _fold_rule(_name))
torch.library.register_vmap("softmax_ce::sigmoid_ce_fwd", _elementwise_rule("sigmoid_ce_fwd", 0, (0, 1)))
torch.library.register_vmap("softmax_ce::sigmoid_ce_bwd",
                            _elementwise_rule("sigmoid_ce_bwd", 1, (0, 1, 2)))


# --------------------------------------------------------------------------------------------
# Which implementation serves a device (or each op), and a switch that forces the reference (for
# tests and the benchmark; eager mode only).
# --------------------------------------------------------------------------------------------

_forced = [False]  # process-wide, so worker threads see the caller's choice


def reference_forced() -> bool:
    return _forced[0]


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Within this context every op runs the pure-PyTorch reference, even where a compiled kernel
    is registered (process-wide: threads started inside it see it too). Meant for tests and
    benchmarks in eager mode: not under torch.compile or torch.func transforms, where the
    dispatcher chooses (run with SOFTMAX_CE_DISABLE_EXTENSION=1 for the reference there)."""
    previous = _forced[0]
    _forced[0] = bool(enabled)
    try:
        yield
    finally:
        _forced[0] = previous


def implementation(device="cpu", per_op: bool = False):
    """'compiled' when the extension registered a kernel of every op for this device type, else
    'reference'. With ``per_op=True``: a dict from each op's name to the one that serves it."""
    device_type = torch.device(device).type
    key = _DISPATCH_KEYS.get(device_type)
    served = {
        name: "compiled" if key is not None and _has_compiled_kernel(name, key) else "reference"
        for name in SCHEMAS
    }
    if per_op:
        return served
    return "compiled" if all(v == "compiled" for v in served.values()) else "reference"


_host = [None]  # whether the host fast path's CPU kernels are registered (known after import)


def host_fast_path() -> bool:
    """Whether the host fast path (HOST_SCHEMAS) may run: its CPU kernels are registered and the
    reference is not forced."""
    if _host[0] is None:
        _host[0] = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"softmax_ce::{name}", "CPU")
                       for name in HOST_SCHEMAS)
    return _host[0] and not _forced[0]


def _make_caller(name):
    op = getattr(torch.ops.softmax_ce, name).default
    ref = getattr(reference, name)

    def call(*args):
        if reference_forced() and not torch.compiler.is_compiling() and not functorch_active():
            return ref(*args)
        return op(*args)

    call.__name__ = name
    call.__doc__ = f"Call softmax_ce::{name} (the reference under force_reference())."
    return call


ce_fwd = _make_caller("ce_fwd")
ce_bwd = _make_caller("ce_bwd")
ce_bwd_ = _make_caller("ce_bwd_")
ce_prob_fwd = _make_caller("ce_prob_fwd")
ce_prob_bwd = _make_caller("ce_prob_bwd")
ce_prob_bwd_ = _make_caller("ce_prob_bwd_")
ce_fwd_bwd = _make_caller("ce_fwd_bwd")
ce_prob_fwd_bwd = _make_caller("ce_prob_fwd_bwd")
ce_bwd_redo_ = _make_caller("ce_bwd_redo_")
ce_prob_bwd_redo_ = _make_caller("ce_prob_bwd_redo_")
softmax_fwd = _make_caller("softmax_fwd")
softmax_bwd = _make_caller("softmax_bwd")
sigmoid_ce_fwd = _make_caller("sigmoid_ce_fwd")
sigmoid_ce_bwd = _make_caller("sigmoid_ce_bwd")
fixed_sum = torch.ops.softmax_ce.fixed_sum.default
ce_reduced = torch.ops.softmax_ce.ce_reduced.default
ce_loss_host = torch.ops.softmax_ce.ce_loss_host.default
