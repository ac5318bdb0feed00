"""Planted synthetic data: reproducible, passes the click filter, truth saved and strongly predictive."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from darec.data.history_flags import shortcut_auc
from darec.data.loader import gather_histories
from darec.data.synthetic import PlantedTruth, SyntheticConfig, generate, prepare_synthetic
from darec.errors import ConfigError


def test_reproducible_by_seed():
    small = SyntheticConfig(n_users=30)
    a, truth_a = generate(small)
    b, truth_b = generate(small)
    assert a.equals(b) and np.array_equal(truth_a.affinity, truth_b.affinity)
    c, _ = generate(SyntheticConfig(n_users=30, seed=1))
    assert not a.equals(c)


def test_layout_and_lengths():
    frame, truth = generate(SyntheticConfig(n_users=40, n_categories=12, n_items=100))
    assert frame.columns == ["user", "item", "category", "timestamp", "behavior"]
    lengths = frame.group_by("user").len()["len"]
    assert lengths.min() >= 215 and frame["user"].n_unique() == 40
    assert frame["category"].max() <= 12 and truth.affinity.shape == (13, 13)
    assert frame.group_by("item").agg(pl.col("category").n_unique())["category"].max() == 1
    assert (frame["timestamp"].diff().filter(frame["user"].diff() == 0) > 0).all()


def test_relevance_helper():
    truth = PlantedTruth(affinity=np.array([[0, 0], [0, 2.0]]), decay_rate=np.log(2), noise=0.0)
    assert truth.relevance(1, 1, 1) == pytest.approx(2.0)
    grid = truth.relevance(np.array([[1]]), np.array([[1, 1, 0]]), np.array([[3, 2, 1]]))  # (1, 3)
    assert np.allclose(grid, [[0.5, 1.0, 0.0]])


def test_prepared_truth_is_in_prepared_ids_and_predictive(tmp_path):
    ds = prepare_synthetic(out=tmp_path / "syn")
    assert ds.manifest["n_users"] == 300 and ds.manifest["source"] == "synthetic"
    assert ds.manifest["splits"]["train"]["samples"] == 300 * 57
    truth = PlantedTruth.load(ds.path)
    assert truth.affinity.shape == (ds.n_categories, ds.n_categories)
    test = ds.split("test")
    hist_items, hist_cats, mask = gather_histories(ds.offsets, ds.items, ds.categories, test["user"], test["cut"], 200)
    positions = np.arange(200, 0, -1)[None, :]
    oracle = (truth.relevance(test["category"][:, None], hist_cats, positions) * mask).sum(1)
    assert roc_auc_score(test["label"], oracle) >= 0.8  # the planted signal alone separates clicks
    assert shortcut_auc(ds) <= 0.60  # while "item already clicked" alone barely does


def test_reclick_knob_controls_repeats_only():
    def repeats(frame: pl.DataFrame) -> float:  # share of clicks whose (user, item) was clicked before
        return 1 - frame.select(pl.struct("user", "item").n_unique()).item() / len(frame)

    base = dict(n_users=40, n_items=3000, n_categories=10)
    low, _ = generate(SyntheticConfig(**base, reclick=0.0))
    high, _ = generate(SyntheticConfig(**base, reclick=0.8))
    assert repeats(low) < 0.2 < 0.6 < repeats(high)
    assert low["category"].equals(high["category"])  # the planted category process is untouched
    # reclick 1 with one favourite: each user clicks exactly one item per category
    only, _ = generate(SyntheticConfig(**base, reclick=1.0, n_favourites=1))
    per_pair = only.group_by("user", "category").agg(pl.col("item").n_unique())["item"]
    assert per_pair.max() == 1


def test_config_checks():
    with pytest.raises(ConfigError):
        SyntheticConfig(mean_length=100)
    with pytest.raises(ConfigError):
        SyntheticConfig(n_items=5, n_categories=10)
    with pytest.raises(ConfigError, match="reclick"):
        SyntheticConfig(reclick=1.5)
    with pytest.raises(ConfigError, match="n_favourites"):
        SyntheticConfig(n_favourites=0)


def test_synth_refuses_a_folder_darec_did_not_write(tmp_path, capsys):
    from darec.cli import main

    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["synth", "--out", str(tmp_path), "--users", "20"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "precious"
