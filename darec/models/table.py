"""An embedding table whose training lookups can hand their row gradients straight to the optimiser.

A table is read by several roles in one step (query and key, target and value, the kept K and the whole
history for the aux head). With `nn.Embedding(sparse=True)` autograd adds those sparse gradients pairwise:
each addition copies every row gathered so far, and once a small table's summed rows outnumber its own
rows (categories, positions) it is coalesced, a sort of ~400,000 rows. On a 2-core CPU that bookkeeping
was most of a DARE step. With a `RowGradients` collector attached, a lookup's backward instead records
(ids, gradient rows) and autograd writes no `.grad`; `RowSparseAdam` sums the pieces row by row in one
pass. The numbers are the same sum, taken in lookup order.

The collector is attached only by the trainer's optimisers, and only where nothing else needs `.grad`
(one process, no gradient clipping): DDP all-reduces `.grad`, the analyses read it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Table", "RowGradients"]


class RowGradients:
    """The (ids (n,), gradient rows (n, d)) pieces one backward pass gave a table, in the order they came."""

    def __init__(self) -> None:
        self.pieces: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.pieces.append((ids.reshape(-1), rows.reshape(-1, rows.shape[-1])))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pieces gathered since the last call, handed over once (the collector is then empty)."""
        pieces, self.pieces = self.pieces, []
        return pieces


class _CollectedLookup(torch.autograd.Function):
    """weight[ids]; backward records (ids, grad) in the collector and gives the weight no gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, collector: RowGradients) -> torch.Tensor:
        ctx.ids, ctx.collector = ids, collector
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        ctx.collector.add(ctx.ids, grad.contiguous())
        return None, None, None


class Table(nn.Embedding):
    """`nn.Embedding` (same parameters, same state-dict keys) that routes training gradients to
    `collector` when one is attached."""

    collector: RowGradients | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.collector is not None and self.weight.requires_grad and torch.is_grad_enabled():
            return _CollectedLookup.apply(self.weight, ids, self.collector)
        return super().forward(ids)
