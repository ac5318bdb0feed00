"""Serving inputs shared by the eager `Scorer` and an exported model: histories, candidates, user chunks.

Kept apart from scorer.py because it imports no model code: `darec.serve.export.load_exported` runs an
exported program with these same input rules on a machine that has only torch (and darec's light modules).

Notation: U users, C candidates per user, N history length.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from darec.errors import DataError

__all__ = ["History", "DEFAULT_MAX_SCORES", "resolve_candidates", "user_chunks"]

# Users per chunk are chosen so the plain path's (U, C, N) score matrix stays below this many floats.
DEFAULT_MAX_SCORES = 1 << 26


@dataclass(frozen=True)
class History:
    """Behaviour histories, oldest first and left-padded like `Batch`.

    items, categories: (U, N) int64; mask: (U, N) bool, True at real behaviours (default: item != 0);
    positions: (U, N) or (N,) int64 target-relative positions (default N..1, 1 = most recent);
    features: side-feature codes of the behaviours by name, (U, N) each (what a model with side features
    reads, see darec.data.loader.history_features); user_features: (U,) codes of the users' features.
    """

    items: torch.Tensor
    categories: torch.Tensor
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    user_features: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def left_pad(cls, items: Sequence[np.ndarray], categories: Sequence[np.ndarray], *,
                 length: int | None = None) -> "History":
        """Ragged per-user sequences (oldest first) -> (U, N) left-padded; longer ones keep their last N."""
        if len(items) != len(categories) or not items:
            raise DataError(f"need one category sequence per item sequence, got {len(items)} and {len(categories)}")
        n = length or max(len(seq) for seq in items)
        out_items = np.zeros((len(items), n), dtype=np.int64)
        out_cats = np.zeros((len(items), n), dtype=np.int64)
        for row, (its, cts) in enumerate(zip(items, categories, strict=True)):  # per user, not per behaviour
            its, cts = np.asarray(its)[-n:], np.asarray(cts)[-n:]
            if len(its) != len(cts):
                raise DataError(f"user {row}: {len(its)} items but {len(cts)} categories")
            if len(its):
                out_items[row, n - len(its):], out_cats[row, n - len(cts):] = its, cts
        items_t = torch.from_numpy(out_items)
        return cls(items=items_t, categories=torch.from_numpy(out_cats), mask=items_t != 0)

    def resolved(self, device: torch.device) -> "History":
        """2-D tensors on `device` with mask and positions filled in."""
        items, cats = torch.as_tensor(self.items), torch.as_tensor(self.categories)
        if items.dim() == 1:
            items, cats = items.unsqueeze(0), cats.unsqueeze(0)
        if items.dim() != 2 or items.shape != cats.shape:
            raise DataError(f"history items/categories must be (U, N) of one shape, got "
                            f"{tuple(items.shape)} and {tuple(cats.shape)}")
        n = items.shape[1]
        mask = items != 0 if self.mask is None else torch.as_tensor(self.mask).reshape(items.shape)
        positions = torch.arange(n, 0, -1) if self.positions is None else torch.as_tensor(self.positions)
        positions = positions.reshape(-1, n).expand(items.shape[0], n)                # (U, N)
        features = {name: _codes_or_values(torch.as_tensor(codes).reshape(items.shape).to(device))
                    for name, codes in self.features.items()}
        users = {name: torch.as_tensor(codes).reshape(items.shape[0]).to(device).long()
                 for name, codes in self.user_features.items()}
        return History(items=items.to(device).long(), categories=cats.to(device).long(),
                       mask=mask.to(device).bool(), positions=positions.to(device).long(), features=features,
                       user_features=users)

    def rows(self, rows: slice) -> "History":
        """The resolved history of users `rows` only."""
        return History(items=self.items[rows], categories=self.categories[rows], mask=self.mask[rows],
                       positions=self.positions[rows], features={n: t[rows] for n, t in self.features.items()},
                       user_features={n: t[rows] for n, t in self.user_features.items()})

    def left_padded_to(self, length: int) -> "History":
        """A resolved history widened to at least `length` slots by masked padding on the left (never cut).

        Padding is invisible to every search (masked slots rank last and get weight 0): an exported
        program that needs N >= K gets the same logits for a shorter history."""
        n = self.items.shape[1]
        if n >= length:
            return self
        pad = (length - n, 0)
        return History(items=F.pad(self.items, pad), categories=F.pad(self.categories, pad),
                       mask=F.pad(self.mask, pad), positions=F.pad(self.positions, pad),
                       features={n: F.pad(t, pad) for n, t in self.features.items()},
                       user_features=self.user_features)


def _codes_or_values(t: torch.Tensor) -> torch.Tensor:
    """Feature codes as int64; numeric features' values stay floating point."""
    return t if t.is_floating_point() else t.long()


def resolve_candidates(h: History, items: torch.Tensor, cats: torch.Tensor, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates as (U, C) int64 on `device`, for the U users of the resolved history `h`."""
    items, cats = torch.as_tensor(items), torch.as_tensor(cats)
    if items.dim() == 1:
        items, cats = items.unsqueeze(0), cats.unsqueeze(0)
    if items.shape != cats.shape or items.dim() != 2 or items.shape[0] != h.items.shape[0]:
        raise DataError(f"candidates must be (U, C) with U = {h.items.shape[0]} users, got items "
                        f"{tuple(items.shape)} and categories {tuple(cats.shape)}")
    return items.to(device).long(), cats.to(device).long()


def user_chunks(users: int, candidates: int, length: int, max_scores: int) -> list[slice]:
    """Consecutive user ranges whose (users, C, N) score matrix stays under `max_scores` floats."""
    chunk = max(1, max_scores // max(1, candidates * length))
    return [slice(lo, lo + chunk) for lo in range(0, users, chunk)]
