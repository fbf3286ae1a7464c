"""``cross_entropy`` of DTensor logits sharded on the class dimension: the mesh dimension's group
and the shard's bounds make a ``Plan``, then the process-group path runs on the local shard."""

from __future__ import annotations

import torch

from .. import _args as A
from . import protocol as P
from .group import vocab_parallel_cross_entropy

__all__ = ["cross_entropy_dtensor"]


def cross_entropy_dtensor(input, target, weight, reduction, ignore_index, label_smoothing,
                          z_loss, softcap, inplace_backward, fn):
    """``cross_entropy`` of DTensor logits sharded on the class dimension along one mesh
    dimension (Replicate on the others; uneven shards as DTensor splits them). ``target`` and
    ``weight``: plain tensors (the same on every rank) or replicated DTensors. Returns the loss
    as a replicated DTensor; the logits' gradient is a DTensor with their placements."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = input.device_mesh, input.placements
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the class "
                           "dimension), got a 0-dim tensor")
    class_dim = 1 if input.dim() >= 2 else 0
    sharded = [i for i, p in enumerate(placements)
               if isinstance(p, Shard) and p.dim % input.dim() == class_dim]
    if len(sharded) != 1 or any(not isinstance(p, Replicate) for i, p in enumerate(placements)
                                if i != sharded[0]):
        raise NotImplementedError(
            f"{fn}: DTensor logits must be sharded on the class dimension ({class_dim}) along "
            f"exactly one mesh dimension and replicated along the others; got {placements}")
    target = replicated_local(target, "target", fn)
    weight = replicated_local(weight, "weight", fn)
    mesh_dim = sharded[0]
    world = mesh.size(mesh_dim)
    C = input.shape[class_dim]
    step = -(-C // world)  # DTensor's split: torch.chunk sizes, trailing shards may be short
    bounds = tuple((min(r * step, C), max(0, min(step, C - r * step))) for r in range(world))
    plan = P.Plan(mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim), world, bounds, C,
                  False)
    full = torch.empty(tuple(input.shape), dtype=input.dtype, device="meta")
    P.check_global_args(full, input.shape, target, weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, fn)
    local = input.to_local(grad_placements=placements)
    if tuple(target.shape) == tuple(input.shape) and target.is_floating_point():
        o, n = bounds[plan.rank]  # probabilities: all C classes given, this rank's slice used
        target = target.narrow(class_dim, o, n)
    opts = A.ce_options(ignore_index, label_smoothing, z_loss, softcap, fn)
    inplace = bool(inplace_backward) and A.inplace_allowed(local)
    loss = vocab_parallel_cross_entropy(local, target, weight, reduction, opts, inplace, plan, fn)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def replicated_local(t, name, fn):
    """A replicated DTensor's local tensor (a plain tensor as it is); anything else raises."""
    from torch.distributed.tensor import DTensor, Replicate

    if t is None or not isinstance(t, DTensor):
        return t
    if any(not isinstance(p, Replicate) for p in t.placements):
        raise NotImplementedError(f"{fn}: argument '{name}' must be a plain tensor or a "
                                  f"replicated DTensor, got placements {t.placements}")
    return t.to_local()
