"""Batch prediction (`darec predict`): click probabilities for a file of (user, item[, category]) rows.

The input (CSV or Parquet, raw ids) is streamed in chunks of `chunk_rows`; within a chunk the rows are
grouped by user, so each user's history is gathered and searched once for all of its candidates
(`Scorer`, one (U, C) block per group of users with similar candidate counts). The scored chunks are
streamed into one Parquet file through polars' sink, which is written to a temporary sibling of `--out`
and renamed into place only when every row is scored: the output has the input's rows in the input's
order, or does not exist.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from polars.io.plugins import register_io_source
from tqdm import tqdm

from darec.data.id_maps import IdMaps, RawIdError, UnknownPolicy
from darec.data.loader import history_features, history_index
from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError
from darec.io import atomic_file
from darec.serve.export import ExportedModel, is_export_dir, load_exported
from darec.serve.scorer import History, Scorer

__all__ = ["predict_file", "checkpoint_file", "load_scorer", "user_histories", "score_pairs",
           "DEFAULT_CHUNK_ROWS", "INPUT_COLUMNS"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 200_000
INPUT_COLUMNS = ("user", "item", "category")   # canonical names; category is optional
OUTPUT_COLUMNS = ("logit", "probability", "known")
_MAX_CANDIDATES = 512    # candidates of one user scored in one block row; more split into several rows
_BLOCK_CELLS = 1 << 20   # history cells (users x max_len) per block: bounds the (U, N, 2 K_A) key tensor
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a `darec train` run directory (its best.pt, the best validation weights)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise DataError("run directory has no best.pt; pass the checkpoint file itself", path=path)
        return path / "best.pt"
    return path


def load_scorer(checkpoint: str | Path, dataset: PreparedDataset, *, device: str = "cpu") -> Scorer | ExportedModel:
    """The checkpoint's Scorer, or for a `darec export` folder its program (`ExportedModel`, CPU); ConfigError
    unless it was trained on `dataset`'s vocabularies (an export also records the dataset's content hash,
    which must match)."""
    from darec.train.trainer import resolve_device

    if is_export_dir(Path(checkpoint)):
        scorer: Scorer | ExportedModel = load_exported(checkpoint)
        if device != "auto" and torch.device(device).type != "cpu":  # "auto" is the CPU for an export
            raise ConfigError(f"an export runs on CPU (torch.export program / onnxruntime), not on {device}; "
                              "serve the training run's checkpoint to use a GPU")
        recorded, content = scorer.export_config["dataset"]["content_sha256"], dataset.manifest.get("content_sha256")
        if recorded and recorded != content:
            raise ConfigError(f"export {checkpoint} was made with another dataset (content hash {recorded[:12]}..., "
                              f"dataset {dataset.path} has {str(content)[:12]}...): serve it with that dataset")
    else:
        checkpoint = checkpoint_file(checkpoint)
        scorer = Scorer.load(checkpoint, device=resolve_device(device), item_features=dataset.item_features)
    for what in ("n_items", "n_categories"):
        trained, here = getattr(scorer.config, what), getattr(dataset, what)
        if trained != here:
            raise ConfigError(f"checkpoint {checkpoint} was trained with {what}={trained}, dataset {dataset.path} "
                              f"has {here}: score with the dataset the model was trained on")
    return scorer


def user_histories(dataset: PreparedDataset, users: np.ndarray, length: int) -> History:
    """The last `length` clicks of each prepared user, left-padded: (U, length), one gather, no loop; with the
    dataset's side features (time fields as seen right after the user's latest behaviour)."""
    users = np.asarray(users, dtype=np.int64)
    offsets = np.asarray(dataset.offsets)
    hi = offsets[users + 1]
    index, real = history_index(offsets, users, hi - offsets[users], length)     # (U, L), the whole history cut
    items = np.where(real, np.asarray(dataset.items[index.reshape(-1)]).reshape(index.shape), 0)
    cats = np.where(real, np.asarray(dataset.categories[index.reshape(-1)]).reshape(index.shape), 0)
    latest = np.asarray(dataset.timestamps)[np.maximum(hi - 1, 0)]               # (U,) the reference time
    features = history_features(dataset, index, real, latest)
    return History(items=torch.from_numpy(items.astype(np.int64)), categories=torch.from_numpy(cats.astype(np.int64)),
                   mask=torch.from_numpy(real),
                   features={n: torch.from_numpy(c) for n, c in features.items()},
                   user_features={n: torch.from_numpy(np.asarray(a)[users].astype(np.int64))
                                  for n, a in dataset.user_features.items()})


def score_pairs(scorer: Scorer, dataset: PreparedDataset, users: np.ndarray, items: np.ndarray,
                categories: np.ndarray, *, length: int) -> np.ndarray:
    """Logits (float32, input order) of (prepared user, item id, category id) rows.

    Rows are grouped by user (at most `_MAX_CANDIDATES` per group); groups are bucketed by candidate count
    rounded up to a power of two, so a (U, C) block wastes at most half its cells on padding, and every
    group's history is gathered and searched once for all of its candidates."""
    n = len(users)
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    new_user = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    user_start = np.flatnonzero(new_user)
    rank = np.arange(n) - np.repeat(user_start, np.diff(np.r_[user_start, n]))   # 0.. within a user
    new_group = new_user | (rank % _MAX_CANDIDATES == 0)
    group_start = np.flatnonzero(new_group)
    group_size = np.diff(np.r_[group_start, n])
    column = np.arange(n) - np.repeat(group_start, group_size)                   # slot in the group's row
    width = 1 << np.ceil(np.log2(group_size)).astype(np.int64)                   # power-of-two class
    for w in np.unique(width):
        groups = np.flatnonzero(width == w)
        per_block = max(1, _BLOCK_CELLS // (length * int(w)))
        for lo in range(0, len(groups), per_block):  # a few blocks per chunk, each fully vectorised
            block = groups[lo:lo + per_block]
            sizes = group_size[block]
            row = np.repeat(np.arange(len(block)), sizes)                         # block row of each pair
            at = np.repeat(group_start[block], sizes) + np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes,
                                                                                          sizes)
            source = order[at]                                                    # input rows of the pairs
            cand_items = np.zeros((len(block), int(w)), dtype=np.int64)
            cand_cats = np.zeros_like(cand_items)
            cand_items[row, column[at]] = items[source]
            cand_cats[row, column[at]] = categories[source]
            history = user_histories(dataset, sorted_users[group_start[block]], length)
            logits = scorer.logits(history, torch.from_numpy(cand_items), torch.from_numpy(cand_cats))
            out[source] = logits.float().cpu().numpy()[row, column[at]]
    return out


