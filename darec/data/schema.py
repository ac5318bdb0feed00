"""The feature schema: which columns of the user's log become model features, and how they are encoded.

A schema is a YAML file validated here (pydantic); `darec prepare --schema FILE` applies it. The default
(`FeatureSchema()`, shipped as `darec/configs/schemas/default.yaml`) is exactly the paper's setting:
every behaviour and target is (item, category), clicks only, nothing else stored, so a dataset prepared
with it is byte-identical to one prepared without a schema.

    raw_ids: auto              # auto (integers for the published layouts, detected for generic) | integer | string
    behaviors: [pv, buy]       # behaviour types kept in histories (null: the source's default)
    targets: [pv]              # behaviour types that are prediction targets (null: every kept one)
    features:                  # categorical features of every behaviour; item and category come first
      - {name: item, column: item}
      - {name: category, column: category}
      - {name: brand, column: brand, encoding: hash, buckets: 100000}
    behavior_type: true        # the behaviour's type as a history feature (multi-behaviour sequences)
    time: {gap: true, hour: false, weekday: false, gap_buckets: 24}
    user_features: [{name: segment, column: segment}]
    numeric: [{name: price, column: price, normalize: standard, target: true}, {name: dwell, column: dwell}]

Encodings: `dictionary` numbers values 1..n in order of first appearance (0 = missing / padding) and saves
the raw <-> code map under ids/features/; `hash` maps a value to 1..buckets (0 = missing) with polars'
seeded hash, no map. A dictionary feature with more than `max_vocabulary` values is refused (use hash).
A feature other than item and category with `target: true` (default) is a property of the item: the
target's value is the item's value at its last kept event, for positives and negatives alike.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from darec.data.id_maps import raw_id_column
from darec.errors import ConfigError, DataError

__all__ = ["FeatureSchema", "CategoricalFeature", "NumericFeature", "TimeFeatures", "load_schema",
           "SHIPPED_SCHEMAS", "BASE_FEATURES", "encode_categorical", "normalise", "apply_normalisation"]

SHIPPED_SCHEMAS = Path(__file__).resolve().parents[1] / "configs" / "schemas"
BASE_FEATURES = ("item", "category")
_NAME = r"^[a-z][a-z0-9_]{0,39}$"
_RESERVED = {"user", "timestamp", "behavior", "position", "time_gap", "hour", "weekday"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CategoricalFeature(_Strict):
    """One categorical column read for every behaviour (and the target, when `target`)."""

    name: str = Field(pattern=_NAME)
    column: str = Field(min_length=1)
    encoding: Literal["dictionary", "hash"] = "dictionary"
    buckets: int | None = Field(default=None, ge=1, le=2**31 - 2)  # hash only
    max_vocabulary: int = Field(default=50_000_000, ge=1, le=2**31 - 2)  # dictionary only
    target: bool = True

    @model_validator(mode="after")
    def _buckets_iff_hash(self) -> "CategoricalFeature":
        if (self.encoding == "hash") != (self.buckets is not None):
            raise ValueError(f"feature {self.name!r}: 'buckets' goes with encoding 'hash' (and is required there)")
        return self

    @property
    def vocabulary(self) -> int | None:
        """Rows its table needs (incl. 0) when known from the schema alone (hash), else None."""
        return self.buckets + 1 if self.buckets is not None else None


class UserFeature(_Strict):
    """A categorical property of the user (its value on the user's last kept row), dictionary-encoded."""

    name: str = Field(pattern=_NAME)
    column: str = Field(min_length=1)


class NumericFeature(_Strict):
    """A numeric column of every behaviour, normalised with statistics over all kept events; a missing value
    becomes 0 after normalising (the mean for standard, the minimum for minmax, log 1 for log).

    `target: true`: a property of the item (price): the target's value is the item's value at its last kept
    event, stored per item like a categorical item feature. Default false: a property of the behaviour
    (dwell time, watch ratio), the target sitting at 0."""

    name: str = Field(pattern=_NAME)
    column: str = Field(min_length=1)
    normalize: Literal["standard", "minmax", "log", "none"] = "standard"
    target: bool = False


class TimeFeatures(_Strict):
    """Time features computed at batch time from the stored timestamps (seconds since the epoch, UTC).

    `gap`: bucket of (target time - behaviour time) on a log2 scale: 0 padding, 1 = same second, b =
    gap in [2^(b-2), 2^(b-1)) seconds, capped at `gap_buckets`. `enter`: the bucket and type embeddings
    go into the attention score only (like the position bias) or into the representation too."""

    gap: bool = False
    gap_buckets: int = Field(default=32, ge=2, le=64)
    hour: bool = False
    weekday: bool = False
    enter: Literal["score", "representation"] = "score"


class FeatureSchema(_Strict):
    """What `darec prepare` keeps beyond (item, category); the defaults reproduce the paper exactly."""

    raw_ids: Literal["auto", "integer", "string"] = "auto"
    behaviors: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    features: tuple[CategoricalFeature, ...] = (CategoricalFeature(name="item", column="item"),
                                                CategoricalFeature(name="category", column="category"))
    behavior_type: bool = False
    time: TimeFeatures = TimeFeatures()
    user_features: tuple[UserFeature, ...] = ()
    numeric: tuple[NumericFeature, ...] = ()

    @field_validator("behaviors", "targets")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("must name at least one behaviour type, or be null")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureSchema":
        first = tuple((f.name, f.column, f.encoding) for f in self.features[:2])
        if first != (("item", "item", "dictionary"), ("category", "category", "dictionary")):
            raise ValueError("features must start with {name: item, column: item} and {name: category, "
                             "column: category}, dictionary-encoded (the ids every model reads)")
        names = [f.name for f in (*self.features, *self.user_features, *self.numeric)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"feature name {repeated[0]!r} is used twice")
        reserved = sorted(set(names) & _RESERVED)
        if reserved:
            raise ValueError(f"feature name {reserved[0]!r} is reserved; name it otherwise")
        if self.targets is not None and self.behaviors is not None and set(self.targets) - set(self.behaviors):
            raise ValueError(f"targets {sorted(set(self.targets) - set(self.behaviors))} are not among the kept "
                             f"behaviors {list(self.behaviors)}")
        return self

    @property
    def extra_features(self) -> tuple[CategoricalFeature, ...]:
        """The categorical features beyond item and category."""
        return self.features[2:]

    @property
    def columns(self) -> dict[str, str]:
        """Input column of every feature stored beside the canonical ones (feature name -> column)."""
        return {f.name: f.column for f in (*self.extra_features, *self.user_features, *self.numeric)}

    @property
    def is_default(self) -> bool:
        """True when nothing beyond the paper's setting is asked for (datasets are then unchanged)."""
        return self == FeatureSchema(raw_ids=self.raw_ids, behaviors=self.behaviors)

    def string_ids(self, source: str) -> bool | None:
        """The readers' `string_ids` argument for `source` (see readers._STRING_IDS_DOC)."""
        if self.raw_ids != "auto":
            return self.raw_ids == "string"
        return None if source == "generic" else False


def load_schema(path: str | Path | None) -> FeatureSchema:
    """A schema file (or a shipped one by name: default, taobao, tmall); None -> the default schema.

    Raises ConfigError with one line naming the file and the first invalid field."""
    if path is None:
        return FeatureSchema()
    path = Path(path)
    if not path.exists() and (SHIPPED_SCHEMAS / f"{path.name}.yaml").is_file() and path.parent == Path("."):
        path = SHIPPED_SCHEMAS / f"{path.name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read the schema file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"schema file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return FeatureSchema.model_validate(data or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        shown = first.get("input") if first["type"] != "missing" else None
        detail = f" (value {shown!r})" if isinstance(shown, (int, float, str)) else ""
        raise ConfigError(f"schema file {path}: {where or 'schema'}: {first['msg']}{detail}") from None


# ---- encoding: raw feature columns -> int32 codes (0 = missing) / normalised float32 -------------------

def encode_categorical(values: pl.Series, *, name: str, column: str, encoding: str = "dictionary",
                       buckets: int | None = None, max_vocabulary: int = 2**31 - 2,
                       path: object = None) -> tuple[np.ndarray, pl.Series | None]:
    """int32 codes of one column (0 where missing) and, for a dictionary, the raw value of code 1, 2, ….

    Dictionary codes follow first appearance; hash codes are 1 + (seeded 64-bit hash of the text) % buckets.
    Raises DataError (naming the feature, column and first value past the limit) when a dictionary would
    exceed `max_vocabulary`."""
    if encoding == "hash":
        hashed = values.cast(pl.String).hash(seed=_HASH_SEED) % buckets + 1
        return hashed.fill_null(0).cast(pl.Int32).to_numpy(), None
    uniques = values.drop_nulls().unique(maintain_order=True)
    if len(uniques) > max_vocabulary:
        raise DataError(f"feature {name!r} has {len(uniques):,} distinct values, more than its max_vocabulary "
                        f"{max_vocabulary:,} for a dictionary encoding; use encoding: hash with buckets",
                        path=path, column=column, value=_shown(uniques[max_vocabulary]))
    table = pl.DataFrame({"key": uniques, "code": np.arange(1, len(uniques) + 1, dtype=np.int32)})
    codes = pl.DataFrame({"key": values}).join(table, on="key", how="left", maintain_order="left")["code"]
    return codes.fill_null(0).to_numpy().astype(np.int32), raw_id_column(uniques)


def normalise(values: pl.Series, how: str) -> tuple[np.ndarray, dict[str, float]]:
    """float32 values normalised over all kept events (missing -> 0 after normalising) and the statistics
    used, which the manifest records so that serving can apply the same map (`apply_normalisation`)."""
    x = values.cast(pl.Float64)
    stats: dict[str, float] = {}
    if how == "standard":
        stats = {"mean": float(x.mean() or 0.0), "std": float(x.std() or 0.0) or 1.0}
    elif how == "minmax":
        stats = {"min": float(x.min() or 0.0), "max": float(x.max() or 0.0)}
    return apply_normalisation(x, how, stats), stats


def apply_normalisation(values: pl.Series, how: str, stats: Mapping[str, float]) -> np.ndarray:
    """float32 values under a recorded normalisation (`how` and its statistics, as the manifest's
    `features.NAME` holds them), missing -> 0: the map `prepare` applied, for values that arrive later."""
    x = values.cast(pl.Float64)
    if how == "log":
        x = (x.clip(lower_bound=0) + 1).log()
    elif how == "standard":
        x = (x - stats["mean"]) / stats["std"]
    elif how == "minmax":
        x = (x - stats["min"]) / ((stats["max"] - stats["min"]) or 1.0)
    return x.fill_null(0.0).fill_nan(0.0).cast(pl.Float32).to_numpy()


def _shown(value: object) -> object:
    text = str(value)
    return value if len(text) <= 80 else text[:80] + "…"


_HASH_SEED = 20250101
