"""A prepared dataset on disk: CSR click sequences stored once, samples as 17-byte pointers into them.

Layout of a prepared directory:
    manifest.json            format version, source, protocol, vocab sizes (incl. padding row 0), counts, hash
    sequences/offsets.npy    int64 (U+1,)   user u's clicks are [offsets[u], offsets[u+1])
    sequences/items.npy      int32 (N,)     oldest first
    sequences/categories.npy int32 (N,)
    sequences/timestamps.npy int64 (N,)
    item_categories.npy      int32 (n_items,) category of each item id (its last click's)
    train.npy / val.npy / test.npy   structured SAMPLE_DTYPE arrays (user, cut, item, category, label)

The manifest holds no wall-clock time or absolute path, so preparing the same input twice gives
byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from darec import __version__
from darec.data.protocol import SAMPLE_DTYPE, SPLITS, PreparedArrays
from darec.errors import DataError
from darec.io import atomic_dir, write_json

__all__ = ["FORMAT_VERSION", "PreparedDataset", "write_prepared", "content_hash"]

FORMAT_VERSION = 1
_SEQUENCES = ("offsets", "items", "categories", "timestamps")


def _arrays(prepared: PreparedArrays) -> dict[str, np.ndarray]:
    """Relative path → array, in the fixed order the content hash uses."""
    out = {f"sequences/{name}.npy": getattr(prepared, name) for name in _SEQUENCES}
    out["item_categories.npy"] = prepared.item_categories
    out.update({f"{name}.npy": prepared.splits[name] for name in SPLITS})
    return out


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every array, in the given order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(f"{name}|{array.dtype.str}|{array.dtype.descr}|{array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def write_prepared(out: str | Path, prepared: PreparedArrays, *, manifest: dict[str, Any],
                   extra: Callable[[Path, PreparedArrays], dict[str, Any] | None] | None = None) -> Path:
    """Write everything into a temporary sibling of `out` and rename it into place only on success.

    `manifest` carries the caller's fields (source, protocol, skipped rows); sizes, counts and the hash
    are added here. `extra(tmp_dir, prepared)` may write more files (e.g. the planted truth) and return manifest
    fields to merge.
    """
    arrays = _arrays(prepared)
    with atomic_dir(out) as tmp:
        (tmp / "sequences").mkdir()
        for name, array in arrays.items():
            np.save(tmp / name, array, allow_pickle=False)
        full = dict(manifest)
        full.update({
            "format_version": FORMAT_VERSION, "darec_version": __version__,
            "n_items": int(prepared.n_items), "n_categories": int(prepared.n_categories),
            "n_users": int(len(prepared.offsets) - 1), "n_events": int(prepared.offsets[-1]),
            "splits": {name: {"samples": int(len(prepared.splits[name])),
                              "positives": int(prepared.splits[name]["label"].sum())} for name in SPLITS},
            "stats": prepared.stats, "bytes_per_sample": SAMPLE_DTYPE.itemsize,
            "content_sha256": content_hash(arrays),
        })
        if extra is not None:
            full.update(extra(tmp, prepared) or {})
        write_json(tmp / "manifest.json", full)
    return Path(out)


class PreparedDataset:
    """Read-only view of a prepared directory; every array is memory-mapped, so opening costs nothing."""

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.manifest = manifest
        self.offsets = arrays["offsets"]
        self.items = arrays["items"]
        self.categories = arrays["categories"]
        self.timestamps = arrays["timestamps"]
        self.item_categories = arrays["item_categories"]
        self._splits: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        """Raises DataError when `path` is not a prepared directory of a format this version reads."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError("not a prepared dataset (no manifest.json); run `darec prepare` first", path=path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"unreadable manifest: {err.msg}", path=manifest_path, line=err.lineno) from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"prepared format {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                            "prepare the data again", path=manifest_path)
        arrays = {name: cls._load(path / "sequences" / f"{name}.npy") for name in _SEQUENCES}
        arrays["item_categories"] = cls._load(path / "item_categories.npy")
        return cls(path, manifest, arrays)

    @staticmethod
    def _load(file: Path) -> np.ndarray:
        if not file.is_file():
            raise DataError("prepared dataset is missing a file", path=file)
        return np.load(file, mmap_mode="r", allow_pickle=False)

    def split(self, name: str) -> np.ndarray:
        """The structured sample array of `name` (train, val or test), memory-mapped."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {SPLITS}", path=self.path)
        if name not in self._splits:
            self._splits[name] = self._load(self.path / f"{name}.npy")
        return self._splits[name]

    @property
    def n_items(self) -> int:
        """Item vocabulary size including the padding row 0."""
        return int(self.manifest["n_items"])

    @property
    def n_categories(self) -> int:
        """Category vocabulary size including the padding row 0."""
        return int(self.manifest["n_categories"])

    @property
    def max_len(self) -> int:
        return int(self.manifest["protocol"]["max_len"])

    @property
    def n_users(self) -> int:
        return int(len(self.offsets) - 1)

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.path)!r}, users={self.n_users}, items={self.n_items})"
