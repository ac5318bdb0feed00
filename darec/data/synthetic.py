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
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from darec.data.pipeline import prepare
from darec.data.protocol import PreparedArrays, ProtocolConfig
from darec.data.readers import RawEvents
from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError

__all__ = ["SyntheticConfig", "PlantedTruth", "generate", "prepare_synthetic", "TRUTH_FILE"]

TRUTH_FILE = "planted_truth.npz"


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
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_categories, self.min_length) < 1 or self.n_items < self.n_categories:
            raise ConfigError(f"synthetic sizes must be positive with n_items >= n_categories: {self}")
        if self.mean_length < self.min_length:
            raise ConfigError(f"mean_length {self.mean_length} < min_length {self.min_length}")
        if not (0 < self.affinity_sparsity <= 1 and self.decay_rate >= 0 and 0 <= self.noise <= 1):
            raise ConfigError(f"need 0 < affinity_sparsity <= 1, decay_rate >= 0, 0 <= noise <= 1: {self}")
        if not (0 <= self.reclick <= 1 and self.n_favourites >= 1):
            raise ConfigError(f"need 0 <= reclick <= 1 and n_favourites >= 1: {self}")


@dataclass(frozen=True)
class PlantedTruth:
    """The generator's parameters. `affinity` is ((C+1)×(C+1), row/column 0 = padding, all zero)."""

    affinity: np.ndarray
    decay_rate: float
    noise: float

    def decay(self, position):
        """Weight of the click `position` steps before the target (1 = the latest)."""
        return np.exp(-self.decay_rate * (np.asarray(position, dtype=np.float64) - 1))

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
            return cls(affinity=data["affinity"], decay_rate=float(data["decay_rate"]), noise=float(data["noise"]))


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
    cats = np.zeros((u, steps), dtype=np.int32)
    state = np.zeros((u, c + 1))
    keep = np.exp(-config.decay_rate)
    for t in tqdm(range(steps), desc="synth", unit="step", disable=None, leave=False):
        if t:
            state = keep * state + a[cats[:, t - 1]]
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
    items = np.where(rng.random((u, steps)) < config.reclick, revisit, catalogue)
    valid = np.arange(steps)[None, :] < lengths[:, None]
    user = np.broadcast_to(np.arange(1, u + 1)[:, None], (u, steps))
    stamps = 1_500_000_000 + 60 * np.arange(steps)[None, :] + rng.integers(0, 86_400, size=(u, 1))
    frame = pl.DataFrame({"user": user[valid].astype(np.int32), "item": items[valid].astype(np.int32),
                          "category": cats[valid], "timestamp": stamps[valid].astype(np.int64)})
    frame = frame.with_columns(behavior=pl.lit("click"))
    return frame, PlantedTruth(affinity=a, decay_rate=config.decay_rate, noise=config.noise)


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


def prepare_synthetic(synth: SyntheticConfig | None = None, *, out: str | Path,
                      config: ProtocolConfig | None = None, overwrite: bool = False) -> PreparedDataset:
    """Generate and prepare in one go; the truth is saved in prepared category ids as `planted_truth.npz`.

    `out` follows `prepare`'s rules: only a dataset darec wrote is replaced unless `overwrite`."""
    synth = synth or SyntheticConfig()
    frame, truth = generate(synth)
    events = RawEvents(frame=frame, n_skipped=0, source="synthetic", paths=())

    def write_truth(directory: Path, prepared: PreparedArrays) -> dict:
        ids = prepared.category_raw_ids.to_numpy().astype(np.int64)  # prepared id i has raw id ids[i - 1]
        affinity = np.zeros((len(ids) + 1, len(ids) + 1))
        affinity[1:, 1:] = truth.affinity[np.ix_(ids, ids)]
        _save_npz(directory / TRUTH_FILE, affinity=affinity, affinity_raw=truth.affinity, category_raw_ids=ids,
                  decay_rate=np.float64(truth.decay_rate), noise=np.float64(truth.noise))
        params = dataclasses.asdict(synth)
        (directory / "planted_truth.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        return {"planted_truth": {"file": TRUTH_FILE, "decay": "exp(-decay_rate * (position - 1))", **params}}

    return prepare(source="synthetic", out=out, config=config, events=events, extra=write_truth,
                   overwrite=overwrite)