@dataclass(frozen=True)
class _Input:
    """The input file as a lazy frame, with which of its columns hold the users, items and categories."""

    path: Path
    kind: str                 # csv or parquet
    frame: pl.LazyFrame
    columns: dict[str, str]   # canonical name -> the file's column (category only when present)
    rows: int | None          # known up front for Parquet (footer), not for CSV

    def line(self, row: int) -> int | None:
        """1-based line of data row `row` (1-based) in a CSV with a header; None for Parquet."""
        return row + 1 if self.kind == "csv" else None


def _open_input(path: Path, columns: Mapping[str, str] | None) -> _Input:
    """Check the input's kind and columns up front (a bad file fails before any scoring)."""
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"input must be a .csv or .parquet file, not {path.suffix or 'a file without suffix'!r}",
                        path=path)
    if path.is_dir():
        raise DataError("input is a folder, not a file", path=path)
    if not path.is_file():
        raise DataError("input file not found", path=path)
    mapping = {name: name for name in INPUT_COLUMNS} | dict(columns or {})
    unknown = set(mapping) - set(INPUT_COLUMNS)
    if unknown:
        raise ConfigError(f"--columns maps only {', '.join(INPUT_COLUMNS)}, got {sorted(unknown)}")
    try:
        if kind == "csv":
            header = pl.scan_csv(path, infer_schema=False).collect_schema().names()
            ids = {col: pl.String for col in mapping.values() if col in header}
            frame = pl.scan_csv(path, schema_overrides=ids)
            frame.collect_schema()
            rows = None
        else:
            frame = pl.scan_parquet(path)
            header = frame.collect_schema().names()
            rows = frame.select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the input as {kind}: {str(err).strip().splitlines()[0]}", path=path) from None
    for name in ("user", "item"):
        if mapping[name] not in header:
            raise DataError(f"input has no {name} column (columns: {', '.join(header[:10])})", path=path,
                            column=mapping[name], line=1 if kind == "csv" else None)
    taken = sorted(set(OUTPUT_COLUMNS) & set(header))
    if taken:
        raise DataError("input already has a column darec predict writes; rename it", path=path, column=taken[0])
    present = {name: col for name, col in mapping.items() if col in header}
    return _Input(path=path, kind=kind, frame=frame, columns=present, rows=rows)


def _check_out(out: Path, input_path: Path, overwrite: bool) -> None:
    if out.suffix.lower() not in (".parquet", ".pq"):
        raise ConfigError(f"--out must be a .parquet file, got {out}")
    if out.is_dir():
        raise DataError("--out is a folder; give a .parquet file name", path=out)
    if out.exists() and out.resolve() == input_path.resolve():
        raise DataError("--out is the input file; write the predictions elsewhere", path=out)
    if out.exists() and not overwrite:
        raise DataError("output exists; pass --overwrite to replace it", path=out)


