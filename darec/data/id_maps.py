"""Raw ↔ internal ids of a prepared dataset, so that everything a user reads or writes names raw ids.

`darec prepare` renumbers ids (items and categories 1..n-1 in order of first appearance, 0 = padding;
users 0..U-1 over the kept users, the CSR row). The maps are saved beside the arrays:

    ids/users.parquet       raw, id    id = prepared user index 0..n_users-1
    ids/items.parquet       raw, id    id = 1..n_items-1 (0 is padding, never listed)
    ids/categories.parquet  raw, id    id = 1..n_categories-1

`raw` keeps the reader's kind of id: Int64 for integer ids (every reader today), String otherwise (e.g.
MovieLens genre names as categories). Raw values given to `encode` are compared as that dtype, so the
string "170" (a CSV cell, an HTTP field) finds the integer id 170; a value that cannot be one ("u170"
against an integer map, a null) is malformed and always an error, whatever the unknown-id policy.

Unknown-id policy (`unknown="oov"`): an unknown item or category becomes id 0, the padding row (a history
behaviour with id 0 is masked; a candidate is scored through the padding embedding and should be flagged);
an unknown user becomes -1 (0 is a real user), which has no stored history.

Dictionary side features (docs/features.md) have maps of the same form, ids/features/NAME.parquet with codes
1..n (0 = missing): kind `feature_kind(NAME)` reads them with the same rules (an unknown value -> 0 under oov).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from darec.errors import DataError

__all__ = ["IdMaps", "UnknownPolicy", "ID_KINDS", "IDS_DIR", "ID_FILES", "FIRST_ID", "OOV_ID", "UNKNOWN_USER",
           "RawIdError", "write_id_maps", "raw_id_column", "check_id_map_rows", "feature_kind"]

UnknownPolicy = Literal["error", "oov"]
ID_KINDS = ("user", "item", "category")
IDS_DIR = "ids"
ID_FILES = {"user": f"{IDS_DIR}/users.parquet", "item": f"{IDS_DIR}/items.parquet",
            "category": f"{IDS_DIR}/categories.parquet"}
OOV_ID = 0          # unknown item / category under unknown="oov": the padding row
UNKNOWN_USER = -1   # unknown user under unknown="oov" (user 0 is a real user)
FIRST_ID = {"user": 0, "item": 1, "category": 1}  # internal ids run first..first+size-1
_FEATURE = "feature:"  # kind prefix of a dictionary feature's map (codes 1..n, like items)
_FEATURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")  # the schema's feature names: a map file name, never a path
_SHOWN = 5          # unknown values named in an error message


class RawIdError(DataError):
    """A raw id that is malformed or unknown; `position` is its 0-based index in the encoded input and
    `reason` the message without location, so a caller reading a file can name the row and column."""

    def __init__(self, reason: str, *, kind: str, position: int, value: Any, path: object = None) -> None:
        super().__init__(reason, path=path, value=value)
        self.reason, self.kind, self.position = reason, kind, position


def raw_id_column(values: pl.Series) -> pl.Series:
    """The on-disk raw dtype of an id column: Int64 for any integer dtype, String for anything else."""
    return values.cast(pl.Int64 if values.dtype.is_integer() else pl.String)


def write_id_maps(directory: str | Path, raw: dict[str, pl.Series]) -> list[str]:
    """Write the three maps under `directory` (a prepared dataset being written) and return their paths.

    `raw[kind]` lists the raw id of every internal id in order (users: id 0 first; items, categories: id 1
    first). Raises DataError when a map has repeated or missing raw ids (the maps must invert)."""
    directory = Path(directory)
    (directory / IDS_DIR).mkdir(exist_ok=True)
    for kind in ID_KINDS:
        column = raw_id_column(raw[kind])
        if column.null_count() or column.n_unique() != len(column):
            raise DataError(f"raw {kind} ids must be distinct and present to be mapped back",
                            path=directory / ID_FILES[kind])
        first = FIRST_ID[kind]
        frame = pl.DataFrame({"raw": column, "id": np.arange(first, first + len(column), dtype=np.int64)})
        frame.write_parquet(directory / ID_FILES[kind], statistics=False)
    return [ID_FILES[kind] for kind in ID_KINDS]


def check_id_map_rows(directory: str | Path, kind: str, expected: int) -> None:
    """DataError unless `kind`'s map file holds `expected` rows (read from the Parquet footer only)."""
    file = Path(directory) / ID_FILES[kind]
    try:
        rows = pl.scan_parquet(file).select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"unreadable id map: {str(err).splitlines()[0]}; prepare the data again", path=file) from None
    if rows != expected:
        raise DataError(f"id map has {rows} rows, the dataset has {expected} {kind}s; prepare the data again",
                        path=file)


