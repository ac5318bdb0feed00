"""Table 1 as a command: every (preset, dim, seed) trained once, cached, and summarised with mean ± std over
seeds, a bootstrap interval over users and seeds, the new-item AUC and a paired test against TWIN."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darec.data.history_flags import target_in_history
from darec.data.store import PreparedDataset
from darec.errors import ConfigError, DataError
from darec.io import write_json, write_text
from darec.models.presets import PRESETS, TABLE1_PRESETS
from darec.train import distributed
from darec.train.config import TrainConfig
from darec.train.metrics import auc, logloss
from darec.train.significance import bootstrap_rows
from darec.train.trainer import TEST_LOGITS, environment, resolve_device, train

__all__ = ["run_table", "resolve_presets", "run_dir_for", "TableSpec", "PAPER_NAMES", "Evidence", "evidence_of",
           "summarise", "markdown_table"]

log = logging.getLogger(__name__)

PAPER_NAMES = {
    "eta": "ETA (2021)", "sdim": "SDIM (2022)", "din": "DIN (2018)", "din_full": "DIN (full sequence)",
    "twin": "TWIN (2023)", "twin_hard": "TWIN (hard)", "twin_proj": "TWIN (w/ proj.)",
    "twin_no_tr": "TWIN (w/o TR)", "twin_v2": "TWIN-V2 (2024)", "twin_4e": "TWIN-4E", "dare": "DARE",
    "dare_no_tr": "DARE (w/o TR)", "sim_hard": "SIM (hard)", "sim_soft": "SIM (soft)",
    "ifa": "IFA (2024)", "ifa_dare": "IFA + DARE tables", "ifa_no_set": "IFA (no candidate attention)",
}
METRICS = ("auc", "gauc", "logloss", "accuracy", "category_auc")
BASELINE = "twin"  # the row every other is tested against (the paper's strongest prior method)


@dataclass(frozen=True)
class TableSpec:
    presets: tuple[str, ...]
    dims: tuple[int, ...]
    seeds: tuple[int, ...]


def resolve_presets(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Expand `all` (every registered preset) and `table1` (the paper's rows), keeping order, no repeats."""
    out: list[str] = []
    for name in names:
        expanded = list(PRESETS) if name == "all" else list(TABLE1_PRESETS) if name == "table1" else [name]
        for preset in expanded:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
            if preset not in out:
                out.append(preset)
    return tuple(out)