class _Predictor:
    """Encodes, scores and decorates one chunk at a time; counts rows and unknown candidates."""

    def __init__(self, source: _Input, dataset: PreparedDataset, maps: IdMaps, scorer: Scorer, *,
                 unknown: UnknownPolicy, length: int) -> None:
        self.source, self.dataset, self.maps, self.scorer = source, dataset, maps, scorer
        self.unknown, self.length = unknown, length
        self.rows = self.n_unknown = 0

    def schema(self) -> pl.Schema:
        schema = dict(self.source.frame.collect_schema())
        for name, col in self.source.columns.items():
            schema[col] = self.maps.raw_dtype(name)
        schema.update(logit=pl.Float32, probability=pl.Float32)
        if self.unknown == "oov":
            schema["known"] = pl.Boolean
        return pl.Schema(schema)

    def score(self, chunk: pl.DataFrame) -> pl.DataFrame:
        cols = self.source.columns
        raw = {name: self._ids(name, lambda: self.maps.as_raw(name, chunk[col])) for name, col in cols.items()}
        users = self._ids("user", lambda: self.maps.encode("user", raw["user"]))
        items = self._ids("item", lambda: self.maps.encode("item", raw["item"], unknown=self.unknown))
        if "category" in cols:
            cats = self._ids("category", lambda: self.maps.encode("category", raw["category"], unknown=self.unknown))
        else:
            cats = np.asarray(self.dataset.item_categories)[items].astype(np.int64)  # oov item -> 0
        logits = score_pairs(self.scorer, self.dataset, users, items, cats, length=self.length)
        probability = torch.sigmoid(torch.from_numpy(logits)).numpy()  # as Scorer.score computes it
        scored = chunk.with_columns(*(value.alias(cols[name]) for name, value in raw.items()),
                                    logit=pl.Series(logits), probability=pl.Series(probability))
        if self.unknown == "oov":
            known = (items != 0) & (cats != 0)
            self.n_unknown += int((~known).sum())
            scored = scored.with_columns(known=pl.Series(known))
        self.rows += chunk.height
        return scored

    def _ids(self, name: str, compute):
        """Run one id conversion; a bad raw id becomes one line naming file, row, column and value."""
        try:
            return compute()
        except RawIdError as err:
            row = self.rows + err.position + 1
            hint = "" if name != "user" or err.value is None else \
                " (an unknown user has no history to score, whatever --unknown says)"
            raise DataError(f"{err.reason}{hint} at row {row}", path=self.source.path, line=self.source.line(row),
                            column=self.source.columns[name], value=err.value) from None


def predict_file(*, checkpoint: str | Path, data: str | Path, input: str | Path, out: str | Path,  # noqa: A002
                 unknown: UnknownPolicy = "error", max_len: int | None = None, device: str = "cpu",
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, columns: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Score every (user, item[, category]) row of `input` (raw ids) and write `out` (Parquet).

    The output holds the input's columns (id columns in the dataset's raw dtype) plus `logit` and
    `probability` (float32), and with `unknown="oov"` a bool `known` (False where the item or category is
    unknown and was scored through the padding row), row for row in input order. An unknown user is an
    error under both policies (it has no history). Without `category`, an item's category is the
    dataset's.

    Raises:
        DataError: unreadable input, a missing column, a malformed or (under "error") unknown id (naming
            the file, row, column and value), or `out` exists without `overwrite`.
        ConfigError: the checkpoint was trained on another dataset, or a bad argument.
    """
    input_path, out = Path(input), Path(out)
    if unknown not in ("error", "oov"):
        raise ConfigError(f"--unknown must be 'error' or 'oov', got {unknown!r}")
    if chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    source = _open_input(input_path, columns)
    _check_out(out, input_path, overwrite)
    dataset = PreparedDataset.open(data)
    maps = IdMaps.open(data)
    scorer = load_scorer(checkpoint, dataset, device=device)
    length = scorer.config.max_len if max_len is None else max_len
    if length < 1:
        raise ConfigError(f"--max-len must be >= 1, got {length}")
    predictor = _Predictor(source, dataset, maps, scorer, unknown=unknown, length=length)
    progress = tqdm(total=source.rows, desc="predict", unit="row", unit_scale=True, disable=None)

    def chunks(*_: Any) -> Iterator[pl.DataFrame]:
        try:
            batches = source.frame.collect_batches(chunk_size=chunk_rows, lazy=True)
            for chunk in batches:
                yield predictor.score(chunk)
                progress.update(chunk.height)
        except (pl.exceptions.PolarsError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read the input after row {predictor.rows}: "
                            f"{str(err).strip().splitlines()[0]}", path=input_path) from None

    start = time.perf_counter()
    try:
        with atomic_file(out, "wb") as handle:
            register_io_source(chunks, schema=predictor.schema()).sink_parquet(handle)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    log.info("wrote %s: %d rows in %.1f s", out, predictor.rows, seconds)
    return {"input": str(input_path), "out": str(out), "rows": predictor.rows, "unknown_candidates": predictor.n_unknown,
            "seconds": seconds, "rows_per_second": predictor.rows / seconds if seconds > 0 else math.inf}
