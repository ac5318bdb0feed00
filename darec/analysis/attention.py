"""Attention accuracy (DARE paper Fig. 8): does the learned attention score the (behaviour category,
position) pairs that carry information about the label?

Ground truth: MI in bits (groundtruth.py) on the grid of the top-10 target categories x top-10 behaviour
categories x positions 1..10. Learned: the model's own search score of a history made of exactly those
cells (its scaling, projections and position bias; item ids and side-feature codes set to padding 0, which
for dot scores adds one constant to every cell). Agreement: Spearman rank correlation over each target's
grid, averaged.

On planted data whose weights depend on the time gap and behaviour type (`--time-decay`,
`--strong-fraction`) the planted truth has no (category, position) grid: each model's attention over the
real test histories (its time-gap and behaviour-type score biases included) is compared with the true
relevance of every behaviour instead (planted.py).

Notation: T targets, C behaviour categories on the grid, P positions on the grid.
"""
from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import spearmanr

from darec.analysis.common import (AnalysisContext, history_scores, load_model, raw_ids, save_figure, search_scores,
                                   trained_run, write_analysis)
from darec.analysis.groundtruth import cell_keys, count_cooccurrence, most_common_targets
from darec.analysis.planted import SPEARMAN_KEYS, history_agreement, planted_histories
from darec.data.batch import Batch
from darec.data.synthetic import TRUTH_FILE, PlantedTruth
from darec.models import TwoStageModel

__all__ = ["grid_batch", "grid_scores", "grid_agreement", "minmax", "planted_grid", "run_attention", "DEFAULT_PRESETS"]

log = logging.getLogger(__name__)

DEFAULT_PRESETS = ("dare", "twin", "twin_4e", "twin_proj", "din")


def grid_batch(*, targets: np.ndarray, categories: np.ndarray, positions: np.ndarray,
               features: tuple[str, ...] = ()) -> Batch:
    """One row per target; its history holds every (category, position) cell once, category-major.

    Every side feature in `features` gets code 0 (padding; the target's own time gap) in the history, the
    target and the user: a feature model scores the grid with one constant per feature added to each cell."""
    t, c, p = len(targets), len(categories), len(positions)
    cats = torch.as_tensor(np.repeat(categories, p), dtype=torch.int64).expand(t, c * p)      # (T, C*P)
    pos = torch.as_tensor(np.tile(positions, c), dtype=torch.int64).expand(t, c * p)          # (T, C*P)
    zeros = torch.zeros(t, dtype=torch.int64)
    hist_zeros = torch.zeros(t, c * p, dtype=torch.int64)
    return Batch(hist_items=hist_zeros, hist_categories=cats.contiguous(),
                 hist_positions=pos.contiguous(), mask=torch.ones(t, c * p, dtype=torch.bool),
                 target_item=zeros, target_category=torch.as_tensor(targets, dtype=torch.int64),
                 label=torch.zeros(t), user=zeros, hist_features={name: hist_zeros for name in features},
                 target_features={name: zeros for name in features}, user_features={name: zeros for name in features})


