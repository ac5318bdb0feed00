"""The batch every model consumes: named tensors, never positional tuples.

Shapes: B = batch size, L = history length (most recent behaviour last, left-padded).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Batch", "HISTORY_FIELDS", "FEATURE_FIELDS", "set_slots"]

HISTORY_FIELDS = ("hist_items", "hist_categories", "hist_positions", "mask")
FEATURE_FIELDS = ("hist_features", "target_features", "user_features")  # name -> tensor mappings


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
        candidate_set: (B,) int64 or None. Rows with the same id were cut from the same user at the same
            moment (one request's candidate set: a positive and its negatives); ids are 0..G-1 within the
            batch. None: every row is a set of its own. Set-wise models (IFA) and ranking losses read it.
        hist_features: side-feature codes of the history by feature name, (B, L) int64 each, 0 where padded:
            the dataset's per-behaviour features and the time fields computed from timestamps (time_gap, ...);
            a numeric feature's normalised values are float32 (B, L) in the same mapping, 0 where padded.
        target_features: (B,) int64 codes of the target's item features (brand, seller, ...), float32 values of
            its numeric item features (price).
        user_features: (B,) int64 codes of the user's features.
        Models read the features their config names and ignore the others (docs/features.md).
    """

    hist_items: torch.Tensor
    hist_categories: torch.Tensor
    hist_positions: torch.Tensor
    mask: torch.Tensor
    target_item: torch.Tensor
    target_category: torch.Tensor
    label: torch.Tensor
    user: torch.Tensor
    candidate_set: torch.Tensor | None = None
    hist_features: dict[str, torch.Tensor] = field(default_factory=dict)
    target_features: dict[str, torch.Tensor] = field(default_factory=dict)
    user_features: dict[str, torch.Tensor] = field(default_factory=dict)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """Every tensor (those in the feature mappings too) through `fn`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in FEATURE_FIELDS:
                out[f.name] = {name: fn(t) for name, t in value.items()}
            else:
                out[f.name] = None if value is None else fn(value)
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def take_history(self, index: torch.Tensor) -> "Batch":
        """The batch restricted to history slots `index` (B, K): every (B, L) tensor becomes (B, K).

        Lets code written for whole histories run on the K kept behaviours only, at O(B K) cost."""
        return dataclasses.replace(self, **{name: getattr(self, name).gather(1, index)  # (B, K)
                                            for name in HISTORY_FIELDS},
                                   hist_features={n: t.gather(1, index) for n, t in self.hist_features.items()})

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def set_ids(self) -> tuple[torch.Tensor, int]:
        """(B,) candidate-set id of every row and the number of sets G (each row alone when unknown)."""
        if self.candidate_set is None:
            return torch.arange(len(self), device=self.target_item.device), len(self)
        return self.candidate_set, int(self.candidate_set.max()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return int(self.target_item.shape[0])


def set_slots(sets: torch.Tensor, n_sets: int) -> tuple[torch.Tensor, int]:
    """Place of every row within its candidate set (0, 1, ... in row order) and the largest set's size, so
    rows (R, ...) scatter into a padded (G, S, ...) layout with `out[sets, slot] = rows`."""
    counts = torch.bincount(sets, minlength=n_sets)                                  # (G,)
    order = torch.argsort(sets, stable=True)                                         # rows grouped by set
    first = torch.cumsum(counts, 0) - counts                                         # (G,) start of each set
    slot = torch.empty_like(sets)
    slot[order] = torch.arange(len(sets), device=sets.device) - first[sets[order]]
    return slot, int(counts.max()) if len(sets) else 0
