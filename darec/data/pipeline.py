"""`prepare`: read a raw log, apply the protocol, write a prepared directory (what `darec prepare` calls)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from darec.data import readers
from darec.data.protocol import DEFAULT_BEHAVIORS, PreparedArrays, ProtocolConfig, build_splits
from darec.data.store import PreparedDataset, is_prepared_dir, write_prepared
from darec.errors import ConfigError
from darec.io import check_output_dir

__all__ = ["prepare", "SOURCES", "SHIPPED_MOVIELENS", "read_source"]

log = logging.getLogger(__name__)

SOURCES = ("taobao", "tmall", "movielens", "generic")
SHIPPED_MOVIELENS = Path(__file__).resolve().parents[1] / "datasets" / "ml-latest-small" / "ratings.csv"


def read_source(source: str, input: str | Path | None, *, behaviors: tuple[str, ...] | None,  # noqa: A002
                movies: str | Path | None = None, columns: Mapping[str, str] | None = None,
                skip_bad_rows: bool = False) -> readers.RawEvents:
    """Dispatch to the reader of `source`; `behaviors=None` keeps the source's default behaviours."""
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; expected one of {SOURCES}")
    if columns and source != "generic":
        raise ConfigError(f"--columns applies only to --source generic, not {source!r} (its columns are fixed)")
    if movies is not None and source != "movielens":
        raise ConfigError(f"--movies applies only to --source movielens, not {source!r}")
    if input is None:
        if source != "movielens":
            raise ConfigError(f"--input is required for source {source!r}")
        input = SHIPPED_MOVIELENS
    input = Path(input)
    kept = behaviors if behaviors is not None else DEFAULT_BEHAVIORS[source]
    if source == "taobao":
        return readers.read_taobao(input, behaviors=kept, skip_bad_rows=skip_bad_rows)
    if source == "tmall":
        return readers.read_tmall(input, behaviors=kept, skip_bad_rows=skip_bad_rows)
    if source == "movielens":
        read = readers.read_movielens_100k if input.name == "u.data" else readers.read_movielens
        return read(input, movies, skip_bad_rows=skip_bad_rows)
    if not columns:
        raise ConfigError("source 'generic' needs a column mapping (user=..,item=..,category=..,timestamp=..)")
    return readers.read_generic(input, columns=columns, behaviors=kept, skip_bad_rows=skip_bad_rows)


def prepare(*, source: str, out: str | Path, input: str | Path | None = None,  # noqa: A002
            config: ProtocolConfig | None = None, movies: str | Path | None = None,
            columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
            events: readers.RawEvents | None = None,
            extra: Callable[[Path, PreparedArrays], dict[str, Any] | None] | None = None,
            overwrite: bool = False) -> PreparedDataset:
    """Turn a raw log into a prepared directory at `out` (swapped in atomically; untouched on error).

    An existing `out` is replaced only when it is a dataset darec wrote (or, with `overwrite`, another
    folder); a file, or a folder holding an input, never. That is checked before reading the input.

    Args:
        source: taobao, tmall, movielens or generic (ignored when `events` is given).
        out: output directory.
        input: the raw file; defaults to the shipped MovieLens copy for `movielens`.
        config: protocol numbers; defaults reproduce the paper.
        movies: MovieLens movies file (default: beside `input`).
        columns: generic source only, canonical name → file column.
        skip_bad_rows: drop (and count) malformed rows instead of failing on the first.
        events: already-read events (used by `darec synth`).
        extra: `extra(tmp_dir, arrays)` writes more files into the output and returns manifest fields.
        overwrite: replace an existing `out` folder that darec did not write (and everything in it).

    Raises:
        DataError: bad or missing input, no user passes the click minimum, or `out` may not be replaced.
        ConfigError: inconsistent arguments.
    """
    config = config or ProtocolConfig()
    given = [p for p in (input, movies) if p is not None]
    check_output_dir(out, replaceable=is_prepared_dir, overwrite=overwrite, protect=given)
    if events is None:
        events = read_source(source, input, behaviors=config.behaviors, movies=movies, columns=columns,
                             skip_bad_rows=skip_bad_rows)
    prepared = build_splits(events.frame, config, source_path=events.paths[0] if events.paths else None)
    protocol = dataclasses.asdict(config)
    protocol["behaviors"] = list(config.behaviors or DEFAULT_BEHAVIORS.get(events.source) or []) or None
    manifest = {
        "source": events.source,
        "inputs": [Path(p).name for p in events.paths],  # names only: the output must not depend on where
        "protocol": protocol,
        "skipped_rows": int(events.n_skipped),
        "duplicate_rows": int(events.n_duplicates),
    }
    write_prepared(out, prepared, manifest=manifest, extra=extra, overwrite=overwrite,
                   protect=[*given, *events.paths])
    dataset = PreparedDataset.open(out)
    splits = dataset.manifest["splits"]
    log.info("prepared %s: %d users, %d items, %d categories; train/val/test = %d/%d/%d samples",
             out, dataset.n_users, dataset.n_items, dataset.n_categories,
             splits["train"]["samples"], splits["val"]["samples"], splits["test"]["samples"])
    return dataset
