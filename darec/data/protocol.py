"""The DARE data protocol (Feng et al., ICLR 2025, §5 and the official preprocessing): kept clicks → splits.

Per kept user with T clicks h[0..T-1] (oldest first), `targets="paper"`: test target h[T-1], validation
h[T-2] and `n_train_targets` training targets at offsets 3, 8, …, 93 from the end. `targets="dense"` (for
small logs, where the paper's 2 evaluation targets per user give AUCs too noisy to compare): every click
after the first `min_history` is a target, split by time within each user: the last `test_fraction` of a
user's targets are test, the `val_fraction` before them validation, the rest training. Each positive gets
`n_negatives` items drawn with probability ∝ global click frequency, never one the user clicked at any
time. A sample is only a pointer (user row, cut, target, label); its history is the CSR slice
seq[max(0, cut - max_len):cut], gathered at batch time (see loader.py).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl

from darec.errors import ConfigError, DataError

__all__ = ["ProtocolConfig", "PreparedArrays", "SAMPLE_DTYPE", "SPLITS", "build_splits", "DEFAULT_BEHAVIORS"]

log = logging.getLogger(__name__)

# Packed (17 bytes a sample): user = row of the CSR, cut = index of the target in that user's sequence.
SAMPLE_DTYPE = np.dtype([("user", "<i4"), ("cut", "<i4"), ("item", "<i4"), ("category", "<i4"), ("label", "i1")])
SPLITS = ("train", "val", "test")
# The reference keeps clicks only; MovieLens ratings all count.
DEFAULT_BEHAVIORS = {"taobao": ("pv",), "tmall": ("click",), "movielens": None, "movielens-100k": None,
                     "generic": None, "synthetic": None}
_LUT_MAX_ID = 1 << 27  # raw ids below this are remapped through a dense lookup table (≤ 512 MB)
_MAX_ROUNDS = 1000


@dataclass(frozen=True)
class ProtocolConfig:
    """Every number of the protocol; the defaults reproduce the paper (Taobao/Tmall setting).

    `behaviors=None` means the source's default (pv for Taobao, click for Tmall, all for MovieLens).
    `target_behaviors` (multi-behaviour sequences): histories hold every kept behaviour, but only these are
    targets, negatives and count towards `min_clicks`; None: every kept behaviour (the paper).
    `min_clicks=None` means 210 for the paper's targets and 20 for dense ones (MovieLens' own minimum).
    """

    behaviors: tuple[str, ...] | None = None
    target_behaviors: tuple[str, ...] | None = None  # the kept behaviours that are targets (None: all)
    min_clicks: int | None = None
    max_len: int = 200
    n_negatives: int = 2
    n_train_targets: int = 19
    train_stride: int | None = None  # gap between training targets: 5 paper, 1 dense (every click)
    first_train_offset: int = 3
    seed: int = 0
    targets: Literal["paper", "dense"] = "paper"
    min_history: int = 5          # dense: clicks before a user's first target
    val_fraction: float = 0.1     # dense: share of each user's targets (the latest but test) for validation
    test_fraction: float = 0.1    # dense: share of each user's targets (the latest) for test

    def __post_init__(self) -> None:
        if self.targets not in ("paper", "dense"):
            raise ConfigError(f"protocol.targets must be 'paper' or 'dense', got {self.targets!r}")
        if self.min_clicks is None:
            object.__setattr__(self, "min_clicks", 210 if self.targets == "paper" else 20)
        if self.train_stride is None:
            object.__setattr__(self, "train_stride", 5 if self.targets == "paper" else 1)
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
                raise ConfigError(f"protocol.{name} must be a number in (0, 0.5), got {value!r}")
        checks = {"min_clicks": (self.min_clicks, 3), "max_len": (self.max_len, 1),
                  "min_history": (self.min_history, 1),
                  "n_negatives": (self.n_negatives, 1), "n_train_targets": (self.n_train_targets, 0),
                  "train_stride": (self.train_stride, 1), "first_train_offset": (self.first_train_offset, 3),
                  "seed": (self.seed, 0)}
        for name, (value, low) in checks.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"protocol.{name} must be an integer >= {low}, got {value!r}")
        if self.targets == "dense" and self.min_clicks < self.min_history + 2:
            raise ConfigError(f"dense targets need min_clicks >= min_history + 2 (a validation and a test target "
                              f"per user), got min_clicks {self.min_clicks}, min_history {self.min_history}")
        for name in ("behaviors", "target_behaviors"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not value):
                raise ConfigError(f"protocol.{name} must be a non-empty tuple of names or None, got {value!r}")

    @property
    def train_offsets(self) -> np.ndarray:
        """Offsets from the end of the sequence (1 = last click) of the training targets: 3, 8, …, 93."""
        return self.first_train_offset + self.train_stride * np.arange(self.n_train_targets, dtype=np.int64)


@dataclass(frozen=True)
class PreparedArrays:
    """Everything `store.write_prepared` saves, with the raw ids behind each new id (items and categories:
    index i-1 → id i; users: index u → prepared user u). A raw-id series left None means raw = internal."""

    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (N,) int32
    categories: np.ndarray  # (N,) int32
    timestamps: np.ndarray  # (N,) int64
    item_categories: np.ndarray  # (n_items,) int32, row 0 = padding
    splits: dict[str, np.ndarray]
    n_items: int
    n_categories: int
    stats: dict = field(default_factory=dict)
    item_raw_ids: pl.Series | None = None
    category_raw_ids: pl.Series | None = None
    user_raw_ids: pl.Series | None = None  # (n_users,) raw id of each kept user, in prepared-index order
    event_columns: dict[str, np.ndarray] = field(default_factory=dict)  # (N,) per kept event, like `items`
    item_columns: dict[str, np.ndarray] = field(default_factory=dict)   # (n_items,) value at the item's last event
    user_columns: dict[str, np.ndarray] = field(default_factory=dict)   # (n_users,) value at the user's last event


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    log.info("%-28s %6.2f s", name, time.perf_counter() - start)


def _remap(values: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Consecutive ids 1..n in order of first appearance (0 is padding), as the reference does."""
    uniques = values.unique(maintain_order=True)
    new = np.arange(1, len(uniques) + 1, dtype=np.int32)
    if values.dtype.is_integer() and values.min() >= 0 and values.max() < _LUT_MAX_ID:
        lut = np.zeros(int(values.max()) + 1, dtype=np.int32)  # dense lookup: one gather, no hash join
        lut[uniques.to_numpy()] = new
        return lut[values.to_numpy()], uniques
    table = pl.DataFrame({"key": uniques, "new": new})
    codes = pl.DataFrame({"key": values}).join(table, on="key", how="left", maintain_order="left")["new"]
    return codes.to_numpy(), uniques


