"""Embedding collapse (Guo et al., 2023, "On the Embedding Collapse When Scaling up Recommendation Models"):
how many directions of its width an embedding table really uses, over training.

Information abundance IA(E) = sum_i sigma_i / max_i sigma_i over the singular values of E (rows = ids):
1 for a rank-1 table, k for k orthonormal columns, at most the width. A table whose rows all drift into
a few directions has collapsed, whatever its width. Measured for every item and category table of every
embedding set (padding row 0 left out), for the concatenation of a multi-embedding model's sets, and for
the head input on a fixed sample of validation rows, at initialisation and at every validation.

Each run is the trainer's own (`darec.train.trainer.train`): it is stopped at each validation step
(`max_steps`), observed from `checkpoint.pt`, and resumed, which the trainer makes exact. The trace is
written after every observation to `RUN/collapse_trace.json`, so an interrupted analysis continues.

Notation: R table rows, d width; S sampled validation rows, F head-input width.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from darec.analysis.common import AnalysisContext, run_name, save_figure, write_analysis
from darec.checkpoint import load_checkpoint
from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.io import write_json
from darec.models import TwoStageModel, build_model
from darec.models.config import ModelConfig
from darec.train.config import TrainConfig
from darec.train.trainer import model_config_for, train

__all__ = ["information_abundance", "table_abundance", "head_input_abundance", "run_collapse", "TRACE_FILE"]

log = logging.getLogger(__name__)

TRACE_FILE = "collapse_trace.json"
FIELDS = ("item", "category")
HEAD_SAMPLE = 2048  # validation rows whose head input is measured


def information_abundance(matrix: np.ndarray | torch.Tensor) -> float:
    """sum of singular values / largest singular value; 0 for an all-zero matrix (no direction used)."""
    values = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    return float(values.sum() / values[0]) if len(values) and values[0] > 0 else 0.0


def table_abundance(model: TwoStageModel) -> dict[str, dict[str, Any]]:
    """IA of every item/category table: `<set>.<field>` (and `<set>.<field>@m` for multi-embedding set m > 0,
    plus `<set>.<field>@all`, the M sets side by side), with the roles reading it and its width."""
    out: dict[str, dict[str, Any]] = {}
    sets = [emb for emb, _ in model.embedding_sets]
    for name in sets[0].sets:
        roles = sorted(role for role, table in sets[0].layout.items() if table == name)
        for field in FIELDS:
            weights = [emb.sets[name].table(field).weight.detach()[1:].double().numpy() for emb in sets]  # row 0: padding
            for m, w in enumerate(weights):
                key = f"{name}.{field}" + (f"@{m}" if m else "")
                out[key] = {"ia": information_abundance(w), "width": w.shape[1], "roles": roles}
            if len(weights) > 1:
                joined = np.concatenate(weights, axis=1)
                out[f"{name}.{field}@all"] = {"ia": information_abundance(joined), "width": joined.shape[1],
                                              "roles": roles}
    return out


@torch.no_grad()
def head_input_abundance(model: TwoStageModel, dataset: PreparedDataset, *, rows: int = HEAD_SAMPLE) -> dict[str, Any]:
    """IA of the head input [v_t, r, v_t * r] (x M sets) on the first `rows` validation rows, evaluation mode."""
    was_training = model.training
    model.eval()
    loader = BatchLoader(dataset, "val", batch_size=rows, max_len=model.config.max_len,
                         group_sets=model.uses_candidate_sets)
    features = model(next(iter(loader))).features.double().numpy()                 # (S, F)
    model.train(was_training)
    return {"ia": information_abundance(features), "width": features.shape[1], "rows": features.shape[0]}


def _observe(model: TwoStageModel, dataset: PreparedDataset, step: int, val_auc: float | None) -> dict[str, Any]:
    return {"step": step, "val_auc": val_auc, "tables": table_abundance(model),
            "head_input": head_input_abundance(model, dataset)}


def _trace(ctx: AnalysisContext, preset: str, n_sets: int) -> dict[str, Any]:
    """Train (or continue) one run, observing it at initialisation and at every validation."""
    dataset = ctx.dataset
    model_overrides = {"dim": ctx.dim} if n_sets == 1 else {"dim": ctx.dim, "n_embedding_sets": n_sets}
    config = ctx.train.replace(preset=preset, model=model_overrides)
    every = config.eval_every
    if every is None:
        raise ConfigError("the collapse analysis needs a fixed eval_every (--eval-every)")
    name = run_name(preset, dim=ctx.dim, attention_dim=None, seed=config.seed, features=config.features)
    run_dir = ctx.runs_dir / f"collapse-{name}-m{n_sets}"
    trace_path = run_dir / TRACE_FILE
    identity = json.loads(json.dumps(config.to_dict()))
    trace = json.loads(trace_path.read_text()) if trace_path.exists() else None
    if trace is not None and trace.get("config") != identity:
        raise ConfigError(f"{run_dir} holds a collapse trace of another training configuration; pass another "
                          "--runs directory or delete it")
    if trace is None:
        if (run_dir / "checkpoint.pt").exists():
            raise ConfigError(f"{run_dir} holds a run without its collapse trace (it was trained by something "
                              "else); pass another --runs directory or delete it")
        model_config = model_config_for(dataset, config)
        torch.manual_seed(config.seed)  # the trainer's initialisation
        trace = {"config": identity, "model_config": model_config.to_dict(), "finished": False,
                 "points": [_observe(build_model(model_config), dataset, 0, None)]}
    bar = tqdm(desc=f"collapse {preset} M={n_sets}", unit="validation", disable=not ctx.progress, leave=False)
    while not trace["finished"]:
        step = trace["points"][-1]["step"]
        result = train(data=dataset, config=config, out_dir=run_dir, max_steps=(step // every + 1) * every,
                       progress=False)
        ckpt = load_checkpoint(run_dir / "checkpoint.pt", keys=("model_config", "model", "state"))
        model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        curve = ckpt["state"]["curve"]
        trace["points"].append(_observe(model, dataset, ckpt["state"]["step"], curve[-1]["val_auc"] if curve else None))
        if result["finished"]:
            trace.update(finished=True, test_auc=result["test"]["auc"], best_step=result["best_step"])
        write_json(trace_path, trace)
        bar.update(1)
    bar.close()
    return trace


def _plot(traces: dict[str, dict[str, Any]], path: Path) -> None:
    """IA against training step, one row per preset: item tables, category tables, head input. Colour: the
    table set; line style: the number of embedding sets M (for M > 1 the M sets side by side, `@all`)."""
    presets = list(dict.fromkeys(t["config"]["preset"] for t in traces.values()))
    counts = sorted({t["model_config"]["n_embedding_sets"] for t in traces.values()})
    styles = dict(zip(counts, ("-", "--", ":", "-.")))
    fig, axes = plt.subplots(len(presets), 3, figsize=(15, 3.4 * len(presets)), squeeze=False)
    for row, preset in zip(axes, presets):
        for trace in (t for t in traces.values() if t["config"]["preset"] == preset):
            m = trace["model_config"]["n_embedding_sets"]
            steps = [p["step"] for p in trace["points"]]
            names = list(dict.fromkeys(k.split(".")[0] for k in trace["points"][0]["tables"]))
            for ax, field in zip(row[:2], FIELDS):
                for i, name in enumerate(names):
                    key = f"{name}.{field}" + ("@all" if m > 1 else "")
                    ax.plot(steps, [p["tables"][key]["ia"] for p in trace["points"]], styles.get(m, "-"),
                            color=f"C{i}", marker=".", label=f"M={m} {key}")
            row[2].plot(steps, [p["head_input"]["ia"] for p in trace["points"]], styles.get(m, "-"), color="k",
                        marker=".", label=f"M={m}")
        for ax, title in zip(row, ("item tables", "category tables", "head input (validation rows)")):
            ax.set(xlabel="training step", ylabel="information abundance", title=f"{preset}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def run_collapse(ctx: AnalysisContext) -> dict[str, Any]:
    """Every preset x every `embedding_sets` value: IA traces, final values, test AUC; one figure."""
    n_sets_list = tuple(ctx.extra.get("embedding_sets") or (1,))
    traces = {}
    for preset in ctx.presets_or(("twin", "dare", "twin_4e")):
        for n_sets in n_sets_list:
            traces[f"{preset} M={n_sets}"] = _trace(ctx, preset, n_sets)
    _plot(traces, ctx.kind_dir("collapse") / "collapse.png")
    # Early stopping ends runs at different steps; the last step every run reached compares like with like.
    common = min(t["points"][-1]["step"] for t in traces.values())
    runs = {label: {"preset": t["config"]["preset"], "n_embedding_sets": t["model_config"]["n_embedding_sets"],
                    "tables": t["model_config"]["tables"], "test_auc": t.get("test_auc"), "best_step": t.get("best_step"),
                    "initial": _summary(t["points"][0]), "final": _summary(t["points"][-1]),
                    "at_common_step": _summary([p for p in t["points"] if p["step"] <= common][-1]),
                    "points": t["points"]}
            for label, t in traces.items()}
    for label, run in runs.items():
        log.info("collapse %s: final IA %s", label, run["final"])
    return write_analysis(ctx, "collapse", {"embedding_sets": list(n_sets_list), "common_step": common, "runs": runs})


def _summary(point: dict[str, Any]) -> dict[str, float]:
    return {"step": point["step"], **{k: v["ia"] for k, v in point["tables"].items()},
            "head_input": point["head_input"]["ia"]}
