"""The planted truth on real histories: when a behaviour's weight depends on its time gap and type.

On planted data made with `--time-decay` or `--strong-fraction` the weight of a behaviour is not a
function of its position, so a grid of (category, position) cells cannot hold the truth. Instead every
test sample's real history is compared with the truth, behaviour by behaviour:

    relevance_j = A[c_j, t] · w_j

with t the sample's target category, c_j the behaviour's category and w_j its true weight
(`PlantedTruth.weight`: `strong_weight` for a buy, times exp(-decay_rate · gap_j / time_unit) in time or
exp(-decay_rate · (p_j - 1)) in steps): behaviour j's share of the state that draws the target's category.
Agreement with a model's search scores, per sample and averaged over samples: Spearman over its history,
and the KL divergence of the attention its scores imply from the planted shares (`history_agreement`).

Notation: B samples, L history length (the model's, left-padded as the loader builds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import rankdata

from darec.data.loader import history_index
from darec.data.store import FEATURE_IDS_DIR, PreparedDataset
from darec.data.synthetic import PlantedTruth

__all__ = ["PlantedHistories", "planted_histories", "strong_behaviours", "rowwise_spearman", "attention_kl",
           "history_agreement", "SPEARMAN_KEYS"]

SPEARMAN_KEYS = ("spearman_vs_planted_history", "spearman_weight_vs_planted_history")
BEHAVIOR = "behavior"  # the event feature that holds the behaviour type (darec.data.pipeline)


@dataclass(frozen=True)
class PlantedHistories:
    """The truth of every history behaviour of a split's samples, in file order, each (B, L).

    mask: real behaviours; affinity: A[c_j, t] (0 at padding); log_weight: log w_j (0 at padding)."""

    mask: np.ndarray
    affinity: np.ndarray
    log_weight: np.ndarray

    @property
    def relevant(self) -> np.ndarray:
        """Real behaviours whose category points to the target (A[c_j, t] > 0)."""
        return self.affinity > 0

    @property
    def relevance(self) -> np.ndarray:
        """A[c_j, t] · w_j, 0 at padding (underflows to 0 for behaviours days old in time)."""
        return self.affinity * np.exp(self.log_weight)

    @property
    def log_relevance(self) -> np.ndarray:
        """log(A[c_j, t]) + log w_j, -inf where A is 0 or padded: the ranks of `relevance`, without underflow."""
        relevant = self.relevant
        return np.where(relevant, np.log(np.where(relevant, self.affinity, 1.0)) + self.log_weight, -np.inf)


def strong_behaviours(dataset: PreparedDataset, index: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, L) True where the behaviour at CSR `index` is a buy (all False on data without behaviour types)."""
    if BEHAVIOR not in dataset.event_features:
        return np.zeros(index.shape, dtype=bool)
    codes = pl.read_parquet(dataset.path / FEATURE_IDS_DIR / f"{BEHAVIOR}.parquet")
    strong = codes.filter(pl.col("raw").cast(pl.String) == PlantedTruth.STRONG_BEHAVIOR)["id"].to_numpy()
    return mask & np.isin(np.asarray(dataset.event_features[BEHAVIOR])[index], strong)


def planted_histories(dataset: PreparedDataset, truth: PlantedTruth, *, max_len: int,
                      split: str = "test") -> PlantedHistories:
    """The truth of the histories the loader builds for `split` (length `max_len`), vectorised over samples."""
    samples = dataset.split(split)
    users, cuts = np.asarray(samples["user"], dtype=np.int64), np.asarray(samples["cut"], dtype=np.int64)
    offsets = np.asarray(dataset.offsets)
    index, mask = history_index(offsets, users, cuts, max_len)                    # (B, L)
    stamps = np.asarray(dataset.timestamps, dtype=np.int64)
    gaps = stamps[offsets[users] + cuts][:, None] - stamps[index]                   # (B, L) target time - behaviour's
    positions = np.arange(max_len, 0, -1)[None, :]                                  # slot j -> L - j
    log_weight = np.where(mask, truth.log_weight(positions, gap_seconds=gaps,
                                                 strong=strong_behaviours(dataset, index, mask)), 0.0)
    targets = np.asarray(samples["category"], dtype=np.int64)[:, None]
    affinity = np.where(mask, truth.affinity[np.asarray(dataset.categories)[index], targets], 0.0)
    return PlantedHistories(mask=mask, affinity=affinity, log_weight=log_weight)


def rowwise_spearman(truth: np.ndarray, learned: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B,) Spearman rank correlation of each row over its `valid` entries (ties: average ranks; -inf is
    the lowest value); NaN where either side is constant there or fewer than two entries are valid."""
    valid = np.asarray(valid, dtype=bool)
    count = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    centred = []
    for values in (truth, learned):
        ranks = rankdata(np.where(valid, np.asarray(values, dtype=np.float64), np.nan), axis=1, nan_policy="omit")
        ranks = np.where(valid, ranks, 0.0)
        centred.append(np.where(valid, ranks - ranks.sum(axis=1, keepdims=True) / count, 0.0))
    numerator = (centred[0] * centred[1]).sum(axis=1)
    spread = np.sqrt((centred[0] ** 2).sum(axis=1) * (centred[1] ** 2).sum(axis=1))
    return np.where(spread > 0, numerator / np.where(spread > 0, spread, 1.0), np.nan)


def attention_kl(planted: PlantedHistories, scores: np.ndarray) -> np.ndarray:
    """(B,) KL(p || q) in nats of each sample: p_j = A[c_j, t] · w_j / sum (the planted share of behaviour j),
    q = softmax of the scores over the real behaviours (the attention the scores imply, before any top-K).
    Unlike a rank correlation it sees magnitudes: a behaviour three steps back that is a day old should get
    almost no attention, one a minute old a lot. NaN where no behaviour is relevant."""
    log_p = _log_softmax(planted.log_relevance)                                     # -inf where p_j = 0
    log_q = _log_softmax(np.where(planted.mask, np.asarray(scores, dtype=np.float64), -np.inf))
    with np.errstate(invalid="ignore"):
        terms = np.where(planted.relevant, np.exp(log_p) * (log_p - log_q), 0.0)
    return np.where(planted.relevant.any(axis=1), terms.sum(axis=1), np.nan)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (B, L) logits where -inf means "left out"; rows with none left are all -inf."""
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(top), shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)), -np.inf)


def history_agreement(planted: PlantedHistories, scores: np.ndarray) -> dict[str, Any]:
    """How well search scores (B, L) follow the truth, averaged over samples where each is defined:
    `spearman_vs_planted_history` over each whole history (does the attention rank behaviours by
    A[c_j, t] · w_j?); `spearman_weight_vs_planted_history` over the relevant behaviours only (among the
    behaviours whose category points to the target, does it rank them by their true weight w_j? Within one
    history the time decay ranks like recency, so only the buys set it apart from the position);
    `kl_vs_planted_history` (`attention_kl`, lower is better); `planted_history_samples` counts the
    samples behind each."""
    per_sample = dict(zip(SPEARMAN_KEYS, (rowwise_spearman(planted.log_relevance, scores, planted.mask),
                                          rowwise_spearman(planted.log_weight, scores, planted.relevant))))
    per_sample["kl_vs_planted_history"] = attention_kl(planted, scores)
    out: dict[str, Any] = {"planted_history_samples": {}}
    for name, values in per_sample.items():
        finite = values[np.isfinite(values)]
        out[name] = float(finite.mean()) if len(finite) else float("nan")
        out["planted_history_samples"][name] = int(len(finite))
    return out