def _is_sorted(users: np.ndarray, stamps: np.ndarray) -> bool:
    """True when rows are already grouped by user and time-ordered within a user (skips the sort)."""
    du = np.diff(users)
    if (du < 0).any():
        return False
    return bool(((du > 0) | (np.diff(stamps) >= 0)).all())


def build_splits(events: pl.DataFrame, config: ProtocolConfig, *, source_path: object = None,
                 columns: dict[str, np.ndarray] | None = None, item_level: tuple[str, ...] = (),
                 user_level: tuple[str, ...] = ()) -> PreparedArrays:
    """Apply the protocol to kept events in file order (columns user, item, category, timestamp, and
    behavior when `config.target_behaviors` is set).

    `columns`: more per-event arrays in file order (encoded features), returned in CSR order as
    `event_columns`; those named in `item_level` also as a per-item table (value at the item's last event,
    as `item_categories`), those in `user_level` as a per-user one (value at the user's latest event).

    Cost: one stable sort of the events (skipped when already user-grouped and time-ordered), one sort of
    the kept users' (user, item) keys, and a few vectorised passes; no per-sample Python loop.

    Raises:
        DataError: no user has `min_clicks` clicks, or negatives cannot be drawn for some user.
    """
    with _stage("remap ids"):
        users, user_raw = _remap(events["user"])
        items, item_raw = _remap(events["item"])
        cats, cat_raw = _remap(events["category"])
        stamps = events["timestamp"].to_numpy()
        n_items, n_categories = len(item_raw) + 1, len(cat_raw) + 1
        item_categories = np.zeros(n_items, dtype=np.int32)
        item_categories[items] = cats  # 1-D fancy assignment runs in order: the last click's category wins
    with _stage("order per user"):
        columns = dict(columns or {})
        item_tables = {}
        for name in item_level:
            item_tables[name] = np.zeros(n_items, dtype=columns[name].dtype)
            item_tables[name][items] = columns[name]  # the last event's value wins, as for categories
        is_target = (events["behavior"].cast(pl.String).is_in(list(config.target_behaviors)).to_numpy()
                     if config.target_behaviors is not None else None)
        if not _is_sorted(users, stamps):
            # Stable: ties in timestamp keep file order (the reference keeps raw file order for Taobao).
            order = pl.DataFrame({"u": users, "t": stamps}).select(
                pl.arg_sort_by(["u", "t"], maintain_order=True)).to_series().to_numpy()
            users, items, cats, stamps = users[order], items[order], cats[order], stamps[order]
            columns = {name: values[order] for name, values in columns.items()}
            is_target = is_target[order] if is_target is not None else None
        # every kept click (target behaviour) of every user: a uniform draw from it is ∝ item frequency
        pool = items if is_target is None else items[is_target]
        counts = np.bincount(users if is_target is None else users[is_target], minlength=int(users.max()) + 1)
        kept_user = counts >= config.min_clicks
        if not kept_user.any():
            raise DataError(f"no user has at least {config.min_clicks} kept clicks "
                            f"(most has {int(counts.max())})", path=source_path)
        keep_row = kept_user[users]
        seq_items, seq_cats, seq_stamps = items[keep_row], cats[keep_row], stamps[keep_row]
        row_of_user = np.cumsum(kept_user) - 1
        lengths = np.bincount(row_of_user[users[keep_row]], minlength=int(kept_user.sum())).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        event_columns = {name: values[keep_row] for name, values in columns.items()}
        user_tables = {}
        for name in user_level:
            user_tables[name] = np.zeros(len(lengths), dtype=event_columns[name].dtype)
            user_tables[name][row_of_user[users[keep_row]]] = event_columns[name]  # latest event wins
        target_at = np.flatnonzero(is_target[keep_row]) if is_target is not None else None  # CSR index of targets
    with _stage("index (user, item) pairs"):
        keys = (row_of_user[users[keep_row]].astype(np.int64) * n_items + seq_items)
        clicked = pl.Series(keys).sort().to_numpy()  # sorted, duplicates harmless for membership
    rng = np.random.default_rng(config.seed)
    splits = {}
    with _stage("targets + negatives"):
        target_lengths = lengths if target_at is None else counts[kept_user].astype(np.int64)
        target_offsets = np.concatenate([[0], np.cumsum(target_lengths)]).astype(np.int64)
        for name, user_rows, cuts in _targets(target_lengths, config):
            if target_at is not None:  # k-th target behaviour of the user -> its place in the full sequence
                cuts = (target_at[target_offsets[user_rows] + cuts] - offsets[user_rows]).astype(np.int32)
            splits[name] = _make_split(user_rows, cuts, offsets=offsets, items=seq_items, cats=seq_cats,
                                       item_categories=item_categories, pool=pool, clicked=clicked,
                                       n_items=n_items, n_negatives=config.n_negatives, rng=rng,
                                       source_path=source_path)
    stats = {"n_events": int(len(items)), "n_users_total": int(len(counts) - 1), "n_users": int(kept_user.sum()),
             "n_kept_events": int(offsets[-1]),
             "n_multi_category_items": _n_multi_category(items, cats, item_categories)}
    return PreparedArrays(offsets=offsets, items=seq_items, categories=seq_cats, timestamps=seq_stamps,
                          item_categories=item_categories, splits=splits, n_items=n_items,
                          n_categories=n_categories, stats=stats, item_raw_ids=item_raw, category_raw_ids=cat_raw,
                          user_raw_ids=user_raw.filter(kept_user[1:]), event_columns=event_columns,
                          item_columns=item_tables, user_columns=user_tables)


