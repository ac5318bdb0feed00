"""`prepare`: read a raw log, apply the protocol, write a prepared directory (what `darec prepare` calls)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from darec.data import readers
from darec.data.protocol import DEFAULT_BEHAVIORS, PreparedArrays, ProtocolConfig, build_splits
from darec.data.schema import CategoricalFeature, FeatureSchema, encode_categorical, normalise
from darec.data.store import PreparedDataset, is_prepared_dir, write_prepared
from darec.errors import ConfigError, DataError
from darec.io import check_output_dir

__all__ = ["prepare", "SOURCES", "SHIPPED_MOVIELENS", "read_source", "encode_features"]

log = logging.getLogger(__name__)

SOURCES = ("taobao", "tmall", "movielens", "generic")
SHIPPED_MOVIELENS = Path(__file__).resolve().parents[1] / "datasets" / "ml-latest-small" / "ratings.csv"


_TMALL_COLUMN = {"seller": "seller", "seller_id": "seller", "brand": "brand", "brand_id": "brand"}


def read_source(source: str, input: str | Path | None, *, behaviors: tuple[str, ...] | None,  # noqa: A002
                movies: str | Path | None = None, columns: Mapping[str, str] | None = None,
                skip_bad_rows: bool = False, schema: FeatureSchema | None = None) -> readers.RawEvents:
    """Dispatch to the reader of `source`; `behaviors=None` keeps the source's default behaviours.

    With a `schema`, the columns its features read are kept under the features' names (DataError naming
    the feature and column when the input has no such column)."""
    schema = schema or FeatureSchema()
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
    wanted = schema.columns  # feature name -> input column
    string_ids = schema.string_ids(source)
    if source == "tmall":
        _check_columns(wanted, _TMALL_COLUMN, input, "the Tmall layout")
        events = readers.read_tmall(input, behaviors=kept, skip_bad_rows=skip_bad_rows, string_ids=string_ids,
                                    extra=sorted({_TMALL_COLUMN[c] for c in wanted.values()}))
        frame = events.frame.with_columns(**{name: pl.col(_TMALL_COLUMN[c]) for name, c in wanted.items()})
        return dataclasses.replace(events, frame=frame)
    if source != "generic":
        _check_columns(wanted, {}, input, f"the {source} layout")
    if source == "taobao":
        return readers.read_taobao(input, behaviors=kept, skip_bad_rows=skip_bad_rows, string_ids=string_ids)
    if source == "movielens":
        read = readers.read_movielens_100k if input.name == "u.data" else readers.read_movielens
        return read(input, movies, skip_bad_rows=skip_bad_rows)
    if not columns:
        raise ConfigError("source 'generic' needs a column mapping (user=..,item=..,category=..,timestamp=..)")
    header = readers.file_columns(input)
    _check_columns(wanted, {c: c for c in header}, input, input.name)
    mapping = {**columns, **wanted}
    return readers.read_generic(input, columns=mapping, behaviors=kept, skip_bad_rows=skip_bad_rows,
                                string_ids=string_ids, numeric=[f.name for f in schema.numeric])


def _check_columns(wanted: Mapping[str, str], available: Mapping[str, str], path: Path, what: str) -> None:
    """DataError naming the first schema feature whose column the input does not have."""
    for name, column in wanted.items():
        if column not in available:
            shown = ", ".join(sorted(available)) or "none beyond user, item, category, behavior, timestamp"
            raise DataError(f"schema feature {name!r} reads column {column!r}, which {what} does not have "
                            f"(feature columns: {shown})", path=path, column=column)


def encode_features(events: readers.RawEvents, schema: FeatureSchema
                    ) -> tuple[dict[str, np.ndarray], dict[str, pl.Series], dict[str, Any]]:
    """The schema's features as per-event arrays in file order (int32 codes, float32 numbers), the raw
    values of every dictionary code (feature -> Series, code i+1 at row i) and the manifest's description."""
    columns: dict[str, np.ndarray] = {}
    maps: dict[str, pl.Series] = {}
    described: dict[str, Any] = {}
    path = events.paths[0] if events.paths else None
    categorical = [*schema.extra_features]
    if schema.behavior_type:
        categorical.append(CategoricalFeature(name="behavior", column="behavior", target=False))
    for feature in categorical:
        codes, raw = encode_categorical(events.frame[feature.name], name=feature.name, column=feature.column, encoding=feature.encoding,
                                        buckets=feature.buckets, max_vocabulary=feature.max_vocabulary, path=path)
        columns[feature.name] = codes
        if raw is not None:
            maps[feature.name] = raw
        described[feature.name] = {"kind": "categorical", "level": "behavior", "column": feature.column,
                                   "encoding": feature.encoding, "target": feature.target,
                                   "vocabulary": int(feature.buckets + 1 if raw is None else len(raw) + 1)}
    for feature in schema.user_features:
        codes, raw = encode_categorical(events.frame[feature.name], name=feature.name, column=feature.column,
                                        path=path)
        columns[feature.name], maps[feature.name] = codes, raw
        described[feature.name] = {"kind": "categorical", "level": "user", "column": feature.column,
                                   "encoding": "dictionary", "vocabulary": int(len(raw) + 1)}
    for feature in schema.numeric:
        columns[feature.name], stats = normalise(events.frame[feature.name], feature.normalize)
        described[feature.name] = {"kind": "numeric", "level": "behavior", "column": feature.column,
                                   "normalize": feature.normalize, "target": feature.target, **stats}
    return columns, maps, described