def run_dir_for(out_dir: Path, config: TrainConfig, dataset_hash: str, env: dict[str, Any]) -> Path:
    """Runs are cached by the hash of their configuration, of the data and of the environment (threads,
    torch, device): a seed reproduces a result bit for bit only in the same environment."""
    blob = json.dumps({"config": config.key(), "data": dataset_hash, "env": env}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return out_dir / "runs" / f"{config.preset}-d{config.model.get('dim', 16)}-s{config.seed}-{key}"


def _load_finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if not path.exists() or not (run_dir / TEST_LOGITS).exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("finished") else None


def run_table(*, data: str | Path, out_dir: str | Path, spec: TableSpec, base: TrainConfig,
              progress: bool = True, n_replicates: int = 1000) -> list[dict[str, Any]]:
    """Train (or reuse) every run of the grid, then write table.md, table.csv, runs.json and curves.png.
    Under torchrun every run trains in all processes; rank 0 summarises (the others return [])."""
    dataset = PreparedDataset.open(data)
    out_dir = Path(out_dir)
    dataset_hash = str(dataset.manifest.get("content_sha256", ""))
    cluster = distributed.setup(resolve_device(base.device))  # under torchrun: every run in N processes
    if base.threads is not None:
        torch.set_num_threads(base.threads)
    env = environment(base, resolve_device(base.device))
    runs: list[dict[str, Any]] = []
    grid = [(p, d, s) for p in spec.presets for d in spec.dims for s in spec.seeds]
    for i, (preset, dim, seed) in enumerate(grid, 1):
        config = base.replace(preset=preset, seed=seed, model={**base.model, "dim": dim})
        run_dir = run_dir_for(out_dir, config, dataset_hash, env)
        result = _load_finished(run_dir)
        if result is None:
            log.info("[%d/%d] training %s dim=%d seed=%d", i, len(grid), preset, dim, seed)
            result = train(data=dataset, config=config, out_dir=run_dir, progress=progress)
        else:
            log.info("[%d/%d] cached %s dim=%d seed=%d", i, len(grid), preset, dim, seed)
        runs.append({"preset": preset, "dim": dim, "seed": seed, "run_dir": str(run_dir), **result})
    if not cluster.is_main:  # rank 0 summarises and writes
        return []
    log.info("bootstrapping test AUC over users and seeds (%d replicates)", n_replicates)
    evidence = evidence_of(dataset, max_len=base.max_len)
    rows = summarise(runs, spec, evidence, n_replicates=n_replicates)
    write_json(out_dir / "runs.json", {"spec": spec.__dict__, "dataset": dataset.manifest, "environment": env,
                                       "runs": runs})
    write_text(out_dir / "table.csv", _csv(rows))
    write_text(out_dir / "table.md", markdown_table(rows, spec, dataset.manifest, evidence, env))
    from darec.train.plots import plot_curves
    plot_curves(runs, out_dir / "curves.png")
    return rows


@dataclass(frozen=True)
class Evidence:
    """What every row is scored against: the test labels, users and the re-click flag."""

    labels: np.ndarray
    users: np.ndarray
    in_history: np.ndarray      # the target item is in the visible history (only positives can be)
    constant_logloss: float     # logloss of predicting the test positive rate for everyone
    shortcut_auc: float         # AUC of the in-history flag alone

    @property
    def new_item_subset(self) -> np.ndarray:
        """Positives whose item is not in the history, and every negative."""
        return ~(self.in_history & (self.labels == 1))


def evidence_of(dataset: PreparedDataset, *, max_len: int | None) -> Evidence:
    test = dataset.split("test")
    labels = np.asarray(test["label"]).astype(np.int64)
    flags = target_in_history(dataset, test, max_len=max_len)
    rate = labels.mean()
    constant = np.full(len(labels), np.log(rate / (1 - rate)))  # the logit of the positive rate
    return Evidence(labels=labels, users=np.asarray(test["user"]), in_history=flags,
                    constant_logloss=logloss(labels, constant), shortcut_auc=auc(labels, flags.astype(np.float64)))


def summarise(runs: list[dict[str, Any]], spec: TableSpec, evidence: Evidence, *,
              n_replicates: int = 1000) -> list[dict[str, Any]]:
    """One row per (preset, dim): seed mean/std of every metric, bootstrap intervals, paired p vs TWIN."""
    rows = []
    for dim in spec.dims:
        logits = {preset: [np.load(Path(r["run_dir"]) / TEST_LOGITS, allow_pickle=False) for r in runs
                           if r["preset"] == preset and r["dim"] == dim] for preset in spec.presets}
        for preset, arrays in logits.items():
            if any(len(a) != len(evidence.labels) for a in arrays):
                raise DataError(f"{preset} d={dim}: test logits do not match the test split; delete its run "
                                "folders and run again", path=Path(runs[0]["run_dir"]).parent)
        everything = bootstrap_rows(evidence.labels, evidence.users, logits, n_replicates=n_replicates)
        subset = evidence.new_item_subset
        new_items = everything if subset.all() else bootstrap_rows(  # no re-clicks: the same samples
            evidence.labels, evidence.users, logits, subset=subset, n_replicates=n_replicates)
        for preset in spec.presets:
            cell = [r for r in runs if r["preset"] == preset and r["dim"] == dim]
            row: dict[str, Any] = {"preset": preset, "dim": dim, "seeds": len(cell)}
            values = np.array([r["test"]["auc"] for r in cell], dtype=np.float64)
            row.update(auc_mean=float(values.mean()), auc_std=_std(values),
                       auc_ci_low=everything[preset].ci_low, auc_ci_high=everything[preset].ci_high,
                       auc_new_mean=new_items[preset].mean, auc_new_ci_low=new_items[preset].ci_low,
                       auc_new_ci_high=new_items[preset].ci_high)
            for metric in METRICS[1:]:
                values = np.array([r["test"][metric] for r in cell], dtype=np.float64)
                row[f"{metric}_mean"], row[f"{metric}_std"] = float(values.mean()), _std(values)
            row["p_vs_twin"] = (everything[preset].p_value_against(everything[BASELINE])
                                if BASELINE in everything and preset != BASELINE else None)
            row["name"] = PAPER_NAMES.get(preset, preset)
            rows.append(row)
    return rows


def _std(values: np.ndarray) -> float | None:
    """Sample std over seeds; undefined (an empty CSV cell) for a single seed rather than a false 0."""
    return float(values.std(ddof=1)) if len(values) > 1 else None


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    cell = lambda v: "" if v is None else str(v)  # noqa: E731
    return "\n".join([",".join(keys)] + [",".join(cell(r[k]) for k in keys) for r in rows]) + "\n"


def markdown_table(rows: list[dict[str, Any]], spec: TableSpec, manifest: dict[str, Any],
                   evidence: Evidence, env: dict[str, Any]) -> str:
    """One line per (preset, dim); bold where the paired test puts the row above TWIN at 5%."""
    protocol = manifest.get("protocol", {})
    lines = [f"# Test AUC over seeds {list(spec.seeds)}", "",
             f"Dataset `{manifest.get('source', '?')}` ({protocol.get('targets', 'paper')} targets), "
             f"{manifest.get('n_users', '?')} users, {len(evidence.labels):,} test samples, content hash "
             f"`{str(manifest.get('content_sha256', ''))[:12]}`. Environment: {env['threads']} threads, "
             f"torch {env['torch']}, {env['device']}.", "",
             "AUC: mean (std over seeds) and its 95% interval over users (bootstrap, seeds fixed). "
             "New-item AUC: positives whose item is not in the visible history, against all negatives "
             f"(the re-click flag alone scores AUC {evidence.shortcut_auc:.3f}; "
             f"{evidence.in_history[evidence.labels == 1].mean():.1%} of test positives have it). "
             "p: paired bootstrap against TWIN over users and seeds; **bold**: above TWIN at p < 0.05. "
             f"Logloss of a constant predictor: {evidence.constant_logloss:.4f}.", "",
             "| Setup | dim | AUC | 95% CI | new-item AUC | GAUC | logloss | p vs TWIN |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        auc_text = f"{r['auc_mean']:.4f}" + ("" if r["auc_std"] is None else f" ({r['auc_std']:.4f})")
        better = r["p_vs_twin"] is not None and r["p_vs_twin"] < 0.05 and r["auc_mean"] > _twin(rows, r)
        p_text = "–" if r["p_vs_twin"] is None else f"{r['p_vs_twin']:.3f}"
        lines.append(f"| {r['name']} | {r['dim']} | {f'**{auc_text}**' if better else auc_text} | "
                     f"[{r['auc_ci_low']:.4f}, {r['auc_ci_high']:.4f}] | {r['auc_new_mean']:.4f} | "
                     f"{r['gauc_mean']:.4f} | {r['logloss_mean']:.4f} | {p_text} |")
    return "\n".join(lines) + "\n"


def _twin(rows: list[dict[str, Any]], row: dict[str, Any]) -> float:
    return next(r["auc_mean"] for r in rows if r["preset"] == BASELINE and r["dim"] == row["dim"])
