"""Retrieval NDCG, attention agreement, convergence threshold, cluster information: known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from darec.analysis.attention import grid_agreement, grid_scores, minmax, planted_grid
from darec.analysis.convergence import auc_threshold, steps_to_reach
from darec.analysis.discriminability import cluster_information, representations
from darec.analysis.retrieval import dcg_curve, ndcg_curve
from darec.data.synthetic import PlantedTruth
from darec.models import build_model, preset_config
from tests.helpers import random_batch


def test_ndcg_of_a_toy_ranking_by_hand():
    relevance = np.array([[3.0, 2.0, 0.0, 1.0]])
    scores = np.array([[0.9, 0.1, 0.5, 0.7]])        # ranking: item0 (3), item3 (1), item2 (0), item1 (2)
    ndcg, ref = ndcg_curve(scores, relevance, 4)
    d = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)]
    dcg = np.cumsum([3 * d[0], 1 * d[1], 0 * d[2], 2 * d[3]])
    ideal = np.cumsum([3 * d[0], 2 * d[1], 1 * d[2], 0 * d[3]])
    np.testing.assert_allclose(ndcg[0], dcg / ideal)
    assert ndcg[0, 0] == pytest.approx(1.0)
    assert ndcg[0, 1] == pytest.approx((3 + 1 / math.log2(3)) / (3 + 2 / math.log2(3)))
    np.testing.assert_allclose(ref[0], dcg / ideal[-1])  # fewer than 20 positions: IDCG at the last k


def test_ndcg_perfect_ranking_is_one_and_padding_ranks_last():
    relevance = np.array([[0.0, 0.5, 0.2, 0.9]])
    scores = np.array([[-np.inf, 1.0, 0.0, 2.0]])
    ndcg, _ = ndcg_curve(scores, relevance, 6)          # k beyond L: the curve stays flat
    np.testing.assert_allclose(ndcg[0], 1.0)
    assert dcg_curve(scores, relevance, 6).shape == (1, 6)
    none, _ = ndcg_curve(scores, np.zeros_like(relevance), 3)
    assert np.isnan(none).all()


def test_agreement_of_the_truth_with_itself_is_one():
    truth = PlantedTruth(affinity=np.random.default_rng(0).random((6, 6)), decay_rate=0.3, noise=0.0)
    targets, cats, pos = np.array([1, 2, 3]), np.array([1, 2, 3, 4, 5]), np.arange(1, 8)
    grid = planted_grid(truth, targets=targets, categories=cats, positions=pos)
    assert grid.shape == (3, 5, 7)
    assert grid[1, 2, 3] == pytest.approx(truth.affinity[3, 2] * math.exp(-0.3 * 3))
    mean, per_target = grid_agreement(grid, grid)
    assert mean == pytest.approx(1.0)
    assert grid_agreement(grid, np.log(grid + 1e-9) * 2 + 1)[0] == pytest.approx(1.0)   # rank-only
    assert grid_agreement(grid, -grid)[0] == pytest.approx(-1.0)
    np.testing.assert_allclose(minmax(grid).max(axis=(1, 2)), 1.0)


def test_grid_scores_use_the_models_own_formula():
    torch.manual_seed(0)
    model = build_model(preset_config("twin", n_items=20, n_categories=6, max_len=12, dim=4, init_std=0.5)).eval()
    targets, cats, pos = np.array([1, 4]), np.array([2, 3, 5]), np.array([1, 2, 7])
    got = grid_scores(model, targets=targets, categories=cats, positions=pos)
    table = model.embeddings.sets["shared"]
    item0 = table.item.weight[0]
    with torch.no_grad():
        bias = (table.position.weight @ table.position.weight[0]) / math.sqrt(4)
        for i, t in enumerate(targets):
            for j, c in enumerate(cats):
                for k, p in enumerate(pos):
                    q = torch.cat([item0, table.category.weight[t]])
                    key = torch.cat([item0, table.category.weight[c]])
                    expected = float(q @ key / math.sqrt(8) + bias[p])
                    assert got[i, j, k] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_convergence_threshold_and_first_step():
    assert auc_threshold([0.8, 0.9], 0.95) == pytest.approx(0.5 + 0.95 * 0.4)
    steps = np.array([10, 20, 30, 40])
    assert steps_to_reach(steps, np.array([0.6, 0.85, 0.83, 0.9]), 0.84) == 20
    assert steps_to_reach(steps, np.array([0.6, 0.7, 0.7, 0.7]), 0.84) is None


def test_cluster_information_of_pure_clusters_is_label_entropy():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    features = np.where(labels[:, None] == 1, 10.0, -10.0) + rng.normal(0, 0.1, (100, 3))
    info = cluster_information(features, labels, counts=(2, 100, 500), seeds=(1, 2))
    assert info["n_clusters"] == [2]                     # counts >= the number of samples are skipped
    np.testing.assert_allclose(info["mi_nats"], math.log(2), rtol=1e-9)
    np.testing.assert_allclose(info["nmi"], 1.0, rtol=1e-9)
    noise = cluster_information(rng.normal(size=(100, 3)), rng.integers(0, 2, 100), counts=(2,))
    assert noise["nmi"][0, 0] < 0.2


@pytest.mark.parametrize("preset", ["dare", "dare_no_tr"])
def test_discriminability_clusters_the_papers_h_by_default(preset):
    """h = sum_i w_i (e_i * v_t) over the kept behaviours (the paper's definition), r without TR;
    `head-input` is the whole head input."""
    torch.manual_seed(0)
    model = build_model(preset_config(preset, n_items=50, n_categories=6, max_len=30, dim=4, init_std=0.5)).eval()
    batch = random_batch(batch_size=8, length=30, min_real=5, seed=1)
    h, labels = representations(model, [batch])
    with torch.no_grad():
        out = model(batch)
        kept = batch.take_history(out.interest.index)
        e = model.embeddings.values(kept.hist_items, kept.hist_categories, kept.hist_positions)  # (B, K, E)
        v_t = model.embeddings.target(batch.target_item, batch.target_category)                # (B, E)
        tokens = e * v_t[:, None, :] if model.config.target_aware else e
        expected = (out.interest.weights[:, :, None] * tokens).sum(1)
    np.testing.assert_allclose(h, expected.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(labels, batch.label.numpy())
    head, _ = representations(model, [batch], features="head-input")
    np.testing.assert_array_equal(head, out.features.numpy())
    assert head.shape[1] == (3 if model.config.target_aware else 2) * h.shape[1]