def prepare(*, source: str, out: str | Path, input: str | Path | None = None,  # noqa: A002
            config: ProtocolConfig | None = None, movies: str | Path | None = None,
            columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
            events: readers.RawEvents | None = None,
            extra: Callable[[Path, PreparedArrays], dict[str, Any] | None] | None = None,
            overwrite: bool = False, schema: FeatureSchema | None = None) -> PreparedDataset:
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
        schema: the features to keep (darec.data.schema); the default keeps item and category only and
            writes exactly what a prepare without a schema writes.

    Raises:
        DataError: bad or missing input, no user passes the click minimum, or `out` may not be replaced.
        ConfigError: inconsistent arguments.
    """
    schema = schema or FeatureSchema()
    config = _with_schema_behaviors(config or ProtocolConfig(), schema)
    given = [p for p in (input, movies) if p is not None]
    check_output_dir(out, replaceable=is_prepared_dir, overwrite=overwrite, protect=given)
    if events is None:
        events = read_source(source, input, behaviors=config.behaviors, movies=movies, columns=columns,
                             skip_bad_rows=skip_bad_rows, schema=schema)
    feature_columns, feature_maps, features = encode_features(events, schema)
    item_level = tuple(f.name for f in (*schema.extra_features, *schema.numeric) if f.target)
    prepared = build_splits(events.frame, config, source_path=events.paths[0] if events.paths else None,
                            columns=feature_columns, item_level=item_level,
                            user_level=tuple(f.name for f in schema.user_features))
    protocol = dataclasses.asdict(config)
    protocol["behaviors"] = list(config.behaviors or DEFAULT_BEHAVIORS.get(events.source) or []) or None
    if protocol["target_behaviors"] is None:
        del protocol["target_behaviors"]  # the paper's setting leaves the manifest as it was
    else:
        protocol["target_behaviors"] = list(protocol["target_behaviors"])
    manifest = {
        "source": events.source,
        "inputs": [Path(p).name for p in events.paths],  # names only: the output must not depend on where
        "protocol": protocol,
        "skipped_rows": int(events.n_skipped),
        "duplicate_rows": int(events.n_duplicates),
    }
    if not schema.is_default:
        manifest["schema"] = schema.model_dump(mode="json")
        manifest["features"] = features
    write_prepared(out, prepared, manifest=manifest, extra=extra, overwrite=overwrite,
                   protect=[*given, *events.paths], feature_maps=feature_maps)
    dataset = PreparedDataset.open(out)
    splits = dataset.manifest["splits"]
    log.info("prepared %s: %d users, %d items, %d categories; train/val/test = %d/%d/%d samples",
             out, dataset.n_users, dataset.n_items, dataset.n_categories,
             splits["train"]["samples"], splits["val"]["samples"], splits["test"]["samples"])
    return dataset


def _with_schema_behaviors(config: ProtocolConfig, schema: FeatureSchema) -> ProtocolConfig:
    """The protocol with the schema's kept and target behaviours (ConfigError when --behaviors disagrees)."""
    if schema.behaviors is None and schema.targets is None:
        return config
    if config.behaviors is not None and schema.behaviors is not None and config.behaviors != schema.behaviors:
        raise ConfigError(f"--behaviors {list(config.behaviors)} disagrees with the schema's behaviors "
                          f"{list(schema.behaviors)}; give one of them")
    return dataclasses.replace(config, behaviors=schema.behaviors or config.behaviors,
                               target_behaviors=schema.targets)
