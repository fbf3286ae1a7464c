"""Vocab-parallel cross-entropy over ``torch.distributed``: each rank holds a slice of the class
dimension of the logits (a tensor-parallel head), one collective per forward.

    protocol.py     where each rank's slice sits (Plan), its header, the one collective, the
                    checks every rank runs on every rank's header, the fail-together guard
    group.py        cross_entropy(..., process_group=): plain tensors and a process group
    dtensor.py      cross_entropy of DTensor logits sharded on the class dimension
    linear_head.py  linear_cross_entropy(..., process_group=): the fused head over slices
    tokens.py       linear_log_probs(..., process_group=): per-token outputs over slices

``softmax_ce.cross_entropy`` and ``softmax_ce.linear_cross_entropy`` send their calls here; the
dependency runs one way (nothing here imports the public modules). docs/distributed.md says what
is supported and which collectives run per step.
"""

from .dtensor import cross_entropy_dtensor
from .group import cross_entropy_over_group, vocab_parallel_cross_entropy
from .linear_head import (HeadArgs, linear_cross_entropy_dtensor,
                          linear_cross_entropy_over_group, linear_over_plan)
from .protocol import chunk_plan, equal_plan
from .tokens import linear_log_probs_sharded

__all__ = ["cross_entropy_over_group", "cross_entropy_dtensor", "linear_cross_entropy_over_group",
           "linear_cross_entropy_dtensor", "linear_over_plan", "HeadArgs", "equal_plan",
           "chunk_plan", "vocab_parallel_cross_entropy", "linear_log_probs_sharded"]
