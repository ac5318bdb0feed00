"""Planted synthetic click logs: the ground truth of "which history click matters" is known.

Generative story, for every user at once (a loop over time steps, vectorised across users):

    S_t = d · S_{t-1} + A[c_{t-1}, :]          (so S_t[c] = Σ_p decay(p) · A[c_{t-p}, c], decay(p) = d^(p-1))
    P(c_t = c) = (1 - noise) · S_t[c] / Σ S_t + noise / C     (uniform at t = 0)
    item_t = one of the user's `n_favourites` favourites of c_t   with probability `reclick`,
             uniform over the catalogue of c_t                     otherwise

with d = exp(-decay_rate) and A a sparse non-negative C×C affinity matrix (A[c_hist, c_target]). A model
that attends to the right (category, position) pairs can predict the next category, and negatives drawn
by popularity mostly come from other categories, so the signal is strong.

Why `reclick` and a large catalogue: the protocol never draws a negative the user clicked, so "target
item already in the history" is a flag only positives carry (see history_flags.py). With few items per
category nearly every positive repeats an earlier click and that flag alone scores AUC 0.85 (and the
negatives, never clicked, avoid the user's categories too); here fresh clicks come from ~130 items per
category, so the flag alone scores AUC 0.56 on the default test split, while every item still recurs across
users, so its embedding learns its category instead of memorising samples. Raising `reclick` brings the
shortcut back.

Optional side signals (issue 14; all off by default, and then the data is byte-identical to before), each
drawn from its own random stream so that turning one on leaves the others' draws alone:

* brands (`n_brands`, `brand_loyalty`): every item has a brand; with probability `brand_loyalty` a fresh
  (not re-clicked) item is drawn, within its category, among the items of the brand of one of the user's
  last 5 clicks. The brand then predicts which item, and one brand embedding is shared by many items.
* behaviour types (`strong_fraction`, `strong_weight`): that share of behaviours are "buy" instead of
  "click" and count `strong_weight` times in the state: S_t = k_t · S_{t-1} + w_{t-1} · A[c_{t-1}, :].
* time (`time_decay`): timestamps come in sessions (about 10 clicks ~30 s apart, sessions ~6 h apart) and
  the decay is in time, not in steps: k_t = exp(-decay_rate · (τ_{t-1} - τ_{t-2}) / time_unit), so that
  S_t[c] ∝ Σ_j w_j · exp(-decay_rate · (τ_t - τ_j) / time_unit) · A[c_j, c]. The gap to the target then
  says what the position does not (a click 3 steps back may be 1 minute or 1 day old).
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
from tqdm import tqdm

from darec.data.pipeline import prepare
from darec.data.protocol import PreparedArrays, ProtocolConfig
from darec.data.readers import RawEvents
from darec.data.schema import CategoricalFeature, FeatureSchema, TimeFeatures
from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError

__all__ = ["SyntheticConfig", "PlantedTruth", "generate", "prepare_synthetic", "synthetic_schema", "TRUTH_FILE"]

TRUTH_FILE = "planted_truth.npz"
BRAND_MEMORY = 5  # a brand-loyal click copies the brand of one of the user's last BRAND_MEMORY clicks
SESSION_CLICKS = 10.0  # time_decay: mean clicks per session (a break follows a click with probability 1/10)
CLICK_GAP = 30.0  # time_decay: mean seconds between clicks of a session (exponential, at least 1 s)
BREAK_GAP = 6 * 3600.0  # time_decay: mean seconds between sessions (exponential)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and signal of a planted log. Every length is >= `min_length` (default 215 > the 210 filter)."""

    n_users: int = 300
    n_items: int = 4000  # ~130 items per category: fresh clicks rarely repeat, items recur across users
    n_categories: int = 30
    mean_length: int = 260
    min_length: int = 215
    affinity_sparsity: float = 0.07  # fraction of target categories each history category points to
    decay_rate: float = 1.0  # decay(p) = exp(-decay_rate · (p - 1)), p = 1 for the latest click
    noise: float = 0.05  # probability of a uniformly random category
    reclick: float = 0.05  # probability that a click re-visits one of the user's favourites of its category
    n_favourites: int = 3  # favourite items per (user, category)
    n_brands: int = 0  # 0: no brands
    brand_loyalty: float = 0.0  # probability that a fresh click picks a brand of the user's recent clicks
    strong_fraction: float = 0.0  # share of behaviours that are "buy" rather than "click"
    strong_weight: float = 1.0  # weight of a "buy" in the state that drives the next categories
    time_decay: bool = False  # sessions of irregular timestamps, decay in time rather than in steps
    time_unit: float = 60.0  # time_decay: seconds over which the weight falls by exp(-decay_rate)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [  # (holds, rule, the fields it reads): a failure names those fields' values, not the whole config
            (min(self.n_users, self.n_categories, self.min_length) >= 1 and self.n_items >= self.n_categories,
             "sizes must be positive with n_items >= n_categories", ("n_users", "n_items", "n_categories", "min_length")),
            (self.mean_length >= self.min_length, "need mean_length >= min_length", ("mean_length", "min_length")),
            (0 < self.affinity_sparsity <= 1, "need 0 < affinity_sparsity <= 1", ("affinity_sparsity",)),
            (self.decay_rate >= 0, "need decay_rate >= 0", ("decay_rate",)),
            (0 <= self.noise <= 1, "need 0 <= noise <= 1", ("noise",)),
            (0 <= self.reclick <= 1, "need 0 <= reclick <= 1", ("reclick",)),
            (self.n_favourites >= 1, "need n_favourites >= 1", ("n_favourites",)),
            (self.n_brands >= 0 and 0 <= self.brand_loyalty <= 1 and bool(self.n_brands or not self.brand_loyalty),
             "need n_brands >= 0 and 0 <= brand_loyalty <= 1 (brand_loyalty needs n_brands)", ("n_brands", "brand_loyalty")),
            (0 <= self.strong_fraction <= 1, "need 0 <= strong_fraction <= 1", ("strong_fraction",)),
            (self.strong_weight > 0, "need strong_weight > 0", ("strong_weight",)),
            (self.time_unit > 0, "need time_unit > 0", ("time_unit",)),
        ]
        for holds, rule, names in checks:
            if not holds:
                raise ConfigError(f"synthetic data: {rule}, got " + ", ".join(f"{n}={getattr(self, n)}" for n in names))