def _n_multi_category(items: np.ndarray, cats: np.ndarray, item_categories: np.ndarray) -> int:
    """Items seen with more than one category (the reference prints this as n_multi_cid_item)."""
    return int(np.unique(items[item_categories[items] != cats]).size)


def _targets(lengths: np.ndarray, config: ProtocolConfig) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(split, user rows, cuts), user-major; a training target needs at least one click before it."""
    if config.targets == "dense":
        yield from _dense_targets(lengths, config)
        return
    rows = np.arange(len(lengths), dtype=np.int32)
    cuts = lengths[:, None] - config.train_offsets[None, :]  # (U, n_train_targets)
    valid = cuts >= 1
    yield "train", np.broadcast_to(rows[:, None], cuts.shape)[valid], cuts[valid].astype(np.int32)
    yield "val", rows, (lengths - 2).astype(np.int32)
    yield "test", rows, (lengths - 1).astype(np.int32)


def _dense_targets(lengths: np.ndarray, config: ProtocolConfig) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Every cut in [min_history, T) is a target; per user the latest ones are test, then validation.

    Each evaluation split takes at least one target per user, so every user is evaluated on their future."""
    n_targets = np.maximum(lengths - config.min_history, 0)                     # (U,)
    n_test = np.minimum(np.ceil(config.test_fraction * n_targets).astype(np.int64), n_targets)
    n_val = np.minimum(np.ceil(config.val_fraction * n_targets).astype(np.int64), n_targets - n_test)
    rows = np.repeat(np.arange(len(lengths), dtype=np.int32), n_targets)
    first = np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
    rank = np.arange(len(rows)) - first                                          # 0 = a user's earliest target
    cuts = (config.min_history + rank).astype(np.int32)
    from_end = np.repeat(n_targets, n_targets) - rank                            # 1 = a user's latest target
    n_eval = np.repeat(n_test + n_val, n_targets)
    split_of = np.where(from_end <= np.repeat(n_test, n_targets), 2, np.where(from_end <= n_eval, 1, 0))
    # Training keeps every `train_stride`-th target counted back from the latest one (a smaller, still
    # time-spread training set when a full pass over every click is more than the budget allows).
    split_of[(split_of == 0) & ((from_end - n_eval - 1) % config.train_stride != 0)] = -1
    for code, name in enumerate(SPLITS):
        keep = split_of == code
        yield name, rows[keep], cuts[keep]


