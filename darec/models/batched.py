"""Batched dot products and weighted sums whose backward passes suit a CPU.

Both are one `bmm` forward. Autograd's `bmm` backward would form the gradient of the (B, L, d) operand
as B matrix products with an inner dimension of 1 (outer products), several times slower on CPU than
the broadcast multiply used here. Without gradients they are the plain einsums (as exported programs
see them).
"""
from __future__ import annotations

import torch

__all__ = ["row_dots", "weighted_sum"]


class _RowDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(queries, keys)
        return torch.bmm(keys, queries.unsqueeze(-1)).squeeze(-1)                       # (B, L)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries, keys = ctx.saved_tensors
        return (torch.bmm(grad.unsqueeze(1), keys).squeeze(1),                           # (B, D)
                grad.unsqueeze(-1) * queries.unsqueeze(1))                              # (B, L, D)


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, values)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1)                        # (B, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, values = ctx.saved_tensors
        return (torch.bmm(values, grad.unsqueeze(-1)).squeeze(-1),                       # (B, K)
                weights.unsqueeze(-1) * grad.unsqueeze(1))                              # (B, K, d)


def _differentiable(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def row_dots(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """<queries[b], keys[b, l]> for queries (B, D) and keys (B, L, D): (B, L)."""
    if not _differentiable(queries, keys):
        return torch.einsum("bd,bld->bl", queries, keys)
    return _RowDots.apply(queries, keys)


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_k weights[..., k] values[..., k, :] for weights (..., K) and values (..., K, d): (..., d).
    Values expanded from one (K, d) block (stride 0 over rows) take one matrix product."""
    if weights.dim() == 2 and values.dim() == 3 and values.stride(0) == 0:  # the same (K, d) values for every row
        return weights @ values[0]
    if not _differentiable(weights, values):
        return torch.einsum("...k,...kd->...d", weights, values)
    lead = weights.shape[:-1]
    flat = _WeightedSum.apply(weights.reshape(-1, weights.shape[-1]), values.reshape(-1, *values.shape[-2:]))
    return flat.reshape(*lead, values.shape[-1])
