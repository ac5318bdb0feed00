"""Retrieval quality of the search (DARE paper Fig. 9): NDCG@k of each model's ranking of a test sample's
history against the mutual-information ground truth of each position, plus case studies.

Relevance of history position j of a test sample with target category t = MI(c_j at p_j; label | t),
counted on the training split, for the cells the test histories hold only (memory follows the test set:
Taobao's 9,407 categories would make a dense count 17.8G cells). Rankings use the model's real search
scores (items included).
NDCG@k = DCG@k / IDCG@k with both at the same k (the reference divides by IDCG@20 for every k; that
variant is reported too as `dcg_over_idcg20`).

On planted data whose weights depend on the time gap and behaviour type (`--time-decay`,
`--strong-fraction`) the rankings are also scored against the planted relevance A[c_j, t] · w_j of each
behaviour (planted.py): `planted` in retrieval.json, `ndcg_planted.png`.

Notation: B test samples, L history length, K the largest k.
"""
from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np

from darec.analysis.attention import DEFAULT_PRESETS
from darec.analysis.common import (AnalysisContext, load_model, raw_ids, save_figure, search_scores, test_batches,
                                   trained_run, write_analysis)
from darec.analysis.groundtruth import cell_keys, count_cooccurrence, target_support
from darec.analysis.planted import planted_histories
from darec.data.store import PreparedDataset
from darec.data.synthetic import TRUTH_FILE, PlantedTruth

__all__ = ["dcg_curve", "ndcg_curve", "position_relevance", "run_retrieval"]

log = logging.getLogger(__name__)


def dcg_curve(scores: np.ndarray, relevance: np.ndarray, max_k: int) -> np.ndarray:
    """(B, K) DCG@1..K of the ranking by `scores` (descending; -inf ranks last), gain = relevance."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :max_k]                  # (B, K)
    gains = np.take_along_axis(relevance, order, axis=1)                           # (B, K)
    discount = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    curve = np.cumsum(gains * discount, axis=1)
    if curve.shape[1] < max_k:  # fewer positions than k: the curve stays flat
        curve = np.concatenate([curve, np.repeat(curve[:, -1:], max_k - curve.shape[1], axis=1)], axis=1)
    return curve


def ndcg_curve(scores: np.ndarray, relevance: np.ndarray, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, K) NDCG@k normalised at the same k, and (B, K) DCG@k / IDCG@min(20, K) (the reference's variant).
    Rows whose ideal DCG is 0 are NaN."""
    dcg = dcg_curve(scores, relevance, max_k)
    ideal = dcg_curve(relevance, relevance, max_k)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(ideal > 0, dcg / ideal, np.nan)
        at20 = ideal[:, min(20, max_k) - 1:min(20, max_k)]
        ref = np.where(at20 > 0, dcg / at20, np.nan)
    return ndcg, ref


def position_relevance(dataset: PreparedDataset, *, target_categories: np.ndarray, hist_categories: np.ndarray,
                       hist_positions: np.ndarray, mask: np.ndarray, min_support: int) -> np.ndarray:
    """(B, L) MI of each history position for its sample's target (0 at padding and for targets with
    fewer than `min_support` training samples).

    Only the (target, category, position) cells these histories hold are counted (a few per position),
    so memory follows the test set, not the C x C x (L + 1) cell space."""
    positive, negative = target_support(dataset)
    supported = (positive + negative) >= min_support                                      # (C,)
    targets = np.broadcast_to(np.asarray(target_categories, dtype=np.int64)[:, None], hist_categories.shape)
    keep = mask & supported[targets]                                                      # (B, L)
    length = int(hist_positions.max(initial=1))
    cells = cell_keys(targets[keep], hist_categories[keep], hist_positions[keep], n_categories=dataset.n_categories,
                      max_position=length)
    counts = count_cooccurrence(dataset, cells=cells, max_position=length)
    log.info("retrieval ground truth: %d (target, category, position) cells counted of %d possible",
             len(counts.cells), dataset.n_categories ** 2 * (length + 1))
    relevance = np.zeros(hist_categories.shape)
    relevance[keep] = counts.mutual_information_at(targets[keep], hist_categories[keep], hist_positions[keep])
    return relevance


