"""How narrow can a test-AUC interval over users get on a given table? Re-scores a finished `darec table`
(or one dataset of `darec demo`) with each user's test targets capped at their latest M.

Why: the demo's MovieLens intervals are ±0.012–0.015, wider than the planted data's ±0.006. If the width
came from few test samples per user, more targets would narrow it; if it comes from the spread between
users, only more users can. Capping per-user targets gives every user a more equal weight, the most an
evaluation design can do with a fixed set of users. Nothing is retrained: the saved test logits are reused.

    python benchmarks/interval_width.py runs/demo/movielens --out benchmarks/results/interval_width_movielens.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from darec.data.store import PreparedDataset
from darec.io import write_json
from darec.train.significance import bootstrap_rows
from darec.train.trainer import TEST_LOGITS

CAPS = (None, 40, 30, 25, 20, 15, 10)


def rank_from_latest(users: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Per test sample: 1 for its user's latest target (cut), 2 for the one before, … (negatives share
    their positive's cut, so they share its rank)."""
    key = users.astype(np.int64) * (int(cuts.max()) + 1) + cuts
    distinct, inverse = np.unique(key, return_inverse=True)          # sorted by (user, cut)
    owner = distinct // (int(cuts.max()) + 1)
    last_of_owner = np.searchsorted(owner, owner, side="right")
    return (last_of_owner - np.arange(len(distinct)))[inverse]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table_dir", type=Path, help="a `darec table` output (runs.json, runs/, data/)")
    parser.add_argument("--data", type=Path, help="its prepared dataset (default TABLE_DIR/data)")
    parser.add_argument("--out", type=Path, help="write the widths as JSON here")
    args = parser.parse_args(argv)

    runs = json.loads((args.table_dir / "runs.json").read_text())["runs"]
    test = PreparedDataset.open(args.data or args.table_dir / "data").split("test")
    users, labels = test["user"].astype(np.int64), test["label"]
    rank = rank_from_latest(users, test["cut"].astype(np.int64))
    logits: dict[str, list[np.ndarray]] = {}
    for run in runs:
        run_dir = args.table_dir / "runs" / Path(run["run_dir"]).name  # runs.json paths are relative to where it ran
        logits.setdefault(run["preset"], []).append(np.load(run_dir / TEST_LOGITS, allow_pickle=False))

    rows = []
    for cap in CAPS:
        subset = None if cap is None else rank <= cap
        found = bootstrap_rows(labels, users, logits, subset=subset)
        rows.append({"cap": cap, "samples": int(len(labels) if subset is None else subset.sum()),
                     "half_width": {p: (b.ci_high - b.ci_low) / 2 for p, b in found.items()},
                     "auc": {p: b.mean for p, b in found.items()}})
    presets = sorted(logits)
    print("| test targets per user | samples | " + " | ".join(presets) + " |")
    print("|---|---|" + "---|" * len(presets))
    for row in rows:
        cells = " | ".join(f"{row['auc'][p]:.4f} ± {row['half_width'][p]:.4f}" for p in presets)
        targets = "all" if row["cap"] is None else f"latest {row['cap']}"
        print(f"| {targets} | {row['samples']:,} | {cells} |")
    if args.out is not None:
        write_json(args.out, {"table_dir": str(args.table_dir), "users": int(np.unique(users).size), "rows": rows})


if __name__ == "__main__":
    main()
