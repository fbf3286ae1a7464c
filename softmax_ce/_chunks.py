"""Chunks of rows for the fused heads: the default chunk size (a memory budget), the chunk
iterator (one GEMM per chunk into a reused buffer: the logits never whole), and the accumulation
of the input's, weight's and bias's gradients from each chunk's logit gradient. Shared by the
loss (``_linear_core``), its vocabulary-chunked form (``_vocab_chunks``), the per-token outputs
(``_tokens_core``) and the vocab-parallel heads (``distributed``)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .reference import acc_dtype
from .switches import chunk_memory_limit

__all__ = ["default_chunk_size", "Needs", "ChunkSpec", "chunk_logits", "GradSums"]

_WORK_FRACTION = 11  # the default chunk's working memory: at most 1/11 of the whole logits
_MIN_CHUNK = 32
_MIN_BUDGET = 16 << 20  # small problems: one chunk of up to 16 MiB (tiny GEMMs are slow)


def default_chunk_size(rows: int, classes: int, in_features: int, dtype: torch.dtype,
                       acc: torch.dtype) -> int:
    """Rows per chunk: the largest number whose working memory (the chunk's logits, plus the
    float32 copies of logits and inputs when ``grad_weight`` accumulates in a wider dtype) stays
    under 1/11 of what the whole logits would take (GEMMs of fewer rows run slower: 256 rows
    instead of 372 cost ~8% at (4096, 1024, 32000) float32 on 2 cores), under 16 MiB for small
    problems, and under ``softmax_ce.chunk_memory`` (256 MiB by default) however many rows there
    are; at least 32 rows (or all of them)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_row = classes * size
    if acc != dtype:
        per_row += (classes + in_features) * torch.empty((), dtype=acc).element_size()
    budget = max(rows * classes * size // _WORK_FRACTION, _MIN_BUDGET)
    budget = min(budget, chunk_memory_limit())
    chunk = budget // max(per_row, 1)
    return int(max(1, min(rows, max(chunk, _MIN_CHUNK))))


class Needs(NamedTuple):
    """Which gradients a pass forms."""

    input: bool = False
    weight: bool = False
    bias: bool = False

    def any(self) -> bool:
        return self.input or self.weight or self.bias


class ChunkSpec(NamedTuple):
    """How the rows are chunked and ``grad_weight`` accumulated."""

    rows: int  # rows per chunk
    acc_fp32: bool  # grad_weight accumulates in float32 for bfloat16 / float16 inputs

    def acc(self, dtype: torch.dtype) -> torch.dtype:
        half = dtype in (torch.bfloat16, torch.float16)
        return torch.float32 if self.acc_fp32 and half else dtype


def chunk_logits(x: Tensor, lin_w: Tensor, lin_b: Optional[Tensor], rows: int):
    """Yields ``(start, end, logits)`` per chunk of ``rows`` rows of ``x`` ``[N, H]``: the chunk's
    ``x @ lin_wᵀ (+ lin_b)`` ``[end - start, C]`` in one buffer reused by every chunk (valid until
    the next step of the iteration)."""
    N = x.shape[0]
    buf = x.new_empty((min(rows, N), lin_w.shape[0]))
    wt = lin_w.t()
    for i in range(0, N, rows):
        j = min(N, i + rows)
        logits = buf[:j - i]
        if lin_b is not None:
            torch.addmm(lin_b, x[i:j], wt, out=logits)
        else:
            torch.mm(x[i:j], wt, out=logits)
        yield i, j, logits


class GradSums:
    """The gradients of the input, weight and bias, accumulated chunk by chunk from the logits'
    gradient G: ``grad_input[chunk] = G @ W``, ``grad_weight += Gᵀ @ x[chunk]`` (in ``acc``),
    ``grad_bias += Σ G``."""

    def __init__(self, x, lin_w, lin_b, needs: Needs, acc: torch.dtype):
        self.x, self.lin_w, self.lin_b, self.needs, self.acc = x, lin_w, lin_b, needs, acc
        C, H = lin_w.shape
        self.gi = x.new_empty(x.shape) if needs.input else None
        self.gw = torch.zeros((C, H), dtype=acc, device=x.device) if needs.weight else None
        self.gb = (torch.zeros((C,), dtype=acc_dtype(x.dtype), device=x.device)
                   if needs.bias else None)

    def add(self, i: int, j: int, G: Tensor) -> None:
        if self.gi is not None:
            torch.mm(G, self.lin_w, out=self.gi[i:j])
        if self.gw is not None:
            if self.acc == G.dtype:
                self.gw.addmm_(G.t(), self.x[i:j])
            else:
                self.gw.addmm_(G.t().to(self.acc), self.x[i:j].to(self.acc))
        if self.gb is not None:
            self.gb.add_(G.sum(0, dtype=self.gb.dtype))

    def result(self):
        """(grad_input, grad_weight, grad_bias) in the inputs' dtypes, empty where not asked."""
        def empty():  # one per output: a custom op's outputs may not alias
            return self.x.new_empty((0,))

        return (self.gi if self.gi is not None else empty(),
                self.gw.to(self.lin_w.dtype) if self.gw is not None else empty(),
                self.gb.to(self.lin_b.dtype) if self.gb is not None else empty())
