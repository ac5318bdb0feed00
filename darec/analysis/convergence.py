"""Convergence (DARE paper Fig. 11a-b): validation accuracy and AUC against training steps, read from the
trainer's recorded curve, and the steps each model needs to reach a common AUC threshold.

Threshold: 0.5 + q * (best AUC of all compared models - 0.5), i.e. a fraction q of the best lift over
chance (q = 0.95 by default). A plain fraction of the AUC itself (0.95 * 0.85 = 0.81) is reached by
almost any model at its first validation, so it would not separate them.
"""
from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np

from darec.analysis.common import AnalysisContext, save_figure, trained_run, write_analysis

__all__ = ["steps_to_reach", "auc_threshold", "run_convergence"]

log = logging.getLogger(__name__)


def auc_threshold(best_aucs: list[float], fraction: float = 0.95) -> float:
    """0.5 + fraction * (max(best_aucs) - 0.5)."""
    return 0.5 + fraction * (max(best_aucs) - 0.5)


def steps_to_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """First recorded step whose value is >= threshold; None when never reached."""
    hit = np.flatnonzero(np.asarray(values) >= threshold)
    return int(np.asarray(steps)[hit[0]]) if len(hit) else None


def run_convergence(ctx: AnalysisContext, *, fraction: float = 0.95) -> dict:
    out = ctx.kind_dir("convergence")
    curves = {}
    for preset in ctx.presets_or(("dare", "twin")):
        curve = trained_run(ctx, preset).result["curve"]
        curves[preset] = {k: np.array([p[k] for p in curve]) for k in ("step", "val_auc", "val_accuracy")}
    threshold = auc_threshold([float(c["val_auc"].max()) for c in curves.values()], fraction)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for preset, c in curves.items():
        axes[0].plot(c["step"], c["val_accuracy"], marker=".", label=preset)
        axes[1].plot(c["step"], c["val_auc"], marker=".", label=preset)
    axes[1].axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:.4f}")
    axes[0].set(xlabel="training step", ylabel="validation accuracy")
    axes[1].set(xlabel="training step", ylabel="validation AUC")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "convergence.png")
    models = {p: {"steps": c["step"], "val_auc": c["val_auc"], "val_accuracy": c["val_accuracy"],
                  "best_val_auc": float(c["val_auc"].max()),
                  "steps_to_threshold": steps_to_reach(c["step"], c["val_auc"], threshold)}
              for p, c in curves.items()}
    log.info("steps to AUC %.4f: %s", threshold, {p: m["steps_to_threshold"] for p, m in models.items()})
    return write_analysis(ctx, "convergence", {"threshold_auc": threshold, "threshold_fraction_of_lift": fraction,
                                               "models": models})
