"""Raw logs → one canonical polars frame (`user`, `item`, `category`, `timestamp`, `behavior`), file order.

Every reader scans lazily with explicit narrow dtypes and pushes the behaviour filter into the scan, so a
100M-row log never exists in memory as strings. Validation is two-speed: the fast scan only *detects*
bad rows (a parse error, or a null / out-of-range value); only then does a slower, still vectorised
diagnostic pass re-read the file as raw lines to name the first bad line, column and value, or, with
`skip_bad_rows=True`, to drop and count them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from darec.errors import DataError

__all__ = [
    "RawEvents", "TAOBAO_BEHAVIORS", "TMALL_ACTIONS", "read_taobao", "read_tmall", "read_movielens",
    "read_movielens_100k", "read_generic", "CANONICAL_COLUMNS",
]

log = logging.getLogger(__name__)

CANONICAL_COLUMNS = ("user", "item", "category", "timestamp", "behavior")
TAOBAO_BEHAVIORS = ("pv", "buy", "cart", "fav")
TMALL_ACTIONS = ("click", "cart", "buy", "fav")  # action_type 0, 1, 2, 3
_INT_RANGE = {"i32": (-(2**31), 2**31 - 1), "i64": (-(2**63), 2**63 - 1), "i8": (-128, 127)}
_DTYPES = {"i32": pl.Int32, "i64": pl.Int64, "i8": pl.Int8, "str": pl.String}


@dataclass(frozen=True)
class RawEvents:
    """Kept events in file order plus what reading cost: `n_skipped` bad rows dropped (skip mode only)."""

    frame: pl.DataFrame
    n_skipped: int
    source: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class _Field:
    """One column of a delimited file: `kind` is i8/i32/i64/str or a tuple of allowed strings."""

    name: str
    kind: str | tuple[str, ...]
    required: bool = True
    label: str | None = None  # the file's own column name, for error messages

    @property
    def shown(self) -> str:
        return self.label or self.name

    @property
    def dtype(self) -> pl.DataType:
        return pl.Enum(list(self.kind)) if isinstance(self.kind, tuple) else _DTYPES[self.kind]


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError("input file not found", path=path)
    if path.stat().st_size == 0:
        raise DataError("input file is empty", path=path)


_Valid = tuple[str, pl.Expr] | None  # (column, expression that is False for an out-of-range value)


def _check_header(path: Path, expected: Sequence[str], separator: str = ",") -> None:
    _check_file(path)
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        first = handle.readline().rstrip("\r\n")
    if tuple(first.split(separator)) != tuple(expected):
        raise DataError(f"unexpected header (expected {separator.join(expected)})", path=path, line=1,
                        value=first[:200])


def _bad_expr(fields: Sequence[_Field], valid: _Valid) -> pl.Expr:
    """True for a row that parsed but is unusable: a missing required value or a failed range check."""
    bad = pl.any_horizontal([pl.col(f.name).is_null() for f in fields if f.required])
    return bad if valid is None else bad | ~valid[1].fill_null(True)


def _read_delimited(path: Path, *, fields: Sequence[_Field], header: bool, separator: str,
                    keep: pl.Expr | None, valid: _Valid, skip_bad_rows: bool) -> tuple[pl.DataFrame, int]:
    """Fast strict scan; falls back to `_diagnose` when anything looks wrong."""
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
    except (pl.exceptions.ComputeError, pl.exceptions.InvalidOperationError, pl.exceptions.SchemaError) as err:
        log.debug("fast scan of %s failed (%s); running the diagnostic pass", path, str(err).split("\n")[0])
        n_bad = -1
    if n_bad == 0:
        return frame, 0
    frame, n_skipped = _diagnose(path, fields=fields, header=header, separator=separator, valid=valid, keep=keep,
                                 skip_bad_rows=skip_bad_rows)
    return (frame if keep is None else frame.filter(keep)), n_skipped


def _diagnose(path: Path, *, fields: Sequence[_Field], header: bool, separator: str, valid: _Valid,
              keep: pl.Expr | None, skip_bad_rows: bool) -> tuple[pl.DataFrame, int]:
    """Re-read `path` as raw lines; name the first bad one or (skip mode) parse only the good ones.

    Cost: every line is split as a string (streaming, so memory stays bounded), several times slower than
    the fast path; it runs only on bad input. The why/where of a bad row is worked out for bad rows only.
    """
    lines = (pl.scan_csv(path, has_header=False, schema={"_line": pl.String}, separator="\x1f", quote_char=None)
             .with_row_index("_row").filter(pl.col("_row") >= int(header), pl.col("_line").is_not_null()))
    parts = pl.col("_line").str.strip_chars_end("\r").str.split(separator)
    exprs, problems = [], []
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
        else:
            low, high = _INT_RANGE[f.kind]
            as_int = raw.str.strip_chars().str.to_integer(strict=False)
            parsed = pl.when(as_int.is_between(low, high)).then(as_int)
            why = f"not an integer in the {f.kind} range"
        exprs.append(parsed.cast(f.dtype).alias(f.name))
        if f.required:
            problems.append((pl.col(f.name).is_null(), why, f.shown, raw))
    if valid is not None:
        shown = next(f.shown for f in fields if f.name == valid[0])
        problems.append((~valid[1].fill_null(True), "value out of range", shown, pl.col(valid[0]).cast(pl.String)))
    checked = lines.with_columns(*exprs).with_columns(_bad=pl.any_horizontal([p[0] for p in problems]))
    if not skip_bad_rows:
        first = checked.filter(pl.col("_bad")).head(1).collect(engine="streaming")
        if first.height:
            raise _located(first, problems, path)
        return checked.drop("_line", "_bad", "_row").collect(engine="streaming"), 0
    wanted = pl.col("_bad") if keep is None else (pl.col("_bad") | keep)
    rows = checked.filter(wanted).drop("_line").collect(engine="streaming")
    n_bad = int(rows["_bad"].sum())
    if n_bad:
        log.warning("skipped %d bad rows of %s (first: line %d)", n_bad, path,
                    rows.filter(pl.col("_bad"))["_row"][0] + 1)
    return rows.filter(~pl.col("_bad")).select([f.name for f in fields]), n_bad


def _located(first: pl.DataFrame, problems: list, path: Path) -> DataError:
    """The first failing check of a bad row (checks are in column order) as a DataError."""
    for cond, why, column, value in problems:
        hit = first.select(cond.alias("hit"), value.cast(pl.String).alias("value"))
        if hit["hit"][0]:
            return DataError(f"bad row: {why}", path=path, line=first["_row"][0] + 1, column=column,
                             value=hit["value"][0] if hit["value"][0] is not None else first["_line"][0])
    return DataError("bad row", path=path, line=first["_row"][0] + 1, value=first["_line"][0])


def _finish(frame: pl.DataFrame, *, source: str, paths: Sequence[Path], n_skipped: int) -> RawEvents:
    if frame.height == 0:
        raise DataError("no rows left after the behaviour filter", path=paths[0])
    frame = frame.select(*(pl.col(c) for c in CANONICAL_COLUMNS)).with_columns(pl.col("timestamp").cast(pl.Int64))
    log.info("read %s: %d kept events%s", source, frame.height, f", {n_skipped} bad rows skipped" if n_skipped else "")
    return RawEvents(frame=frame, n_skipped=n_skipped, source=source, paths=tuple(str(p) for p in paths))


def read_taobao(path: str | Path, *, behaviors: Sequence[str] = ("pv",), skip_bad_rows: bool = False) -> RawEvents:
    """Taobao UserBehavior.csv: no header; user,item,category,behavior,timestamp."""
    path = Path(path)
    unknown = set(behaviors) - set(TAOBAO_BEHAVIORS)
    if unknown:
        raise DataError(f"unknown Taobao behaviour(s) {sorted(unknown)}; expected {TAOBAO_BEHAVIORS}")
    fields = [_Field("user", "i32", label="user_id"), _Field("item", "i32", label="item_id"),
              _Field("category", "i32", label="category_id"), _Field("behavior", TAOBAO_BEHAVIORS, label="behavior_type"),
              _Field("timestamp", "i64")]
    frame, skipped = _read_delimited(path, fields=fields, header=False, separator=",", valid=None,
                                     keep=pl.col("behavior").is_in(list(behaviors)), skip_bad_rows=skip_bad_rows)
    return _finish(frame, source="taobao", paths=[path], n_skipped=skipped)


_TMALL_HEADER = ("user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp", "action_type")


def read_tmall(path: str | Path, *, behaviors: Sequence[str] = ("click",), skip_bad_rows: bool = False) -> RawEvents:
    """Tmall user_log_format1.csv: header, time_stamp is mmdd (day resolution), action_type 0..3.

    `behaviors` takes names (click, cart, buy, fav) or the raw codes 0..3. Unlike the reference we keep
    mmdd values of any width (`829` = 29 Aug); the reference drops those that are not 4 characters.
    """
    path = Path(path)
    codes = sorted({TMALL_ACTIONS.index(b) if b in TMALL_ACTIONS else _tmall_code(b) for b in behaviors})
    _check_header(path, _TMALL_HEADER)
    names = ("user", "item", "category", "seller", "brand", "timestamp", "action")
    kinds = ("i32", "i32", "i32", "i32", "i32", "i64", "i8")
    fields = [_Field(n, k, required=n not in {"seller", "brand"}, label=label)
              for n, k, label in zip(names, kinds, _TMALL_HEADER)]
    frame, skipped = _read_delimited(path, fields=fields, header=True, separator=",",
                                     valid=("action", pl.col("action").is_between(0, 3)), keep=pl.col("action").is_in(codes),
                                     skip_bad_rows=skip_bad_rows)
    frame = frame.with_columns(behavior=pl.col("action").cast(pl.UInt8)
                               .replace_strict(list(range(4)), list(TMALL_ACTIONS), return_dtype=pl.Enum(TMALL_ACTIONS)))
    return _finish(frame, source="tmall", paths=[path], n_skipped=skipped)


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
        genres = pl.read_csv(movies, columns=["movieId", "genres"], schema_overrides={"movieId": pl.Int32})
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
    raw = pl.read_csv(movies, has_header=False, separator="|", quote_char=None, encoding="utf8-lossy",
                      infer_schema=False)
    flags = raw.select(pl.col(raw.columns[-19:]).cast(pl.Int8))
    first_genre = pl.concat_list(pl.all()).list.arg_max()  # first set flag ("unknown" = 0 when none set)
    genres = pl.DataFrame({"item": raw[raw.columns[0]].cast(pl.Int32),
                           "category": flags.select(first_genre).to_series().cast(pl.Int32)})
    return _join_categories(frame, genres, movies=movies, ratings=ratings, skipped=skipped, source="movielens-100k")


def _join_categories(frame: pl.DataFrame, genres: pl.DataFrame, *, movies: Path, ratings: Path, skipped: int,
                     source: str) -> RawEvents:
    joined = frame.join(genres, on="item", how="left", maintain_order="left")
    missing = joined.with_row_index("_row").filter(pl.col("category").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise DataError("rated movie missing from the movies file", path=ratings, line=row["_row"] + 2,
                        column="movieId", value=row["item"])
    joined = joined.with_columns(behavior=pl.lit("rating"))
    return _finish(joined, source=source, paths=[ratings, movies], n_skipped=skipped)


def read_generic(path: str | Path, *, columns: Mapping[str, str], behaviors: Sequence[str] | None = None,
                 skip_bad_rows: bool = False, separator: str = ",") -> RawEvents:
    """A CSV (with header) or Parquet file; `columns` maps canonical names to the file's column names.

    Ids and timestamps must be integers. `behaviors` filters on the mapped behaviour column (all rows
    are kept when it is None or the file has no behaviour column).
    """
    path = Path(path)
    missing = {"user", "item", "category", "timestamp"} - set(columns)
    if missing or set(columns) - set(CANONICAL_COLUMNS):
        raise DataError(f"column mapping needs user, item, category, timestamp (+ optional behavior); got {dict(columns)}")
    _check_file(path)
    keep = pl.col("behavior").cast(pl.String).is_in(list(behaviors)) if behaviors and "behavior" in columns else None
    if path.suffix.lower() in {".parquet", ".pq"}:
        frame, skipped = _read_parquet(path, columns=columns, keep=keep, skip_bad_rows=skip_bad_rows)
    else:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            header = handle.readline().rstrip("\r\n").split(separator)
        absent = [c for c in columns.values() if c not in header]
        if absent:
            raise DataError(f"column(s) {absent} not in the header {header}", path=path, line=1)
        rename = {v: k for k, v in columns.items()}
        kinds = {"user": "i64", "item": "i64", "category": "i64", "timestamp": "i64", "behavior": "str"}
        fields = [_Field(rename.get(h, f"_extra{i}"), kinds.get(rename.get(h, ""), "str"), required=h in rename,
                         label=h) for i, h in enumerate(header)]
        frame, skipped = _read_delimited(path, fields=fields, header=True, separator=separator, valid=None,
                                         keep=keep, skip_bad_rows=skip_bad_rows)
    if "behavior" not in frame.columns:
        frame = frame.with_columns(behavior=pl.lit("click"))
    return _finish(frame, source="generic", paths=[path], n_skipped=skipped)


def _read_parquet(path: Path, *, columns: Mapping[str, str], keep: pl.Expr | None,
                  skip_bad_rows: bool) -> tuple[pl.DataFrame, int]:
    try:
        frame = pl.scan_parquet(path).select(**{k: pl.col(v) for k, v in columns.items()}).collect()
        frame = frame.with_columns(pl.col(c).cast(pl.Int64, strict=True) for c in ("user", "item", "category", "timestamp"))
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"cannot read Parquet columns {dict(columns)}: {str(err).splitlines()[0]}", path=path) from None
    nulls = frame.with_row_index("_row").filter(pl.any_horizontal(pl.all().is_null()))
    if nulls.height and not skip_bad_rows:
        row = nulls.row(0, named=True)
        column = next(c for c in columns if row[c] is None)
        raise DataError("missing value", path=path, line=row["_row"] + 1, column=columns[column], value=None)
    frame = frame.drop_nulls()
    return (frame if keep is None else frame.filter(keep)), nulls.height
