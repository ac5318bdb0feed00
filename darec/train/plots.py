"""Training-curve figures for `darec table` and `darec demo`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from darec.io import atomic_file  # noqa: E402

__all__ = ["plot_curves"]


def plot_curves(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Validation AUC and logloss against training step, one line per preset (mean over seeds), per dim."""
    dims = sorted({r["dim"] for r in runs})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 7), squeeze=False)
    for col, dim in enumerate(dims):
        for preset in dict.fromkeys(r["preset"] for r in runs if r["dim"] == dim):
            curves = [r["curve"] for r in runs if r["dim"] == dim and r["preset"] == preset]
            n = min(len(c) for c in curves)
            steps = [p["step"] for p in curves[0][:n]]
            for row, metric in enumerate(("val_auc", "val_logloss")):
                values = np.mean([[p[metric] for p in c[:n]] for c in curves], axis=0)
                axes[row][col].plot(steps, values, marker=".", label=preset)
        for row, label in enumerate(("validation AUC", "validation logloss")):
            axes[row][col].set(xlabel="training step", ylabel=label, title=f"dim = {dim}")
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
