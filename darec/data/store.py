"""A prepared dataset on disk: CSR click sequences stored once, samples as 17-byte pointers into them.

Layout of a prepared directory:
    manifest.json            format version, source, protocol, vocab sizes (incl. padding row 0), counts, hash
    sequences/offsets.npy    int64 (U+1,)   user u's clicks are [offsets[u], offsets[u+1])
    sequences/items.npy      int32 (N,)     oldest first
    sequences/categories.npy int32 (N,)
    sequences/timestamps.npy int64 (N,)
    item_categories.npy      int32 (n_items,) category of each item id (its last click's)
    train.npy / val.npy / test.npy   structured SAMPLE_DTYPE arrays (user, cut, item, category, label)
    ids/users.parquet, ids/items.parquet, ids/categories.parquet   raw <-> internal ids (see id_maps.py)
    features/{events,items,users}/NAME.npy, ids/features/NAME.parquet   schema features (see schema.py), only
                             when the schema asks for more than item and category

The manifest holds no wall-clock time or absolute path, so preparing the same input twice gives
byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from darec import __version__
from darec.data.id_maps import FIRST_ID, ID_FILES, ID_KINDS, IdMaps, check_id_map_rows, write_id_maps
from darec.data.protocol import SAMPLE_DTYPE, SPLITS, PreparedArrays
from darec.errors import DataError
from darec.io import atomic_dir, fault_point, recover_swap, relative_files, write_json

__all__ = ["FORMAT_VERSION", "PreparedDataset", "write_prepared", "content_hash", "is_prepared_dir", "FEATURE_DIRS",
           "FEATURE_IDS_DIR"]

FORMAT_VERSION = 1
_SEQUENCES = ("offsets", "items", "categories", "timestamps")
_MANIFEST = "manifest.json"


# Feature arrays (only with a schema beyond the default): per kept event, per item id, per prepared user.
FEATURE_DIRS = {"event": "features/events", "item": "features/items", "user": "features/users"}
FEATURE_IDS_DIR = "ids/features"


def _arrays(prepared: PreparedArrays) -> dict[str, np.ndarray]:
    """Relative path → array, in the fixed order the content hash uses (feature arrays last, by name)."""
    out = {f"sequences/{name}.npy": getattr(prepared, name) for name in _SEQUENCES}
    out["item_categories.npy"] = prepared.item_categories
    out.update({f"{name}.npy": prepared.splits[name] for name in SPLITS})
    for level, columns in (("event", prepared.event_columns), ("item", prepared.item_columns),
                           ("user", prepared.user_columns)):
        out.update({f"{FEATURE_DIRS[level]}/{name}.npy": columns[name] for name in sorted(columns)})
    return out


def _raw_ids(prepared: PreparedArrays) -> dict[str, pl.Series]:
    """Each kind's raw id of every internal id, in id order; a kind without raw ids maps to itself."""
    sizes = _id_map_sizes(len(prepared.offsets) - 1, prepared.n_items, prepared.n_categories)
    given = {"user": prepared.user_raw_ids, "item": prepared.item_raw_ids, "category": prepared.category_raw_ids}
    out = {}
    for kind in ID_KINDS:
        raw = given[kind]
        out[kind] = pl.Series(np.arange(FIRST_ID[kind], FIRST_ID[kind] + sizes[kind])) if raw is None else raw
        if len(out[kind]) != sizes[kind]:
            raise ValueError(f"{len(out[kind])} raw {kind} ids for {sizes[kind]} {kind}s")  # a caller's bug
    return out


