"""Ground-truth relevance of a behaviour to a target (DARE paper §5.2, Fig. 8): mutual information.

For a target category t, X = "the behaviour at relative position p has category c" and Y = the label,
over the training samples whose target has category t. MI(X; Y) is computed in bits from four counts:
x_pos / x_neg (samples with X = 1, by label) and t_pos / t_neg (all samples of t, by label).

The (t, c, p) space is C x C x (P + 1) cells: 17.8G on Taobao (9,407 categories, P = 200), so counts
are kept only for the cells a caller asks for (`cells`: the grid of a heat-map, or the cells that
the test histories actually hold). Each chunk of training samples is turned into cell keys, matched
to the requested ones with one `searchsorted` and summed with one `bincount`; memory is O(requested
cells + chunk), whatever the vocabulary.

Notation: C category vocabulary (incl. padding 0), P = the history length counted, B chunk size,
N requested cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from darec.data.loader import gather_histories
from darec.data.store import PreparedDataset

__all__ = ["Cooccurrence", "count_cooccurrence", "cell_keys", "target_support", "binary_mutual_information",
           "most_common_targets"]


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


def cell_keys(targets, categories, positions, *, n_categories: int, max_position: int) -> np.ndarray:
    """int64 key of each (target category, behaviour category, position) cell; broadcasts."""
    t, c, p = (np.asarray(a, dtype=np.int64) for a in (targets, categories, positions))
    return (t * n_categories + c) * (max_position + 1) + p


@dataclass(frozen=True)
class Cooccurrence:
    """Counts over one split, for the requested cells only.

    cells: (N,) sorted keys (`cell_keys`), positive/negative: (N,) samples with X = 1 by label;
    target_positive/target_negative: (C,) samples of each target category by label."""

    n_categories: int
    max_position: int
    cells: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    target_positive: np.ndarray
    target_negative: np.ndarray

    def counts_at(self, targets, categories, positions) -> tuple[np.ndarray, np.ndarray]:
        """(x_pos, x_neg) of the cells (broadcast shape); every cell must have been requested."""
        keys = cell_keys(targets, categories, positions, n_categories=self.n_categories,
                         max_position=self.max_position)
        index = np.searchsorted(self.cells, keys)
        if keys.size and (index.max() >= len(self.cells) or not np.array_equal(self.cells[index], keys)):
            raise ValueError("co-occurrence lookup of a cell that was not counted")
        return self.positive[index], self.negative[index]

    def mutual_information_at(self, targets, categories, positions) -> np.ndarray:
        """MI in bits of the cells (broadcast shape)."""
        x_pos, x_neg = self.counts_at(targets, categories, positions)
        t = np.asarray(targets, dtype=np.int64)
        return binary_mutual_information(x_pos, x_neg, t_pos=self.target_positive[t], t_neg=self.target_negative[t])

    def support(self) -> np.ndarray:
        """(C,) number of samples of each target category."""
        return self.target_positive + self.target_negative


def target_support(dataset: PreparedDataset, *, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(C,) positive and (C,) negative sample counts of each target category in a split."""
    samples = dataset.split(split)
    categories = np.asarray(samples["category"], dtype=np.int64)
    labels = np.asarray(samples["label"], dtype=np.float64)
    n = dataset.n_categories
    return (np.bincount(categories, weights=labels, minlength=n),
            np.bincount(categories, weights=1.0 - labels, minlength=n))


def most_common_targets(dataset: PreparedDataset, k: int, *, split: str = "train") -> np.ndarray:
    """The k most frequent target categories of a split (ties: smaller id first)."""
    counts = np.bincount(np.asarray(dataset.split(split)["category"], dtype=np.int64), minlength=dataset.n_categories)
    counts[0] = 0
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[:k][counts[order[:k]] > 0]


def count_cooccurrence(dataset: PreparedDataset, *, cells: np.ndarray, max_position: int, split: str = "train",
                       chunk: int = 8192) -> Cooccurrence:
    """Counts of the requested (target category, behaviour category, position) cells by label over a split.

    `cells` are `cell_keys(..., max_position=max_position)`; positions 1..max_position are counted
    (the max_position most recent behaviours of each sample)."""
    n_cat = dataset.n_categories
    cells = np.unique(np.asarray(cells, dtype=np.int64))                           # (N,) sorted
    if len(cells) and (cells[0] < 0 or cells[-1] >= n_cat * n_cat * (max_position + 1)):
        raise ValueError("co-occurrence cells outside the category x category x position space")
    wanted = np.zeros(n_cat, dtype=bool)
    wanted[cells // (n_cat * (max_position + 1))] = True                           # targets with a requested cell
    samples = dataset.split(split)
    samples = samples[wanted[np.asarray(samples["category"], dtype=np.int64)]]
    offsets, items, cats = (np.asarray(a) for a in (dataset.offsets, dataset.items, dataset.categories))
    positive, negative = np.zeros(len(cells)), np.zeros(len(cells))
    positions = np.arange(max_position, 0, -1, dtype=np.int64)                      # (P,) slot j -> P - j
    last = max(len(cells) - 1, 0)
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        _, hist_cats, mask = gather_histories(offsets, items, cats, part["user"], part["cut"], max_position)
        target = np.asarray(part["category"], dtype=np.int64)[:, None]              # (B, 1)
        keys = cell_keys(target, hist_cats, positions[None, :], n_categories=n_cat, max_position=max_position)
        index = np.minimum(np.searchsorted(cells, keys), last)                      # (B, P)
        hit = mask & (cells[index] == keys)
        label = np.broadcast_to(np.asarray(part["label"], dtype=np.float64)[:, None], keys.shape)
        positive += np.bincount(index[hit], weights=label[hit], minlength=len(cells))
        negative += np.bincount(index[hit], weights=1.0 - label[hit], minlength=len(cells))
    target_positive, target_negative = target_support(dataset, split=split)
    return Cooccurrence(n_categories=n_cat, max_position=max_position, cells=cells, positive=positive,
                        negative=negative, target_positive=target_positive, target_negative=target_negative)
