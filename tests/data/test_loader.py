"""gather_histories against a slow per-sample reference; BatchLoader shapes, dtypes and resumability."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darec.data.batch import Batch
from darec.data.loader import BatchLoader, gather_histories
from darec.data.pipeline import prepare


def _reference(offsets, items, users, cuts, max_len):
    out = np.zeros((len(users), max_len), dtype=np.int64)
    for row, (u, c) in enumerate(zip(users, cuts)):
        hist = items[offsets[u]:offsets[u] + c][-max_len:] if c > 0 else []
        if len(hist):
            out[row, max_len - len(hist):] = hist
    return out


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 15), min_size=1, max_size=6), max_len=st.integers(1, 20),
       data=st.data())
def test_gather_matches_reference(lengths, max_len, data):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.arange(1, offsets[-1] + 1, dtype=np.int32) * 3
    n = data.draw(st.integers(1, 8))
    users = np.array(data.draw(st.lists(st.integers(0, len(lengths) - 1), min_size=n, max_size=n)))
    cuts = np.array([data.draw(st.integers(0, lengths[u])) for u in users])
    expected = _reference(offsets, items, users, cuts, max_len)
    hist, cats, mask = gather_histories(offsets, items, items + 1, users, cuts, max_len)
    assert (hist == expected).all() and (mask == (expected > 0)).all()
    assert ((cats - 1) * mask == expected).all()
    t = [torch.from_numpy(a.astype(np.int64)) for a in (offsets, items, items + 1, users, cuts)]
    th, tc, tm = gather_histories(*t, max_len)
    assert (th.numpy() == expected).all() and (tm.numpy() == mask).all() and (tc.numpy() == cats).all()


def test_left_padding_oldest_first():
    offsets, items = np.array([0, 5]), np.array([11, 12, 13, 14, 15])
    hist, _, mask = gather_histories(offsets, items, items, np.array([0, 0]), np.array([2, 5]), 4)
    assert hist.tolist() == [[0, 0, 11, 12], [12, 13, 14, 15]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    return prepare(source="movielens", out=tmp_path_factory.mktemp("ml") / "prep")


def test_batches_shapes_and_dtypes(movielens):
    loader = BatchLoader(movielens, "val", batch_size=100)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and len(batches[-1]) == 81
    b = batches[0]
    assert isinstance(b, Batch) and b.hist_items.shape == (100, 200)
    for name in ("hist_items", "hist_categories", "hist_positions", "target_item", "target_category", "user"):
        assert getattr(b, name).dtype == torch.int64
    assert b.label.dtype == torch.float32 and b.mask.dtype == torch.bool
    assert b.hist_positions[0].tolist() == list(range(200, 0, -1))
    assert b.label[:6].tolist() == [1, 0, 0, 1, 0, 0]
    assert b.mask.all()  # val histories have >= 208 clicks: no padding
    assert len(BatchLoader(movielens, "val", batch_size=100, drop_last=True)) == 3


def test_resume_gives_identical_batches(movielens):
    loader = BatchLoader(movielens, "train", batch_size=512, shuffle=True, seed=5)
    full = list(loader.batches(epoch=2))
    resumed = list(loader.batches(epoch=2, start=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.target_item, b.target_item) and torch.equal(a.hist_items, b.hist_items)
    other = next(loader.batches(epoch=3))
    assert not torch.equal(full[0].target_item, other.target_item)


def test_longer_history_than_prepared(movielens):
    long = next(iter(BatchLoader(movielens, "test", batch_size=64, max_len=1000)))
    short = next(iter(BatchLoader(movielens, "test", batch_size=64)))
    assert long.hist_items.shape == (64, 1000)
    assert torch.equal(long.hist_items[:, -200:], short.hist_items)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gather_equals_cpu(movielens):
    cpu = next(iter(BatchLoader(movielens, "train", batch_size=256, shuffle=True, max_len=300)))
    gpu = next(iter(BatchLoader(movielens, "train", batch_size=256, shuffle=True, max_len=300, device="cuda")))
    assert gpu.hist_items.is_cuda
    for name in ("hist_items", "hist_categories", "mask", "target_item", "label", "hist_positions"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu())
