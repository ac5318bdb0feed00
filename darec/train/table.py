"""Table 1 as a command: every (preset, dim, seed) trained once, cached, and summarised as mean ± std."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darec.data.store import PreparedDataset
from darec.io import write_json, write_text
from darec.models.presets import PRESETS, TABLE1_PRESETS
from darec.errors import ConfigError
from darec.train.config import TrainConfig
from darec.train.trainer import train

__all__ = ["run_table", "resolve_presets", "run_dir_for", "TableSpec", "PAPER_NAMES"]

log = logging.getLogger(__name__)

PAPER_NAMES = {
    "eta": "ETA (2021)", "sdim": "SDIM (2022)", "din": "DIN (2018)", "din_full": "DIN (full sequence)",
    "twin": "TWIN (2023)", "twin_hard": "TWIN (hard)", "twin_proj": "TWIN (w/ proj.)",
    "twin_no_tr": "TWIN (w/o TR)", "twin_v2": "TWIN-V2 (2024)", "twin_4e": "TWIN-4E", "dare": "DARE",
    "dare_no_tr": "DARE (w/o TR)", "sim_hard": "SIM (hard)", "sim_soft": "SIM (soft)",
}
METRICS = ("auc", "gauc", "logloss", "accuracy", "category_auc")


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


def run_dir_for(out_dir: Path, config: TrainConfig, dataset_hash: str) -> Path:
    """Runs are cached by the hash of their configuration and of the data they were trained on."""
    key = hashlib.sha256(f"{config.key()}:{dataset_hash}".encode()).hexdigest()[:12]
    return out_dir / "runs" / f"{config.preset}-d{config.model.get('dim', 16)}-s{config.seed}-{key}"


def _load_finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("finished") else None


def run_table(*, data: str | Path, out_dir: str | Path, spec: TableSpec, base: TrainConfig,
              progress: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) every run of the grid, then write table.md, table.csv, runs.json and curves.png."""
    dataset = PreparedDataset.open(data)
    out_dir = Path(out_dir)
    dataset_hash = str(dataset.manifest.get("content_sha256", ""))
    runs: list[dict[str, Any]] = []
    grid = [(p, d, s) for p in spec.presets for d in spec.dims for s in spec.seeds]
    for i, (preset, dim, seed) in enumerate(grid, 1):
        config = base.replace(preset=preset, seed=seed, model={**base.model, "dim": dim})
        run_dir = run_dir_for(out_dir, config, dataset_hash)
        result = _load_finished(run_dir)
        if result is None:
            log.info("[%d/%d] training %s dim=%d seed=%d", i, len(grid), preset, dim, seed)
            result = train(data=dataset, config=config, out_dir=run_dir, progress=progress)
        else:
            log.info("[%d/%d] cached %s dim=%d seed=%d", i, len(grid), preset, dim, seed)
        runs.append({"preset": preset, "dim": dim, "seed": seed, "run_dir": str(run_dir), **result})
    rows = summarise(runs, spec)
    write_json(out_dir / "runs.json", {"spec": spec.__dict__, "dataset": dataset.manifest, "runs": runs})
    write_text(out_dir / "table.csv", _csv(rows))
    write_text(out_dir / "table.md", markdown_table(rows, spec, dataset.manifest))
    from darec.train.plots import plot_curves
    plot_curves(runs, out_dir / "curves.png")
    return rows


def summarise(runs: list[dict[str, Any]], spec: TableSpec) -> list[dict[str, Any]]:
    rows = []
    for preset in spec.presets:
        for dim in spec.dims:
            cell = [r for r in runs if r["preset"] == preset and r["dim"] == dim]
            row: dict[str, Any] = {"preset": preset, "name": PAPER_NAMES.get(preset, preset), "dim": dim,
                                   "seeds": len(cell)}
            for metric in METRICS:
                values = np.array([r["test"][metric] for r in cell], dtype=np.float64)
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n"


def markdown_table(rows: list[dict[str, Any]], spec: TableSpec, manifest: dict[str, Any]) -> str:
    """Test AUC mean (std over seeds) per preset and embedding dim; the best mean per column in bold."""
    lines = [f"# Test AUC, mean (std) over seeds {list(spec.seeds)}", "",
             f"Dataset: `{manifest.get('source', '?')}`, {manifest.get('n_users', '?')} users, "
             f"content hash `{str(manifest.get('content_sha256', ''))[:12]}`.", ""]
    header = "| Setup | " + " | ".join(f"dim = {d}" for d in spec.dims) + " |"
    lines += [header, "|---|" + "---|" * len(spec.dims)]
    best = {d: max(r["auc_mean"] for r in rows if r["dim"] == d) for d in spec.dims}
    for preset in spec.presets:
        cells = []
        for d in spec.dims:
            r = next(x for x in rows if x["preset"] == preset and x["dim"] == d)
            text = f"{r['auc_mean']:.5f} ({r['auc_std']:.5f})"
            cells.append(f"**{text}**" if r["auc_mean"] == best[d] else text)
        lines.append(f"| {PAPER_NAMES.get(preset, preset)} | " + " | ".join(cells) + " |")
    lines += ["", "Other test metrics (mean over seeds): GAUC by user, logloss of the main head, accuracy.", "",
              "| Setup | dim | GAUC | logloss | accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['dim']} | {r['gauc_mean']:.5f} | {r['logloss_mean']:.5f} | "
                     f"{r['accuracy_mean']:.5f} |")
    return "\n".join(lines) + "\n"
