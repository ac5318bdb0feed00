"""The batch every model consumes: named tensors, never positional tuples.

Shapes: B = batch size, L = history length (most recent behaviour last, left-padded).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["Batch", "HISTORY_FIELDS"]

HISTORY_FIELDS = ("hist_items", "hist_categories", "hist_positions", "mask")


@dataclass(frozen=True)
class Batch:
    """One batch of samples.

    Attributes:
        hist_items: (B, L) int64 item ids of the history, oldest first, 0 where padded.
        hist_categories: (B, L) int64 category ids, 0 where padded.
        hist_positions: (B, L) int64 target-relative positions: L for the oldest slot down to 1 for
            the behaviour just before the target (the reference's "tid"; the target itself is 0).
        mask: (B, L) bool, True for real behaviours.
        target_item: (B,) int64.
        target_category: (B,) int64.
        label: (B,) float32, 1.0 for a click.
        user: (B,) int64 user index (for GAUC).
    """

    hist_items: torch.Tensor
    hist_categories: torch.Tensor
    hist_positions: torch.Tensor
    mask: torch.Tensor
    target_item: torch.Tensor
    target_category: torch.Tensor
    label: torch.Tensor
    user: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in dataclasses.fields(self)})

    def take_history(self, index: torch.Tensor) -> "Batch":
        """The batch restricted to history slots `index` (B, K): every (B, L) tensor becomes (B, K).

        Lets code written for whole histories run on the K kept behaviours only, at O(B K) cost."""
        return dataclasses.replace(self, **{name: getattr(self, name).gather(1, index)  # (B, K)
                                            for name in HISTORY_FIELDS})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return int(self.target_item.shape[0])