def grid_scores(model: TwoStageModel, *, targets: np.ndarray, categories: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
    """(T, C, P) learned attention logits of the grid cells."""
    batch = grid_batch(targets=targets, categories=categories, positions=positions,
                       features=tuple(f.name for f in model.config.features))
    scores = search_scores(model, batch)                                                       # (T, C*P)
    return scores.numpy().reshape(len(targets), len(categories), len(positions))               # (T, C, P)


def grid_agreement(truth: np.ndarray, learned: np.ndarray) -> tuple[float, np.ndarray]:
    """Spearman correlation per target over its (C, P) grid, and their mean over targets with a defined one."""
    per_target = np.array([spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(a) > 0 and np.ptp(b) > 0
                           else np.nan for a, b in zip(truth, learned)])
    finite = per_target[np.isfinite(per_target)]
    return (float(finite.mean()) if len(finite) else float("nan")), per_target


def minmax(grid: np.ndarray) -> np.ndarray:
    """Min-max normalise each target's (C, P) grid to [0, 1] (constant grids become 0)."""
    low = grid.min(axis=(1, 2), keepdims=True)
    span = np.ptp(grid, axis=(1, 2), keepdims=True)
    return np.where(span > 0, (grid - low) / np.where(span > 0, span, 1), 0.0)


def planted_grid(truth: PlantedTruth, *, targets: np.ndarray, categories: np.ndarray,
                 positions: np.ndarray) -> np.ndarray:
    """(T, C, P) planted relevance A[c_hist, c_target] * decay(p)."""
    return truth.relevance(targets[:, None, None], categories[None, :, None], positions[None, None, :])


def _softmax_grid(scores: np.ndarray) -> np.ndarray:
    z = scores.reshape(len(scores), -1)
    z = np.exp(z - z.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).reshape(scores.shape)


def _heatmaps(grid: np.ndarray, *, targets, categories, positions, title: str, path, names: dict) -> None:
    """One (C, P) panel per target; categories are labelled by `names` (internal id -> raw id)."""
    n = len(targets)
    cols = min(5, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(grid[i], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set(title=f"target category {names[int(targets[i])]}", xlabel="position",
               xticks=range(len(positions)), yticks=range(len(categories)))
        ax.set_xticklabels(positions, fontsize=6)
        ax.set_yticklabels([names[int(c)] for c in categories], fontsize=6)
        ax.set_ylabel("behaviour category", fontsize=7)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.88, wspace=0.35, hspace=0.55)
    save_figure(fig, path, tight=False)


def run_attention(ctx: AnalysisContext, *, n_categories: int = 10, n_positions: int = 10) -> dict:
    dataset = ctx.dataset
    out = ctx.kind_dir("attention")
    categories = most_common_targets(dataset, n_categories)
    targets = categories
    positions = np.arange(1, min(n_positions, dataset.max_len) + 1)
    grid = (targets[:, None, None], categories[None, :, None], positions[None, None, :])
    cells = cell_keys(*grid, n_categories=dataset.n_categories, max_position=int(positions[-1]))
    counts = count_cooccurrence(dataset, cells=cells.ravel(), max_position=int(positions[-1]))
    mi = counts.mutual_information_at(*grid)                                                   # (T, C, P)
    grids = {"ground_truth_mi": mi}
    shown = dict(targets=targets, categories=categories, positions=positions)
    raw_categories = raw_ids(dataset, "category", categories)
    names = dict(zip(categories.tolist(), raw_categories or categories.tolist()))  # raw ids label the plots
    _heatmaps(minmax(mi), title="ground truth: MI(behaviour at (c, p); label) in bits, min-max per target",
              path=out / "ground_truth_mi.png", names=names, **shown)
    truth = PlantedTruth.load(ctx.data_dir) if (ctx.data_dir / TRUTH_FILE).is_file() else None
    planted, histories = None, {}  # histories: max_len -> the truth of the real test histories (side signals)
    if truth is not None and truth.position_only:
        planted = planted_grid(truth, **shown)
        grids["planted_truth"] = planted
        _heatmaps(minmax(planted), title="planted truth A[c, t] * decay(p), min-max per target",
                  path=out / "planted_truth.png", names=names, **shown)
    models = {}
    for preset in ctx.presets_or(DEFAULT_PRESETS):
        model = load_model(trained_run(ctx, preset).run_dir)
        learned = grid_scores(model, **shown)
        _heatmaps(minmax(_softmax_grid(learned)), title=f"{preset}: learned attention (softmax over grid, min-max)",
                  path=out / f"learned_{preset}.png", names=names, **shown)
        mean, per_target = grid_agreement(mi, learned)
        models[preset] = {"spearman_vs_mi": mean, "spearman_vs_mi_per_target": per_target,
                          "learned_scores": learned}
        if planted is not None:
            models[preset]["spearman_vs_planted"] = grid_agreement(planted, learned)[0]
        if truth is not None and not truth.position_only:
            length = model.config.max_len
            if length not in histories:
                histories[length] = planted_histories(dataset, truth, max_len=length)
            models[preset].update(history_agreement(histories[length], history_scores(dataset, model)))
    names = list(models)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
    keys = ["spearman_vs_mi"] + (["spearman_vs_planted"] if planted is not None else []) + \
        (list(SPEARMAN_KEYS) if histories else [])
    width = min(0.4, 0.8 / len(keys))
    for j, key in enumerate(keys):
        ax.bar(np.arange(len(names)) + width * j, [models[n][key] for n in names], width=width, label=key)
    ax.set_xticks(np.arange(len(names)) + width * (len(keys) - 1) / 2)
    ax.set_xticklabels(names)
    ax.set(ylabel="Spearman over the grid" if not histories else "Spearman (grid / test histories)",
           title="attention accuracy")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    save_figure(fig, out / "agreement.png")
    payload = {"targets": targets, "categories": categories, "positions": positions, "mi_bits": mi,
               "models": models, "targets_raw": raw_ids(dataset, "category", targets), "categories_raw": raw_categories}
    if planted is not None:
        payload["planted_truth"] = planted
        payload["mi_vs_planted_spearman"] = grid_agreement(planted, mi)[0]
    if histories:
        payload["planted_history"] = {
            "truth": "A[c_j, t] * w_j of every behaviour of the real test histories (w_j: planted weight from "
                     "time gap and behaviour type)", "time_unit": truth.time_unit, "strong_weight": truth.strong_weight,
            "by_history_length": {length: {"samples": len(h.mask),
                                           "relevant_share": float(h.relevant.sum() / h.mask.sum())}
                                  for length, h in histories.items()}}
    log.info("attention agreement: %s", {n: round(m["spearman_vs_mi"], 3) for n, m in models.items()})
    if histories:
        log.info("attention vs the planted truth of the test histories: %s",
                 {n: {k: round(m[k], 3) for k in (*SPEARMAN_KEYS, "kl_vs_planted_history")} for n, m in models.items()})
    return write_analysis(ctx, "attention", payload)