def _case_study(path, *, categories, relevance, scores, retrieved, title) -> None:
    """Rows: ground truth and each model; columns: the 10 most recent behaviours (position 1 first)."""
    names = ["ground truth (MI)"] + list(scores)
    rows = [relevance] + [np.where(np.isfinite(r), r, np.nan) for r in scores.values()]
    grid = np.stack([np.nan_to_num((r - np.nanmin(r)) / (np.nanmax(r) - np.nanmin(r) or 1.0)) if np.isfinite(r).any()
                     else np.zeros_like(r) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.6))
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, name in enumerate(names[1:], 1):
        for j in np.flatnonzero(retrieved[name]):
            ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=9)
    ax.set(xticks=range(len(categories)), yticks=range(len(names)), title=title,
           xlabel="history category (position 1 = most recent, left); x = retrieved")
    ax.set_xticklabels([f"{c}\np{j + 1}" for j, c in enumerate(categories)], fontsize=7)
    ax.set_yticklabels(names, fontsize=8)
    save_figure(fig, path)


def run_retrieval(ctx: AnalysisContext, *, max_k: int = 50, min_support: int = 30, n_cases: int = 3) -> dict:
    """NDCG curves over test samples whose target category has >= `min_support` training samples."""
    dataset = ctx.dataset
    out = ctx.kind_dir("retrieval")
    presets = ctx.presets_or(DEFAULT_PRESETS)
    scores, hist = {}, []
    for preset in presets:
        model = load_model(trained_run(ctx, preset).run_dir)
        parts = []
        for batch in test_batches(dataset, model):
            parts.append(search_scores(model, batch).numpy())
            if preset == presets[0]:
                hist.append((batch.hist_categories.numpy().astype(np.int32),
                             batch.hist_positions.numpy().astype(np.int32), batch.mask.numpy(),
                             batch.target_category.numpy()))
        scores[preset] = (np.concatenate(parts), model.config.top_k)
    hist_categories, hist_positions, mask, targets = (np.concatenate(a) for a in zip(*hist))
    relevance = position_relevance(dataset, target_categories=targets, hist_categories=hist_categories,
                                   hist_positions=hist_positions, mask=mask, min_support=min_support)
    curves, per_sample, keep = _curves(scores, relevance, max_k)
    ks = np.arange(1, max_k + 1)
    _plot_curves(out / "ndcg.png", curves, ks, title=f"retrieval vs MI ground truth ({int(keep.sum())} test samples)")
    planted = _planted(ctx, out, dataset=dataset, scores=scores, length=hist_categories.shape[1], max_k=max_k)
    cases = _cases(out, dataset=dataset, presets=presets, per_sample=per_sample, scores=scores,
                   relevance=relevance, categories=hist_categories, targets=targets, keep=keep, n_cases=n_cases)
    log.info("retrieval NDCG@10: %s", {p: round(float(c["ndcg"][min(10, max_k) - 1]), 3) for p, c in curves.items()})
    return write_analysis(ctx, "retrieval", {
        "k": ks, "samples": int(keep.sum()), "min_support": min_support, "curves": curves,
        "ndcg_at": _ndcg_at(curves, max_k), "case_studies": cases, **planted})


def _curves(scores: dict, relevance: np.ndarray, max_k: int) -> tuple[dict, dict, np.ndarray]:
    """Per preset: mean NDCG curves over the samples with a positive ideal DCG, the per-sample NDCG, and
    which samples those are."""
    curves, per_sample = {}, {}
    keep = None
    for preset, (s, _) in scores.items():
        ndcg, ref = ndcg_curve(s, relevance, max_k)
        keep = np.isfinite(ndcg[:, 0]) if keep is None else keep
        per_sample[preset] = ndcg
        curves[preset] = {"ndcg": np.nanmean(ndcg[keep], axis=0), "dcg_over_idcg20": np.nanmean(ref[keep], axis=0)}
    return curves, per_sample, keep


