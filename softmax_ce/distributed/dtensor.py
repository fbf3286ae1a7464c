"""``cross_entropy`` of DTensor logits sharded on the class dimension: the mesh dimension's group
and the shard's bounds make a ``Plan``, then the process-group path runs on the local shard."""

from __future__ import annotations

import torch

from . import protocol as P
from .group import guarded_call

__all__ = ["cross_entropy_dtensor", "replicated_local", "class_shard"]


def class_shard(t, class_dim: int, fn: str, name: str):
    """(mesh dimension, plan maker) of a DTensor sharded on ``class_dim`` along exactly one mesh
    dimension and replicated along the others; anything else raises."""
    from torch.distributed.tensor import Replicate, Shard

    placements = t.placements
    sharded = [i for i, p in enumerate(placements)
               if isinstance(p, Shard) and p.dim % t.dim() == class_dim]
    if len(sharded) != 1 or any(not isinstance(p, Replicate) for i, p in enumerate(placements)
                                if i != sharded[0]):
        raise NotImplementedError(
            f"{fn}: DTensor '{name}' must be sharded on dimension {class_dim} along exactly one "
            f"mesh dimension and replicated along the others; got {placements}")
    mesh, mesh_dim = t.device_mesh, sharded[0]
    plan = P.chunk_plan(mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim),
                        mesh.size(mesh_dim), t.shape[class_dim])
    return mesh_dim, plan


def replicated_local(t, name, fn):
    """A replicated DTensor's local tensor (a plain tensor as it is); anything else raises."""
    from torch.distributed.tensor import DTensor, Replicate

    if t is None or not isinstance(t, DTensor):
        return t
    if any(not isinstance(p, Replicate) for p in t.placements):
        raise NotImplementedError(f"{fn}: argument '{name}' must be a plain tensor or a "
                                  f"replicated DTensor, got placements {t.placements}")
    return t.to_local()


def _local_target(target, input, class_dim, plan, fn):
    """This rank's target: class indices as they are; probabilities (all C classes) narrowed to
    the rank's slice, or a DTensor target sharded like the logits taken as its local shard (the
    one layout whose gradient, if it requires one, is this rank's alone)."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor) and tuple(target.placements) == tuple(input.placements) \
            and tuple(target.shape) == tuple(input.shape) and target.is_floating_point():
        return target.to_local(grad_placements=target.placements)
    target = replicated_local(target, "target", fn)
    if tuple(target.shape) == tuple(input.shape) and target.is_floating_point():
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                f"{fn}: a probability target that requires grad must be a DTensor sharded like "
                "the logits (a replicated one would need its gradient summed over the ranks)")
        o, n = plan.bounds[plan.rank]
        return target.narrow(class_dim, o, n)
    return target


def cross_entropy_dtensor(input, target, weight, reduction, ignore_index, label_smoothing,
                          z_loss, softcap, inplace_backward, fn):
    """``cross_entropy`` of DTensor logits sharded on the class dimension along one mesh
    dimension (Replicate on the others; uneven shards as DTensor splits them). ``target``: a
    plain tensor or a replicated DTensor (the same on every rank), or probabilities as a DTensor
    sharded like the logits; ``weight``: plain or replicated. Returns the loss as a replicated
    DTensor; the logits' gradient is a DTensor with their placements."""
    from torch.distributed.tensor import DTensor, Replicate

    if input.dim() == 0:
        raise RuntimeError(f"{fn}: argument 'input' must have at least 1 dimension (the class "
                           "dimension), got a 0-dim tensor")
    class_dim = 1 if input.dim() >= 2 else 0
    _, plan = class_shard(input, class_dim, fn, "input")
    local = input.to_local(grad_placements=input.placements)

    def prepare(target, weight):
        return (_local_target(target, input, class_dim, plan, fn),
                replicated_local(weight, "weight", fn), tuple(input.shape))

    loss = guarded_call(P.Exchange(plan, fn, local.device), plan, local, target, weight,
                        reduction, ignore_index, label_smoothing, z_loss, softcap,
                        inplace_backward, fn, prepare)
    mesh = input.device_mesh
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