@dataclass(frozen=True)
class _Map:
    """One kind's map: the raw ids sorted (for binary search) with their internal ids, and raw by id."""

    raw_sorted: pl.Series   # (n,) sorted raw ids
    id_of_sorted: np.ndarray  # (n,) int64 internal id of raw_sorted[i]
    raw_by_id: pl.Series    # (first + n + 1,) raw id of each internal id; null at padding and the last slot
    first: int
    sorted_ints: np.ndarray | None = None  # raw_sorted as int64 for integer maps: numpy's search is ~30x
                                           # cheaper than polars' for the few ids of one request

    @property
    def size(self) -> int:
        return len(self.raw_sorted)

    @property
    def dtype(self) -> pl.DataType:
        return self.raw_sorted.dtype


class IdMaps:
    """Raw <-> internal ids of one prepared dataset, loaded lazily from <dataset>/ids/*.parquet.

    Every operation is vectorised (a binary search over the sorted raw ids, a gather by internal id);
    a map is read on first use of its kind, once, also when several threads ask at the same time.
    """

    def __init__(self, dataset_dir: Path) -> None:
        self.path = dataset_dir
        self._maps: dict[str, _Map] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, dataset_dir: str | Path) -> "IdMaps":
        """Maps of `dataset_dir`; DataError (one line) when its ids/ files are missing (an older dataset)."""
        dataset_dir = Path(dataset_dir)
        for kind in ID_KINDS:
            if not (dataset_dir / ID_FILES[kind]).is_file():
                raise DataError("dataset has no raw-id maps (prepared by an older darec); prepare it again "
                                "to name users and items by their raw ids", path=dataset_dir / ID_FILES[kind])
        return cls(dataset_dir)

    def size(self, kind: str) -> int:
        """How many raw ids of `kind` the dataset knows (items/categories: the vocabulary less padding)."""
        return self._map(kind).size

    def raw_dtype(self, kind: str) -> pl.DataType:
        """Int64 or String: how raw ids of `kind` are compared."""
        return self._map(kind).dtype

    @staticmethod
    def oov_id(kind: str) -> int:
        """The internal id `encode(..., unknown="oov")` gives an unknown raw id of `kind`."""
        _check_kind(kind)
        return UNKNOWN_USER if kind == "user" else OOV_ID

    def encode(self, kind: str, raw: Any, *, unknown: UnknownPolicy = "error") -> np.ndarray:
        """raw values (list, numpy array or polars Series; ints or strings; compared as the dataset's raw
        dtype) -> int64 internal ids. 'error': RawIdError (a DataError) naming the first unknown raw
        value(s). 'oov': unknown -> `oov_id(kind)`. A malformed value is an error under both policies."""
        if unknown not in ("error", "oov"):
            raise DataError(f"unknown-id policy must be 'error' or 'oov', got {unknown!r}")
        found, ids, values = self._lookup(kind, raw)
        missing = np.flatnonzero(~found)
        if missing.size and unknown == "error":
            shown = pl.Series(values).gather(missing[:_SHOWN]).to_list()
            count = "" if len(values) == 1 else f" ({missing.size} of {len(values)} unknown, first {shown})"
            raise RawIdError(f"raw {kind} id not in the dataset{count}", kind=kind, position=int(missing[0]),
                             value=shown[0], path=self.path / _file(kind))
        return np.where(found, ids, self.oov_id(kind))

    def known(self, kind: str, raw: Any) -> np.ndarray:
        """Bool mask: which raw values the dataset knows (a malformed value is unknown, not an error)."""
        values = _as_series(raw, kind)
        converted, malformed = _converted(values, self._map(kind).dtype)
        return self._search(kind, converted)[0] & ~malformed

    def decode(self, kind: str, ids: Any) -> pl.Series:
        """internal ids -> raw values (Series of the raw dtype). Padding/OOV id -> null."""
        table = self._map(kind)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        low, high = self.oov_id(kind), table.first + table.size
        bad = np.flatnonzero((ids < low) | (ids >= high))
        if bad.size:
            raise DataError(f"internal {kind} ids must be in [{low}, {high}), got {ids[bad[0]]} at position "
                            f"{bad[0]}", path=self.path / _file(kind))
        slot = np.where(ids < table.first, len(table.raw_by_id) - 1, ids)  # the last slot is null
        return table.raw_by_id.gather(slot).alias(kind)

    def as_raw(self, kind: str, raw: Any) -> pl.Series:
        """`raw` converted to the dataset's raw dtype ("170" -> 170 for integer ids), as `encode` compares
        it; RawIdError naming the first malformed value (a null, "u170" against integer ids)."""
        values = _as_series(raw, kind)
        dtype = self._map(kind).dtype
        converted, malformed = _converted(values, dtype)
        if malformed.any():
            at = int(np.argmax(malformed))
            shown = values[at]
            what = "a missing value" if shown is None else ("not an integer" if dtype == pl.Int64 else "not an id")
            raise RawIdError(f"raw {kind} id is {what}; this dataset's {kind} ids are "
                             f"{'integers' if dtype == pl.Int64 else 'strings'}", kind=kind, position=at,
                             value=shown)
        return converted

    def _lookup(self, kind: str, raw: Any) -> tuple[np.ndarray, np.ndarray, pl.Series | np.ndarray]:
        """(found mask, internal ids where found, the values as compared); RawIdError on a malformed value."""
        table = self._map(kind)
        if table.sorted_ints is not None and _is_integer_array(raw):
            # every value is an integer id as it stands: no conversion, no polars call (a request's ids
            # are validated integers; polars' conversion costs ~0.1 ms a call, numpy's search microseconds)
            keys = raw.astype(np.int64, copy=False)
            return *self._search_ints(kind, keys), keys
        converted = self.as_raw(kind, raw)
        found, ids = self._search(kind, converted)
        return found, ids, converted

    def _search(self, kind: str, values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """Binary search of `values` (already of the raw dtype; nulls are never found) in the sorted map."""
        table = self._map(kind)
        if table.sorted_ints is not None and values.null_count() == 0:
            return self._search_ints(kind, values.to_numpy())
        if table.size == 0 or len(values) == 0:
            return np.zeros(len(values), dtype=bool), np.full(len(values), self.oov_id(kind), dtype=np.int64)
        slot = np.minimum(table.raw_sorted.search_sorted(values).to_numpy(), table.size - 1)
        found = (table.raw_sorted.gather(slot) == values).fill_null(False).to_numpy()
        return found, table.id_of_sorted[slot]

    def _search_ints(self, kind: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_search` of int64 `keys` in an integer map, in numpy."""
        table = self._map(kind)
        if table.size == 0 or len(keys) == 0:
            return np.zeros(len(keys), dtype=bool), np.full(len(keys), self.oov_id(kind), dtype=np.int64)
        slot = np.minimum(np.searchsorted(table.sorted_ints, keys), table.size - 1)
        return table.sorted_ints[slot] == keys, table.id_of_sorted[slot]

    def _map(self, kind: str) -> _Map:
        _check_kind(kind)
        table = self._maps.get(kind)
        if table is None:
            with self._lock:
                table = self._maps.get(kind) or _read_map(self.path / _file(kind), first=FIRST_ID.get(kind, 1))
                self._maps[kind] = table
        return table

    def __repr__(self) -> str:
        return f"IdMaps({str(self.path)!r})"


def feature_kind(name: str) -> str:
    """The kind under which `IdMaps` reads dictionary feature `name`'s map (ids/features/NAME.parquet)."""
    return _FEATURE + name


def _check_kind(kind: str) -> None:
    if kind not in ID_KINDS and not (kind.startswith(_FEATURE) and _FEATURE_NAME.fullmatch(kind[len(_FEATURE):])):
        raise DataError(f"id kind must be one of {ID_KINDS} or a feature_kind(name), got {kind!r}")


def _file(kind: str) -> str:
    """The map file of `kind`, relative to the dataset."""
    from darec.data.store import FEATURE_IDS_DIR  # store imports this module

    return ID_FILES.get(kind) or f"{FEATURE_IDS_DIR}/{kind[len(_FEATURE):]}.parquet"


def _read_map(file: Path, *, first: int) -> _Map:
    """Read and check one map file: columns raw (Int64 or String, distinct) and id (first, first+1, …)."""
    try:
        frame = pl.read_parquet(file)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"unreadable id map: {str(err).splitlines()[0]}; prepare the data again", path=file) from None
    if frame.columns != ["raw", "id"] or frame.schema["raw"] not in (pl.Int64, pl.String) \
            or frame.schema["id"] != pl.Int64:
        raise DataError(f"id map must have columns raw (Int64 or String) and id (Int64), has {dict(frame.schema)}; "
                        "prepare the data again", path=file)
    raw, ids = frame["raw"], frame["id"].to_numpy()
    if not np.array_equal(ids, np.arange(first, first + len(ids))):
        raise DataError(f"id map's ids must run {first}, {first + 1}, … in order; prepare the data again", path=file)
    if raw.null_count() or raw.n_unique() != len(raw):
        raise DataError("id map has missing or repeated raw ids; prepare the data again", path=file)
    order = raw.arg_sort().to_numpy()
    padding = pl.Series([None] * first, dtype=raw.dtype)
    raw_sorted = raw.gather(order)
    return _Map(raw_sorted=raw_sorted, id_of_sorted=ids[order], first=first,
                raw_by_id=pl.concat([padding, raw, pl.Series([None], dtype=raw.dtype)]),
                sorted_ints=raw_sorted.to_numpy() if raw.dtype == pl.Int64 else None)


def _is_integer_array(raw: Any) -> bool:
    """A 1-D numpy array of a signed or narrow unsigned integer dtype: every value is an int64 id as it stands."""
    return (isinstance(raw, np.ndarray) and raw.ndim == 1
            and (raw.dtype.kind == "i" or (raw.dtype.kind == "u" and raw.dtype.itemsize < 8)))


def _as_series(raw: Any, kind: str) -> pl.Series:
    """Any supported container (or one scalar) of raw ids as a polars Series, types as given."""
    if isinstance(raw, pl.Series):
        return raw
    if isinstance(raw, (str, bytes, int, float, np.generic)) or raw is None:  # one id
        raw = [raw.decode() if isinstance(raw, bytes) else raw]
    if isinstance(raw, np.ndarray) and raw.dtype == object:
        raw = raw.tolist()
    try:
        return pl.Series(kind, raw)
    except (TypeError, ValueError, pl.exceptions.PolarsError):  # mixed ints and strings: compare as text
        return pl.Series(kind, raw, dtype=pl.String, strict=False)


def _converted(values: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, np.ndarray]:
    """`values` as `dtype` (Int64 or String) and a mask of the malformed ones (null, or not that kind).

    Integers and strings convert either way ("170" <-> 170; blanks around an integer are ignored); a float counts
    only where it is integral (170.0); anything else (booleans, dates, 170.5) is malformed."""
    name = values.name
    if values.dtype in (pl.Categorical, pl.Object) or isinstance(values.dtype, pl.Enum):
        values = values.cast(pl.String, strict=False)
    if values.dtype.is_float():
        as_int = values.cast(pl.Int64, strict=False)
        values = as_int.zip_with(as_int.cast(pl.Float64) == values, pl.Series([None], dtype=pl.Int64))
    if values.dtype == pl.String and dtype == pl.Int64:
        values = values.str.strip_chars()
    elif not (values.dtype == pl.String or values.dtype.is_integer()):
        values = pl.repeat(None, len(values), dtype=dtype, eager=True)
    converted = values.cast(dtype, strict=False).alias(name)
    return converted, converted.is_null().to_numpy()