def _plot_curves(path, curves: dict, ks: np.ndarray, *, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for preset, c in curves.items():
        axes[0].plot(ks, c["ndcg"], label=preset)
        axes[1].plot(ks, c["dcg_over_idcg20"], label=preset)
    axes[0].set(xlabel="behaviours returned by search (k)", ylabel="NDCG@k (normalised at k)", title=title)
    axes[1].set(xlabel="k", ylabel="DCG@k / IDCG@20", title="the reference's normalisation")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _planted(ctx: AnalysisContext, out, *, dataset: PreparedDataset, scores: dict, length: int,
             max_k: int) -> dict:
    """On planted data with side signals: NDCG of every ranking against the planted relevance A[c_j, t] · w_j
    (`planted` payload and `ndcg_planted.png`); nothing on other data (its payload stays as it was)."""
    if not (ctx.data_dir / TRUTH_FILE).is_file():
        return {}
    truth = PlantedTruth.load(ctx.data_dir)
    if truth.position_only:
        return {}
    relevance = planted_histories(dataset, truth, max_len=length).relevance
    curves, _, keep = _curves(scores, relevance, max_k)
    _plot_curves(out / "ndcg_planted.png", curves, np.arange(1, max_k + 1),
                 title=f"retrieval vs planted A[c, t] * w (time gap, type; {int(keep.sum())} test samples)")
    log.info("retrieval NDCG@10 vs planted: %s",
             {p: round(float(c["ndcg"][min(10, max_k) - 1]), 3) for p, c in curves.items()})
    return {"planted": {"samples": int(keep.sum()), "curves": curves, "ndcg_at": _ndcg_at(curves, max_k)}}


def _ndcg_at(curves: dict, max_k: int) -> dict:
    """{preset: {k: NDCG@k}} at the usual cut-offs up to `max_k`."""
    return {p: {str(k): float(c["ndcg"][k - 1]) for k in (1, 5, 10, 20, 50) if k <= max_k} for p, c in curves.items()}


def _cases(out, *, dataset, presets, per_sample, scores, relevance, categories, targets, keep,
           n_cases) -> list[dict]:
    """Samples where the first preset's NDCG@10 beats the best other one by the widest margin; each is named by
    its test-split row and, where the dataset has id maps, its user, target item and categories' raw ids."""
    at10 = {p: np.nan_to_num(v[:, min(10, v.shape[1]) - 1], nan=-1.0) for p, v in per_sample.items()}
    rivals = [at10[p] for p in presets[1:]] or [np.zeros_like(at10[presets[0]])]
    margin = np.where(keep, at10[presets[0]] - np.max(rivals, axis=0), -np.inf)
    cases = []
    for rank, i in enumerate(np.argsort(-margin, kind="stable")[:n_cases]):
        if not np.isfinite(margin[i]):
            break
        recent = slice(None, -11, -1)                                                  # last 10 slots, newest first
        shown = {p: s[i][recent] for p, (s, _) in scores.items()}
        retrieved = {}
        for p, (s, top_k) in scores.items():
            top = np.argsort(-s[i], kind="stable")[:top_k]
            retrieved[p] = np.isin(np.arange(s.shape[1])[recent], top)
        sample = dataset.split("test")[i]
        user, item, target = (raw_ids(dataset, kind, [value]) for kind, value in
                              (("user", sample["user"]), ("item", sample["item"]), ("category", targets[i])))
        named = {"user_raw": user and user[0], "target_item_raw": item and item[0],
                 "target_category_raw": target and target[0]}
        hist = raw_ids(dataset, "category", categories[i][recent]) or categories[i][recent].tolist()
        who = "" if user is None else f", user {user[0]}"
        _case_study(out / f"case_{rank}.png", categories=["-" if c is None else c for c in hist],  # - = padding
                    relevance=relevance[i][recent], scores=shown, retrieved=retrieved,
                    title=f"test sample {i}{who}, target category {targets[i] if target is None else target[0]}")
        cases.append({"sample": int(i), "target_category": int(targets[i]), "figure": f"case_{rank}.png",
                      "ndcg_at_10": {p: float(at10[p][i]) for p in presets}, **named})
    return cases
