"""Metrics against scikit-learn on random data with many ties."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from darec.train.metrics import auc, group_auc, logloss


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 400), st.integers(1, 6))
def test_auc_equals_sklearn_with_ties(seed, n, levels):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.integers(0, levels, n).astype(np.float64)
    assert abs(auc(y, scores) - roc_auc_score(y, scores)) < 1e-12


def test_group_auc_equals_weighted_sklearn_per_group():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 25, 3000)
    y = rng.integers(0, 2, 3000)
    scores = rng.normal(size=3000).round(1)
    groups[:5] = 99
    y[:5] = 1  # a single-class group is skipped
    expected, weights = [], []
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            expected.append(roc_auc_score(y[m], scores[m]))
            weights.append(m.sum())
    value, used = group_auc(y, scores, groups)
    assert abs(value - np.average(expected, weights=weights)) < 1e-12
    assert used == sum(weights)


def test_logloss_from_logits_equals_sklearn():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=3, size=500)
    y = rng.integers(0, 2, 500)
    assert abs(logloss(y, z) - log_loss(y, 1 / (1 + np.exp(-z)))) < 1e-9
