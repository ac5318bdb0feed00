"""Planted side signals (brand, behaviour type, time decay): off by default and then nothing changes; on,
each signal is really in the data, and `prepare_synthetic` stores it as a feature."""
from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest

from darec.cli import main
from darec.data.synthetic import (BRAND_MEMORY, BREAK_GAP, SESSION_CLICKS, PlantedTruth, SyntheticConfig, generate,
                                  prepare_synthetic)
from darec.errors import ConfigError, DataError

SIDE = dict(n_brands=20, brand_loyalty=0.6, strong_fraction=0.2, strong_weight=4.0, time_decay=True)
SMALL = dict(n_users=40, n_categories=10, n_items=3000)


def _digest(frame: pl.DataFrame, truth: PlantedTruth) -> str:
    """sha256 over the columns' bytes and the affinity, as computed before the side signals existed."""
    h = hashlib.sha256()
    for column in frame.columns:
        values = frame[column]
        h.update("".join(values.to_list()).encode() if column == "behavior" else values.to_numpy().tobytes())
    h.update(truth.affinity.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(("config", "expected"), [
    (SyntheticConfig(), "57c306d4ded2ab19f222bbd44a2974219fbc751d04e29f5903cfdc6025372dca"),
    (SyntheticConfig(n_users=40, n_categories=12, n_items=100, seed=3),
     "26cdd4715fcbe61cede42dad039f565519f6d0d990ce35eaa1158f6fac267b81"),
])
def test_defaults_are_the_data_generated_before_side_signals(config, expected):
    frame, truth = generate(config)  # digests taken from the generator as it was before this change
    assert frame.columns == ["user", "item", "category", "timestamp", "behavior"]
    assert _digest(frame, truth) == expected


def test_side_signals_are_deterministic_per_seed():
    a, truth_a = generate(SyntheticConfig(**SMALL, **SIDE))
    b, truth_b = generate(SyntheticConfig(**SMALL, **SIDE))
    assert a.equals(b) and np.array_equal(truth_a.affinity, truth_b.affinity)
    assert truth_a.time_unit == truth_b.time_unit == 60.0
    assert a.columns == ["user", "item", "category", "timestamp", "behavior", "brand"]
    assert not a.equals(generate(SyntheticConfig(**SMALL, **SIDE, seed=1))[0])


def test_each_signal_draws_from_its_own_stream():
    base, _ = generate(SyntheticConfig(**SMALL))
    brands, _ = generate(SyntheticConfig(**SMALL, n_brands=20, brand_loyalty=0.6))
    assert brands.drop("item", "brand").equals(base.drop("item"))  # brands change which item, nothing else
    strong, _ = generate(SyntheticConfig(**SMALL, strong_fraction=0.2, strong_weight=4.0))
    assert strong["timestamp"].equals(base["timestamp"]) and not strong["category"].equals(base["category"])
    unit_weight, _ = generate(SyntheticConfig(**SMALL, strong_fraction=0.2))  # "buy" labels, same process
    assert unit_weight.drop("behavior").equals(base.drop("behavior")) and unit_weight["behavior"].eq("buy").mean() == \
        pytest.approx(0.2, abs=0.02)


def _recent_brand_rate(frame: pl.DataFrame, n_brands: int) -> tuple[float, float]:
    """Share of clicks (after each user's first BRAND_MEMORY) whose brand is among the brands of the user's
    last BRAND_MEMORY clicks, and the share a brand drawn uniformly would have (|distinct recent| / n_brands)."""
    lagged = [pl.col("brand").shift(k).over("user").alias(f"lag{k}") for k in range(1, BRAND_MEMORY + 1)]
    recent = pl.concat_list([f"lag{k}" for k in range(1, BRAND_MEMORY + 1)])
    rows = (frame.with_columns(lagged).drop_nulls()
            .select(hit=recent.list.contains(pl.col("brand")), distinct=recent.list.n_unique()))
    return float(rows["hit"].mean()), float(rows["distinct"].mean() / n_brands)


@pytest.mark.parametrize("loyalty", [0.0, 0.3, 0.7])
def test_brand_loyalty_is_planted(loyalty):
    # reclick 0: every click is fresh, so each is loyal with probability `loyalty` (every (category, brand)
    # pair has ~15 items here, so a loyal draw always finds one), otherwise a uniform item of its category
    frame, _ = generate(SyntheticConfig(**SMALL, n_brands=20, brand_loyalty=loyalty, reclick=0.0))
    observed, chance = _recent_brand_rate(frame, 20)
    assert observed == pytest.approx(loyalty + (1 - loyalty) * chance, abs=0.025)
    items = frame.group_by("item").agg(pl.col("brand").n_unique(), pl.col("category").n_unique())
    assert items["brand"].max() == 1 and items["category"].max() == 1  # a brand is a property of the item


def _next_follows_affinity(frame: pl.DataFrame, truth: PlantedTruth) -> pl.DataFrame:
    """Per behaviour: whether the user's next category is one the behaviour's category points to in A."""
    nxt = frame.with_columns(next=pl.col("category").shift(-1).over("user"),
                             gap_before=pl.col("timestamp").diff().over("user")).drop_nulls("next")
    points = truth.affinity[nxt["category"].to_numpy(), nxt["next"].to_numpy()] > 0
    return nxt.with_columns(follows=pl.Series(points))


def test_strong_behaviours_drive_the_next_category_more():
    frame, truth = generate(SyntheticConfig(**SMALL, strong_fraction=0.2, strong_weight=10.0, decay_rate=0.3))
    rates = _next_follows_affinity(frame, truth).group_by("behavior").agg(pl.col("follows").mean())
    rate = dict(zip(rates["behavior"], rates["follows"]))
    assert rate["buy"] > rate["click"] + 0.15  # a buy counts 10 clicks in the state


def test_time_decay_follows_the_clock_not_the_steps():
    frame, truth = generate(SyntheticConfig(**SMALL, time_decay=True))
    gaps = frame["timestamp"].diff().filter(frame["user"].diff() == 0)
    long = np.exp(-3600 / BREAK_GAP) / SESSION_CLICKS  # a break, and longer than an hour
    assert gaps.min() >= 1 and gaps.median() < 60 and (gaps > 3600).mean() == pytest.approx(long, abs=0.015)
    # the behaviour right after a break: the break erased the older state, so the next category follows
    # A of that behaviour alone, far more often than inside a session where older clicks still count
    rows = _next_follows_affinity(frame, truth)
    after_break = rows.filter(pl.col("gap_before") > 3600)["follows"].mean()
    in_session = rows.filter(pl.col("gap_before") < 60)["follows"].mean()
    assert after_break > 0.9 and after_break > in_session + 0.15
    assert truth.log_decay_at_gap([0, 60, 120]) == pytest.approx([0.0, -1.0, -2.0])
    with pytest.raises(DataError, match="steps"):
        generate(SyntheticConfig(**SMALL))[1].log_decay_at_gap(60)
    # the position-based truth the analyses use would be wrong here: refused, not silently used
    with pytest.raises(DataError, match="not by position"):
        truth.relevance(np.array([1]), np.array([2]), np.array([1]))


def test_prepared_side_signals_are_features(tmp_path):
    config = SyntheticConfig(n_users=30, n_categories=8, n_items=400, **SIDE)
    frame, _ = generate(config)
    ds = prepare_synthetic(config, out=tmp_path / "syn")
    specs = ds.feature_specs
    assert specs["brand"]["vocabulary"] == frame["brand"].n_unique() + 1
    assert specs["behavior"]["vocabulary"] == 3 and specs["behavior"]["target"] is False
    assert ds.manifest["schema"]["time"]["gap"] is True and ds.manifest["schema"]["behavior_type"] is True
    # codes map back to the generator's brands, per event and per prepared item
    brand_raw = pl.read_parquet(ds.path / "ids/features/brand.parquet").sort("id")["raw"].to_numpy()
    item_raw = pl.read_parquet(ds.path / "ids/items.parquet").sort("id")["raw"].to_numpy()
    true_brand = dict(zip(frame["item"].to_list(), frame["brand"].to_list()))
    items = ds.item_features["brand"]
    assert [brand_raw[items[i] - 1] for i in range(1, ds.n_items)] == [true_brand[r] for r in item_raw]
    events = ds.event_features["brand"]
    assert np.array_equal(events, items[ds.items])  # every event's brand is its item's
    behaviour_raw = pl.read_parquet(ds.path / "ids/features/behavior.parquet").sort("id")["raw"].to_list()
    stored = np.array(behaviour_raw)[ds.event_features["behavior"] - 1]
    assert (stored == "buy").mean() == pytest.approx((frame["behavior"] == "buy").mean(), abs=0.01)
    truth = PlantedTruth.load(ds.path)
    assert truth.time_unit == 60.0 and truth.strong_weight == 4.0


def test_default_prepare_has_no_features(tmp_path):
    ds = prepare_synthetic(SyntheticConfig(n_users=20, n_categories=6, n_items=60), out=tmp_path / "syn")
    assert not ds.feature_specs and "schema" not in ds.manifest
    assert PlantedTruth.load(ds.path).time_unit is None


def test_side_signal_config_checks():
    with pytest.raises(ConfigError, match="brand_loyalty needs n_brands"):
        SyntheticConfig(brand_loyalty=0.5)
    with pytest.raises(ConfigError, match="strong_weight"):
        SyntheticConfig(strong_weight=0)
    with pytest.raises(ConfigError, match="time_unit"):
        SyntheticConfig(time_unit=-1.0)


def test_synth_cli_side_signals(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--users", "20", "--brands", "10", "--brand-loyalty", "0.5",
                 "--strong-fraction", "0.1", "--strong-weight", "3", "--time-decay", "--time-unit", "300"]) == 0
    assert "brand (categorical" in capsys.readouterr().out
    truth = PlantedTruth.load(out)
    assert truth.time_unit == 300.0 and truth.strong_weight == 3.0
    assert main(["synth", "--out", str(tmp_path / "bad"), "--brand-loyalty", "0.5"]) == 2
    assert "brand_loyalty needs n_brands" in capsys.readouterr().err