def _make_split(user_rows: np.ndarray, cuts: np.ndarray, *, offsets: np.ndarray, items: np.ndarray,
                cats: np.ndarray, item_categories: np.ndarray, pool: np.ndarray, clicked: np.ndarray,
                n_items: int, n_negatives: int, rng: np.random.Generator, source_path: object) -> np.ndarray:
    """Each positive followed by its negatives (same user and cut), as one structured array."""
    where = offsets[user_rows] + cuts
    group = 1 + n_negatives
    out = np.empty(len(user_rows) * group, dtype=SAMPLE_DTYPE)
    out["user"] = np.repeat(user_rows, group)
    out["cut"] = np.repeat(cuts, group)
    negatives = _draw_negatives(np.repeat(user_rows, n_negatives), pool=pool, clicked=clicked, n_items=n_items,
                                rng=rng, source_path=source_path).reshape(-1, n_negatives)
    target = np.concatenate([items[where][:, None], negatives], axis=1)  # (P, 1 + n_negatives)
    out["item"] = target.reshape(-1)
    category = np.concatenate([cats[where][:, None], item_categories[negatives]], axis=1)
    out["category"] = category.reshape(-1)
    label = np.zeros((len(user_rows), group), dtype=np.int8)
    label[:, 0] = 1
    out["label"] = label.reshape(-1)
    return out


def _draw_negatives(user_rows: np.ndarray, *, pool: np.ndarray, clicked: np.ndarray, n_items: int,
                    rng: np.random.Generator, source_path: object) -> np.ndarray:
    """Frequency-proportional draws, redrawn (vectorised rounds) until none is an item the user clicked."""
    out = np.empty(len(user_rows), dtype=np.int32)
    pending = np.arange(len(user_rows))
    for _ in range(_MAX_ROUNDS):
        if pending.size == 0:
            return out
        candidates = pool[rng.integers(0, len(pool), size=pending.size)]
        keys = user_rows[pending].astype(np.int64) * n_items + candidates
        slot = np.minimum(np.searchsorted(clicked, keys), len(clicked) - 1)
        hit = clicked[slot] == keys
        out[pending[~hit]] = candidates[~hit]
        pending = pending[hit]
    raise DataError(f"cannot draw negatives for {pending.size} samples after {_MAX_ROUNDS} rounds: "
                    "their users clicked (nearly) every item", path=source_path)
