"""Raw request values -> the internal ids and codes the model reads, as `darec prepare` encoded the log.

Ids (users, items, categories) go through the dataset's id maps; an explicit history's side features through
what prepare used: a dictionary feature's map (ids/features/NAME.parquet), prepare's own hash encoder, the
loader's time functions against the target time, the normalisation recorded for a numeric feature. Every
problem with a value is the `HTTPException` that refuses the request, naming its field: 422 for a malformed or missing value, 404 for an unknown id under
the `error` policy (docs/serving.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from fastapi import HTTPException

from darec.data.id_maps import ID_KINDS, IdMaps, UnknownPolicy, feature_kind
from darec.data.loader import TIME_FIELDS, history_codes
from darec.data.schema import apply_normalisation, encode_categorical
from darec.data.store import PreparedDataset
from darec.errors import DataError
from darec.models.config import ModelConfig

if TYPE_CHECKING:
    from darec.serve.app import HistoryIn

__all__ = ["RequestEncoder"]


class RequestEncoder:
    """Encodes the raw values of requests for one model and dataset (read-only after construction)."""

    def __init__(self, dataset: PreparedDataset, maps: IdMaps, config: ModelConfig, *, unknown: UnknownPolicy) -> None:
        self.dataset, self.maps, self.unknown, self.max_len = dataset, maps, unknown, config.max_len
        self.category_of_item = np.asarray(dataset.item_categories, dtype=np.int64)  # (n_items,), small
        self.integer_ids = {kind: maps.raw_dtype(kind) == pl.Int64 for kind in ID_KINDS}
        # what an explicit history must carry for this model: per-behaviour features (besides the time
        # fields, computed from the timestamps), time fields (name -> vocabulary), user features
        self.behaviour_features = tuple(f for f in config.features if f.kind != "user" and f.name not in TIME_FIELDS)
        self.time_fields = {f.name: f.vocabulary for f in config.features if f.name in TIME_FIELDS}
        self.user_features = tuple(f.name for f in config.features if f.kind == "user")

    def ids(self, kind: str, raw: list | pl.Series, field: str, *, allow_unknown: bool,
            noun: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Internal ids (codes) of `kind` and a known-mask; an unknown id is a 404 unless the policy is oov and
        `allow_unknown` (then it maps to the padding row, code 0). A value of the wrong kind is a 422."""
        # validated integers (StrictInt, 64-bit) as an int64 array take IdMaps' numpy-only path
        integers = self.integer_ids[kind] if kind in self.integer_ids else self.maps.raw_dtype(kind) == pl.Int64
        values = np.array(raw, dtype=np.int64) if integers else raw
        try:
            ids = self.maps.encode(kind, values, unknown="oov")
        except DataError as err:
            raise HTTPException(422, f"{field}: {err}") from None
        known = ids != self.maps.oov_id(kind)
        if not known.all() and not (allow_unknown and self.unknown == "oov"):
            unknown = np.asarray(raw, dtype=object)[~known]
            raise HTTPException(404, f"{field}: {len(unknown)} {noun or kind + ' id(s)'} not in the dataset, first "
                                     f"{unknown[:5].tolist()}")
        return ids, known

    def item_categories(self, items: np.ndarray, raw: list | None, field: str) -> np.ndarray:
        """The category ids sent, or each item's category in the dataset when none were."""
        if raw is None:
            return self.category_of_item[items]
        return self.ids("category", raw, field, allow_unknown=True)[0]

    def history(self, history: HistoryIn) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The explicit history as model inputs, {field: (N,)} in time order and cut to max_len: "items",
        "categories", each side feature of a behaviour the model reads (time fields from the timestamps, as
        the loader computes them), and the user's feature codes. Unknown behaviours (oov) stay as masked slots."""
        items = self.ids("item", history.items, "history.items", allow_unknown=True)[0]
        fields = {"items": items, "categories": self.item_categories(items, history.categories, "history.categories")}
        fields |= self._behaviour_codes(history.features or {})
        stamps = self._timestamps(history)
        order = np.arange(len(items)) if history.timestamps is None else np.argsort(stamps, kind="stable")
        kept = order[-self.max_len:]
        fields = {name: values[kept] for name, values in fields.items()}
        if self.time_fields:
            latest = stamps[order[-1]] if len(order) else 0
            reference = np.array([latest if history.time is None else self._seconds([history.time], "history.time")[0]])
            slots = np.arange(len(kept))[None, :]
            codes = history_codes({}, stamps[kept], self.time_fields, slots, np.ones(slots.shape, bool), reference)
            fields |= {name: values[0] for name, values in codes.items()}
        return fields, self._user_codes(history.user_features or {})

    def _behaviour_codes(self, given: dict[str, list]) -> dict[str, np.ndarray]:
        """(N,) codes of every per-behaviour side feature the model reads, from the raw values sent."""
        read = {f.name for f in self.behaviour_features}
        extra = sorted(set(given) - read)
        if extra:
            raise HTTPException(422, f"history.features.{extra[0]}: this model reads no such behaviour feature "
                                     f"(it reads {', '.join(sorted(read)) or 'none'})")
        codes = {}
        for feature in self.behaviour_features:
            field = f"history.features.{feature.name}"
            if feature.name not in given:
                raise HTTPException(422, f"{field}: missing; this model reads side features per behaviour "
                                         f"({', '.join(f.name for f in self.behaviour_features)}): give one raw "
                                         "value per behaviour (null where missing)")
            encode = self._numeric_values if feature.numeric else self._feature_codes
            codes[feature.name] = encode(feature.name, given[feature.name], field)
        return codes

    def _user_codes(self, given: dict[str, Any]) -> dict[str, int]:
        """The code of each user feature the model reads: the raw value's, 0 (missing) when not given."""
        extra = sorted(set(given) - set(self.user_features))
        if extra:
            raise HTTPException(422, f"history.user_features.{extra[0]}: this model reads no such user feature "
                                     f"(it reads {', '.join(self.user_features) or 'none'})")
        return {name: int(self._feature_codes(name, [given.get(name)], f"history.user_features.{name}")[0])
                for name in self.user_features}

    def _numeric_values(self, name: str, raw: list, field: str) -> np.ndarray:
        """float32 values of numeric feature `name` under the normalisation prepare recorded for it (the
        manifest's statistics), null (missing) -> 0, as the stored values are."""
        try:
            values = pl.Series(name, raw, dtype=pl.Float64, strict=True)
        except (TypeError, ValueError, pl.exceptions.PolarsError):
            raise HTTPException(422, f"{field}: values must be numbers (or null)") from None
        spec = self.dataset.feature_specs[name]
        return apply_normalisation(values, spec["normalize"], spec)

    def _feature_codes(self, name: str, raw: list, field: str) -> np.ndarray:
        """int64 codes of raw values of categorical feature `name`, encoded as prepare encoded the column: a
        dictionary feature through its map ids/features/NAME.parquet (an unknown value follows the unknown-id
        policy), a hash feature with prepare's own encoder; null (missing) is code 0 either way."""
        spec = self.dataset.feature_specs[name]
        dictionary = spec["encoding"] != "hash"
        allowed = {self.maps.raw_dtype(feature_kind(name))} if dictionary else {pl.Int64, pl.String}
        try:
            values = pl.Series(name, raw, strict=True)  # as sent: integers, strings or nulls, never mixed
        except (TypeError, ValueError, pl.exceptions.PolarsError):
            values = None
        if values is None or values.dtype not in allowed | {pl.Null}:
            kind = " or ".join(sorted("integers" if dtype == pl.Int64 else "strings" for dtype in allowed))
            raise HTTPException(422, f"{field}: values must be {kind} (or null), all of one kind, as this "
                                     f"dataset's {name} values are")
        if not dictionary:
            return encode_categorical(values, name=name, column=spec["column"], encoding="hash",
                                      buckets=int(spec["vocabulary"]) - 1)[0].astype(np.int64)
        present = values.is_not_null().to_numpy()
        codes = np.zeros(len(values), dtype=np.int64)
        if present.any():
            codes[present] = self.ids(feature_kind(name), values.drop_nulls(), field, allow_unknown=True,
                                      noun=f"{name} value(s)")[0]
        return codes

    def _timestamps(self, history: HistoryIn) -> np.ndarray | None:
        """The timestamps as float64, or int64 seconds when the model computes time features from them."""
        if history.timestamps is None:
            if self.time_fields and history.items:
                raise HTTPException(422, f"history.timestamps: this model reads time features "
                                         f"({', '.join(self.time_fields)}); give one timestamp per behaviour")
            return np.zeros(0, dtype=np.int64) if self.time_fields else None  # (an empty history)
        stamps = np.asarray(history.timestamps, dtype=np.float64)
        return self._seconds(stamps, "history.timestamps") if self.time_fields else stamps

    @staticmethod
    def _seconds(values: Any, field: str) -> np.ndarray:
        """int64 whole seconds (time features are computed from them, like the dataset's timestamps)."""
        values = np.asarray(values, dtype=np.float64)
        bad = np.flatnonzero((values != np.floor(values)) | (np.abs(values) > 2.0 ** 53))
        if bad.size:
            raise HTTPException(422, f"{field}: time features need whole seconds since the epoch, got "
                                     f"{float(values[bad[0]])} at index {bad[0]}")
        return values.astype(np.int64)