def _id_map_sizes(n_users: int, n_items: int, n_categories: int) -> dict[str, int]:
    """Rows of each id map: every user; items and categories without the padding id 0."""
    return {"user": n_users, "item": n_items - 1, "category": n_categories - 1}


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every array, in the given order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(f"{name}|{array.dtype.str}|{array.dtype.descr}|{array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def write_prepared(out: str | Path, prepared: PreparedArrays, *, manifest: dict[str, Any],
                   extra: Callable[[Path, PreparedArrays], dict[str, Any] | None] | None = None,
                   overwrite: bool = False, protect: Sequence[str | Path] = (),
                   feature_maps: dict[str, pl.Series] | None = None) -> Path:
    """Write everything into a temporary sibling of `out` and swap it into place only on success.

    An existing `out` is replaced only when it is a dataset darec wrote (`is_prepared_dir`) or `overwrite`
    is set; never when it is a file or holds one of `protect` (the inputs); see `darec.io.atomic_dir`.
    `manifest` carries the caller's fields (source, protocol, skipped rows); sizes, counts, the file list
    and the hash are added here. `extra(tmp_dir, prepared)` may write more files (e.g. the planted truth)
    and return manifest fields to merge. `feature_maps[name]` (raw value of code 1, 2, …) is saved as
    ids/features/NAME.parquet (columns raw, id), like the id maps.
    """
    arrays = _arrays(prepared)
    with atomic_dir(out, replaceable=is_prepared_dir, overwrite=overwrite, protect=protect) as tmp:
        for name, array in arrays.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp / name, array, allow_pickle=False)
            fault_point("writing")
        write_id_maps(tmp, _raw_ids(prepared))
        if feature_maps:
            (tmp / FEATURE_IDS_DIR).mkdir(parents=True)
        for name, raw in (feature_maps or {}).items():
            pl.DataFrame({"raw": raw, "id": np.arange(1, len(raw) + 1, dtype=np.int64)}).write_parquet(
                tmp / FEATURE_IDS_DIR / f"{name}.parquet", statistics=False)
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
        full["files"] = sorted(relative_files(tmp))
        write_json(tmp / _MANIFEST, full)
    return Path(out)


def _read_manifest(path: Path) -> Any:
    """The parsed manifest.json of `path` (any JSON value), or DataError when it is missing or not JSON."""
    file = path / _MANIFEST
    if not file.is_file():
        raise DataError("not a prepared dataset (no manifest.json); run `darec prepare` first", path=path)
    try:
        return json.loads(file.read_bytes())
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"unreadable manifest: {getattr(err, 'msg', None) or err.__class__.__name__}", path=file,
                        line=getattr(err, "lineno", None)) from None
    except OSError as err:
        raise DataError(f"cannot read the manifest: {err.strerror}", path=file) from None


def is_prepared_dir(path: Path) -> bool:
    """True when `path` holds a darec manifest and nothing but the files that manifest lists.

    Used to decide whether an existing `--out` may be replaced: a user's file dropped into a dataset
    folder makes it no longer darec's alone. (Manifests written before the file list existed are trusted.)
    """
    try:
        manifest = _read_manifest(path)
    except DataError:
        return False
    if not (isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int)
            and isinstance(manifest.get("content_sha256"), str) and "darec_version" in manifest):
        return False
    listed = manifest.get("files")
    return listed is None or (isinstance(listed, list) and relative_files(path) <= {*map(str, listed), _MANIFEST})


class _SplitCounts(BaseModel):
    model_config = ConfigDict(strict=True)
    samples: StrictInt = Field(ge=0)
    positives: StrictInt = Field(ge=0)


class _ProtocolFields(BaseModel):
    """Only what readers of a dataset rely on; the protocol's other numbers are recorded as they are."""

    model_config = ConfigDict(extra="allow", strict=True)
    max_len: StrictInt = Field(ge=1)


class _Manifest(BaseModel):
    """The fields a dataset is checked against when opened; unknown fields are kept (newer writers)."""

    model_config = ConfigDict(extra="allow", strict=True)
    format_version: StrictInt
    darec_version: StrictStr
    source: StrictStr
    protocol: _ProtocolFields
    n_items: StrictInt = Field(ge=1)
    n_categories: StrictInt = Field(ge=1)
    n_users: StrictInt = Field(ge=0)
    n_events: StrictInt = Field(ge=0)
    splits: dict[str, _SplitCounts]
    stats: dict[str, Any]
    content_sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[StrictStr] | None = None


def _validated_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_manifest(path)
    file = path / _MANIFEST
    if not isinstance(manifest, dict):
        raise DataError(f"manifest is a JSON {type(manifest).__name__}, not an object", path=file)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"prepared format {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                        "prepare the data again", path=file)
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        value = first["input"] if first["type"] != "missing" else None
        raise DataError(f"invalid manifest field {field!r}: {first['msg']}", path=file,
                        value=value if isinstance(value, (int, float, str, type(None))) else str(value)[:80]) from None
    if set(manifest["splits"]) != set(SPLITS):
        raise DataError(f"invalid manifest field 'splits': must be {list(SPLITS)}", path=file,
                        value=str(sorted(manifest["splits"])))
    return manifest


