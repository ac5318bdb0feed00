"""`darec analyze KIND`: the registry of analyses and the one function that runs them."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from darec.analysis.attention import run_attention
from darec.analysis.attention_size import run_attention_size
from darec.analysis.common import ANALYSIS_TRAIN, AnalysisContext
from darec.analysis.convergence import run_convergence
from darec.analysis.discriminability import run_discriminability
from darec.analysis.gradients import run_gradients
from darec.analysis.retrieval import run_retrieval
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
}


def analyze(kind: str, *, data: str | Path, out: str | Path, runs: str | Path | None = None,
            presets: tuple[str, ...] | None = None, train: TrainConfig = ANALYSIS_TRAIN, dim: int = 16,
            steps: int = 100, sizes: tuple[int, ...] = (128, 64, 32, 16),
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run one analysis (or `all`) and return {kind: its JSON payload}; models are trained into `runs`
    (default OUT/runs) or reused from there."""
    kinds = list(ANALYSES) if kind == "all" else [kind]
    unknown = [k for k in kinds if k not in ANALYSES]
    if unknown:
        raise ConfigError(f"unknown analysis {unknown[0]!r}; known: all, {', '.join(ANALYSES)}")
    if steps < 1 or dim < 1 or not sizes or min(sizes) < 1:
        raise ConfigError("--steps, --dim and every --sizes value must be >= 1")
    out = Path(out)
    ctx = AnalysisContext(data_dir=Path(data), out_dir=out, runs_dir=Path(runs) if runs else out / "runs",
                          train=train, dim=dim, presets=tuple(presets) if presets else None, steps=steps,
                          sizes=tuple(sizes), progress=progress)
    ctx.dataset  # fail early on a directory that is not a prepared dataset
    results = {}
    for name in kinds:
        log.info("analysis %s", name)
        results[name] = ANALYSES[name](ctx)
    return results
