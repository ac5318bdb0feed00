"""Representation discriminability (DARE paper Fig. 10): how much label information the aggregated
representation carries, measured by clustering it.

What is clustered (`features`):
- "h" (default, the paper's definition, §3.3): h = sum_i w_i (e_i * v_t) = v_t * r with TR, and the
  plain aggregate r = sum_i w_i e_i without TR;
- "head-input" (the reference's `collect_repr.py`): the whole head input, [v_t, r, v_t * r] with TR,
  [v_t, r] without.
Every test sample's vector is clustered with seeded MiniBatchKMeans for 10..1000 clusters (counts >= the
number of samples are skipped); the mutual information between cluster id and label is reported in nats
(`mi_nats`) and normalised (`nmi`). Several K-means seeds on one trained model give the spread.

Notation: N test samples, F clustered width (E for h, 2E or 3E for the head input).
"""
from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from darec.analysis.common import AnalysisContext, load_model, save_figure, test_batches, trained_run, write_analysis
from darec.errors import ConfigError
from darec.models import TwoStageModel

__all__ = ["representations", "cluster_information", "run_discriminability", "CLUSTER_COUNTS", "TR_PAIRS",
           "FEATURES"]

log = logging.getLogger(__name__)

CLUSTER_COUNTS = (10, 20, 50, 100, 200, 500, 1000)
DEFAULT_PRESETS = ("dare", "twin", "twin_4e", "din", "dare_no_tr", "twin_no_tr")
TR_PAIRS = (("dare", "dare_no_tr"), ("twin", "twin_no_tr"))
# what is clustered, as (with TR, without TR)
FEATURES = {"h": ("h = v_t*r", "h = r"), "head-input": ("[v_t, r, v_t*r]", "[v_t, r]")}


@torch.no_grad()
def representations(model: TwoStageModel, batches, *, features: str = "h") -> tuple[np.ndarray, np.ndarray]:
    """(N, F) vectors to cluster (see the module docstring) and (N,) labels, evaluation mode."""
    if features not in FEATURES:
        raise ConfigError(f"discriminability features must be one of {sorted(FEATURES)}, got {features!r}")
    model.eval()
    vectors, labels = [], []
    for batch in batches:
        out = model(batch)
        if features == "head-input":
            vectors.append(out.features.float().numpy())
        else:
            target = model.embeddings.target(batch.target_item, batch.target_category,
                                             batch.target_features)                                # (B, E)
            r = out.interest.r
            vectors.append((target * r if model.config.target_aware else r).float().numpy())
        labels.append(batch.label.numpy())
    return np.concatenate(vectors), np.concatenate(labels).astype(np.int64)


def cluster_information(features: np.ndarray, labels: np.ndarray, *, counts: tuple[int, ...] = CLUSTER_COUNTS,
                        seeds: tuple[int, ...] = (1,)) -> dict:
    """MI (nats) and NMI between K-means clusters and labels: arrays (seeds, counts) per measure."""
    counts = tuple(k for k in counts if k < len(features))
    mi = np.zeros((len(seeds), len(counts)))
    nmi = np.zeros_like(mi)
    # One BLAS/OpenMP thread: on a busy machine the threaded K-means spins and runs 10-30x slower.
    with threadpool_limits(1):
        for i, seed in enumerate(seeds):
            for j, k in enumerate(counts):
                clusters = MiniBatchKMeans(n_clusters=k, random_state=seed).fit_predict(features)
                mi[i, j] = mutual_info_score(labels, clusters)
                nmi[i, j] = normalized_mutual_info_score(labels, clusters)
    return {"n_clusters": list(counts), "mi_nats": mi, "nmi": nmi}


def _plot(ax, results: dict, presets, key: str) -> None:
    for preset in presets:
        r = results[preset]
        values = np.asarray(r[key])
        mean = values.mean(0)
        ax.plot(r["n_clusters"], mean, marker=".", label=preset)
        ax.fill_between(r["n_clusters"], values.min(0), values.max(0), alpha=0.2)
    ax.set(xscale="log", xlabel="number of clusters",
           ylabel="MI(cluster; label) [nats]" if key == "mi_nats" else "normalised MI (cluster; label)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def run_discriminability(ctx: AnalysisContext, *, kmeans_seeds: int = 3) -> dict:
    dataset = ctx.dataset
    out = ctx.kind_dir("discriminability")
    seeds = tuple(range(ctx.seed, ctx.seed + kmeans_seeds))
    features = ctx.extra.get("cluster_features", "h")
    results = {}
    for preset in ctx.presets_or(DEFAULT_PRESETS):
        model = load_model(trained_run(ctx, preset).run_dir)
        vectors, labels = representations(model, test_batches(dataset, model), features=features)
        results[preset] = {**cluster_information(vectors, labels, seeds=seeds), "samples": len(labels),
                           "feature_dim": int(vectors.shape[1]),
                           "features": FEATURES[features][0 if model.config.target_aware else 1]}
    main = [p for p in results if not p.endswith("_no_tr")] or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _plot(axes[0], results, main, "nmi")
    _plot(axes[1], results, main, "mi_nats")
    fig.suptitle(f"discriminability of {' / '.join(FEATURES[features])} (K-means seeds {list(seeds)}; "
                 "band = min..max)")
    save_figure(fig, out / "discriminability.png")
    pairs = [pair for pair in TR_PAIRS if all(p in results for p in pair)]
    if pairs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        _plot(axes[0], results, [p for pair in pairs for p in pair], "nmi")
        _plot(axes[1], results, [p for pair in pairs for p in pair], "mi_nats")
        fig.suptitle("with vs without the target-aware representation (TR)")
        save_figure(fig, out / "tr_comparison.png")
    log.info("discriminability NMI at %s clusters: %s", CLUSTER_COUNTS[0],
             {p: round(float(np.asarray(r["nmi"])[:, 0].mean()), 4) for p, r in results.items() if r["n_clusters"]})
    return write_analysis(ctx, "discriminability", {"kmeans_seeds": seeds, "features": features,
                                                    "models": results, "tr_pairs": pairs})
