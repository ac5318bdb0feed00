"""Gradient split: the two paths sum to autograd's table gradient; DARE's paths reach disjoint tables;
the conflict statistics on constructed gradient pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from darec.analysis.gradients import (category_conflict_ratio, row_cosines, split_gradients, step_statistics,
                                      training_loss)
from darec.models import build_model, preset_config
from tests.helpers import random_batch


def _model(preset: str):
    torch.manual_seed(0)
    config = preset_config(preset, n_items=50, n_categories=6, max_len=30, dim=4, init_std=0.3)
    return build_model(config).train()


@pytest.mark.parametrize("preset", ["twin", "dare", "twin_proj", "twin_4e", "din"])
def test_paths_sum_to_the_table_gradient(preset):
    model = _model(preset)
    batch = random_batch(batch_size=12, length=30, n_items=50, n_categories=6, min_real=3, seed=1)
    split = split_gradients(model, batch)
    assert all(p.grad is None for p in model.parameters())                  # the analysis leaves the model alone
    model.zero_grad()
    training_loss(model, model(batch), batch).backward()
    for (table_set, field), att in split.attention.items():
        weight = model.embeddings.sets[table_set].table(field).weight
        total = att + split.representation[(table_set, field)]
        torch.testing.assert_close(total, weight.grad, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), split.parameters):
        torch.testing.assert_close(g, p.grad if p.grad is not None else torch.zeros_like(p), rtol=1e-5, atol=1e-6)


def test_shared_table_receives_both_paths_dare_disjoint():
    batch = random_batch(batch_size=12, length=30, n_items=50, n_categories=6, min_real=3, seed=2)
    twin = split_gradients(_model("twin"), batch)
    assert twin.attention[("shared", "category")].abs().sum() > 0
    assert twin.representation[("shared", "category")].abs().sum() > 0
    dare = split_gradients(_model("dare"), batch)
    for (table_set, _field), att in dare.attention.items():
        rep = dare.representation[(table_set, _field)]
        if table_set == "attention":
            assert rep.abs().sum() == 0 and att.abs().sum() > 0
        else:
            assert att.abs().sum() == 0 and rep.abs().sum() > 0


def test_row_cosines_and_step_statistics_on_constructed_pairs():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [-1.0, 1.0], [3.0, 0.0]])
    cos = row_cosines(a, b)
    np.testing.assert_allclose(cos[:3], [1.0, -1.0, 0.0], atol=1e-12)
    assert np.isnan(cos[3])                                                # zero row: undefined
    stats = step_statistics(a, b)
    assert stats["mean_cosine"] == pytest.approx(0.0)
    assert stats["mean_row_norm_attention"] == pytest.approx((1 + 2 + np.sqrt(2) + 0) / 4)
    assert stats["global_norm_representation"] == pytest.approx(np.sqrt(4 + 1 + 2 + 9))


def test_conflict_ratio_counts_negative_dots_per_row():
    dots = np.array([[-1.0, 2.0, 0.0],
                     [-3.0, -1.0, 0.0],
                     [1.0, 5.0, 0.0],
                     [-2.0, 0.0, 0.0]])
    ratio = category_conflict_ratio(dots)
    np.testing.assert_allclose(ratio[:2], [3 / 4, 1 / 3])
    assert np.isnan(ratio[2])                                              # never touched by both paths


def test_fraction_of_conflicting_steps_from_cosine_histogram():
    # Per-step mean cosines of constructed pairs: two conflicting steps, one consistent.
    steps = [(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.5]])),
             (np.array([[0.0, 1.0]]), np.array([[0.2, -1.0]])),
             (np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]]))]
    cos = np.array([step_statistics(a, b)["mean_cosine"] for a, b in steps])
    assert (cos < 0).mean() == pytest.approx(2 / 3)
