"""Ground-truth relevance of a behaviour to a target (DARE paper §5.2, Fig. 8): mutual information.

For a target category t, X = "the behaviour at relative position p has category c" and Y = the label,
over the training samples whose target has category t. MI(X; Y) is computed in bits from four counts:
x_pos / x_neg (samples with X = 1, by label) and t_pos / t_neg (all samples of t, by label). The counts
come from one vectorised `bincount` over (t, c, p) keys per chunk of samples.

Notation: T target categories counted, C category vocabulary (incl. padding 0), P = max position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from darec.data.loader import gather_histories
from darec.data.store import PreparedDataset
from darec.errors import ConfigError

__all__ = ["Cooccurrence", "count_cooccurrence", "binary_mutual_information", "most_common_targets"]

_MAX_CELLS = 60_000_000  # (T, C, P+1) float64 counts, twice: about 1 GB


def binary_mutual_information(x_pos, x_neg, *, t_pos, t_neg) -> np.ndarray:
    """MI(X; Y) in bits for binary X and Y from counts; broadcasts.

    0 log 0 = 0, so a cell with X always 1, never 1, or a target with one label gives exactly 0
    (the reference instead substitutes 1e-5 for missing counts and drops samples that hit log 0)."""
    x_pos, x_neg, t_pos, t_neg = (np.asarray(a, dtype=np.float64) for a in (x_pos, x_neg, t_pos, t_neg))
    n = t_pos + t_neg
    joint = np.stack(np.broadcast_arrays(x_pos, x_neg, t_pos - x_pos, t_neg - x_neg))     # (4, ...)
    p_x = np.stack([x_pos + x_neg, x_pos + x_neg, n - x_pos - x_neg, n - x_pos - x_neg])
    p_y = np.stack([t_pos, t_neg, t_pos, t_neg]) * np.ones_like(joint)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint / n * np.log2(joint * n / (p_x * p_y)), 0.0)
    return np.nan_to_num(terms.sum(0), nan=0.0)


@dataclass(frozen=True)
class Cooccurrence:
    """Counts over one split. positive/negative: (T, C, P+1), index [row of t, c, p]; p = 0 is unused."""

    targets: np.ndarray          # (T,) category id of each row
    positive: np.ndarray
    negative: np.ndarray
    target_positive: np.ndarray  # (T,)
    target_negative: np.ndarray  # (T,)

    def row_of(self, categories: np.ndarray) -> np.ndarray:
        """Row index of each target category, -1 where it was not counted."""
        lookup = np.full(int(max(self.targets.max(), np.max(categories, initial=0))) + 1, -1, dtype=np.int64)
        lookup[self.targets] = np.arange(len(self.targets))
        return lookup[np.asarray(categories)]

    def mutual_information(self) -> np.ndarray:
        """(T, C, P+1) MI in bits of every (target category, behaviour category, position)."""
        return binary_mutual_information(self.positive, self.negative, t_pos=self.target_positive[:, None, None],
                                         t_neg=self.target_negative[:, None, None])

    def support(self) -> np.ndarray:
        """(T,) number of samples of each counted target category."""
        return self.target_positive + self.target_negative


def most_common_targets(dataset: PreparedDataset, k: int, *, split: str = "train") -> np.ndarray:
    """The k most frequent target categories of a split (ties: smaller id first)."""
    counts = np.bincount(np.asarray(dataset.split(split)["category"], dtype=np.int64), minlength=dataset.n_categories)
    counts[0] = 0
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[:k][counts[order[:k]] > 0]


def count_cooccurrence(dataset: PreparedDataset, *, split: str = "train", max_position: int | None = None,
                       targets: np.ndarray | None = None, chunk: int = 8192) -> Cooccurrence:
    """Counts of (target category, behaviour category, position) by label over a split.

    Raises ConfigError when the count array would be too large; pass fewer `targets` then."""
    n_cat = dataset.n_categories
    length = int(max_position or dataset.max_len)
    targets = np.arange(n_cat) if targets is None else np.asarray(targets, dtype=np.int64)
    cells = len(targets) * n_cat * (length + 1)
    if cells > _MAX_CELLS:
        raise ConfigError(f"co-occurrence counts need {cells:,} cells; restrict the target categories")
    row = np.full(n_cat, -1, dtype=np.int64)
    row[targets] = np.arange(len(targets))
    samples = dataset.split(split)
    offsets, items, cats = (np.asarray(a) for a in (dataset.offsets, dataset.items, dataset.categories))
    positive, negative = np.zeros(cells), np.zeros(cells)
    positions = np.arange(length, 0, -1, dtype=np.int64)                            # (P,) slot j -> P - j
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        _, hist_cats, mask = gather_histories(offsets, items, cats, part["user"], part["cut"], length)
        t_row = row[np.asarray(part["category"], dtype=np.int64)]                   # (B,)
        keep = mask & (t_row >= 0)[:, None]                                         # (B, P)
        keys = (t_row[:, None] * n_cat + hist_cats.astype(np.int64)) * (length + 1) + positions[None, :]  # (B, P)
        label = np.broadcast_to(np.asarray(part["label"], dtype=np.float64)[:, None], keys.shape)
        positive += np.bincount(keys[keep], weights=label[keep], minlength=cells)
        negative += np.bincount(keys[keep], weights=1.0 - label[keep], minlength=cells)
    all_rows = row[np.asarray(samples["category"], dtype=np.int64)]
    counted = all_rows >= 0
    labels = np.asarray(samples["label"], dtype=np.float64)[counted]
    shape = (len(targets), n_cat, length + 1)
    return Cooccurrence(targets=targets, positive=positive.reshape(shape), negative=negative.reshape(shape),
                        target_positive=np.bincount(all_rows[counted], weights=labels, minlength=len(targets)),
                        target_negative=np.bincount(all_rows[counted], weights=1 - labels, minlength=len(targets)))
