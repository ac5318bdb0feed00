"""Samples → `Batch`: one vectorised gather of left-padded histories out of the CSR, no per-sample loop.

Notation: B = batch size, L = history length (`max_len`). Histories are oldest first and left-padded
with 0; slot j (0-based) gets position L - j, so the click just before the target is position 1.

Side features (docs/features.md): every per-behaviour code array of the dataset is gathered with the same
index as the items; the target's item-feature codes are `item_features[name][target item]`; the time
fields (time_gap, hour, weekday, when the schema asks for them) are computed here from the timestamps.
Numeric features travel the same way as float32 values (0 where padded) instead of int64 codes.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from darec.data.batch import Batch
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.models.config import FeatureField

__all__ = ["gather_histories", "history_index", "history_codes", "history_features", "BatchLoader",
           "time_gap_bucket", "time_codes", "feature_fields", "TIME_FIELDS"]

TIME_FIELDS = ("time_gap", "hour", "weekday")  # computed from timestamps, never stored
_TIME_VOCABULARY = {"hour": 25, "weekday": 8}   # codes 1..24 (UTC hour + 1), 1..7 (Monday = 1); 0 = padding


def history_index(offsets, users, cuts, max_len: int):
    """Global CSR index (B, L) of the slots of seq[max(0, cut - L):cut], left-padded (index 0 there),
    and the mask (B, L) of real slots. numpy arrays or torch tensors alike (the GPU path runs on the device)."""
    if isinstance(users, torch.Tensor):
        slots = torch.arange(max_len, device=users.device, dtype=torch.int64)
        start = offsets[users.long()] + cuts.long() - max_len  # (B,) global index of slot 0
        mask = slots[None, :] >= (max_len - cuts.long())[:, None]  # slot j is real iff j >= L - cut
        index = start[:, None] + slots[None, :]  # (B, L)
        return torch.where(mask, index, torch.zeros_like(index)), mask
    users = np.asarray(users, dtype=np.int64)
    cuts = np.asarray(cuts, dtype=np.int64)
    slots = np.arange(max_len, dtype=np.int64)
    index = (offsets[users] + cuts - max_len)[:, None] + slots[None, :]  # (B, L)
    mask = slots[None, :] >= (max_len - cuts)[:, None]
    return np.where(mask, index, 0), mask


def _take(values, index, mask):
    """values[index] with 0 where `mask` is False (padding), numpy or torch."""
    if isinstance(index, torch.Tensor):
        return torch.where(mask, values[index], torch.zeros((), dtype=values.dtype, device=values.device))
    return np.where(mask, values[index], 0)


def gather_histories(offsets, items, categories, users, cuts, max_len: int):
    """Histories seq[max(0, cut - L):cut] of each sample, left-padded to L.

    Works on numpy arrays or torch tensors alike (same index arithmetic), so the GPU path gathers on
    the device. Args: offsets (U+1,), items/categories (N,), users/cuts (B,). Returns (hist_items,
    hist_cats, mask), each (B, L); ids keep the dtype of `items`/`categories`, mask is bool.
    """
    index, mask = history_index(offsets, users, cuts, max_len)
    return _take(items, index, mask), _take(categories, index, mask), mask


def time_gap_bucket(gap_seconds, n_buckets: int):
    """Log-scale bucket of the time between a behaviour and its target (numpy or torch, int64 out).

    Code 0 is the target itself (and padding); 1 = same second (gap <= 0); b = 2 .. n_buckets - 1 holds gaps
    in [2^(b-2), 2^(b-1)) seconds (2: 1 s, 3: 2-3 s, 4: 4-7 s, ..., 18: 2^16 s ~ 18 h, 25: ~97 days);
    n_buckets holds everything from 2^(n_buckets-2) s on. The table has n_buckets + 1 rows.
    Exact for any int64 gap: the bucket is frexp's binary exponent + 1, no floating-point log."""
    if isinstance(gap_seconds, torch.Tensor):
        gap = gap_seconds.long()
        exponent = torch.frexp(gap.clamp(min=1).double())[1].long()        # gap = m 2^e, m in [0.5, 1)
        return torch.where(gap >= 1, (exponent + 1).clamp(max=n_buckets), torch.ones_like(gap))
    gap = np.asarray(gap_seconds, dtype=np.int64)
    exponent = np.frexp(np.maximum(gap, 1).astype(np.float64))[1].astype(np.int64)
    return np.where(gap >= 1, np.minimum(exponent + 1, n_buckets), 1)


