"""Do side features help, and does the attention learn the planted time decay? (issue 14, step 4)

Planted data with three side signals (darec.data.synthetic: brand loyalty, "buy" behaviours that weigh 8
clicks, a decay in time over sessions), prepared with the demo's planted protocol and training budget
(darec/demo.py). DARE and TWIN train with every feature the dataset has (`features: all`: brand, behaviour
type, time gap) and with none, over seeds, through `darec table`'s runner (runs cached by configuration and
data); a paired bootstrap over users and seeds (darec.train.significance) tests "features" against "none".

Attention analysis: the learned time-gap score bias of every DARE run with features
(`RoleEmbeddings.context_bias("time_gap")`, one scalar per log2 gap bucket) against the planted log-decay
at the mean gap of the test (history, target) pairs in that bucket; Spearman over the buckets that hold at
least MIN_PAIRS pairs. The planted log-decay is linear in the gap, so it falls by orders of magnitude over
the buckets of a week-long history: only the buckets where it is above FLAT_BELOW still move the softmax
(below, every weight is 0), and those get their own correlation too.

What the category signal is worth at most: the test AUC of the planted category probability itself
(oracle), with the true time decay and behaviour weights, without the weights, and with the best decay in
steps instead of time (what a model that sees positions but not gaps could at best do).

With `--taobao FILE` (the UserBehavior.csv layout) the same A/B runs on that log prepared with the shipped
`taobao` schema (every behaviour type in histories with its type, time features; pv targets).

    python benchmarks/features_effect.py --threads 1 \\
        --taobao ../shared/data/taobao-userbehavior-head/UserBehavior.csv
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from common import parse_args
from darec.checkpoint import load_model_checkpoint
from darec.data.loader import history_index, time_gap_bucket
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.schema import load_schema
from darec.data.store import PreparedDataset
from darec.data.synthetic import PlantedTruth, SyntheticConfig, prepare_synthetic
from darec.demo import DEMO_DATASETS
from darec.io import write_json
from darec.train.config import TrainConfig
from darec.train.metrics import auc
from darec.train.significance import bootstrap_rows
from darec.train.table import TableSpec, evidence_of, run_table
from darec.train.trainer import TEST_LOGITS

log = logging.getLogger("features_effect")

RESULTS = Path(__file__).resolve().parent / "results"
SIDE_SIGNALS = SyntheticConfig(n_brands=50, brand_loyalty=0.5, strong_fraction=0.15, strong_weight=8.0,
                               time_decay=True, time_unit=600.0)
PLANTED = next(d for d in DEMO_DATASETS if d.name == "planted")  # protocol and training budget of the demo
TAOBAO_PROTOCOL = ProtocolConfig(min_clicks=50)
TAOBAO_TRAIN = TrainConfig(batch_size=128, epochs=4)  # docs/features.md's earlier Taobao-fixture budget, dim 8
ARMS = ("all", "none")  # the default arms; "none" is the baseline every other arm is tested against
MIN_PAIRS = 50
FLAT_BELOW = -10.0  # planted log-weight under which a behaviour no longer counts (e^-10 of the latest)


def ab_test(data: Path, out_dir: Path, *, presets: tuple[str, ...], dim: int, seeds: tuple[int, ...],
            base: TrainConfig, arms: tuple[str, ...] = ARMS) -> dict[str, Any]:
    """Every preset × arm (a `features` setting: all, none, or NAME,NAME) × seed trained (or reused) by
    `run_table`; per preset and arm the test AUC per seed, its mean, std and 95% interval over users, and
    per preset and arm other than none the gain over none with its paired p."""
    dataset = PreparedDataset.open(data)
    evidence = evidence_of(dataset, max_len=base.max_len)
    spec = TableSpec(presets=presets, dims=(dim,), seeds=seeds)
    runs: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        log.info("%s: features %s", data, arm)
        table_dir = out_dir / arm.replace(",", "+")
        run_table(data=data, out_dir=table_dir, spec=spec, base=base.replace(features=arm))
        for run in json.loads((table_dir / "runs.json").read_text())["runs"]:
            runs.setdefault(f"{run['preset']}/{arm}", []).append(run)
    logits = {row: [np.load(Path(r["run_dir"]) / TEST_LOGITS, allow_pickle=False) for r in cell]
              for row, cell in runs.items()}
    boot = bootstrap_rows(evidence.labels, evidence.users, logits)
    rows: dict[str, Any] = {}
    for row, cell in runs.items():
        aucs = [float(r["test"]["auc"]) for r in cell]
        rows[row] = {"auc_per_seed": dict(zip(seeds, aucs)), "auc_mean": float(np.mean(aucs)),
                     "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
                     "auc_ci": [boot[row].ci_low, boot[row].ci_high],
                     "train_seconds": [r.get("train_seconds") for r in cell],
                     "run_dirs": [r["run_dir"] for r in cell]}
    effects = {}
    for preset in presets:
        without = rows[f"{preset}/none"]
        for arm in arms:
            if arm == "none":
                continue
            with_ = rows[f"{preset}/{arm}"]
            spread = max(s for s in (with_["auc_std"], without["auc_std"], 0.0) if s is not None)
            effects[f"{preset}/{arm}"] = {
                "auc_gain": with_["auc_mean"] - without["auc_mean"], "largest_seed_std": spread,
                "p_paired": boot[f"{preset}/{arm}"].p_value_against(boot[f"{preset}/none"])}
    return {"data": str(data), "content_sha256": dataset.manifest["content_sha256"],
            "stored_features": sorted(dataset.feature_specs), "schema": dataset.manifest.get("schema"),
            "test_samples": int(len(evidence.labels)),
            "test_users": int(len(np.unique(evidence.users))), "seeds": list(seeds), "dim": dim,
            "train": base.replace(features="all").to_dict(), "rows": rows, "effect": effects}


def category_oracle(data: Path, max_len: int) -> dict[str, float]:
    """Test AUC of P(target category | history) as planted, (1 - noise) S[c] / sum(S) + noise / C, with S the
    decayed, weighted sum of affinity rows: in time with behaviour weights (the truth), in time without
    them, and in steps (the best of a few rates) with and without them."""
    dataset, truth = PreparedDataset.open(data), PlantedTruth.load(data)
    test = dataset.split("test")
    users, cuts = test["user"].astype(np.int64), test["cut"].astype(np.int64)
    index, mask = history_index(dataset.offsets, users, cuts, max_len)
    index = np.where(mask, index, 0)
    stamps = np.asarray(dataset.timestamps)
    gaps = stamps[np.asarray(dataset.offsets)[users] + cuts][:, None] - stamps[index]
    categories = np.asarray(dataset.categories)[index]
    codes = pl.read_parquet(data / "ids/features/behavior.parquet").sort("id")["raw"].to_numpy()
    strong = codes[dataset.event_features["behavior"][index] - 1] == "buy"
    typed = np.where(strong, truth.strong_weight, 1.0) * mask
    to_target = truth.affinity[categories, np.asarray(test["category"])[:, None]]
    out_of = truth.affinity[categories].sum(-1)
    n_categories = truth.affinity.shape[0] - 1

    def oracle(weights: np.ndarray) -> float:
        share = (to_target * weights).sum(1) / np.maximum((out_of * weights).sum(1), 1e-300)
        return auc(test["label"], (1 - truth.noise) * share + truth.noise / n_categories)

    in_time = np.exp(truth.log_decay_at_gap(gaps))
    positions = np.arange(max_len, 0, -1)[None, :]
    in_steps = {rate: np.exp(-rate * (positions - 1)) for rate in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)}
    return {"time_and_type": oracle(typed * in_time), "time_only": oracle(mask * in_time),
            "best_steps_and_type": max(oracle(typed * d) for d in in_steps.values()),
            "best_steps_only": max(oracle(mask * d) for d in in_steps.values())}


def gap_buckets(dataset: PreparedDataset, max_len: int, n_buckets: int) -> dict[int, dict[str, float]]:
    """Per time-gap bucket: how many (history behaviour, test target) pairs fall in it and their mean gap
    in seconds (the histories and gaps the model saw at test time: one per positive's cut)."""
    test = dataset.split("test")
    positives = test[test["label"] == 1]
    users, cuts = positives["user"].astype(np.int64), positives["cut"].astype(np.int64)
    index, mask = history_index(dataset.offsets, users, cuts, max_len)
    stamps = np.asarray(dataset.timestamps)
    reference = stamps[np.asarray(dataset.offsets)[users] + cuts][:, None]
    gaps = (reference - stamps[np.where(mask, index, 0)])[mask]
    buckets = time_gap_bucket(gaps, n_buckets)
    counts = np.bincount(buckets, minlength=n_buckets + 1)
    sums = np.bincount(buckets, weights=gaps.astype(np.float64), minlength=n_buckets + 1)
    return {int(b): {"pairs": int(counts[b]), "mean_gap_s": float(sums[b] / counts[b])}
            for b in np.flatnonzero(counts)}


def time_decay_recovery(data: Path, run_dirs: list[str], seeds: tuple[int, ...], *, max_len: int,
                        plot: Path) -> dict[str, Any]:
    """Spearman between the learned time-gap bias of each run and the planted log-decay, per bucket."""
    dataset = PreparedDataset.open(data)
    truth = PlantedTruth.load(data)
    n_buckets = int(dataset.manifest["schema"]["time"]["gap_buckets"])
    support = gap_buckets(dataset, max_len, n_buckets)
    kept = [b for b, s in support.items() if s["pairs"] >= MIN_PAIRS]
    planted = truth.log_decay_at_gap([support[b]["mean_gap_s"] for b in kept])
    moving = planted > FLAT_BELOW
    learned = []
    for run_dir in run_dirs:
        bias = load_model_checkpoint(Path(run_dir) / "best.pt").embeddings.context_bias("time_gap")
        learned.append(bias.detach().cpu().numpy().astype(np.float64)[kept])
    per_run = [{"seed": seed, "spearman_all": float(spearmanr(b, planted).statistic),
                "spearman_moving": float(spearmanr(b[moving], planted[moving]).statistic)}
               for seed, b in zip(seeds, learned)]
    mean_bias = np.mean(learned, axis=0)
    _plot(kept, planted, learned, seeds, plot)
    return {"buckets": kept, "pairs": [support[b]["pairs"] for b in kept],
            "mean_gap_s": [support[b]["mean_gap_s"] for b in kept], "planted_log_decay": planted.tolist(),
            "learned_bias_mean": mean_bias.tolist(), "learned_bias_per_run": [b.tolist() for b in learned],
            "per_run": per_run, "spearman_all_mean_bias": float(spearmanr(mean_bias, planted).statistic),
            "spearman_moving_mean_bias": float(spearmanr(mean_bias[moving], planted[moving]).statistic),
            "moving_buckets": [b for b, m in zip(kept, moving) if m], "min_pairs": MIN_PAIRS,
            "flat_below": FLAT_BELOW, "plot": plot.name}


def _plot(buckets: list[int], planted: np.ndarray, learned: list[np.ndarray], seeds: tuple[int, ...],
          path: Path) -> None:
    """Learned bias per bucket beside the planted log-decay; each run's bias is shifted to mean 0 over the
    buckets where the planted weight still counts (a constant shift changes no softmax)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving = planted > FLAT_BELOW
    shifted = [bias - bias[moving].mean() for bias in learned]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed, bias in zip(seeds, shifted):
        left.plot(buckets, bias, marker="o", ms=3, label=f"learned, seed {seed}")
    left.set_xlabel("time-gap bucket (b: gap in [2^(b-2), 2^(b-1)) s)")
    left.set_ylabel("score bias (shifted)")
    left.legend(fontsize=8)
    twin = left.twinx()
    twin.plot(buckets, planted, color="black", ls="--", label="planted log-decay")
    twin.set_ylabel("planted log-decay")
    twin.set_ylim(max(planted.min(), 3 * FLAT_BELOW), 0.5)
    twin.legend(loc="lower left", fontsize=8)
    for bias in shifted:
        right.scatter(planted[moving], bias[moving], s=12)
    right.set_xlabel("planted log-decay (buckets above %g)" % FLAT_BELOW)
    right.set_ylabel("learned bias (shifted)")
    fig.suptitle("DARE with features: time-gap score bias vs planted decay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/features-effect"), help="data and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--presets", nargs="+", default=["dare", "twin"], help="planted-data presets")
    parser.add_argument("--arms", nargs="+", default=list(ARMS),
                        help="planted-data `features` settings compared (must include all and none), e.g. "
                             "all none brand behavior,time_gap")
    parser.add_argument("--taobao", type=Path, help="UserBehavior.csv: also run DARE on it (features all / none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "features_effect.json")
    args = parse_args(parser, argv)
    if not {"all", "none"} <= set(args.arms):
        parser.error("--arms must include all and none")
    started, load_before = time.perf_counter(), os.getloadavg()
    seeds = tuple(args.seeds)

    planted_data = args.work / "planted" / "data"
    log.info("preparing planted data with side signals into %s", planted_data)
    prepare_synthetic(SIDE_SIGNALS, out=planted_data, config=PLANTED.protocol, overwrite=False)
    planted_train = PLANTED.train.replace(threads=args.threads, device="cpu")
    planted = ab_test(planted_data, args.work / "planted", presets=tuple(args.presets), dim=16, seeds=seeds,
                      base=planted_train, arms=tuple(args.arms))
    planted["synthetic"], planted["protocol"] = asdict(SIDE_SIGNALS), asdict(PLANTED.protocol)
    planted["category_oracle_auc"] = category_oracle(planted_data, max_len=planted_train.max_len)
    decay = time_decay_recovery(planted_data, planted["rows"]["dare/all"]["run_dirs"], seeds,
                                max_len=planted_train.max_len,
                                plot=args.out.with_name(args.out.stem + "_time_gap.png"))
    command = "python benchmarks/features_effect.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"command": command, "planted": planted, "time_decay": decay}
    if args.taobao:
        taobao_data = args.work / "taobao" / "data"
        prepare(source="taobao", input=args.taobao, out=taobao_data, config=TAOBAO_PROTOCOL,
                schema=load_schema("taobao"))
        result["taobao"] = ab_test(taobao_data, args.work / "taobao", presets=("dare",), dim=8, seeds=seeds,
                                   base=TAOBAO_TRAIN.replace(threads=args.threads, device="cpu"))
    result["machine"] = {"cpus": os.cpu_count(), "threads": args.threads, "load_average_before": load_before,
                         "load_average_after": os.getloadavg(), "wall_s": time.perf_counter() - started}
    write_json(args.out, result)
    log.info("wrote %s (%.0f s)", args.out, result["machine"]["wall_s"])


if __name__ == "__main__":
    main()
