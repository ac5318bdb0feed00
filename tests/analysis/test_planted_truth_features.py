"""The planted truth when a behaviour's weight depends on its time gap and type (issue 14), and the attention,
retrieval and discriminability analyses on such data, with and without side features."""
from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from darec.analysis import analyze
from darec.analysis import common
from darec.analysis.planted import (PlantedHistories, attention_kl, history_agreement, planted_histories,
                                    rowwise_spearman)
from darec.cli import main
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.data.synthetic import PlantedTruth, SyntheticConfig, generate, prepare_synthetic
from darec.errors import DataError

SIDE = SyntheticConfig(n_users=8, n_items=120, n_categories=6, mean_length=225, n_brands=10, brand_loyalty=0.5,
                       strong_fraction=0.15, strong_weight=8.0, time_decay=True, time_unit=600.0)
TINY = dict(n_users=30, n_items=120, n_categories=6, mean_length=225)
MAX_LEN = 6
BUDGET = ["--dim", "4", "--epochs", "1", "--batch-size", "128", "--eval-every", "3", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def side_dir(tmp_path_factory):
    """8 users, histories of 6: the brute-force truth below walks every test sample by hand."""
    out = tmp_path_factory.mktemp("planted_side") / "data"
    prepare_synthetic(SIDE, out=out, config=ProtocolConfig(max_len=MAX_LEN))
    return out


@pytest.fixture(scope="module")
def tiny_side_dir(tmp_path_factory):
    """30 users with every side signal on, histories of 20: the analyses train on it in seconds."""
    out = tmp_path_factory.mktemp("tiny_side") / "data"
    config = SyntheticConfig(**TINY, n_brands=10, brand_loyalty=0.5, strong_fraction=0.15, strong_weight=8.0,
                             time_decay=True, time_unit=600.0)
    prepare_synthetic(config, out=out, config=ProtocolConfig(max_len=20))
    return out


def test_true_weight_by_hand():
    truth = PlantedTruth(affinity=np.zeros((3, 3)), decay_rate=1.0, noise=0.0, time_unit=600.0, strong_weight=8.0)
    got = truth.weight(np.array([1, 2, 3]), gap_seconds=np.array([0, 600, 1200]), strong=np.array([False, True, False]))
    np.testing.assert_allclose(got, [1.0, 8 * math.exp(-1), math.exp(-2)])      # in time: the positions do not count
    in_steps = PlantedTruth(affinity=np.zeros((3, 3)), decay_rate=math.log(2), noise=0.0, strong_weight=3.0)
    np.testing.assert_allclose(in_steps.weight(np.array([1, 2, 3]), strong=np.array([True, False, True])),
                               [3.0, 0.5, 0.75])
    with pytest.raises(DataError, match="time gaps"):
        truth.weight(np.array([1]), strong=np.array([False]))
    with pytest.raises(DataError, match="behaviour types"):
        truth.weight(np.array([1]), gap_seconds=np.array([5]))
    with pytest.raises(DataError, match="not by position alone"):
        truth.decay(1)
    assert not truth.position_only and not in_steps.position_only


def test_position_only_truth_is_unchanged():
    truth = PlantedTruth(affinity=np.ones((3, 3)), decay_rate=0.3, noise=0.0)
    positions = np.arange(1, 11)
    before = np.exp(-0.3 * (positions.astype(np.float64) - 1))                   # the formula `decay` always had
    assert truth.position_only
    assert np.array_equal(truth.decay(positions), before) and np.array_equal(truth.weight(positions), before)


def test_the_true_weight_is_what_drives_the_generator():
    """The generator's state before step t, replayed step by step from the log, is proportional to
    sum_j w_j A[c_j, :] with w_j = PlantedTruth.weight of behaviour j against the time of step t."""
    frame, truth = generate(SIDE)
    one = frame.filter(pl.col("user") == 3)
    cats, stamps = one["category"].to_numpy(), one["timestamp"].to_numpy()
    strong = (one["behavior"] == PlantedTruth.STRONG_BEHAVIOR).to_numpy()
    state = np.zeros(truth.affinity.shape[0])
    for t in range(1, 60):
        keep = math.exp(-truth.decay_rate * (stamps[t - 1] - stamps[t - 2]) / truth.time_unit) if t > 1 else 1.0
        state = keep * state + (truth.strong_weight if strong[t - 1] else 1.0) * truth.affinity[cats[t - 1]]
        weights = truth.weight(None, gap_seconds=stamps[t] - stamps[:t], strong=strong[:t])
        summed = weights @ truth.affinity[cats[:t]]
        np.testing.assert_allclose(summed / summed.sum(), state / state.sum(), rtol=1e-9)
    assert strong[:60].any() and (np.diff(stamps[:60]) > 3600).any()           # buys and session breaks both seen


def test_planted_histories_equal_a_per_sample_walk_through_the_log(side_dir):
    """Vectorised truth of every test history slot vs a loop over samples reading the generated log."""
    dataset = PreparedDataset.open(side_dir)
    truth = PlantedTruth.load(side_dir)
    got = planted_histories(dataset, truth, max_len=MAX_LEN)
    frame, raw_truth = generate(SIDE)
    maps = dataset.id_maps()
    test = dataset.split("test")
    users = maps.decode("user", test["user"]).to_list()
    targets = maps.decode("category", test["category"]).to_list()
    weight = np.zeros((len(test), MAX_LEN))
    relevance = np.zeros((len(test), MAX_LEN))
    for i, (user, target, cut) in enumerate(zip(users, targets, test["cut"].tolist())):
        log = frame.filter(pl.col("user") == user).to_dicts()                    # this user's behaviours, in time order
        for slot in range(MAX_LEN):
            j = cut - MAX_LEN + slot
            if j < 0:
                continue
            event = log[j]
            w = (8.0 if event["behavior"] == "buy" else 1.0) * \
                math.exp(-(log[cut]["timestamp"] - event["timestamp"]) / 600.0)   # decay_rate 1, time_unit 600
            weight[i, slot] = w
            relevance[i, slot] = raw_truth.affinity[event["category"], target] * w
    np.testing.assert_allclose(np.exp(got.log_weight) * got.mask, weight, rtol=1e-12)
    np.testing.assert_allclose(got.relevance, relevance, rtol=1e-12)
    assert got.relevant.any() and (weight > 1).any()                          # some relevant behaviours, some buys


def test_planted_histories_line_up_with_the_models_batches(tiny_side_dir, tmp_path):
    analyze("attention", data=tiny_side_dir, out=tmp_path, presets=("dare",), dim=4,
            train=common.ANALYSIS_TRAIN.replace(epochs=1, batch_size=128, eval_every=3, threads=1), progress=False)
    dataset, truth = PreparedDataset.open(tiny_side_dir), PlantedTruth.load(tiny_side_dir)
    model = common.load_model(tmp_path / "runs" / "dare-d4-s1")
    batches = list(common.test_batches(dataset, model))
    cats = np.concatenate([b.hist_categories.numpy() for b in batches])
    targets = np.concatenate([b.target_category.numpy() for b in batches])
    planted = planted_histories(dataset, truth, max_len=model.config.max_len)
    assert np.array_equal(planted.mask, np.concatenate([b.mask.numpy() for b in batches]))
    assert np.array_equal(planted.affinity, truth.affinity[cats, targets[:, None]] * planted.mask)


def test_rowwise_spearman_equals_scipy_per_row():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (40, 12)).astype(float)                           # ties
    learned = rng.random((40, 12))
    valid = rng.random((40, 12)) < 0.7
    valid[0] = False
    valid[1, :1] = True
    valid[1, 1:] = False
    learned[~valid] = -np.inf                                                    # padding as the search reports it
    got = rowwise_spearman(truth, learned, valid)
    expected = [spearmanr(t[v], s[v]).statistic if v.sum() > 1 and np.ptp(t[v]) > 0 else np.nan
                for t, s, v in zip(truth, learned, valid)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.isnan(got[:2]).all()


def test_agreement_of_the_truth_with_itself(side_dir):
    dataset, truth = PreparedDataset.open(side_dir), PlantedTruth.load(side_dir)
    planted = planted_histories(dataset, truth, max_len=MAX_LEN)
    by_relevance = history_agreement(planted, np.where(planted.mask, planted.log_relevance, -np.inf))
    assert by_relevance["spearman_vs_planted_history"] == pytest.approx(1.0)
    by_weight = history_agreement(planted, planted.log_weight)
    assert by_weight["spearman_weight_vs_planted_history"] == pytest.approx(1.0)
    against = history_agreement(planted, -planted.log_weight)
    assert against["spearman_weight_vs_planted_history"] == pytest.approx(-1.0)
    assert min(by_weight["planted_history_samples"].values()) > 0
    assert by_relevance["kl_vs_planted_history"] == pytest.approx(0.0, abs=1e-9)


def test_attention_kl_by_hand():
    mask = np.array([[True, True, True, False]])
    planted = PlantedHistories(mask=mask, affinity=np.array([[1.0, 0.0, 3.0, 0.0]]),
                               log_weight=np.log([[2.0, 5.0, 1.0, 1.0]]) * mask)
    p = np.array([2.0, 3.0]) / 5.0                                               # shares of behaviours 0 and 2
    scores = np.array([[0.0, 1.0, 2.0, -np.inf]])
    q = np.exp([0.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    assert attention_kl(planted, scores)[0] == pytest.approx((p * np.log(p / q)).sum())
    assert attention_kl(planted, planted.log_relevance)[0] == pytest.approx(0.0, abs=1e-12)   # attention = truth
    nothing = PlantedHistories(mask=mask, affinity=np.zeros((1, 4)), log_weight=np.zeros((1, 4)))
    assert np.isnan(attention_kl(nothing, scores)[0])


@pytest.mark.parametrize("features", ["all", "none"])
def test_analyses_run_on_side_signal_data(tiny_side_dir, tmp_path, features):
    out = tmp_path / "out"
    args = ["--data", str(tiny_side_dir), "--out", str(out), "--presets", "dare", "twin", "--features", features]
    for kind in ("attention", "retrieval", "discriminability"):
        assert main(["analyze", kind, *args, *BUDGET]) == 0
    suffix = "" if features == "all" else "-fnone"
    model = common.load_model(out / "runs" / f"dare-d4{suffix}-s1")
    read = {f.name for f in model.config.features}
    assert read == ({"brand", "behavior", "time_gap"} if features == "all" else set())
    attention = json.loads((out / "attention" / "attention.json").read_text())
    assert "planted_truth" not in attention and attention["planted_history"]["strong_weight"] == 8.0
    for scores in attention["models"].values():
        assert -1 <= scores["spearman_vs_planted_history"] <= 1
        assert -1 <= scores["spearman_weight_vs_planted_history"] <= 1
        assert scores["kl_vs_planted_history"] > 0
        assert -1 <= scores["spearman_vs_mi"] <= 1                              # the grid scores feature models too
    retrieval = json.loads((out / "retrieval" / "retrieval.json").read_text())
    assert "ndcg_planted.png" in retrieval["figures"] and retrieval["planted"]["samples"] > 0
    assert all(0 <= c["ndcg"][0] <= 1 for c in retrieval["planted"]["curves"].values())
    assert main(["analyze", "discriminability", *args, *BUDGET, "--cluster-features", "head-input"]) == 0
    disc = json.loads((out / "discriminability" / "discriminability.json").read_text())
    assert disc["models"]["dare"]["samples"] == len(PreparedDataset.open(tiny_side_dir).split("test"))


def test_position_only_planted_data_keeps_the_grid_truth(tiny_planted_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(tiny_planted_dir), "--out", str(out), "--presets", "dare"]
    for kind in ("attention", "retrieval"):
        assert main(["analyze", kind, *args, *BUDGET]) == 0
    attention = json.loads((out / "attention" / "attention.json").read_text())
    assert "planted_truth" in attention and "planted_history" not in attention
    assert "spearman_vs_planted" in attention["models"]["dare"]
    assert "planted" not in json.loads((out / "retrieval" / "retrieval.json").read_text())


def test_unknown_feature_is_one_line(tiny_side_dir, tmp_path, capsys):
    args = ["analyze", "attention", "--data", str(tiny_side_dir), "--out", str(tmp_path), "--features", "shop"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown feature 'shop'" in err and len(err.strip().splitlines()) == 1