def _load(file: Path, dtype: np.dtype, length: int) -> np.ndarray:
    """Memory-map one .npy after checking its header, dtype, length and exact size against the manifest."""
    if not file.is_file():
        raise DataError("prepared dataset is missing a file; prepare the data again", path=file)
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataError(f"corrupt or truncated array file ({str(err).splitlines()[0]}); prepare the data again",
                        path=file) from None
    if array.dtype != dtype or array.shape != (length,):
        raise DataError(f"array is {array.dtype} {array.shape}, the manifest says {dtype} ({length},); "
                        "prepare the data again", path=file)
    size, expected = file.stat().st_size, array.offset + array.nbytes
    if size != expected:
        raise DataError(f"array file is {size:,} bytes, expected {expected:,}; prepare the data again", path=file)
    return array


def _check_range(values: np.ndarray, low: int, high: int | np.ndarray, *, file: Path, what: str,
                 column: str | None = None) -> None:
    """Every value in [low, high) (`high` may be per value), else a DataError naming the first offender."""
    bad = np.flatnonzero((values < low) | (values >= high))
    if bad.size:
        raise DataError(f"prepared dataset is inconsistent: {what}; prepare the data again", path=file,
                        column=column, value=int(values[bad[0]]))


class PreparedDataset:
    """Read-only view of a prepared directory; every array is memory-mapped.

    `open` verifies the dataset before anyone trains on it: the manifest's schema, every array file's
    dtype, length and size, and that all ids and pointers are in range (so a damaged dataset fails at
    open, not with an IndexError mid-training). `open(..., verify_hash=True)` also recomputes the content
    hash (reads every byte).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray],
                 splits: dict[str, np.ndarray]) -> None:
        self.path = path
        self.manifest = manifest
        self.offsets = arrays["offsets"]
        self.items = arrays["items"]
        self.categories = arrays["categories"]
        self.timestamps = arrays["timestamps"]
        self.item_categories = arrays["item_categories"]
        self._splits = splits
        self.feature_specs: dict[str, dict[str, Any]] = manifest.get("features") or {}
        self.event_features = {n: arrays[f"{FEATURE_DIRS['event']}/{n}.npy"] for n in self.feature_specs
                               if self.feature_specs[n]["level"] == "behavior"}
        self.item_features = {n: arrays[f"{FEATURE_DIRS['item']}/{n}.npy"] for n, spec in self.feature_specs.items()
                              if spec.get("target")}
        self.user_features = {n: arrays[f"{FEATURE_DIRS['user']}/{n}.npy"] for n, spec in self.feature_specs.items()
                              if spec["level"] == "user"}

    @classmethod
    def open(cls, path: str | Path, *, verify_hash: bool = False) -> "PreparedDataset":
        """Raises DataError when `path` is not a complete, consistent prepared directory this version reads."""
        path = Path(path)
        recover_swap(path)
        manifest = _validated_manifest(path)
        n_users, n_events = manifest["n_users"], manifest["n_events"]
        lengths = {"offsets": n_users + 1, "items": n_events, "categories": n_events, "timestamps": n_events}
        dtypes = {"offsets": np.int64, "items": np.int32, "categories": np.int32, "timestamps": np.int64}
        arrays = {name: _load(path / "sequences" / f"{name}.npy", np.dtype(dtypes[name]), lengths[name])
                  for name in _SEQUENCES}
        arrays["item_categories"] = _load(path / "item_categories.npy", np.dtype(np.int32), manifest["n_items"])
        feature_files = _feature_files(manifest)
        for name, (dtype, length, vocabulary) in feature_files.items():
            arrays[name] = _load(path / name, dtype, length)
            if vocabulary is not None:
                _check_range(arrays[name], 0, vocabulary, file=path / name,
                             what=f"feature codes must be in [0, vocabulary = {vocabulary})")
        splits = {name: _load(path / f"{name}.npy", SAMPLE_DTYPE, manifest["splits"][name]["samples"])
                  for name in SPLITS}
        for name in manifest.get("files") or ():
            if not (path / name).is_file():
                raise DataError("prepared dataset is missing a file; prepare the data again", path=path / name)
        sizes = _id_map_sizes(n_users, manifest["n_items"], manifest["n_categories"])
        for kind in ID_KINDS:  # datasets prepared before the maps existed still open (IdMaps.open refuses them)
            if ID_FILES[kind] in (manifest.get("files") or ()):
                check_id_map_rows(path, kind, sizes[kind])
        _check_consistency(path, manifest, arrays, splits)
        if verify_hash:
            stored = {f"sequences/{name}.npy": arrays[name] for name in _SEQUENCES}
            stored["item_categories.npy"] = arrays["item_categories"]
            stored.update({f"{name}.npy": splits[name] for name in SPLITS})
            stored.update({name: arrays[name] for name in sorted(feature_files, key=_hash_order)})
            if content_hash(stored) != manifest["content_sha256"]:
                raise DataError("content hash mismatch: the arrays changed since `darec prepare` wrote them; "
                                "prepare the data again", path=path)
        return cls(path, manifest, arrays, splits)

    def id_maps(self) -> IdMaps:
        """The raw <-> internal id maps; DataError when the dataset predates them."""
        return IdMaps.open(self.path)

    def split(self, name: str) -> np.ndarray:
        """The structured sample array of `name` (train, val or test), memory-mapped."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {SPLITS}", path=self.path)
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