@dataclass(frozen=True)
class PlantedTruth:
    """The generator's parameters. `affinity` is ((C+1)×(C+1), row/column 0 = padding, all zero).

    `time_unit` is set when the decay is in time (`time_decay`); `strong_weight` is the weight of a "buy"
    relative to a "click". `weight` gives the true weight of every behaviour from whatever sets it (position,
    time gap, behaviour type); `decay` is the position-only weight of the paper's planted data."""

    STRONG_BEHAVIOR: ClassVar[str] = "buy"  # the `behavior` value of a strong behaviour (the others are clicks)

    affinity: np.ndarray
    decay_rate: float
    noise: float
    time_unit: float | None = None
    strong_weight: float = 1.0

    @property
    def position_only(self) -> bool:
        """True when a behaviour's weight depends on its position alone (the paper's planted data)."""
        return self.time_unit is None and self.strong_weight == 1.0

    def decay(self, position):
        """Weight of the click `position` steps before the target (1 = the latest). Refused on data whose
        weights depend on more than the position (time decay, strong behaviour types): there `weight` needs
        the time gaps and behaviour types, and a position-based ground truth would be wrong, silently."""
        if not self.position_only:
            raise DataError("this planted data weighs clicks by time gap or behaviour type, not by position "
                            "alone; the position-based ground truth does not apply (use PlantedTruth.weight "
                            "with the gaps and types, or make the data without --time-decay and --strong-fraction)")
        return self.weight(position)

    def log_weight(self, position, *, gap_seconds=None, strong=None) -> np.ndarray:
        """Log of the true weight of a behaviour in the state that draws its target's category, up to a
        constant per target: the decay in time (`gap_seconds` = target time - behaviour time, on time-decay
        data) or in steps (`position`, 1 = the latest), plus log `strong_weight` where `strong` (a "buy").
        Broadcasts, e.g. (B, L) arrays of a batch. The generator decays from the latest behaviour's time,
        not the target's: that shifts every log-weight of a target by the same amount, so ratios are exact.

        `gap_seconds` is required on time-decay data and `strong` when buys weigh more than clicks (pass
        all False for data without buys)."""
        if self.time_unit is not None:
            if gap_seconds is None:
                raise DataError("this planted data decays in time: the true weight needs the time gaps")
            log_decay = self.log_decay_at_gap(gap_seconds)
        else:
            log_decay = -self.decay_rate * (np.asarray(position, dtype=np.float64) - 1)
        if self.strong_weight == 1.0:
            return log_decay
        if strong is None:
            raise DataError("this planted data weighs buys more than clicks: the true weight needs the "
                            "behaviour types")
        return log_decay + np.where(np.asarray(strong, dtype=bool), np.log(self.strong_weight), 0.0)

    def weight(self, position, *, gap_seconds=None, strong=None) -> np.ndarray:
        """exp(`log_weight`): the true weight itself (underflows to 0 for behaviours days old in time)."""
        return np.exp(self.log_weight(position, gap_seconds=gap_seconds, strong=strong))

    def log_decay_at_gap(self, gap_seconds):
        """Log-weight of a click `gap_seconds` before the target, up to a constant (time-decay data only)."""
        if self.time_unit is None:
            raise DataError("this planted data decays in steps, not in time (made without time_decay)")
        return -self.decay_rate * np.asarray(gap_seconds, dtype=np.float64) / self.time_unit

    def side_arrays(self) -> dict[str, np.ndarray]:
        """The fields beyond the step-decay truth that differ from their defaults (saved only then, so the
        default truth file keeps its bytes)."""
        side = {"time_unit": self.time_unit, "strong_weight": None if self.strong_weight == 1.0 else self.strong_weight}
        return {name: np.float64(value) for name, value in side.items() if value is not None}

    def relevance(self, target_cat, hist_cat, position):
        """A[hist_cat, target_cat] · decay(position); broadcasts over arrays (e.g. (B, 1) vs (B, L))."""
        return self.affinity[np.asarray(hist_cat), np.asarray(target_cat)] * self.decay(position)

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "PlantedTruth":
        """The truth saved beside a prepared synthetic dataset, in its (prepared) category ids."""
        file = Path(prepared_dir) / TRUTH_FILE
        if not file.is_file():
            raise DataError("no planted truth here (not prepared by `darec synth`)", path=file)
        with np.load(file) as data:
            time_unit = float(data["time_unit"]) if "time_unit" in data else None
            strong = float(data["strong_weight"]) if "strong_weight" in data else 1.0
            return cls(affinity=data["affinity"], decay_rate=float(data["decay_rate"]), noise=float(data["noise"]),
                       time_unit=time_unit, strong_weight=strong)


