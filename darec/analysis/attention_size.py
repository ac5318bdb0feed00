"""Attention size (DARE paper Fig. 11c-d): test AUC and measured search-stage time against the attention
dimension. As in the paper (K_A = 128 is its baseline "1", then 64 and 32), DARE keeps K_R fixed at the
largest size and shrinks K_A below it (possible because its attention tables are its own; K_R can be
set with `representation_dim`); TWIN has one table, so its only knob is the shared dimension.

Search-stage time = the model's scorer over all L behaviours + top-K selection, on one fixed test batch,
median of repeats after warm-up (evaluation mode, no gradients, this machine's device).
"""
from __future__ import annotations

import logging
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from darec.analysis.common import AnalysisContext, load_model, save_figure, test_batches, trained_run, write_analysis
from darec.data.batch import Batch
from darec.errors import ConfigError
from darec.models import TwoStageModel

__all__ = ["search_time", "run_attention_size"]

log = logging.getLogger(__name__)


@torch.no_grad()
def search_time(model: TwoStageModel, batch: Batch, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of scorer + select over `batch` (the search stage only, no value aggregation)."""
    search = model.search
    if not (hasattr(search, "scorer") and hasattr(search, "select")):
        raise ConfigError(f"search {model.config.search!r} has no separate scorer/select stage to time")
    model.eval()
    sync = torch.cuda.synchronize if batch.mask.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        search.select(search.scorer(model.embeddings, batch), batch, search.top_k)     # (B, K)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_attention_size(ctx: AnalysisContext, *, batch_size: int = 1024, repeats: int = 20) -> dict:
    dataset = ctx.dataset
    out = ctx.kind_dir("attention-size")
    sizes = tuple(sorted(set(ctx.sizes), reverse=True))
    representation_dim = ctx.extra.get("representation_dim") or sizes[0]
    plans = {"dare": [dict(dim=representation_dim, attention_dim=s) for s in sizes],  # K_A shrinks, K_R fixed
             "twin": [dict(dim=s) for s in sizes]}                                     # one shared dim
    results = {}
    chosen = [p for p in ctx.presets_or(tuple(plans)) if p in plans]
    if not chosen:
        raise ConfigError(f"attention-size compares {sorted(plans)}; none of them was asked for")
    for preset in chosen:
        rows = []
        for plan, size in zip(plans[preset], sizes):
            run = trained_run(ctx, preset, **plan)
            model = load_model(run.run_dir)
            batch = next(iter(test_batches(dataset, model, batch_size=batch_size)))
            rows.append({"attention_dim": size, "dim": run.dim, "test_auc": run.result["test"]["auc"],
                         "search_seconds": search_time(model, batch, repeats=repeats),
                         "batch_size": len(batch), "history_length": int(batch.mask.shape[1])})
        results[preset] = rows
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for preset, rows in results.items():
        x = [r["attention_dim"] for r in rows]
        axes[0].plot(x, [r["test_auc"] for r in rows], marker="o", label=preset)
        axes[1].plot(x, [1e3 * r["search_seconds"] for r in rows], marker="o", label=preset)
    axes[0].set(xlabel="attention dim per field (K_A; TWIN: shared dim)", ylabel="test AUC", xscale="log")
    axes[1].set(xlabel="attention dim per field", ylabel="search time per batch (ms, median)", xscale="log")
    for ax in axes:
        ax.set_xticks(sizes)
        ax.set_xticklabels(sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "attention_size.png")
    return write_analysis(ctx, "attention-size", {"sizes": sizes, "representation_dim": representation_dim,
                                                  "models": results,
                                                  "timing": {"device": "cpu", "repeats": repeats,
                                                             "threads": torch.get_num_threads()}})