def time_codes(name: str, stamps, reference, n_buckets: int):
    """Code of time field `name` for behaviours at `stamps` (seconds since the epoch, UTC), targets at
    `reference` (broadcast): time_gap = `time_gap_bucket(reference - stamps)`; hour = UTC hour + 1;
    weekday = 1 (Monday) .. 7. numpy or torch; 0 is left for padding and the target."""
    if name == "time_gap":
        return time_gap_bucket(reference - stamps, n_buckets)
    if name == "hour":
        return stamps // 3600 % 24 + 1
    if name == "weekday":
        return (stamps // 86400 + 3) % 7 + 1  # 1970-01-01 was a Thursday
    raise ConfigError(f"unknown time field {name!r}; known: {list(TIME_FIELDS)}")


def _time_settings(dataset: PreparedDataset) -> tuple[dict[str, int], str]:
    """The time fields the dataset's schema asks for (name -> vocabulary) and where they enter."""
    time = (dataset.manifest.get("schema") or {}).get("time") or {}
    fields = {}
    if time.get("gap"):
        fields["time_gap"] = int(time.get("gap_buckets", 32)) + 1
    fields.update({name: vocab for name, vocab in _TIME_VOCABULARY.items() if time.get(name)})
    return fields, str(time.get("enter", "score"))


def feature_fields(dataset: PreparedDataset, selected: str | Collection[str] = "all") -> tuple[FeatureField, ...]:
    """The side features of `dataset` a model reads, as `ModelConfig.features`.

    `selected`: "all" (every feature the model can read), "none", or names. Item features: categorical
    per-behaviour features with a target value; context: the others (behaviour type, `target: false`
    ones) and the time fields, entering the score only or (schema `time.enter: representation`) the
    representation too; user: per-user categorical features. Numeric features are item features (schema
    `target: true`) or context features the same way, read as their value times a vector (`FeatureField.numeric`).
    Unknown names: ConfigError listing the known."""
    time_fields, enter = _time_settings(dataset)
    context_enter = "both" if enter == "representation" else "score"
    available: dict[str, FeatureField] = {}
    for name, spec in dataset.feature_specs.items():
        if spec.get("kind") == "numeric":
            available[name] = (FeatureField(name, 1, "item", numeric=True) if spec.get("target")
                               else FeatureField(name, 1, "context", context_enter, numeric=True))
        elif spec.get("level") == "user":
            available[name] = FeatureField(name, int(spec["vocabulary"]), "user")
        elif spec.get("target"):
            available[name] = FeatureField(name, int(spec["vocabulary"]), "item")
        else:
            available[name] = FeatureField(name, int(spec["vocabulary"]), "context", context_enter)
    for name, vocabulary in time_fields.items():
        available[name] = FeatureField(name, vocabulary, "context", context_enter)
    if selected == "all":
        return tuple(available.values())
    if selected == "none":
        return ()
    for name in selected:
        if name not in available:
            raise ConfigError(f"unknown feature {name!r}: dataset {dataset.path} has "
                              f"{', '.join(available) or 'no side features'} (use --features none|all|NAME,NAME)")
    return tuple(available[name] for name in dict.fromkeys(selected))


class BatchLoader:
    """Iterates one split of a prepared dataset as `Batch`es.

    Shuffling uses the permutation of `np.random.default_rng([seed, epoch])`, so `batches(epoch, start)`
    reproduces exactly the batches a run would have seen after `start` steps of that epoch (resume).
    `max_len` may exceed the prepared one: longer histories come from the same CSR. On a CUDA device
    the CSR arrays live on the GPU and the gather runs there; only sample pointers cross the bus.

    `group_sets`: a split stores each positive followed by its negatives of the same user and cut (one
    candidate set, see protocol.py); with `group_sets` whole sets are shuffled and a batch holds
    `batch_size // set size` whole sets, so set-wise models and ranking losses see every set complete.
    Every batch carries `candidate_set` ids (rows of one user and cut share one) in either mode.

    `shard=(rank, world_size)`: this process reads only its share of every global batch (multi-process
    training, darec/train/distributed.py): a contiguous run of the batch's rows (whole sets with
    `group_sets`), shares differing by at most one row (set). Every rank gets the same number of
    non-empty batches, as DDP and sharded tables need: a batch with fewer rows (sets) than ranks hands its
    last row (set) to the ranks past its end again (evaluation drops such repeats by row index).

    `features`: names of the side features to gather (see `feature_fields`); None: every one the dataset has.
    """

    def __init__(self, dataset: PreparedDataset, split: str, *, batch_size: int, shuffle: bool = False,
                 seed: int = 0, max_len: int | None = None, drop_last: bool = False,
                 device: str | torch.device = "cpu", group_sets: bool = False,
                 shard: tuple[int, int] = (0, 1), features: Collection[str] | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.max_len = int(max_len if max_len is not None else dataset.max_len)
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        self.samples = dataset.split(split)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.group_sets = group_sets
        if not 0 <= shard[0] < shard[1]:
            raise ConfigError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.shard = shard
        keys = _request_keys(self.samples)
        self._set_starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        self._sets_per_batch = max(1, batch_size * len(self._set_starts) // max(len(self.samples), 1))
        self.device = torch.device(device)
        self._on_device = self.device.type != "cpu"
        if self._on_device:
            self._csr = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
                              for a in (dataset.offsets, dataset.items, dataset.categories))
        else:
            self._csr = (np.asarray(dataset.offsets), np.asarray(dataset.items), np.asarray(dataset.categories))
        wanted = {f.name for f in feature_fields(dataset)} if features is None else set(features)
        self._time_fields = {n: v for n, v in _time_settings(dataset)[0].items() if n in wanted}
        self._tables = {level: {n: self._array(a) for n, a in arrays.items() if n in wanted}
                        for level, arrays in (("event", dataset.event_features), ("item", dataset.item_features),
                                              ("user", dataset.user_features))}
        if self._time_fields:
            self._tables["time"] = {"timestamps": self._array(dataset.timestamps)}
        self._positions = torch.arange(self.max_len, 0, -1, dtype=torch.int64, device=self.device)  # (L,)

    def __len__(self) -> int:
        n, per = (len(self._set_starts), self._sets_per_batch) if self.group_sets else (len(self.samples), self.batch_size)
        return n // per if self.drop_last else math.ceil(n / per)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of `epoch` in visiting order."""
        if self.group_sets:
            return self._set_order(epoch)[0]
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def _set_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of whole candidate sets in visiting order, and where each batch starts in that order."""
        sizes = np.diff(np.r_[self._set_starts, len(self.samples)])
        sets = np.arange(len(sizes))
        if self.shuffle:
            sets = np.random.default_rng([self.seed, epoch]).permutation(len(sizes))
        lengths = sizes[sets]
        ends = np.cumsum(lengths)
        rows = np.repeat(self._set_starts[sets] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        bounds = np.r_[0, ends][::self._sets_per_batch]
        return rows, np.r_[bounds, len(rows)] if bounds[-1] != len(rows) else bounds

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, skipping the first `start` (cheap: nothing is gathered for them)."""
        for index in self.indices(epoch, start):
            yield self._batch(index)

    def indices(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """Sample indices of the batches of `epoch` from batch `start` on (this rank's share of each)."""
        if self.group_sets:
            order, bounds = self._set_order(epoch)
        else:
            order = self.order(epoch)
            bounds = np.minimum(np.arange(len(self) + 1) * self.batch_size, len(order))
        for b in range(start, len(self)):
            yield self._share(order[bounds[b]:bounds[b + 1]])

    def _share(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous run of whole units (rows, or candidate sets) of one global batch."""
        rank, world = self.shard
        if world == 1:
            return index
        if self.group_sets:
            keys = _request_keys(self.samples[index])
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        else:
            starts = np.arange(len(index))
        edges = np.r_[starts, len(index)]
        units = len(starts)
        if units < world:  # too few to share: ranks past the end repeat the last unit
            first = min(rank, units - 1)
            return index[edges[first]:edges[first + 1]]
        cuts = np.arange(world + 1) * units // world
        return index[edges[cuts[rank]]:edges[cuts[rank + 1]]]

    def _batch(self, index: np.ndarray) -> Batch:
        rows = self.samples[index]  # structured (B,) copy of the pointers
        columns = {name: torch.from_numpy(rows[name].astype(np.int64)) for name in ("user", "cut", "item", "category")}
        label = torch.from_numpy(rows["label"].astype(np.float32))
        if self._on_device:
            columns = {k: v.to(self.device, non_blocking=True) for k, v in columns.items()}
            label = label.to(self.device, non_blocking=True)
            users, cuts, items = columns["user"], columns["cut"], columns["item"]
        else:
            users, cuts, items = (rows[k].astype(np.int64) for k in ("user", "cut", "item"))
        slots, mask = history_index(self._csr[0], users, cuts, self.max_len)  # (B, L), shared by every field
        hist_items, hist_cats = (self._tensor(_take(values, slots, mask)) for values in self._csr[1:])
        positions = self._positions.expand(len(index), -1)  # (B, L), same for every row: a stride-0 view
        sets = torch.from_numpy(np.unique(_request_keys(rows), return_inverse=True)[1].reshape(-1))
        return Batch(hist_items=hist_items, hist_categories=hist_cats, hist_positions=positions,
                     mask=mask if self._on_device else torch.from_numpy(mask),
                     target_item=columns["item"], target_category=columns["category"], label=label,
                     user=columns["user"], candidate_set=sets.to(self.device, non_blocking=True),
                     **self._features(users, cuts, items, slots, mask))

    def _array(self, values: np.ndarray) -> Any:
        """A code (value) array as the gather reads it: int64 (float32) on the device, or the memory-mapped
        numpy array."""
        if self._on_device:
            return torch.from_numpy(np.ascontiguousarray(values, dtype=_batch_dtype(values))).to(self.device)
        return np.asarray(values)

    def _tensor(self, codes: Any) -> torch.Tensor:
        """Gathered codes (values) as the batch holds them: int64 (float32) tensors (already so on the device)."""
        return codes if self._on_device else torch.from_numpy(np.asarray(codes, dtype=_batch_dtype(codes)))

    def _features(self, users: Any, cuts: Any, items: Any, slots: Any, mask: Any) -> dict[str, dict[str, torch.Tensor]]:
        """hist_features (B, L), target_features and user_features (B,) of the batch: gathered at the items'
        CSR index `slots`, and the time fields from the timestamps (the target's is its event's)."""
        if not any(self._tables.values()):
            return {}
        stamps = self._tables.get("time", {}).get("timestamps")
        reference = None if stamps is None else stamps[self._csr[0][users] + cuts]   # (B,) the target's time
        hist = history_codes(self._tables["event"], stamps, self._time_fields, slots, mask, reference)
        return {"hist_features": {n: self._tensor(a) for n, a in hist.items()},
                "target_features": {n: self._tensor(a[items]) for n, a in self._tables["item"].items()},
                "user_features": {n: self._tensor(a[users]) for n, a in self._tables["user"].items()}}


def history_codes(events: Mapping[str, Any], stamps: Any, time_fields: Mapping[str, int], index: Any, mask: Any,
                  reference: Any) -> dict[str, Any]:
    """Side-feature codes (B, L) of the behaviours at CSR `index` (B, L), 0 where `mask` is False: each
    per-behaviour code array in `events` gathered there, and each time field (name -> vocabulary) computed
    from `stamps` against the targets' times `reference` (B,). numpy arrays or torch tensors alike."""
    codes = {name: _take(values, index, mask) for name, values in events.items()}
    for name, vocabulary in time_fields.items():
        codes[name] = time_codes(name, stamps[index], reference[:, None], vocabulary - 1) * mask
    return codes


def history_features(dataset: PreparedDataset, index: np.ndarray, mask: np.ndarray,
                     reference: np.ndarray) -> dict[str, np.ndarray]:
    """Every side-feature code (numeric value) (B, L) the loader would gather for behaviours at CSR `index`, as
    a batch holds it (int64, float32), with time fields relative to `reference` (B,) seconds: for callers with
    an index of their own (serving)."""
    time_fields = _time_settings(dataset)[0]
    events = {n: np.asarray(a) for n, a in dataset.event_features.items()}
    codes = history_codes(events, np.asarray(dataset.timestamps), time_fields, index, mask, np.asarray(reference))
    return {n: c.astype(_batch_dtype(c), copy=False) for n, c in codes.items()}


def _batch_dtype(values: Any) -> type:
    """What a batch holds for a feature array: float32 for numeric values, int64 for codes."""
    return np.float32 if np.asarray(values).dtype.kind == "f" else np.int64


def _request_keys(rows: np.ndarray) -> np.ndarray:
    """One int64 per sample, equal exactly for samples of the same user and cut (one candidate set)."""
    return (rows["user"].astype(np.int64) << 32) | rows["cut"].astype(np.int64)
