"""The protocol on hand-made logs whose splits are worked out by hand."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import chisquare

from darec.data.protocol import SAMPLE_DTYPE, ProtocolConfig, build_splits
from darec.errors import ConfigError, DataError


def _events(rows):
    user, item, category, ts = zip(*rows)
    return pl.DataFrame({"user": user, "item": item, "category": category, "timestamp": ts},
                        schema={"user": pl.Int32, "item": pl.Int32, "category": pl.Int32, "timestamp": pl.Int64})


def _log():
    """User 7: 12 clicks on raw items 101..112 (category 1 for odd, 2 for even), written out of time order
    with a tie; user 9: 3 clicks (dropped by min_clicks=10) on items 500, 501, 101."""
    rows = [(9, 500, 3, 5), (9, 501, 3, 6)]
    rows += [(7, 100 + k, 1 + (k % 2 == 0), 1000 + k) for k in range(1, 13)]
    rows[2], rows[3] = rows[3], rows[2]  # file order != time order for items 101/102
    rows += [(9, 101, 4, 7)]  # item 101 last seen with category 4
    rows.insert(5, (7, 200, 5, 1004))  # same timestamp as item 104 and written before it: stays before it
    return rows


CONFIG = ProtocolConfig(min_clicks=10, max_len=4, n_negatives=2, n_train_targets=2, train_stride=5)


def test_targets_cuts_and_vocab():
    out = build_splits(_events(_log()), CONFIG)
    # ids: users 9→1, 7→2; items by first appearance: 500,501,102,101,103,200,104,...; vocab incl. padding
    assert out.n_items == 1 + 2 + 12 + 1 and out.n_categories == 1 + 5
    assert out.offsets.tolist() == [0, 13]  # only user 7 kept (13 clicks incl. item 200)
    raw = out.item_raw_ids.to_list()
    seq = [raw[i - 1] for i in out.items]
    # sorted by time; the tie at t=1004 keeps file order (200 was written before 104)
    assert seq == [101, 102, 103, 200, 104, 105, 106, 107, 108, 109, 110, 111, 112]
    t = 13
    assert out.splits["test"]["cut"].tolist() == [t - 1] * 3
    assert out.splits["val"]["cut"].tolist() == [t - 2] * 3
    assert out.splits["train"]["cut"].tolist() == [t - 3] * 3 + [t - 8] * 3
    assert out.splits["train"]["label"].tolist() == [1, 0, 0, 1, 0, 0]
    positives = out.splits["train"][out.splits["train"]["label"] == 1]
    assert [raw[i - 1] for i in positives["item"]] == [seq[t - 3], seq[t - 8]]
    assert out.splits["train"].dtype == SAMPLE_DTYPE and SAMPLE_DTYPE.itemsize == 17
    # item 101 (new id 4) was last seen with raw category 4 → its category id
    cat_raw = out.category_raw_ids.to_list()
    assert cat_raw[out.item_categories[raw.index(101) + 1] - 1] == 4


def test_negatives_exclude_every_clicked_item_and_take_their_category():
    out = build_splits(_events(_log()), CONFIG)
    clicked = set(out.items.tolist())
    for split in out.splits.values():
        neg = split[split["label"] == 0]
        assert len(neg) == 2 * int(split["label"].sum())
        assert not clicked & set(neg["item"].tolist())  # includes clicks after the target
        assert (neg["category"] == out.item_categories[neg["item"]]).all()
        assert (split["user"] == 0).all()


def test_short_training_histories_are_dropped_not_negative():
    config = ProtocolConfig(min_clicks=5, n_train_targets=3, train_stride=5)  # offsets 3, 8, 13
    rows = [(1, k, 1, k) for k in range(1, 10)] + [(2, 50 + k, 1, k) for k in range(1, 10)]
    out = build_splits(_events(rows), config)
    assert sorted(out.splits["train"]["cut"][::3].tolist()) == [1, 1, 6, 6]  # 9-13 < 1 dropped


def test_no_user_passes_the_filter():
    with pytest.raises(DataError, match="at least 210"):
        build_splits(_events([(1, 1, 1, 1), (1, 2, 1, 2)]), ProtocolConfig(), source_path="x.csv")


def test_user_who_clicked_everything_cannot_get_negatives():
    rows = [(1, 1 + k % 3, 1, k) for k in range(12)]
    with pytest.raises(DataError, match="negatives"):
        build_splits(_events(rows), ProtocolConfig(min_clicks=10, n_train_targets=1))


@pytest.mark.parametrize("field,value", [("min_clicks", 2), ("max_len", 0), ("n_negatives", 0),
                                         ("first_train_offset", 2), ("seed", -1), ("behaviors", "pv")])
def test_config_checks(field, value):
    with pytest.raises(ConfigError, match=field):
        ProtocolConfig(**{field: value})


def test_negatives_are_proportional_to_global_click_frequency():
    """One kept user clicks 3 items; 50 dropped users click 5 other items with frequencies 1:2:3:4:5."""
    rows = [(1, 1 + k % 3, 1, k) for k in range(12)]
    freq = {10: 20, 11: 40, 12: 60, 13: 80, 14: 100}
    other = [item for item, n in freq.items() for _ in range(n)]
    rows += [(100 + k % 50, item, 2, k) for k, item in enumerate(other)]  # 50 users × 6 clicks: dropped
    config = ProtocolConfig(min_clicks=10, n_train_targets=2, n_negatives=500, seed=3)
    out = build_splits(_events(rows), config)
    raw = out.item_raw_ids.to_list()
    negatives = np.concatenate([s["item"][s["label"] == 0] for s in out.splits.values()])
    drawn = np.bincount([raw[i - 1] for i in negatives], minlength=15)[10:15]
    expected = np.array(list(freq.values()), dtype=float)
    assert drawn.sum() == 4 * 500
    assert chisquare(drawn, expected / expected.sum() * drawn.sum()).pvalue > 1e-3


def test_seed_changes_negatives_only():
    a = build_splits(_events(_log()), CONFIG)
    b = build_splits(_events(_log()), ProtocolConfig(**{**CONFIG.__dict__, "seed": 1}))
    for name in a.splits:
        pos = a.splits[name]["label"] == 1
        assert (a.splits[name][pos] == b.splits[name][pos]).all()


def test_dense_targets_split_each_users_clicks_by_time():
    """User 7 has 13 kept clicks; min_history 2 leaves 11 targets (cuts 2..12): the latest ceil(1.1) = 2
    are test, the 2 before them validation, the rest training; stride 3 keeps every third training
    target counted back from the latest."""
    dense = ProtocolConfig(targets="dense", min_clicks=10, min_history=2, max_len=4, n_negatives=1)
    out = build_splits(_events(_log()), dense)
    positive = {name: split[split["label"] == 1]["cut"].tolist() for name, split in out.splits.items()}
    assert positive == {"train": [2, 3, 4, 5, 6, 7, 8], "val": [9, 10], "test": [11, 12]}
    strided = build_splits(_events(_log()), ProtocolConfig(**{**dense.__dict__, "train_stride": 3}))
    assert strided.splits["train"][strided.splits["train"]["label"] == 1]["cut"].tolist() == [2, 5, 8]


def test_protocol_defaults_follow_the_target_scheme():
    assert (ProtocolConfig().min_clicks, ProtocolConfig().train_stride) == (210, 5)
    assert (ProtocolConfig(targets="dense").min_clicks, ProtocolConfig(targets="dense").train_stride) == (20, 1)
    with pytest.raises(ConfigError, match="min_history"):
        ProtocolConfig(targets="dense", min_clicks=5, min_history=5)
    with pytest.raises(ConfigError, match="test_fraction"):
        ProtocolConfig(targets="dense", test_fraction=0.7)
