"""The re-click flag against a per-sample loop on random CSR data, a hand-made case, and its AUC."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darec.data.history_flags import shortcut_auc, shortcut_stats, target_in_history
from darec.data.protocol import SAMPLE_DTYPE
from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError


def _dataset(lengths, items, *, max_len: int, n_items: int, test: np.ndarray | None = None) -> PreparedDataset:
    """An in-memory dataset (the constructor takes arrays; nothing touches disk)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.asarray(items, dtype=np.int32)
    manifest = {"protocol": {"max_len": max_len}, "n_items": n_items, "n_categories": 2}
    empty = np.zeros(0, dtype=SAMPLE_DTYPE)
    constant = np.broadcast_to(np.int32(1), items.shape)  # categories and times play no part here
    arrays = {"offsets": offsets, "items": items, "categories": constant, "timestamps": constant,
              "item_categories": np.ones(n_items, dtype=np.int32)}
    splits = {"train": empty, "val": empty, "test": empty if test is None else test}
    return PreparedDataset(None, manifest, arrays, splits)


def _samples(user, cut, item, label) -> np.ndarray:
    out = np.zeros(len(user), dtype=SAMPLE_DTYPE)
    out["user"], out["cut"], out["item"], out["label"] = user, cut, item, label
    return out


def _brute_force(dataset: PreparedDataset, samples: np.ndarray, max_len: int) -> np.ndarray:
    flags = []
    for sample in samples:
        sequence = dataset.items[dataset.offsets[sample["user"]]:dataset.offsets[sample["user"] + 1]]
        flags.append(sample["item"] in sequence[max(0, sample["cut"] - max_len):sample["cut"]])
    return np.array(flags, dtype=bool)


def test_hand_made_windows():
    # user 0 clicks 5 3 7 5 9, user 1 clicks 3 8
    ds = _dataset([5, 2], [5, 3, 7, 5, 9, 3, 8], max_len=2, n_items=10)
    samples = _samples(user=[0, 0, 0, 0, 0, 1, 1], cut=[4, 4, 4, 2, 0, 1, 1], item=[5, 7, 3, 5, 5, 3, 5],
                       label=[1] * 7)
    # windows (L = 2): user 0 cut 4 sees [7, 5]; cut 2 sees [5, 3]; cut 0 sees nothing; user 1 cut 1 sees [3]
    assert target_in_history(ds, samples).tolist() == [True, True, False, True, False, True, False]
    assert target_in_history(ds, samples, max_len=4)[2]  # 3 at index 1 is visible with L = 4
    assert target_in_history(ds, samples[:0]).shape == (0,)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_users=st.integers(1, 6), n_items=st.integers(2, 8), max_len=st.integers(1, 12))
def test_matches_brute_force(data, n_users, n_items, max_len):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(1, 20, size=n_users)
    ds = _dataset(lengths, rng.integers(1, n_items, size=lengths.sum()), max_len=max_len, n_items=n_items)
    n = data.draw(st.integers(1, 40))
    user = rng.integers(0, n_users, size=n)
    samples = _samples(user, rng.integers(0, lengths[user] + 1), rng.integers(1, n_items, size=n),
                       rng.integers(0, 2, size=n))
    np.testing.assert_array_equal(target_in_history(ds, samples), _brute_force(ds, samples, max_len))
    other = data.draw(st.integers(1, 25))
    np.testing.assert_array_equal(target_in_history(ds, samples, max_len=other), _brute_force(ds, samples, other))


def test_auc_of_the_flag_alone():
    # 4 positives, 2 in history; 4 negatives, none: AUC = 0.5 + (2/4 - 0) / 2 = 0.75
    test = _samples(user=[0] * 8, cut=[4] * 8, item=[1, 2, 7, 8, 5, 6, 7, 8], label=[1] * 4 + [0] * 4)
    ds = _dataset([4], [1, 2, 3, 4], max_len=10, n_items=9, test=test)
    assert shortcut_auc(ds) == pytest.approx(0.75)
    stats = shortcut_stats(ds, "test", max_len=1)  # only item 4 visible: no positive flagged
    assert (stats.positive_share, stats.negative_share, stats.auc) == (0.0, 0.0, 0.5)


def test_key_overflow_is_a_clear_error_not_a_wrong_answer():
    events = np.broadcast_to(np.int32(1), (2**33,))  # 8.6e9 clicks, no memory: refused before any sort
    ds = _dataset([2**33], events, max_len=2, n_items=2**30 + 1)
    with pytest.raises(DataError, match="overflow"):
        target_in_history(ds, _samples([0], [5], [2**30], [1]))


def test_rejects_a_bad_max_len():
    ds = _dataset([2], [1, 2], max_len=2, n_items=3)
    with pytest.raises(ConfigError, match="max_len"):
        target_in_history(ds, _samples([0], [1], [1], [1]), max_len=0)
