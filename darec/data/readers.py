"""Raw logs → one canonical polars frame (`user`, `item`, `category`, `timestamp`, `behavior`), file order.

Every reader scans lazily with explicit narrow dtypes and pushes the behaviour filter into the scan, so a
100M-row log never exists in memory as strings. Validation is two-speed: the fast scan only *detects*
bad rows (a parse error, or a null / out-of-range value); only then does a slower, still vectorised
diagnostic pass re-read the file as raw lines to name the first bad line, column and value, or, with
`skip_bad_rows=True`, to drop and count them.

Rules every source shares: ids and timestamps are integers >= 0 (a negative one is a bad row); a file that
is not text (zip, binary, Parquet given as CSV) is refused up front; gzip/zstd CSVs are read as they are;
exact duplicate rows are dropped, keeping the first, and counted (`RawEvents.n_duplicates`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from darec.errors import DataError

__all__ = [
    "RawEvents", "TAOBAO_BEHAVIORS", "TMALL_ACTIONS", "read_taobao", "read_tmall", "read_movielens",
    "read_movielens_100k", "read_generic", "CANONICAL_COLUMNS", "drop_duplicate_rows", "file_columns",
    "TMALL_EXTRA_COLUMNS",
]

log = logging.getLogger(__name__)

CANONICAL_COLUMNS = ("user", "item", "category", "timestamp", "behavior")
TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")
TMALL_ACTIONS = ("click", "cart", "buy", "fav")  # action_type 0, 1, 2, 3
_INT_RANGE = {"i32": (-(2**31), 2**31 - 1), "i64": (-(2**63), 2**63 - 1), "i8": (-128, 127)}
_DTYPES = {"i32": pl.Int32, "i64": pl.Int64, "i8": pl.Int8, "str": pl.String, "f64": pl.Float64}


@dataclass(frozen=True)
class RawEvents:
    """Kept events in file order plus what reading cost: `n_skipped` bad rows dropped (skip mode only)."""

    frame: pl.DataFrame
    n_skipped: int
    source: str
    paths: tuple[str, ...]
    n_duplicates: int = 0


@dataclass(frozen=True)
class _Field:
    """One column of a delimited file: `kind` is i8/i32/i64/str or a tuple of allowed strings."""

    name: str
    kind: str | tuple[str, ...]
    required: bool = True
    label: str | None = None  # the file's own column name, for error messages
    text_ok: bool = False  # an id column that may hold string ids (read as text when any value is not an integer)

    @property
    def shown(self) -> str:
        return self.label or self.name

    @property
    def dtype(self) -> pl.DataType:
        return pl.Enum(list(self.kind)) if isinstance(self.kind, tuple) else _DTYPES[self.kind]


# Leading bytes of formats a CSV reader must not try to parse as text (polars itself reads gzip and zstd).
_NOT_TEXT = {b"PK\x03\x04": "a zip archive: extract the CSV from it first",
             b"PK\x05\x06": "an empty zip archive", b"PAR1": "a Parquet file: read it with --source generic",
             b"BZh": "a bzip2 file: decompress it first", b"\xfd7zXZ\x00": "an xz file: decompress it first",
             b"7z\xbc\xaf\x27\x1c": "a 7-zip archive: extract the CSV from it first"}
_COMPRESSED = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd")  # gzip, zstd


def _check_file(path: Path, *, text: bool = True) -> None:
    """A readable, non-empty regular file; with `text`, one that does not start like a binary format."""
    if path.is_dir():
        raise DataError("input is a folder, not a file", path=path)
    if not path.is_file():
        raise DataError("input file not found", path=path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8192)
    except OSError as err:
        raise DataError(f"cannot read the input: {err.strerror}", path=path) from None
    if not head:
        raise DataError("input file is empty", path=path)
    if not text:
        return
    for magic, what in _NOT_TEXT.items():
        if head.startswith(magic):
            raise DataError(f"input is {what}", path=path)
    if b"\x00" in head and not head.startswith(_COMPRESSED):
        raise DataError("input is a binary file, not a text CSV (it contains NUL bytes)", path=path, line=1)


def _lines(path: Path) -> pl.LazyFrame:
    """The file as raw text lines (`_line`), decoded leniently so that a bad byte is shown, not fatal.

    `_rest` is non-null when a line contains the \\x1f byte this scan splits on (only garbage does).
    """
    return pl.scan_csv(path, has_header=False, schema={"_line": pl.String, "_rest": pl.String}, separator="\x1f",
                       quote_char=None, encoding="utf8-lossy", missing_columns="insert", extra_columns="ignore",
                       truncate_ragged_lines=True)


def _first_line(path: Path) -> str:
    """The header line (decompressed like the data itself), for the readers whose files have one."""
    try:
        first = _lines(path).head(1).collect()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"cannot read the header: {str(err).splitlines()[0]}", path=path, line=1) from None
    return (first["_line"][0] or "").rstrip("\r") if first.height else ""


_Valid = tuple[str, pl.Expr] | None  # (column, expression that is False for an out-of-range value)


def file_columns(path: str | Path, separator: str = ",") -> list[str]:
    """Column names of a generic input (CSV header or Parquet schema), to check a schema against."""
    path = Path(path)
    if path.suffix.lower() in {".parquet", ".pq"}:
        _check_file(path, text=False)
        try:
            return list(pl.read_parquet_schema(path))
        except (pl.exceptions.PolarsError, OSError) as err:
            raise DataError(f"cannot read the Parquet schema: {str(err).splitlines()[0]}", path=path) from None
    _check_file(path)
    return _first_line(path).split(separator)


def _check_header(path: Path, expected: Sequence[str], separator: str = ",") -> None:
    _check_file(path)
    first = _first_line(path)
    if tuple(first.split(separator)) != tuple(expected):
        raise DataError(f"unexpected header (expected {separator.join(expected)})", path=path, line=1,
                        value=first[:200])


def _bad_expr(fields: Sequence[_Field], valid: _Valid) -> pl.Expr:
    """True for a row that parsed but is unusable: a missing required value, a negative id or timestamp, or a
    failed range check."""
    bad = pl.any_horizontal([pl.col(f.name).is_null() for f in fields if f.required]
                            + [pl.col(f.name) < 0 for f in fields if f.required and f.kind in _INT_RANGE])
    return bad if valid is None else bad | ~valid[1].fill_null(True)


def _id_fields(fields: Sequence[_Field], string_ids: bool | None, textual: set[str] = frozenset()) -> list[_Field]:
    """`fields` with the id columns that hold strings read as text: every id column with `string_ids=True`,
    none with False, the `textual` ones (found by `_textual_ids`) with None."""
    as_text = {f.name for f in fields if f.text_ok} if string_ids else set(textual)
    return [dataclasses.replace(f, kind="str", text_ok=False) if f.name in as_text
            else dataclasses.replace(f, text_ok=f.text_ok and string_ids is None) for f in fields]


def _textual_ids(path: Path, fields: Sequence[_Field], *, header: bool, separator: str) -> set[str]:
    """Names of the id columns (`text_ok`) holding a value that is not an integer: one extra scan of the
    file as text, run only when the integer scan failed."""
    candidates = [f.name for f in fields if f.text_ok]
    if not candidates:
        return set()
    try:
        flags = (pl.scan_csv(path, has_header=False, skip_lines=int(header), separator=separator, quote_char=None,
                             schema={f.name: pl.String for f in fields}, truncate_ragged_lines=True)
                 .select([(pl.col(n).is_not_null() & pl.col(n).str.strip_chars().str.to_integer(strict=False)
                           .is_null()).any().alias(n) for n in candidates]).collect())
    except (pl.exceptions.PolarsError, OSError):
        return set()  # unparseable even as text: the diagnostic pass names the line
    return {n for n in candidates if flags[n][0]}


def _read_delimited(path: Path, *, fields: Sequence[_Field], header: bool, separator: str,
                    keep: pl.Expr | None, valid: _Valid, skip_bad_rows: bool) -> tuple[pl.DataFrame, int]:
    """Fast strict scan; falls back to `_diagnose` when anything looks wrong.

    Id columns marked `text_ok` are scanned as integers first; if that fails and some of them hold a
    value that is not an integer, those columns are string ids and the file is scanned again so."""
    _check_file(path)
    names = [f.name for f in fields]
    bad = _bad_expr(fields, valid)
    blank = pl.all_horizontal([pl.col(n).is_null() for n in names])
    wanted = (bad & ~blank) if keep is None else ((keep & ~bad) | (bad & ~blank))
    try:
        frame = (pl.scan_csv(path, has_header=False, skip_lines=int(header), separator=separator, quote_char=None,
                             schema={f.name: f.dtype for f in fields})
                 .filter(wanted if keep is not None else ~blank).collect())
        n_bad = frame.select(bad.sum()).item()
    except OSError as err:  # e.g. a truncated gzip: nothing a line-by-line diagnosis can locate
        raise DataError(f"cannot read the input ({err}); is a compressed file truncated?", path=path) from None
    except pl.exceptions.PolarsError as err:
        log.debug("fast scan of %s failed (%s); running the diagnostic pass", path, str(err).split("\n")[0])
        n_bad = -1
    if n_bad == 0:
        return frame, 0
    textual = _textual_ids(path, fields, header=header, separator=separator) if n_bad == -1 else set()
    if textual:
        log.info("string ids in column(s) %s of %s", sorted(textual), path)
        return _read_delimited(path, fields=_id_fields(fields, None, textual), header=header, separator=separator,
                               keep=keep, valid=valid, skip_bad_rows=skip_bad_rows)
    frame, n_skipped = _diagnose(path, fields=fields, header=header, separator=separator, valid=valid, keep=keep,
                                 skip_bad_rows=skip_bad_rows)
    return (frame if keep is None else frame.filter(keep)), n_skipped


def _diagnose(path: Path, *, fields: Sequence[_Field], header: bool, separator: str, valid: _Valid,
              keep: pl.Expr | None, skip_bad_rows: bool) -> tuple[pl.DataFrame, int]:
    """Re-read `path` as raw lines; name the first bad one or (skip mode) parse only the good ones.

    Cost: every line is split as a string (streaming, so memory stays bounded), several times slower than
    the fast path; it runs only on bad input. The why/where of a bad row is worked out for bad rows only.
    """
    lines = (_lines(path).with_row_index("_row")
             .filter(pl.col("_row") >= int(header), pl.col("_line").is_not_null() | pl.col("_rest").is_not_null()))
    parts = pl.col("_line").fill_null("").str.strip_chars_end("\r").str.split(separator)
    exprs = []
    problems = [(pl.col("_rest").is_not_null(), "control byte \\x1f in the line (binary data?)", None,
                 pl.col("_line"))]
    problems += [(parts.list.get(i, null_on_oob=True).str.contains("\ufffd", literal=True),
                  "invalid UTF-8 (shown as \ufffd)", f.shown, parts.list.get(i, null_on_oob=True))
                 for i, f in enumerate(fields)]
    n_fields = parts.list.len()
    problems.append((n_fields != len(fields), f"wrong number of columns (expected {len(fields)})", None, pl.col("_line")))
    for i, f in enumerate(fields):
        raw = parts.list.get(i, null_on_oob=True)
        if isinstance(f.kind, tuple):
            parsed = pl.when(raw.is_in(list(f.kind))).then(raw)
            why = f"unknown value (expected one of {', '.join(f.kind)})"
        elif f.kind == "str":
            parsed = pl.when(raw != "").then(raw)
            why = "empty value"
        elif f.kind == "f64":
            as_float = raw.str.strip_chars().cast(pl.Float64, strict=False)
            parsed = pl.when((raw == "") | as_float.is_not_nan()).then(as_float)
            why = "not a number"
        else:
            low, high = _INT_RANGE[f.kind]
            as_int = raw.str.strip_chars().str.to_integer(strict=False)
            parsed = pl.when(as_int.is_between(low, high)).then(as_int)
            why = f"not an integer in the {f.kind} range"
        exprs.append(parsed.cast(f.dtype).alias(f.name))
        if f.required:
            problems.append((pl.col(f.name).is_null(), why, f.shown, raw))
        else:  # an optional column may be blank, not malformed
            problems.append((pl.col(f.name).is_null() & (raw.str.strip_chars() != ""), why, f.shown, raw))
        if f.required and f.kind in _INT_RANGE:
            problems.append((pl.col(f.name) < 0, "negative value (ids and timestamps must be >= 0)", f.shown, raw))
    if valid is not None:
        shown = next(f.shown for f in fields if f.name == valid[0])
        problems.append((~valid[1].fill_null(True), "value out of range", shown, pl.col(valid[0]).cast(pl.String)))
    checked = lines.with_columns(*exprs).with_columns(_bad=pl.any_horizontal([p[0] for p in problems]))
    if not skip_bad_rows:
        first = checked.filter(pl.col("_bad")).head(1).collect(engine="streaming")
        if first.height:
            raise _located(first, problems, path)
        return checked.drop("_line", "_rest", "_bad", "_row").collect(engine="streaming"), 0
    wanted = pl.col("_bad") if keep is None else (pl.col("_bad") | keep)
    rows = checked.filter(wanted).drop("_line", "_rest").collect(engine="streaming")
    n_bad = int(rows["_bad"].sum())
    if n_bad:
        log.warning("skipped %d bad rows of %s (first: line %d)", n_bad, path,
                    rows.filter(pl.col("_bad"))["_row"][0] + 1)
    return rows.filter(~pl.col("_bad")).select([f.name for f in fields]), n_bad


def _located(first: pl.DataFrame, problems: list, path: Path) -> DataError:
    """The first failing check of a bad row (checks are in column order) as a DataError."""
    for cond, why, column, value in problems:
        hit = first.select(cond.fill_null(False).alias("hit"), value.cast(pl.String).alias("value"))
        if hit["hit"][0]:
            shown = hit["value"][0] if hit["value"][0] is not None else first["_line"][0]
            return DataError(f"bad row: {why}", path=path, line=first["_row"][0] + 1, column=column,
                             value=_short(shown))
    return DataError("bad row", path=path, line=first["_row"][0] + 1, value=_short(first["_line"][0]))


def _short(text: str | None, limit: int = 80) -> str | None:
    """A value short enough for a one-line message (a garbage line can be megabytes long)."""
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def _finish(frame: pl.DataFrame, *, source: str, paths: Sequence[Path], n_skipped: int,
            extra: Sequence[str] = ()) -> RawEvents:
    """The canonical columns, then the `extra` (feature) columns asked for, exact duplicates dropped."""
    if frame.height == 0:
        raise DataError("no rows left after the behaviour filter", path=paths[0])
    frame = frame.select(*(pl.col(c) for c in (*CANONICAL_COLUMNS, *extra))).with_columns(
        pl.col("timestamp").cast(pl.Int64))
    frame, n_duplicates = drop_duplicate_rows(frame)
    if n_duplicates:
        log.warning("dropped %d exact duplicate rows of %s (the first of each is kept)", n_duplicates, paths[0])
    log.info("read %s: %d kept events%s", source, frame.height, f", {n_skipped} bad rows skipped" if n_skipped else "")
    return RawEvents(frame=frame, n_skipped=n_skipped, source=source, paths=tuple(str(p) for p in paths),
                     n_duplicates=n_duplicates)


def drop_duplicate_rows(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """`frame` without exact repeats of an earlier row (file order kept), and how many were dropped.

    A repeated click would count twice towards the click minimum and appear twice in histories. Cost: one
    row hash and one sort of the hashes (~1 s per 10M rows on 2 cores); rows are compared exactly only
    where a hash repeats, so a hash collision never drops a row.
    """
    hashes = frame.select(pl.struct(pl.all()).hash()).to_series()
    ordered = hashes.sort()
    repeated = ordered.slice(1).filter(ordered.slice(1) == ordered.slice(0, len(ordered) - 1))
    if repeated.is_empty():
        return frame, 0
    candidate = hashes.is_in(repeated.unique().implode()).to_numpy()
    keep = np.ones(frame.height, dtype=bool)
    keep[candidate] = frame.filter(candidate).select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy()
    return frame.filter(keep), int(frame.height - keep.sum())


_STRING_IDS_DOC = """`string_ids`: False (default for the published layouts, whose ids are integers) refuses a
    non-integer id; True reads user, item and category ids as strings; None detects, per column."""


def read_taobao(path: str | Path, *, behaviors: Sequence[str] = ("pv",), skip_bad_rows: bool = False,
                string_ids: bool | None = False) -> RawEvents:
    """Taobao UserBehavior.csv: no header; user,item,category,behavior,timestamp. See `_STRING_IDS_DOC`."""
    path = Path(path)
    unknown = set(behaviors) - set(TAOBAO_BEHAVIORS)
    if unknown:
        raise DataError(f"unknown Taobao behaviour(s) {sorted(unknown)}; expected {TAOBAO_BEHAVIORS}")
    fields = _id_fields([_Field("user", "i32", label="user_id", text_ok=True),
                         _Field("item", "i32", label="item_id", text_ok=True),
                         _Field("category", "i32", label="category_id", text_ok=True),
                         _Field("behavior", TAOBAO_BEHAVIORS, label="behavior_type"), _Field("timestamp", "i64")],
                        string_ids)
    frame, skipped = _read_delimited(path, fields=fields, header=False, separator=",", valid=None,
                                     keep=pl.col("behavior").is_in(list(behaviors)), skip_bad_rows=skip_bad_rows)
    return _finish(frame, source="taobao", paths=[path], n_skipped=skipped)


_TMALL_HEADER = ("user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp", "action_type")


TMALL_EXTRA_COLUMNS = ("seller", "brand")


def read_tmall(path: str | Path, *, behaviors: Sequence[str] = ("click",), skip_bad_rows: bool = False,
               string_ids: bool | None = False, extra: Sequence[str] = ()) -> RawEvents:
    """Tmall user_log_format1.csv: header, time_stamp is mmdd (day resolution), action_type 0..3.

    `behaviors` takes names (click, cart, buy, fav) or the raw codes 0..3. Unlike the reference we keep
    mmdd values of any width (`829` = 29 Aug); the reference drops those that are not 4 characters.
    `extra` keeps seller and/or brand (brand may be empty: null). See `_STRING_IDS_DOC` for `string_ids`.
    """
    path = Path(path)
    codes = sorted({TMALL_ACTIONS.index(b) if b in TMALL_ACTIONS else _tmall_code(b) for b in behaviors})
    _check_header(path, _TMALL_HEADER)
    names = ("user", "item", "category", "seller", "brand", "timestamp", "action")
    kinds = ("i32", "i32", "i32", "i32", "i32", "i64", "i8")
    fields = _id_fields([_Field(n, k, required=n not in {"seller", "brand"}, label=label,
                                text_ok=n in {"user", "item", "category", "seller", "brand"})
                         for n, k, label in zip(names, kinds, _TMALL_HEADER)], string_ids)
    frame, skipped = _read_delimited(path, fields=fields, header=True, separator=",",
                                     valid=("action", pl.col("action").is_between(0, 3)), keep=pl.col("action").is_in(codes),
                                     skip_bad_rows=skip_bad_rows)
    frame = frame.with_columns(behavior=pl.col("action").cast(pl.UInt8)
                               .replace_strict(list(range(4)), list(TMALL_ACTIONS), return_dtype=pl.Enum(TMALL_ACTIONS)))
    unknown = sorted(set(extra) - set(TMALL_EXTRA_COLUMNS))
    if unknown:
        raise DataError(f"the Tmall layout has no column {unknown[0]!r} (it has {', '.join(TMALL_EXTRA_COLUMNS)} "
                        "beyond user, item, category, timestamp, behavior)", path=path, column=unknown[0])
    return _finish(frame, source="tmall", paths=[path], n_skipped=skipped, extra=extra)


def _tmall_code(value: str) -> int:
    if value in {"0", "1", "2", "3"}:
        return int(value)
    raise DataError(f"unknown Tmall behaviour {value!r}; expected one of {TMALL_ACTIONS} or 0..3")


def read_movielens(ratings: str | Path, movies: str | Path | None = None, *, skip_bad_rows: bool = False) -> RawEvents:
    """MovieLens ratings.csv + movies.csv (every rating is a click); category = the first genre listed."""
    ratings = Path(ratings)
    movies = Path(movies) if movies is not None else ratings.with_name("movies.csv")
    fields = [_Field("user", "i32", label="userId"), _Field("item", "i32", label="movieId"), _Field("rating", "str"),
              _Field("timestamp", "i64")]
    _check_header(ratings, [f.shown for f in fields])
    frame, skipped = _read_delimited(ratings, fields=fields, header=True, separator=",", valid=None, keep=None,
                                     skip_bad_rows=skip_bad_rows)
    _check_file(movies)
    try:
        genres = pl.read_csv(movies, columns=["movieId", "genres"],
                             schema_overrides={"movieId": pl.Int32, "genres": pl.String})
    except (pl.exceptions.PolarsError, ValueError) as err:
        raise DataError(f"cannot read movies file: {str(err).splitlines()[0]}", path=movies) from None
    genres = genres.select(item=pl.col("movieId"), category=pl.col("genres").str.split("|").list.first())
    return _join_categories(frame, genres, movies=movies, ratings=ratings, skipped=skipped, source="movielens")


def read_movielens_100k(ratings: str | Path, movies: str | Path | None = None, *,
                        skip_bad_rows: bool = False) -> RawEvents:
    """ml-100k: tab-separated `u.data` (user, item, rating, timestamp) + pipe-separated `u.item` genre flags."""
    ratings = Path(ratings)
    movies = Path(movies) if movies is not None else ratings.with_name("u.item")
    fields = [_Field("user", "i32"), _Field("item", "i32"), _Field("rating", "str"), _Field("timestamp", "i64")]
    frame, skipped = _read_delimited(ratings, fields=fields, header=False, separator="\t", valid=None, keep=None,
                                     skip_bad_rows=skip_bad_rows)
    _check_file(movies)
    try:
        raw = pl.read_csv(movies, has_header=False, separator="|", quote_char=None, encoding="utf8-lossy",
                          infer_schema=False)
        if raw.width < 20:
            raise DataError(f"movies file has {raw.width} columns; u.item has 24 (id, ..., 19 genre flags)",
                            path=movies)
        flags = raw.select(pl.col(raw.columns[-19:]).cast(pl.Int8))
        first_genre = pl.concat_list(pl.all()).list.arg_max()  # first set flag ("unknown" = 0 when none set)
        genres = pl.DataFrame({"item": raw[raw.columns[0]].cast(pl.Int32),
                               "category": flags.select(first_genre).to_series().cast(pl.Int32)})
    except pl.exceptions.PolarsError as err:
        raise DataError(f"cannot read movies file: {str(err).splitlines()[0]}", path=movies) from None
    return _join_categories(frame, genres, movies=movies, ratings=ratings, skipped=skipped, source="movielens-100k")


def _join_categories(frame: pl.DataFrame, genres: pl.DataFrame, *, movies: Path, ratings: Path, skipped: int,
                     source: str) -> RawEvents:
    genres = genres.unique("item", keep="first", maintain_order=True)  # a repeated movie must not repeat ratings
    joined = frame.join(genres, on="item", how="left", maintain_order="left")
    missing = joined.with_row_index("_row").filter(pl.col("category").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise DataError("rated movie missing from the movies file", path=ratings, line=row["_row"] + 2,
                        column="movieId", value=row["item"])
    joined = joined.with_columns(behavior=pl.lit("rating"))
    return _finish(joined, source=source, paths=[ratings, movies], n_skipped=skipped)


def read_generic(path: str | Path, *, columns: Mapping[str, str], behaviors: Sequence[str] | None = None,
                 skip_bad_rows: bool = False, separator: str = ",", string_ids: bool | None = None,
                 numeric: Sequence[str] = ()) -> RawEvents:
    """A CSV (with header) or Parquet file; `columns` maps names to the file's column names.

    user, item, category and timestamp are required, behavior optional; any other name is a feature
    column, kept under that name (ids, or numbers for the names in `numeric`; blank cells are null).
    Ids are integers >= 0 or, where a column holds any non-integer value, strings (`string_ids=None`
    detects per column; True reads every id column as text, False refuses non-integers). Timestamps are
    integers >= 0 (a Parquet float column is accepted only where every value is integral). `behaviors`
    filters on the mapped behaviour column (all rows are kept when it is None or there is none).
    """
    path = Path(path)
    missing = {"user", "item", "category", "timestamp"} - set(columns)
    if missing:
        raise DataError(f"column mapping needs user, item, category, timestamp (+ optional behavior and feature "
                        f"columns); got {dict(columns)}")
    if len(set(columns.values())) != len(columns):
        raise DataError(f"column mapping uses one file column for two fields: {dict(columns)}")
    extra = [name for name in columns if name not in CANONICAL_COLUMNS]
    parquet = path.suffix.lower() in {".parquet", ".pq"}
    _check_file(path, text=not parquet)
    keep = pl.col("behavior").cast(pl.String).is_in(list(behaviors)) if behaviors and "behavior" in columns else None
    if parquet:
        frame, skipped = _read_parquet(path, columns=columns, keep=keep, skip_bad_rows=skip_bad_rows,
                                       string_ids=string_ids, numeric=numeric)
    else:
        header = _first_line(path).split(separator)
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise DataError("column name repeated in the header", path=path, line=1, column=repeated[0])
        absent = [c for c in columns.values() if c not in header]
        if absent:
            raise DataError(f"column(s) {absent} not in the header {_short(str(header))}", path=path, line=1)
        rename = {v: k for k, v in columns.items()}
        fields = [_generic_field(rename.get(h, f"_extra{i}"), h, numeric=numeric) for i, h in enumerate(header)]
        frame, skipped = _read_delimited(path, fields=_id_fields(fields, string_ids), header=True,
                                         separator=separator, valid=None, keep=keep, skip_bad_rows=skip_bad_rows)
    if "behavior" not in frame.columns:
        frame = frame.with_columns(behavior=pl.lit("click"))
    return _finish(frame, source="generic", paths=[path], n_skipped=skipped, extra=extra)


def _generic_field(name: str, label: str, *, numeric: Sequence[str]) -> _Field:
    """How the generic reader parses one header column mapped to `name` (`_extraN`: not mapped, text)."""
    if name in {"user", "item", "category"}:
        return _Field(name, "i64", label=label, text_ok=True)
    if name == "timestamp":
        return _Field(name, "i64", label=label)
    if name == "behavior" or name.startswith("_extra"):
        return _Field(name, "str", label=label, required=name == "behavior")
    if name in numeric:
        return _Field(name, "f64", label=label, required=False)
    return _Field(name, "i64", label=label, required=False, text_ok=True)


_ID_COLUMNS = ("user", "item", "category", "timestamp")


def _read_parquet(path: Path, *, columns: Mapping[str, str], keep: pl.Expr | None, skip_bad_rows: bool,
                  string_ids: bool | None = None, numeric: Sequence[str] = ()) -> tuple[pl.DataFrame, int]:
    """Mapped columns of a Parquet file; integer ids and timestamps become Int64 only when exactly integral
    and >= 0; an id column holding a non-integer string is read as string ids (see `read_generic`)."""
    try:
        frame = pl.scan_parquet(path).select(**{k: pl.col(v) for k, v in columns.items()}).collect()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"cannot read Parquet columns {dict(columns)}: {str(err).splitlines()[0]}", path=path) from None
    features = [name for name in columns if name not in CANONICAL_COLUMNS]
    ids = [name for name in ("user", "item", "category", *features) if name not in numeric]
    textual = {name for name in ids if frame.schema[name] == pl.String and string_ids is not False
               and (string_ids or frame.select((pl.col(name).is_not_null() & pl.col(name).str.strip_chars()
                                               .str.to_integer(strict=False).is_null()).any()).item())}
    integral_columns = [name for name in (*ids, "timestamp") if name not in textual]
    for name in integral_columns:
        dtype = frame.schema[name]
        if not (dtype.is_numeric() or dtype == pl.String):
            raise DataError(f"column holds {dtype}; ids and timestamps must be integers or strings", path=path,
                            column=columns[name])
    as_int = {name: pl.col(name).cast(pl.Int64, strict=False) for name in integral_columns}
    required = [name for name in columns if name not in features]
    problems = [(name, pl.col(name).is_null(), "missing value") for name in required]  # (column, is bad, why)
    for name in integral_columns:
        present = pl.col(name).is_not_null()
        integral = pl.col(name).cast(pl.Float64, strict=False) == as_int[name].cast(pl.Float64)
        problems += [(name, present & (as_int[name].is_null() | ~integral.fill_null(False)), "not an integer"),
                     (name, as_int[name] < 0, "negative value (ids and timestamps must be >= 0)")]
    for name in numeric:
        as_float = pl.col(name).cast(pl.Float64, strict=False)
        problems.append((name, pl.col(name).is_not_null() & (as_float.is_null() | as_float.is_nan()), "not a number"))
        as_int[name] = as_float
    flags = frame.select(*(cond.fill_null(False).alias(f"_p{i}") for i, (_, cond, _) in enumerate(problems)))
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    n_bad = int(bad.sum())
    if n_bad and not skip_bad_rows:
        row = int(bad.arg_max())
        name, _, why = next(problem for i, problem in enumerate(problems) if flags[f"_p{i}"][row])
        raise DataError(f"bad row {row + 1}: {why}", path=path, column=columns[name],
                        value=_short(str(frame[name][row])))
    frame = frame.filter(~bad).with_columns(**as_int, **{name: pl.col(name).cast(pl.String) for name in textual})
    return (frame if keep is None else frame.filter(keep)), n_bad
