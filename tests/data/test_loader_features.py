"""Side features in batches (issue 14): history codes are the CSR slices of every sample, time-gap buckets
follow the documented log-2 edges, target and user codes come from the per-item and per-user tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from darec.data.loader import BatchLoader, history_codes, history_index, time_codes, time_gap_bucket
from tests.models.test_model_features import FULL_SCHEMA, prepare_features


def test_time_gap_buckets_by_hand():
    gaps = [-5, 0, 1, 2, 3, 4, 7, 8, 1000, 65_536, 10**9]
    # 0 s and less: 1; 1 s: 2; [2, 4): 3; [4, 8): 4; 8: 5; 1000 in [512, 1024): 11; 2^16: 18; 1e9: capped at 16
    expected = [1, 1, 2, 3, 3, 4, 4, 5, 11, 18, 16]
    assert time_gap_bucket(np.array(gaps), 16).tolist() == [min(e, 16) for e in expected]
    assert time_gap_bucket(np.array(gaps), 32).tolist() == [1, 1, 2, 3, 3, 4, 4, 5, 11, 18, 31]
    assert time_gap_bucket(torch.tensor(gaps), 32).tolist() == time_gap_bucket(np.array(gaps), 32).tolist()


def test_hour_and_weekday_by_hand():
    # 1970-01-01 00:00 UTC was a Thursday; 2021-03-15 13:30 UTC (1615815000) a Monday
    stamps = np.array([0, 1_615_815_000])
    assert time_codes("hour", stamps, 0, 0).tolist() == [1, 14]
    assert time_codes("weekday", stamps, 0, 0).tolist() == [4, 1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_features(tmp_path_factory.mktemp("loader"), FULL_SCHEMA)


def _left_padded(values: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    values = values[-length:]
    out[length - len(values):] = values
    return out


def test_batch_features_match_per_sample_slices(dataset):
    """Every history code, time field, target and user code against a plain per-sample reference."""
    max_len = 7
    loader = BatchLoader(dataset, "train", batch_size=50, max_len=max_len)
    samples = dataset.split("train")
    offsets, stamps = np.asarray(dataset.offsets), np.asarray(dataset.timestamps)
    row = 0
    for batch in loader:
        assert set(batch.hist_features) == {"brand", "behavior", "time_gap", "hour"}
        assert set(batch.target_features) == {"brand"} and set(batch.user_features) == {"segment"}
        for b in range(len(batch)):
            user, cut, item = (int(samples[row][k]) for k in ("user", "cut", "item"))
            lo, hi = offsets[user], offsets[user] + cut
            for name in ("brand", "behavior"):
                expected = _left_padded(np.asarray(dataset.event_features[name][lo:hi]), max_len)
                assert batch.hist_features[name][b].tolist() == expected.tolist()
            target_time = stamps[hi]
            gaps = [time_gap_bucket(np.array(target_time - t), 12).item() for t in stamps[lo:hi]]
            assert batch.hist_features["time_gap"][b].tolist() == _left_padded(np.array(gaps, dtype=np.int64),
                                                                               max_len).tolist()
            hours = [(int(t) // 3600) % 24 + 1 for t in stamps[lo:hi]]
            assert batch.hist_features["hour"][b].tolist() == _left_padded(np.array(hours, dtype=np.int64),
                                                                           max_len).tolist()
            assert batch.target_features["brand"][b].item() == dataset.item_features["brand"][item]
            assert batch.user_features["segment"][b].item() == dataset.user_features["segment"][user]
            row += 1
    assert row == len(samples)
    loader = BatchLoader(dataset, "train", batch_size=50, max_len=max_len, features=("brand",))
    batch = next(iter(loader))
    assert set(batch.hist_features) == {"brand"} and not batch.user_features


def test_numpy_and_torch_gathers_agree(dataset):
    """The on-device path runs the same code on tensors: it must give the same codes as numpy."""
    samples = dataset.split("val")
    users, cuts = samples["user"].astype(np.int64), samples["cut"].astype(np.int64)
    offsets, stamps = np.asarray(dataset.offsets), np.asarray(dataset.timestamps)
    events = {n: np.asarray(a) for n, a in dataset.event_features.items()}
    fields = {"time_gap": 13, "hour": 25, "weekday": 8}
    index, mask = history_index(offsets, users, cuts, 9)
    expected = history_codes(events, stamps, fields, index, mask, stamps[offsets[users] + cuts])
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.int64))  # noqa: E731  (a writable copy)
    t_index, t_mask = history_index(t(offsets), t(users), t(cuts), 9)
    got = history_codes({n: t(a) for n, a in events.items()}, t(stamps), fields, t_index, t_mask,
                        t(stamps)[t(offsets)[t(users)] + t(cuts)])
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].tolist() == np.asarray(expected[name]).tolist(), name