def _affinity(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Sparse A: each history category points to k random targets with weights in [0.5, 1.5)."""
    c = config.n_categories
    k = max(1, round(config.affinity_sparsity * c))
    scores = rng.random((c, c))
    targets = np.argsort(scores, axis=1)[:, :k]  # (C, k) random distinct targets per row
    a = np.zeros((c + 1, c + 1))
    rows = np.repeat(np.arange(1, c + 1), k)
    a[rows, targets.reshape(-1) + 1] = rng.uniform(0.5, 1.5, size=c * k)
    return a


def generate(config: SyntheticConfig | None = None) -> tuple[pl.DataFrame, PlantedTruth]:
    """Events in the canonical layout (user-major, time-ordered; raw ids from 1) and the planted truth."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    u, c = config.n_users, config.n_categories
    a = _affinity(config, rng)
    item_category = np.concatenate([np.arange(1, c + 1), rng.integers(1, c + 1, config.n_items - c)])
    rng.shuffle(item_category)  # item i + 1 has category item_category[i]; every category has an item
    by_category = np.argsort(item_category, kind="stable") + 1  # items grouped by category
    starts = np.searchsorted(item_category[by_category - 1], np.arange(1, c + 2))  # (C+1,) CSR over categories
    lengths = rng.integers(config.min_length, 2 * config.mean_length - config.min_length + 1, size=u)
    steps = int(lengths.max())
    brand_rng, strong_rng, time_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3))
    strong = strong_rng.random((u, steps)) < config.strong_fraction  # (U, T) "buy" behaviours
    weight = np.where(strong, config.strong_weight, 1.0)
    offsets = _session_offsets(u, steps, time_rng) if config.time_decay else 60 * np.arange(steps)[None, :]
    gap = np.diff(offsets, axis=1, prepend=0)  # (U, T) seconds since the previous behaviour (0 at t = 0)
    elapsed = np.roll(gap, 1, axis=1) / config.time_unit if config.time_decay else np.ones((u, steps))
    keep = np.exp(-config.decay_rate * elapsed)  # (U, T) k_t, in time units (steps without time_decay)
    cats = np.zeros((u, steps), dtype=np.int32)
    state = np.zeros((u, c + 1))
    for t in tqdm(range(steps), desc="synth", unit="step", disable=None, leave=False):
        if t:
            state = keep[:, t, None] * state + weight[:, t - 1, None] * a[cats[:, t - 1]]
        total = state[:, 1:].sum(axis=1, keepdims=True)
        driven = np.where(total > 0, state[:, 1:] / np.maximum(total, 1e-12), 1.0 / c)
        prob = (1 - config.noise) * driven + config.noise / c  # (U, C)
        draw = rng.random((u, 1))
        cats[:, t] = np.minimum((np.cumsum(prob, axis=1) < draw).sum(axis=1), c - 1) + 1
    catalogue = _catalogue_draw(starts, by_category, rng, cats)  # (U, T) uniform within the category
    favourite_cats = np.broadcast_to(np.arange(1, c + 1)[None, :, None], (u, c, config.n_favourites))
    favourites = _catalogue_draw(starts, by_category, rng, favourite_cats)  # (U, C, F)
    slot = rng.integers(0, config.n_favourites, size=(u, steps))
    revisit = favourites[np.arange(u)[:, None], cats - 1, slot]  # (U, T) a favourite of the user in that category
    reclicked = rng.random((u, steps)) < config.reclick
    items = np.where(reclicked, revisit, catalogue)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    user = np.broadcast_to(np.arange(1, u + 1)[:, None], (u, steps))
    stamps = 1_500_000_000 + offsets + rng.integers(0, 86_400, size=(u, 1))
    frame = pl.DataFrame({"user": user[valid].astype(np.int32), "item": items[valid].astype(np.int32),
                          "category": cats[valid], "timestamp": stamps[valid].astype(np.int64)})
    frame = frame.with_columns(behavior=pl.Series(np.where(strong[valid], "buy", "click")))
    if config.n_brands:
        item_brand = np.concatenate([[0], brand_rng.integers(1, config.n_brands + 1, size=config.n_items)])
        items = _brand_loyal(items, cats, ~reclicked, item_category, item_brand, config, brand_rng)
        frame = frame.with_columns(item=pl.Series(items[valid].astype(np.int32)),
                                   brand=pl.Series(item_brand[items[valid]].astype(np.int32)))
    truth = PlantedTruth(affinity=a, decay_rate=config.decay_rate, noise=config.noise,
                         time_unit=config.time_unit if config.time_decay else None, strong_weight=config.strong_weight)
    return frame, truth


