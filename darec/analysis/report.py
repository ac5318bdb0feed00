"""`darec report DIR`: one Markdown page from the analyses' JSON and PNGs (and Table 1 when present).

Reads `DIR/<kind>/<kind>.json` for every analysis that has run and `table.md` / `table.csv` /
`runs.json` from `DIR` or from `table_dir`; writes `DIR/report.md` with relative links to the figures.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from darec.errors import ConfigError
from darec.io import write_text

__all__ = ["build_report", "write_report"]

log = logging.getLogger(__name__)

_KINDS = ("gradients", "attention", "retrieval", "discriminability", "convergence", "attention-size")
_TITLES = {"gradients": "Gradient domination and conflict (Figs. 2-3)", "attention": "Attention accuracy (Fig. 8)",
           "retrieval": "Retrieval quality (Fig. 9)", "discriminability": "Representation discriminability (Fig. 10)",
           "convergence": "Convergence (Fig. 11a-b)", "attention-size": "Attention size (Fig. 11c-d)"}


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _gradients(r: dict) -> list[str]:
    lines = ["| model | table | repr/attn row-norm ratio | repr/attn global-norm ratio | steps conflicting "
             "| rows with conflict ratio > 50 % |", "|---|---|---|---|---|---|"]
    for preset, p in r["presets"].items():
        for table, t in p["tables"].items():
            lines.append(f"| {preset} | {table} | {_fmt(t['row_norm_ratio_repr_over_attn'], 3)} | "
                         f"{_fmt(t['global_norm_ratio_repr_over_attn'], 3)} | "
                         f"{_fmt(t['fraction_steps_conflicting'], 3)} | "
                         f"{_fmt(t['fraction_rows_conflict_over_half'], 3)} |")
        if not p["tables"]:
            lines.append(f"| {preset} | (no shared table) | - | - | {p['cosine']} | rows reached by both paths: "
                         f"{p['rows_touched_by_both_paths']} |")
    return lines


def _attention(r: dict) -> list[str]:
    planted = "mi_vs_planted_spearman" in r
    lines = ["| model | Spearman vs MI |" + (" Spearman vs planted |" if planted else ""),
             "|---|---|" + ("---|" if planted else "")]
    for preset, m in r["models"].items():
        lines.append(f"| {preset} | {_fmt(m['spearman_vs_mi'], 3)} |"
                     + (f" {_fmt(m.get('spearman_vs_planted'), 3)} |" if planted else ""))
    if planted:
        lines += ["", f"MI ground truth vs planted truth: Spearman {_fmt(r['mi_vs_planted_spearman'], 3)}."]
    return lines


def _retrieval(r: dict) -> list[str]:
    ks = sorted(next(iter(r["ndcg_at"].values()), {}), key=int)
    lines = [f"{r['samples']} test samples. NDCG@k normalised at the same k.", "",
             "| model | " + " | ".join(f"NDCG@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for preset, values in r["ndcg_at"].items():
        lines.append(f"| {preset} | " + " | ".join(_fmt(values[k], 3) for k in ks) + " |")
    return lines


def _discriminability(r: dict) -> list[str]:
    counts = sorted({k for m in r["models"].values() for k in m["n_clusters"]})
    lines = [f"Mean over K-means seeds {r['kmeans_seeds']}.", ""]
    for key, label in (("nmi", "NMI (normalised)"), ("mi_nats", "MI (nats)")):
        lines += [f"| {label} | features | " + " | ".join(f"{k} clusters" for k in counts) + " |",
                  "|---|---|" + "---|" * len(counts)]
        for preset, m in r["models"].items():
            means = {k: sum(row[j] for row in m[key]) / len(m[key]) for j, k in enumerate(m["n_clusters"])}
            lines.append(f"| {preset} | {m['features']} | " + " | ".join(_fmt(means.get(k)) for k in counts) + " |")
        lines.append("")
    return lines


def _convergence(r: dict) -> list[str]:
    lines = [f"Threshold AUC {_fmt(r['threshold_auc'])} ({r['threshold_fraction_of_lift']:.0%} of the best lift "
             "over 0.5).", "", "| model | best val AUC | steps to threshold |", "|---|---|---|"]
    for preset, m in r["models"].items():
        lines.append(f"| {preset} | {_fmt(m['best_val_auc'])} | {_fmt(m['steps_to_threshold'])} |")
    return lines


def _attention_size(r: dict) -> list[str]:
    lines = [f"Search time: median of {r['timing']['repeats']} repeats on {r['timing']['device']} "
             f"({r['timing']['threads']} threads).", "",
             "| model | K_A | K_R | test AUC | search ms / batch |", "|---|---|---|---|---|"]
    for preset, rows in r["models"].items():
        for row in rows:
            lines.append(f"| {preset} | {row['attention_dim']} | {row['dim']} | {_fmt(row['test_auc'])} | "
                         f"{1e3 * row['search_seconds']:.3f} (B={row['batch_size']}, L={row['history_length']}) |")
    return lines


_SECTIONS = {"gradients": _gradients, "attention": _attention, "retrieval": _retrieval,
             "discriminability": _discriminability, "convergence": _convergence, "attention-size": _attention_size}


def build_report(out_dir: str | Path, *, table_dir: str | Path | None = None) -> str:
    """The Markdown text. Raises ConfigError when there is neither an analysis nor a table to report."""
    out_dir = Path(out_dir)
    lines = ["# darec analyses report", ""]
    table_dir = Path(table_dir) if table_dir else out_dir
    found = 0
    if (table_dir / "table.md").is_file():
        found += 1
        text = (table_dir / "table.md").read_text().strip().splitlines()
        lines += ["## Table 1", ""] + ["#" + ln if ln.startswith("#") else ln for ln in text]
        extras = [name for name in ("table.csv", "runs.json", "curves.png") if (table_dir / name).is_file()]
        rel = _relative(table_dir, out_dir)
        lines += ["", "Files: " + ", ".join(f"[{n}]({rel}{n})" for n in extras), ""]
        if "curves.png" in extras:
            lines += [f"![training curves]({rel}curves.png)", ""]
    for kind in _KINDS:
        path = out_dir / kind / f"{kind}.json"
        if not path.is_file():
            continue
        found += 1
        result = json.loads(path.read_text())
        lines += [f"## {_TITLES[kind]}", "",
                  f"Data `{result.get('data')}`; numbers in [{kind}.json]({kind}/{kind}.json).", ""] + _SECTIONS[kind](result) + [""]
        lines += [f"![{kind} {name}]({kind}/{name})" for name in result.get("figures", [])] + [""]
    if not found:
        raise ConfigError(f"nothing to report in {out_dir}: run `darec analyze` or `darec table` first")
    return "\n".join(lines)


def _relative(target: Path, base: Path) -> str:
    """`target` as a link prefix relative to the report's folder (`../table/`), so the report keeps
    working when the folders are moved or copied together; URL-quoted for names with spaces."""
    rel = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return "" if rel == "." else f"{quote(rel)}/"


def write_report(out_dir: str | Path, *, table_dir: str | Path | None = None) -> Path:
    path = Path(out_dir) / "report.md"
    write_text(path, build_report(out_dir, table_dir=table_dir))
    log.info("wrote %s", path)
    return path
