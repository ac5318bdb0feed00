"""Confidence intervals and paired tests for AUC, by bootstrapping users (and seeds for the test).

Test samples of one user are not independent (same history, same taste), so the bootstrap redraws
users, not samples. The interval of a row is that of its mean AUC over its seeds on the population of
users (seeds held fixed; the seed spread is reported beside it as a std). The paired test against
another row redraws the seeds too (the same seed indices for both rows), so a difference must hold
across seeds *and* users to be called significant. One replicate's user draw is shared by all rows,
which makes the difference between two rows a paired statistic.

Users are dealt at random into G ≤ `max_groups` groups that are the resampled units (a cluster of
independent users is still an independent unit, and G stays bounded on Taobao-size test sets). Each
run's AUC is summarised once as a G×G matrix of pair counts, A[g, h] = #(positive of g ranked above
negative of h), ties 1/2; a replicate with group multiplicities c then has the exact AUC
cᵀAc / ((c·P)(c·N)), so a thousand replicates are a few matrix products, not a thousand sorts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["PairCounts", "pair_counts", "BootstrapAUC", "bootstrap_rows", "user_groups"]


@dataclass(frozen=True)
class PairCounts:
    """A run's test ranking reduced to groups: A (G, G) pair wins, P and N (G,) positives, negatives."""

    wins: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    def auc(self, multiplicity: np.ndarray) -> np.ndarray:
        """Exact AUC under group multiplicities (R, G); returns (R,)."""
        c = np.atleast_2d(multiplicity).astype(np.float64)
        return ((c @ self.wins) * c).sum(axis=1) / ((c @ self.positives) * (c @ self.negatives))


def user_groups(users: np.ndarray, *, max_groups: int = 1000, seed: int = 0) -> tuple[np.ndarray, int]:
    """Each sample's group (users dealt at random into at most `max_groups` groups) and the group count."""
    _, index = np.unique(users, return_inverse=True)
    n_users = int(index.max()) + 1
    n_groups = min(n_users, max_groups)
    deal = np.random.default_rng(seed).permutation(n_users) % n_groups
    return deal[index], n_groups


def pair_counts(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_groups: int,
                *, block: int = 8192) -> PairCounts:
    """Sort once; walk the tie runs in blocks, carrying each group's count of negatives seen so far."""
    y = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="stable")
    s, y, g = np.asarray(scores)[order], y[order], groups[order]
    run = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1                      # tie run of each sample
    n_runs = int(run[-1]) + 1 if len(run) else 0
    ones = np.ones(len(s))
    pos = sp.csr_matrix((ones[y], (run[y], g[y])), shape=(n_runs, n_groups))     # (runs, G)
    neg = sp.csr_matrix((ones[~y], (run[~y], g[~y])), shape=(n_runs, n_groups))
    wins = np.zeros((n_groups, n_groups))
    seen = np.zeros(n_groups)                                              # negatives strictly below
    for lo in range(0, n_runs, block):
        neg_block = neg[lo:lo + block].toarray()
        below = seen + np.cumsum(neg_block, axis=0) - neg_block           # (block, G)
        wins += pos[lo:lo + block].T @ (below + 0.5 * neg_block)
        seen += neg_block.sum(axis=0)
    return PairCounts(wins=wins, positives=np.bincount(g[y], minlength=n_groups).astype(np.float64),
                      negatives=np.bincount(g[~y], minlength=n_groups).astype(np.float64))


@dataclass(frozen=True)
class BootstrapAUC:
    """A row's mean AUC over seeds: its point value, 95% interval over users, and its replicates."""

    mean: float
    ci_low: float
    ci_high: float
    replicates: np.ndarray         # (R,) users redrawn, seeds fixed: the interval
    paired_replicates: np.ndarray  # (R,) users and seeds redrawn, shared draws across rows: the test

    def p_value_against(self, other: "BootstrapAUC") -> float:
        """Two-sided bootstrap p-value of 'this row's AUC equals the other's' over users and seeds."""
        diff = self.paired_replicates - other.paired_replicates
        tail = min(np.mean(diff <= 0), np.mean(diff >= 0))
        return float(min(1.0, 2 * tail + 1.0 / len(diff)))  # + 1/R: R draws cannot show p below 1/R


def bootstrap_rows(labels: np.ndarray, users: np.ndarray, logits: dict[str, list[np.ndarray]], *,
                   subset: np.ndarray | None = None, n_replicates: int = 1000, seed: int = 0,
                   max_groups: int = 1000) -> dict[str, BootstrapAUC]:
    """Per row (name → one logits array per seed, all in the test split's order): the mean test AUC over
    seeds with its 95% interval over users. `subset` (bool, n) restricts the AUC to those samples."""
    keep = np.ones(len(labels), bool) if subset is None else np.asarray(subset, bool)
    groups, n_groups = user_groups(np.asarray(users)[keep], max_groups=max_groups, seed=seed)
    n_seeds = {len(runs) for runs in logits.values()}
    if len(n_seeds) != 1:
        raise ValueError(f"every row needs the same number of seeds, got {sorted(n_seeds)}")
    rng = np.random.default_rng(seed)
    multiplicity = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_replicates)  # (R, G)
    seeds = rng.integers(0, n_seeds.pop(), size=(n_replicates, len(next(iter(logits.values())))))  # (R, S)
    labels = np.asarray(labels)[keep]
    out = {}
    for name, runs in logits.items():
        counts = [pair_counts(labels, np.asarray(r)[keep], groups, n_groups) for r in runs]
        per_seed = np.stack([c.auc(multiplicity) for c in counts], axis=1)              # (R, S)
        replicates = per_seed.mean(axis=1)
        point = float(np.mean([c.auc(np.ones(n_groups))[0] for c in counts]))
        low, high = np.quantile(replicates, [0.025, 0.975])
        out[name] = BootstrapAUC(mean=point, ci_low=float(low), ci_high=float(high), replicates=replicates,
                                 paired_replicates=np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1))
    return out
