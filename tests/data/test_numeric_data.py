"""Numeric features in the data (issue 14): a missing cell is 0 after normalising, an item-level (`target:
true`) value is the item's value at its last kept event, and batches carry the float values of every sample's
history and target as a per-sample reference computes them."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from darec.data.loader import BatchLoader, history_codes, history_features, history_index
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.schema import apply_normalisation, load_schema

COLUMNS = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts"}
SCHEMA = """
numeric:
  - {name: price, column: price, target: true}
  - {name: dwell, column: dwell, normalize: minmax}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three users of 12 time-ordered events over 8 items; prices and dwell times with a few blank cells."""
    tmp = tmp_path_factory.mktemp("numeric")
    rng = np.random.default_rng(3)
    n = 36
    items = rng.integers(1, 9, size=n)
    blank = {4, int(np.flatnonzero(items == items[17])[-1])}  # one of them an item's last event
    price = [None if i in blank else float(10 * item + i % 3) for i, item in enumerate(items)]
    dwell = [None if i == 30 else float(rng.integers(1, 100)) for i in range(n)]
    pl.DataFrame({"uid": np.repeat([7, 8, 9], 12), "iid": items, "cid": items % 3, "ts": np.arange(n),
                  "price": price, "dwell": dwell}).write_csv(tmp / "log.csv")
    (tmp / "s.yaml").write_text(SCHEMA)
    ds = prepare(source="generic", input=tmp / "log.csv", out=tmp / "ds", columns=COLUMNS,
                 config=ProtocolConfig(min_clicks=10, n_train_targets=2, max_len=6), schema=load_schema(tmp / "s.yaml"))
    return ds, pl.read_csv(tmp / "log.csv")


def test_missing_values_are_zero_after_normalising(dataset):
    """standard: (x - mean) / std over the present values, a blank is 0 (the mean); minmax: a blank is 0 (the
    minimum). Every event is kept here and already in CSR order (users grouped, times increasing)."""
    ds, log = dataset
    price, dwell = log["price"].to_numpy(), log["dwell"].to_numpy()
    present = price[~np.isnan(price)]
    expected = np.where(np.isnan(price), 0.0, (price - present.mean()) / present.std(ddof=1))
    np.testing.assert_allclose(ds.event_features["price"], expected, atol=1e-6)
    low, high = np.nanmin(dwell), np.nanmax(dwell)
    np.testing.assert_allclose(ds.event_features["dwell"], np.where(np.isnan(dwell), 0.0, (dwell - low) / (high - low)),
                               atol=1e-6)
    assert ds.event_features["price"].dtype == np.float32 and ds.feature_specs["price"]["target"] is True
    assert ds.feature_specs["dwell"]["target"] is False and "dwell" not in ds.item_features


def test_item_value_is_its_last_events(dataset):
    """features/items/price.npy: per item id, the normalised price of the item's last event (0 if that cell is
    blank), brute force over the events."""
    ds, log = dataset
    ids = np.asarray(ds.id_maps().encode("item", log["iid"]))
    table = np.asarray(ds.item_features["price"])
    assert table.dtype == np.float32 and table.shape == (ds.n_items,) and table[0] == 0
    events = np.asarray(ds.event_features["price"])
    for item in range(1, ds.n_items):
        assert table[item] == events[np.flatnonzero(ids == item)[-1]]
    blank_last = [item for item in range(1, ds.n_items) if np.isnan(log["price"].to_numpy()[ids == item][-1])]
    assert blank_last and all(table[item] == 0 for item in blank_last)


def test_batches_carry_float_values(dataset):
    """Every sample's history values (left-padded with 0) and its target's item value, per sample."""
    ds, _ = dataset
    max_len = 4
    samples = ds.split("train")
    offsets = np.asarray(ds.offsets)
    row = 0
    for batch in BatchLoader(ds, "train", batch_size=5, max_len=max_len):
        assert set(batch.hist_features) == {"price", "dwell"} and set(batch.target_features) == {"price"}
        assert all(t.dtype.is_floating_point for t in (*batch.hist_features.values(), *batch.target_features.values()))
        for b in range(len(batch)):
            user, cut, item = (int(samples[row][k]) for k in ("user", "cut", "item"))
            for name in ("price", "dwell"):
                seen = np.asarray(ds.event_features[name][offsets[user]:offsets[user] + cut])[-max_len:]
                expected = np.r_[np.zeros(max_len - len(seen)), seen]
                assert batch.hist_features[name][b].tolist() == pytest.approx(expected.tolist())
            assert batch.target_features["price"][b].item() == ds.item_features["price"][item]
            row += 1
    assert row == len(samples)
    batch = next(iter(BatchLoader(ds, "train", batch_size=5, features=("dwell",))))
    assert set(batch.hist_features) == {"dwell"} and not batch.target_features


def test_history_features_for_serving_hold_values(dataset):
    """`history_features` (serving's gather) hands numeric values as float32, codes as int64."""
    ds, _ = dataset
    users = np.arange(ds.n_users)
    offsets = np.asarray(ds.offsets)
    index, mask = history_index(offsets, users, np.diff(offsets), 5)
    values = history_features(ds, index, mask, np.zeros(len(users), dtype=np.int64))
    assert values["price"].dtype == np.float32
    np.testing.assert_array_equal(values["price"][mask], np.asarray(ds.event_features["price"])[index[mask]])
    assert (values["price"][~mask] == 0).all()


def test_recorded_normalisation_reproduces_the_stored_values(dataset):
    """The manifest's `normalize` and statistics map the raw column onto exactly the stored values (what a
    service needs to read raw numbers sent later)."""
    ds, log = dataset
    for name in ("price", "dwell"):
        spec = ds.feature_specs[name]
        again = apply_normalisation(log[name], spec["normalize"], spec)
        np.testing.assert_array_equal(again, np.asarray(ds.event_features[name]))
    logs = apply_normalisation(pl.Series([None, -3.0, 0.0, np.e - 1]), "log", {})
    np.testing.assert_allclose(logs, [0.0, 0.0, 0.0, 1.0], atol=1e-7)


def test_numpy_and_torch_gathers_agree_on_values(dataset):
    """The on-device loader runs the same gather on float tensors: the same values as numpy."""
    ds, _ = dataset
    samples = ds.split("val")
    offsets = np.array(ds.offsets)  # a writable copy: torch.from_numpy below
    users, cuts = samples["user"].astype(np.int64), samples["cut"].astype(np.int64)
    events = {n: np.asarray(a) for n, a in ds.event_features.items()}
    index, mask = history_index(offsets, users, cuts, 5)
    expected = history_codes(events, None, {}, index, mask, None)
    t_index, t_mask = history_index(torch.from_numpy(offsets), torch.from_numpy(users), torch.from_numpy(cuts), 5)
    got = history_codes({n: torch.from_numpy(a.copy()) for n, a in events.items()}, None, {}, t_index, t_mask, None)
    for name, values in expected.items():
        assert got[name].dtype == torch.float32 and values.dtype == np.float32
        np.testing.assert_array_equal(got[name].numpy(), values)
