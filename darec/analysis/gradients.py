"""Gradient domination and conflict (DARE paper, Figs. 2-3): what the attention path and the
representation path each send to the embedding tables.

Every lookup is recorded by `RoleEmbeddings.recorder`; the loss gradient w.r.t. each lookup's output is
scattered back (`index_add_`) into a table-shaped buffer of its path: attention = query + key roles
(including the position-bias lookups and the aux head's full-sequence scores), representation =
target + value roles. The two buffers of a table sum to that table's true gradient.

Notation: B batch, L history length, N table rows, d row width, S observed steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from darec.analysis.common import AnalysisContext, save_figure, write_analysis
from darec.data.batch import Batch
from darec.data.loader import BatchLoader
from darec.models import TwoStageModel, build_model, preset_config

__all__ = ["PATHS", "PathGradients", "split_gradients", "training_loss", "row_cosines", "step_statistics",
           "category_conflict_ratio", "run_gradients"]

log = logging.getLogger(__name__)

PATHS = {"query": "attention", "key": "attention", "target": "representation", "value": "representation"}


@dataclass(frozen=True)
class PathGradients:
    """Per (table set, field): the attention-path and representation-path gradient, each (N, d)."""

    attention: dict[tuple[str, str], torch.Tensor]
    representation: dict[tuple[str, str], torch.Tensor]
    parameters: list[torch.Tensor]     # d loss / d p for every model parameter, in model.parameters() order


def training_loss(model: TwoStageModel, out, batch: Batch, *, aux_weight: float = 1.0,
                  l2: float = 1e-6) -> torch.Tensor:
    """The trainer's loss: BCE of the main head + aux_weight * BCE of the aux head + L2 on non-embedding,
    non-bias weights."""
    loss = F.binary_cross_entropy_with_logits(out.logit, batch.label)
    if out.aux_logit is not None:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(out.aux_logit, batch.label)
    if l2 > 0:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        weights = [p for name, p in model.named_parameters() if "bias" not in name and id(p) not in embedding_ids]
        loss = loss + l2 * torch.stack([w.pow(2).sum() for w in weights]).sum()
    return loss


def split_gradients(model: TwoStageModel, batch: Batch, *, aux_weight: float = 1.0,
                    l2: float = 1e-6) -> PathGradients:
    """One forward + one autograd pass; nothing in the model changes (no .grad is written)."""
    emb = model.embeddings
    emb.recorder = []
    try:
        out = model(batch)
        loss = training_loss(model, out, batch, aux_weight=aux_weight, l2=l2)
        lookups = emb.recorder
    finally:
        emb.recorder = None
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [lk.output for lk in lookups] + params, allow_unused=True)
    buffers: dict[str, dict[tuple[str, str], torch.Tensor]] = {"attention": {}, "representation": {}}
    for lookup, grad in zip(lookups, grads[:len(lookups)]):
        key = (lookup.table_set, lookup.field)
        weight = emb.sets[lookup.table_set].table(lookup.field).weight
        for bufs in buffers.values():
            bufs.setdefault(key, torch.zeros_like(weight))
        if grad is not None:
            width = grad.shape[-1]
            buffers[PATHS[lookup.role]][key].index_add_(0, lookup.ids.reshape(-1), grad.reshape(-1, width))  # (N, d)
    param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[len(lookups):])]
    return PathGradients(attention=buffers["attention"], representation=buffers["representation"],
                         parameters=param_grads)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of (N, d) arrays; NaN where either row is zero."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((na > 0) & (nb > 0), (a * b).sum(1) / (na * nb), np.nan)


def step_statistics(attention: np.ndarray, representation: np.ndarray) -> dict[str, float]:
    """Norms and agreement of one step's two gradients of one table (padding row already removed).

    mean_row_norm_*: mean over all rows, zero rows included (the reference's domination measure);
    global_norm_*: Frobenius norm; mean_cosine: mean over rows where both are non-zero (NaN if none)."""
    cos = row_cosines(attention, representation)
    return {"mean_row_norm_attention": float(np.linalg.norm(attention, axis=1).mean()),
            "mean_row_norm_representation": float(np.linalg.norm(representation, axis=1).mean()),
            "global_norm_attention": float(np.linalg.norm(attention)),
            "global_norm_representation": float(np.linalg.norm(representation)),
            "mean_cosine": float(np.nanmean(cos)) if np.isfinite(cos).any() else float("nan")}


def category_conflict_ratio(dots: np.ndarray) -> np.ndarray:
    """dots: (S, N) per-step, per-row <g_attention, g_representation>. Per row, the share of steps with a
    negative dot among steps with a non-zero one; NaN for rows never touched by both paths."""
    conflicts, agreements = (dots < 0).sum(0), (dots > 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(conflicts + agreements > 0, conflicts / (conflicts + agreements), np.nan)


def _observe(ctx: AnalysisContext, preset: str) -> dict:
    """Train `preset` for ctx.steps Adam steps from scratch, recording both paths' gradients per step."""
    dataset = ctx.dataset
    torch.manual_seed(ctx.seed)
    config = preset_config(preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                           max_len=dataset.max_len, dim=ctx.dim)
    model = build_model(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=ctx.train.lr)
    loader = BatchLoader(dataset, "train", batch_size=ctx.train.batch_size, shuffle=True, seed=ctx.seed)
    shared = sorted({s for s in model.embeddings.layout.values()
                     if {PATHS[r] for r, t in model.embeddings.layout.items() if t == s} == set(PATHS.values())})
    per_step: list[dict] = []
    dots: dict[str, list[np.ndarray]] = {}
    overlap_rows = 0
    paths: dict[str, set[str]] = {}
    bar = tqdm(total=ctx.steps, desc=f"gradients {preset}", disable=not ctx.progress, leave=False)
    epoch = 0
    while len(per_step) < ctx.steps:
        for batch in loader.batches(epoch):
            g = split_gradients(model, batch, aux_weight=ctx.train.aux_weight, l2=ctx.train.l2)
            step: dict = {}
            for (table_set, field), att in g.attention.items():
                rep = g.representation[(table_set, field)]
                first = 0 if field == "position" else 1     # item/category row 0 is padding; position 0 is the target's
                att_np, rep_np = att[first:].numpy(), rep[first:].numpy()
                both = (np.abs(att_np).sum(1) > 0) & (np.abs(rep_np).sum(1) > 0)
                overlap_rows += int(both.sum())
                if table_set in shared:
                    step[f"{table_set}.{field}"] = step_statistics(att_np, rep_np)
                    dots.setdefault(f"{table_set}.{field}", []).append((att_np * rep_np).sum(1))
                else:
                    seen = paths.setdefault(f"{table_set}.{field}", set())
                    seen.update(name for name, arr in (("attention", att_np), ("representation", rep_np))
                                if arr.any())
            per_step.append(step)
            for p, grad in zip(model.parameters(), g.parameters):
                p.grad = grad
            optimizer.step()
            bar.update(1)
            if len(per_step) >= ctx.steps:
                break
        epoch += 1
    bar.close()
    return {"layout": dict(model.embeddings.layout), "shared_sets": shared, "per_step": per_step,
            "paths_by_table": {k: sorted(v) for k, v in paths.items()},
            "dots": {k: np.stack(v) for k, v in dots.items()}, "rows_touched_by_both_paths": overlap_rows}


def _summarise(observed: dict) -> dict:
    per_step, summary = observed["per_step"], {}
    for table in observed["dots"]:
        stats = [s[table] for s in per_step]
        arr = {k: np.array([s[k] for s in stats]) for k in stats[0]}
        cos = arr["mean_cosine"][np.isfinite(arr["mean_cosine"])]
        ratio = category_conflict_ratio(observed["dots"][table])
        seen = ratio[np.isfinite(ratio)]
        summary[table] = {
            "row_norm_ratio_repr_over_attn": float(arr["mean_row_norm_representation"].mean()
                                                   / arr["mean_row_norm_attention"].mean()),
            "global_norm_ratio_repr_over_attn": float(arr["global_norm_representation"].mean()
                                                      / arr["global_norm_attention"].mean()),
            "mean_row_norm_attention": float(arr["mean_row_norm_attention"].mean()),
            "mean_row_norm_representation": float(arr["mean_row_norm_representation"].mean()),
            "steps_with_cosine": int(len(cos)),
            "fraction_steps_conflicting": float((cos < 0).mean()) if len(cos) else None,
            "per_step_mean_cosine": arr["mean_cosine"],
            "conflict_ratio_histogram": np.histogram(seen, bins=10, range=(0, 1))[0],
            "fraction_rows_conflict_over_half": float((seen > 0.5).mean()) if len(seen) else None,
            "rows_seen": int(len(seen)),
        }
    return summary


def _plots(ctx: AnalysisContext, preset: str, summary: dict, observed: dict) -> None:
    """One figure per preset: a row per shared table; per-step cosine histogram, per-row conflict
    histogram, and the two paths' gradient norms over the steps."""
    fig, axes = plt.subplots(len(summary), 3, figsize=(15, 3.4 * len(summary)), squeeze=False)
    for (table, s), (ax_cos, ax_conf, ax_norm) in zip(summary.items(), axes):
        cos = np.array(s["per_step_mean_cosine"], dtype=float)
        cos = cos[np.isfinite(cos)]
        ax_cos.hist(cos, bins=40, range=(-1, 1), weights=np.full(len(cos), 100 / max(len(cos), 1)))
        ax_cos.axvline(0, color="red", lw=1)
        ax_cos.set(xlabel="per-step mean row cosine(attention, representation)", ylabel="% of steps",
                   title=f"{table}: {100 * (s['fraction_steps_conflicting'] or 0):.1f}% of steps conflicting")
        ax_conf.bar(np.arange(10) * 10 + 5, s["conflict_ratio_histogram"], width=9)
        ax_conf.axvline(50, color="red", lw=1)
        ax_conf.set(xlabel="conflict ratio of a row over the steps (%)", ylabel="rows",
                    title=f"{table}: {100 * (s['fraction_rows_conflict_over_half'] or 0):.0f}% of rows above 50%")
        steps = [st[table] for st in observed["per_step"]]
        for path in ("attention", "representation"):
            ax_norm.plot([st[f"mean_row_norm_{path}"] for st in steps], label=path)
        ax_norm.set(xlabel="step", ylabel="mean row L2 norm", yscale="log",
                    title=f"{table}: representation / attention = {s['row_norm_ratio_repr_over_attn']:.2f}")
        ax_norm.legend(fontsize=8)
    fig.suptitle(f"{preset}: gradients reaching the shared tables")
    save_figure(fig, ctx.kind_dir("gradients") / f"gradients_{preset}.png")


def run_gradients(ctx: AnalysisContext) -> dict:
    """Shared-table presets: domination and conflict statistics. Decoupled ones: which path feeds which set."""
    results = {}
    for preset in ctx.presets_or(("twin", "dare")):
        observed = _observe(ctx, preset)
        summary = _summarise(observed)
        if summary:
            _plots(ctx, preset, summary, observed)
        results[preset] = {
            "layout": observed["layout"], "steps": len(observed["per_step"]), "tables": summary,
            "paths_reaching_unshared_tables": observed["paths_by_table"],
            "rows_touched_by_both_paths": observed["rows_touched_by_both_paths"],
            "cosine": "defined" if summary else "undefined: no table receives both paths (disjoint support)",
        }
        log.info("gradients %s: %s", preset, {t: (round(s["row_norm_ratio_repr_over_attn"], 3),
                                                  s["fraction_steps_conflicting"]) for t, s in summary.items()})
    return write_analysis(ctx, "gradients", {"presets": results})