def _session_offsets(u: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """(U, T) seconds since each user's first behaviour: sessions of ~SESSION_CLICKS clicks ~CLICK_GAP s
    apart, separated by breaks of ~BREAK_GAP s (every gap >= 1 s, so timestamps strictly increase)."""
    breaks = rng.random((u, steps)) < 1 / SESSION_CLICKS
    gaps = 1 + np.floor(rng.exponential(np.where(breaks, BREAK_GAP, CLICK_GAP))).astype(np.int64)
    gaps[:, 0] = 0
    return np.cumsum(gaps, axis=1)


def _brand_loyal(items: np.ndarray, cats: np.ndarray, fresh: np.ndarray, item_category: np.ndarray,
                 item_brand: np.ndarray, config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """`items` where, with probability `brand_loyalty`, a fresh click is replaced by an item of its category
    whose brand is that of one of the user's last BRAND_MEMORY clicks (kept when the pair has no item).
    A loop over time steps (each step copies brands of the steps before it), vectorised over users."""
    u, steps = items.shape
    key = (item_category - 1) * config.n_brands + item_brand[1:] - 1  # (n_items,) (category, brand) of item i + 1
    by_key = np.argsort(key, kind="stable") + 1
    starts = np.searchsorted(key[by_key - 1], np.arange(config.n_categories * config.n_brands + 1))
    loyal = fresh & (rng.random((u, steps)) < config.brand_loyalty)
    lag = rng.integers(1, BRAND_MEMORY + 1, size=(u, steps))
    pick = rng.random((u, steps))
    items, rows = items.copy(), np.arange(u)
    for t in range(1, steps):
        brand = item_brand[items[rows, t - np.minimum(lag[:, t], t)]]
        pair = (cats[:, t] - 1) * config.n_brands + brand - 1
        low, size = starts[pair], starts[pair + 1] - starts[pair]
        chosen = by_key[np.minimum(low + (pick[:, t] * size).astype(np.int64), len(by_key) - 1)]
        items[:, t] = np.where(loyal[:, t] & (size > 0), chosen, items[:, t])
    return items


def _catalogue_draw(starts: np.ndarray, by_category: np.ndarray, rng: np.random.Generator,
                    cats: np.ndarray) -> np.ndarray:
    """One item drawn uniformly from the catalogue of each category in `cats` (any shape, ids >= 1)."""
    low, size = starts[cats - 1], starts[cats] - starts[cats - 1]
    return by_category[low + (rng.random(cats.shape) * size).astype(np.int64)]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez but with fixed zip timestamps, so re-preparing gives byte-identical files."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as handle:
                np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)


def synthetic_schema(synth: SyntheticConfig) -> FeatureSchema:
    """The features a planted log carries: brand, behaviour type and time gap when their signal is on (the
    default schema, i.e. the paper's setting, when none is)."""
    base = FeatureSchema()
    brand = (CategoricalFeature(name="brand", column="brand"),) if synth.n_brands else ()
    return FeatureSchema(features=(*base.features, *brand), behavior_type=synth.strong_fraction > 0,
                         time=TimeFeatures(gap=synth.time_decay))


def prepare_synthetic(synth: SyntheticConfig | None = None, *, out: str | Path,
                      config: ProtocolConfig | None = None, overwrite: bool = False) -> PreparedDataset:
    """Generate and prepare in one go; the truth is saved in prepared category ids as `planted_truth.npz`,
    and the side signals that are on are stored as features (`synthetic_schema`).

    `out` follows `prepare`'s rules: only a dataset darec wrote is replaced unless `overwrite`."""
    synth = synth or SyntheticConfig()
    frame, truth = generate(synth)
    events = RawEvents(frame=frame, n_skipped=0, source="synthetic", paths=())

    def write_truth(directory: Path, prepared: PreparedArrays) -> dict:
        ids = prepared.category_raw_ids.to_numpy().astype(np.int64)  # prepared id i has raw id ids[i - 1]
        affinity = np.zeros((len(ids) + 1, len(ids) + 1))
        affinity[1:, 1:] = truth.affinity[np.ix_(ids, ids)]
        _save_npz(directory / TRUTH_FILE, affinity=affinity, affinity_raw=truth.affinity, category_raw_ids=ids,
                  decay_rate=np.float64(truth.decay_rate), noise=np.float64(truth.noise), **truth.side_arrays())
        params = dataclasses.asdict(synth)
        (directory / "planted_truth.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        decay = ("exp(-decay_rate * gap_seconds / time_unit)" if synth.time_decay
                 else "exp(-decay_rate * (position - 1))")
        return {"planted_truth": {"file": TRUTH_FILE, "decay": decay, **params}}

    return prepare(source="synthetic", out=out, config=config, events=events, extra=write_truth,
                   overwrite=overwrite, schema=synthetic_schema(synth))
