"""Exact, vectorised ranking metrics: AUC with tied scores averaged, GAUC by any group, logloss."""
from __future__ import annotations

import numpy as np

__all__ = ["auc", "group_auc", "logloss", "accuracy", "evaluate_predictions"]


def _tied_ranks(groups: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of `scores` within each group, ties sharing their mean rank; plus the sort order."""
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(s)
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_value = new_group | np.r_[True, s[1:] != s[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    run_id = np.cumsum(new_value) - 1
    run_start = np.flatnonzero(new_value)
    run_end = np.r_[run_start[1:], n]                                  # exclusive
    mean_pos = (run_start + run_end - 1) / 2.0                          # 0-based mean position of a tie run
    ranks = mean_pos[run_id] - group_start + 1.0
    return ranks, order


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-group AUCs over groups that have both classes.

    Returns (gauc, number of samples in the groups used). Mann-Whitney per group, so ties count 1/2.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    _, groups = np.unique(np.asarray(groups), return_inverse=True)
    ranks, order = _tied_ranks(groups, scores)
    g, y = groups[order], labels[order]
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    n_pos = np.bincount(g, weights=y, minlength=n_groups)
    n_all = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(g, weights=ranks * y, minlength=n_groups)
    usable = (n_pos > 0) & (n_neg > 0)
    if not usable.any():
        return float("nan"), 0
    per_group = (rank_sum[usable] - n_pos[usable] * (n_pos[usable] + 1) / 2) / (n_pos[usable] * n_neg[usable])
    weight = n_all[usable]
    return float((per_group * weight).sum() / weight.sum()), int(weight.sum())


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; equals sklearn's roc_auc_score, ties included."""
    return group_auc(labels, scores, np.zeros(len(labels), dtype=np.int64))[0]


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy computed from logits (stable for confident predictions)."""
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    return float(np.mean((np.asarray(logits) > 0) == np.asarray(labels).astype(bool)))


def evaluate_predictions(*, labels: np.ndarray, logits: np.ndarray, users: np.ndarray,
                         categories: np.ndarray) -> dict[str, float]:
    """All reported metrics of one split. `category_auc` is the reference's "category average AUC"."""
    return {
        "auc": auc(labels, logits),
        "gauc": group_auc(labels, logits, users)[0],
        "category_auc": group_auc(labels, logits, categories)[0],
        "logloss": logloss(labels, logits),
        "accuracy": accuracy(labels, logits),
        "n": int(len(labels)),
    }
