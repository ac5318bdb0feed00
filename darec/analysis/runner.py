"""`darec analyze KIND`: the registry of analyses and the one function that runs them."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from darec.analysis.attention import run_attention
from darec.analysis.attention_size import run_attention_size
from darec.analysis.collapse import run_collapse
from darec.analysis.common import ANALYSIS_TRAIN, AnalysisContext
from darec.analysis.convergence import run_convergence
from darec.analysis.discriminability import FEATURES, run_discriminability
from darec.analysis.gradients import run_gradients
from darec.analysis.retrieval import run_retrieval
from darec.data.loader import feature_fields
from darec.errors import ConfigError
from darec.train.config import TrainConfig

__all__ = ["ANALYSES", "analyze"]

log = logging.getLogger(__name__)

ANALYSES: dict[str, Callable[[AnalysisContext], dict[str, Any]]] = {
    "gradients": run_gradients,
    "attention": run_attention,
    "retrieval": run_retrieval,
    "discriminability": run_discriminability,
    "convergence": run_convergence,
    "attention-size": run_attention_size,
    "collapse": run_collapse,
}


def analyze(kind: str, *, data: str | Path, out: str | Path, runs: str | Path | None = None,
            presets: tuple[str, ...] | None = None, train: TrainConfig = ANALYSIS_TRAIN, dim: int = 16,
            steps: int = 100, sizes: tuple[int, ...] = (128, 64, 32, 16), representation_dim: int | None = None,
            cluster_features: str = "h", embedding_sets: tuple[int, ...] = (1,),
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run one analysis (or `all`) and return {kind: its JSON payload}; models are trained into `runs`
    (default OUT/runs) or reused from there.

    `representation_dim`: attention-size's fixed K_R (default the largest of `sizes`);
    `cluster_features`: what discriminability clusters, "h" (the paper's) or "head-input" (the reference's);
    `embedding_sets`: collapse's multi-embedding set counts M (each preset is trained once per M).
    `train.features` picks the side features the models read (all, none or names; `--features`)."""
    kinds = list(ANALYSES) if kind == "all" else [kind]
    unknown = [k for k in kinds if k not in ANALYSES]
    if unknown:
        raise ConfigError(f"unknown analysis {unknown[0]!r}; known: all, {', '.join(ANALYSES)}")
    counts = [steps, dim, *sizes, *embedding_sets] + ([] if representation_dim is None else [representation_dim])
    if not sizes or min(counts) < 1:
        raise ConfigError("--steps, --dim, --representation-dim and every --sizes and --embedding-sets value "
                          "must be >= 1")
    if cluster_features not in FEATURES:
        raise ConfigError(f"--cluster-features must be one of {', '.join(FEATURES)}, got {cluster_features!r}")
    out = Path(out)
    ctx = AnalysisContext(data_dir=Path(data), out_dir=out, runs_dir=Path(runs) if runs else out / "runs",
                          train=train, dim=dim, presets=tuple(presets) if presets else None, steps=steps,
                          sizes=tuple(sizes), progress=progress,
                          extra={"representation_dim": representation_dim, "cluster_features": cluster_features,
                                 "embedding_sets": tuple(embedding_sets)})
    feature_fields(ctx.dataset, train.features)  # fail early: not a prepared dataset, or unknown feature names
    results = {}
    for name in kinds:
        log.info("analysis %s", name)
        results[name] = ANALYSES[name](ctx)
    return results
