"""The re-click shortcut: is a sample's target item already among the clicks its model can see?

The protocol draws negatives only among items the user never clicked, so "target item in the visible
history" can be true for positives only; its share among positives is an AUC a model gets for free
(flag as a score: AUC = 0.5 + share / 2). Tables report it beside the models' AUCs.

Method: every click that can matter gets the composite key item · N + g (g = its global CSR index,
which also fixes the user); after one sort, a sample's window [offsets[u] + max(0, cut - L),
offsets[u] + cut) holds its item iff two `searchsorted` bounds on item · N + window differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError

__all__ = ["target_in_history", "shortcut_auc", "ShortcutStats", "shortcut_stats"]

_INT64_MAX = np.iinfo(np.int64).max


def _windows(dataset: PreparedDataset, samples: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Global CSR bounds [start, end) of every sample's visible history."""
    offsets = np.asarray(dataset.offsets, dtype=np.int64)
    base = offsets[np.asarray(samples["user"], dtype=np.int64)]
    cuts = np.asarray(samples["cut"], dtype=np.int64)
    return base + np.maximum(cuts - max_len, 0), base + cuts


def _relevant_clicks(dataset: PreparedDataset, targets: np.ndarray, start: np.ndarray,
                     end: np.ndarray) -> np.ndarray:
    """Global indices of the clicks inside some window whose item is some sample's target (the rest
    cannot change a flag; skipping them keeps the sort small on Taobao-size sequences)."""
    n_events = len(dataset.items)
    inside = np.bincount(start, minlength=n_events + 1) - np.bincount(end, minlength=n_events + 1)
    wanted = np.zeros(max(dataset.n_items, int(targets.max(initial=0)) + 1), dtype=bool)
    wanted[targets] = True
    items = np.asarray(dataset.items)
    return np.flatnonzero((np.cumsum(inside[:-1]) > 0) & wanted[items])


def target_in_history(dataset: PreparedDataset, samples: np.ndarray, *, max_len: int | None = None) -> np.ndarray:
    """(S,) bool: sample i's `item` is among its user's clicks [cut - max_len, cut) of the CSR sequence.

    `samples` is a structured array with fields user, cut, item (a split or part of one); `max_len`
    defaults to the prepared history length. Cost: one sort of the relevant clicks, two searchsorted.

    Raises:
        ConfigError: max_len < 1.
        DataError: item ids × clicks overflow the int64 composite key.
    """
    length = dataset.max_len if max_len is None else max_len
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ConfigError(f"max_len must be an integer >= 1, got {length!r}")
    if len(samples) == 0:
        return np.zeros(0, dtype=bool)
    targets = np.asarray(samples["item"], dtype=np.int64)
    start, end = _windows(dataset, samples, int(length))
    n_keys = len(dataset.items) + 1  # window ends reach N, so g takes N + 1 values
    if int(targets.max()) + 1 > _INT64_MAX // n_keys:
        raise DataError(f"{int(targets.max()) + 1:,} item ids × {n_keys:,} clicks overflow the int64 key of "
                        "the re-click flag", path=dataset.path)
    clicks = _relevant_clicks(dataset, targets, start, end)
    keys = np.sort(np.asarray(dataset.items)[clicks].astype(np.int64) * n_keys + clicks)
    low = np.searchsorted(keys, targets * n_keys + start, side="left")
    high = np.searchsorted(keys, targets * n_keys + end, side="left")
    return high > low


@dataclass(frozen=True)
class ShortcutStats:
    """Share of positives / negatives flagged, and the AUC of the flag alone as a score."""

    positive_share: float
    negative_share: float
    auc: float


def _mean(flags: np.ndarray) -> float:
    return float(flags.mean()) if flags.size else float("nan")


def shortcut_stats(dataset: PreparedDataset, split: str = "test", *, max_len: int | None = None) -> ShortcutStats:
    """How strong the re-click shortcut is on one split (see the module docstring)."""
    from darec.train.metrics import auc  # imports torch; `darec prepare` should not pay for it

    samples = dataset.split(split)
    flags = target_in_history(dataset, samples, max_len=max_len)
    positive = np.asarray(samples["label"]) == 1
    return ShortcutStats(positive_share=_mean(flags[positive]), negative_share=_mean(flags[~positive]),
                         auc=auc(positive, flags.astype(np.float64)))


def shortcut_auc(dataset: PreparedDataset, split: str = "test", *, max_len: int | None = None) -> float:
    """AUC of "target item in the visible history" alone as a score on `split`."""
    return shortcut_stats(dataset, split, max_len=max_len).auc
