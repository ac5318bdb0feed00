"""Prepared directories: layout, manifest, memory-mapping, byte-identical re-runs, bytes per sample."""
from __future__ import annotations

import json

import numpy as np
import pytest

from darec.data.pipeline import prepare
from darec.data.protocol import SAMPLE_DTYPE, ProtocolConfig
from darec.data.store import PreparedDataset, content_hash
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.errors import DataError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reprepare_is_byte_identical(tmp_path):
    a = prepare(source="movielens", out=tmp_path / "a")
    b = prepare(source="movielens", out=tmp_path / "b")
    assert _files(a.path) == _files(b.path)
    assert set(_files(a.path)) == {"manifest.json", "item_categories.npy", "train.npy", "val.npy", "test.npy",
                                   "sequences/offsets.npy", "sequences/items.npy", "sequences/categories.npy",
                                   "sequences/timestamps.npy", "ids/users.parquet", "ids/items.parquet",
                                   "ids/categories.parquet"}


def test_synthetic_reprepare_is_byte_identical(tmp_path):
    small = SyntheticConfig(n_users=20, mean_length=230)
    a = prepare_synthetic(small, out=tmp_path / "a")
    b = prepare_synthetic(small, out=tmp_path / "b")
    assert _files(a.path) == _files(b.path)


def test_open_and_manifest(tmp_path):
    ds = PreparedDataset.open(prepare(source="movielens", out=tmp_path / "ml").path)
    m = ds.manifest
    assert isinstance(ds.items, np.memmap) and ds.items.dtype == np.int32 and ds.timestamps.dtype == np.int64
    assert ds.offsets.dtype == np.int64 and len(ds.offsets) == m["n_users"] + 1 == 128
    assert ds.n_items == len(ds.item_categories) and ds.max_len == 200
    assert ds.split("train").dtype == SAMPLE_DTYPE and ds.split("train").dtype.itemsize == 17
    assert m["protocol"]["min_clicks"] == 210 and m["skipped_rows"] == 0 and m["format_version"] == 1
    arrays = {"sequences/offsets.npy": ds.offsets, "sequences/items.npy": ds.items,
              "sequences/categories.npy": ds.categories, "sequences/timestamps.npy": ds.timestamps,
              "item_categories.npy": ds.item_categories,
              **{f"{s}.npy": ds.split(s) for s in ("train", "val", "test")}}
    assert content_hash(arrays) == m["content_sha256"]
    # sequences are per-user time ordered and every target is the CSR entry at its cut
    assert all((np.diff(ds.timestamps[ds.offsets[u]:ds.offsets[u + 1]]) >= 0).all() for u in range(ds.n_users))
    pos = ds.split("test")[ds.split("test")["label"] == 1]
    assert (ds.items[ds.offsets[pos["user"]] + pos["cut"]] == pos["item"]).all()
    assert (pos["cut"] == np.diff(ds.offsets) - 1).all()


def test_sample_files_take_at_most_50_bytes_a_sample(tmp_path):
    ds = prepare(source="movielens", out=tmp_path / "ml")
    files = [ds.path / f"{s}.npy" for s in ("train", "val", "test")]
    n = sum(v["samples"] for v in ds.manifest["splits"].values())
    assert sum(f.stat().st_size for f in files) / n <= 50


def test_open_rejects_non_datasets(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        PreparedDataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format"):
        PreparedDataset.open(tmp_path)
    with pytest.raises(DataError, match="split"):
        prepare(source="movielens", out=tmp_path / "ml", config=ProtocolConfig()).split("dev")