def _feature_files(manifest: dict[str, Any]) -> dict[str, tuple[np.dtype, int, int | None]]:
    """Feature array files the manifest's `features` imply: path -> (dtype, length, code bound or None)."""
    out: dict[str, tuple[np.dtype, int, int | None]] = {}
    features = manifest.get("features") or {}
    if not isinstance(features, dict):
        raise DataError("invalid manifest field 'features': must be an object; prepare the data again")
    for name, spec in features.items():
        try:
            kind, level, vocabulary = spec["kind"], spec["level"], spec.get("vocabulary")
        except (TypeError, KeyError):
            raise DataError(f"invalid manifest field 'features.{name}'; prepare the data again") from None
        dtype = np.dtype(np.float32 if kind == "numeric" else np.int32)
        if level == "user":
            out[f"{FEATURE_DIRS['user']}/{name}.npy"] = (dtype, manifest["n_users"], vocabulary)
            continue
        out[f"{FEATURE_DIRS['event']}/{name}.npy"] = (dtype, manifest["n_events"], vocabulary)
        if spec.get("target"):
            out[f"{FEATURE_DIRS['item']}/{name}.npy"] = (dtype, manifest["n_items"], vocabulary)
    return out


def _hash_order(name: str) -> tuple[int, str]:
    """Feature files in the order `_arrays` hashes them: events, items, users; by name within each."""
    level = next(i for i, folder in enumerate(FEATURE_DIRS.values()) if name.startswith(folder + "/"))
    return level, name


def _check_consistency(path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray],
                       splits: dict[str, np.ndarray]) -> None:
    """Ids within the vocabularies, CSR offsets monotone, every sample pointing inside its user's clicks.

    Cost: a few vectorised passes (min/max-like) over the arrays, small next to one training epoch.
    """
    n_items, n_categories, n_events = manifest["n_items"], manifest["n_categories"], manifest["n_events"]
    offsets = np.asarray(arrays["offsets"])
    lengths = np.diff(offsets)
    file = path / "sequences" / "offsets.npy"
    if offsets[0] != 0 or offsets[-1] != n_events:
        raise DataError(f"prepared dataset is inconsistent: offsets must run from 0 to n_events = {n_events}; "
                        "prepare the data again", path=file)
    _check_range(lengths, 0, n_events + 1, file=file, what="offsets must not decrease")
    items, categories = f"item ids must be in [1, n_items = {n_items})", \
        f"category ids must be in [1, n_categories = {n_categories})"
    _check_range(arrays["items"], 1, n_items, file=path / "sequences" / "items.npy", what=items)
    _check_range(arrays["categories"], 1, n_categories, file=path / "sequences" / "categories.npy", what=categories)
    _check_range(arrays["item_categories"], 0, n_categories, file=path / "item_categories.npy",
                 what=f"category ids must be in [0, n_categories = {n_categories})")
    for name, samples in splits.items():
        file = path / f"{name}.npy"
        _check_range(samples["user"], 0, len(lengths), file=file, column="user",
                     what=f"user rows must be in [0, n_users = {len(lengths)})")
        _check_range(samples["cut"], 0, lengths[np.asarray(samples["user"])], file=file, column="cut",
                     what="a sample's cut must lie inside its user's clicks")
        _check_range(samples["item"], 1, n_items, file=file, column="item", what=items)
        _check_range(samples["category"], 1, n_categories, file=file, column="category", what=categories)
        _check_range(samples["label"], 0, 2, file=file, column="label", what="labels must be 0 or 1")
        positives, expected = int(np.count_nonzero(samples["label"])), manifest["splits"][name]["positives"]
        if positives != expected:
            raise DataError(f"prepared dataset is inconsistent: {positives} positives, the manifest says "
                            f"{expected}; prepare the data again", path=file)
