"""The whole pipeline at full size on this machine: UserBehavior.csv -> `darec prepare` -> one epoch of DARE
(dim 16, the prepared Taobao-sized vocabulary) -> test metrics, each stage's wall time and peak memory.

    python benchmarks/full_scale.py --rows 10000000                 # what was measured here (2 cores)
    python benchmarks/full_scale.py --rows 100000000                # the target size
    python benchmarks/full_scale.py --csv ub.csv --nproc-per-node 2 # an existing file, training in 2 processes

Stages run as child processes, so each one's wall time and peak resident memory (the largest process of the
stage) are its own:
  generate  ../shared/tools/make_userbehavior.py CSV ROWS (synthetic, Taobao layout; skipped when the CSV
            exists; not part of the pipeline's time)
  prepare   darec prepare --source taobao (the paper's protocol)
  train     darec train: one epoch, validated once at its end, then the test split (result.json)
Writes benchmarks/results/NAME.json (default full_scale_cpu.json); training samples/s are the trainer's own
(steps only, no validation), the stage's wall time includes model set-up, validation, test and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import parse_args
from darec.io import write_json

__all__ = ["main", "run_stage"]

log = logging.getLogger("benchmarks.full_scale")
RESULTS = Path(__file__).resolve().parent / "results"
TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_userbehavior.py"
# Runs a command and reports the peak resident memory of its largest process (ru_maxrss is in KiB on Linux).
_MEASURED = ("import json, resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
             "print(json.dumps({'rc': code, 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN)"
             ".ru_maxrss * 1024}), file=sys.stderr)")


def run_stage(name: str, command: list[str]) -> dict[str, Any]:
    """Run one stage as a child process; its wall time, peak memory and exit status."""
    log.info("== %s: %s", name, " ".join(command))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED, *command], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    sys.stderr.write("\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else ""))
    report = json.loads(lines[-1])
    if report["rc"] != 0:
        raise SystemExit(f"stage {name} failed (exit {report['rc']})")
    log.info("   %s: %.1f s, peak %.2f GiB", name, wall, report["peak_rss_bytes"] / 2**30)
    return {"command": " ".join(command), "wall_s": wall, "peak_rss_bytes": report["peak_rss_bytes"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated UserBehavior.csv")
    p.add_argument("--csv", type=Path, help="an existing UserBehavior-layout file (default: generate one)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/darec-full-scale"))
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes (torchrun)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="more `darec train --set` overrides (repeatable)")
    p.add_argument("--name", default="full_scale_cpu", help="results file stem")
    args = parse_args(p, argv)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    csv = args.csv or work / f"userbehavior_{args.rows}.csv"
    load_start = os.getloadavg()
    stages: dict[str, Any] = {}
    if not csv.exists():
        stages["generate"] = run_stage("generate", [sys.executable, str(TOOL), str(csv), str(args.rows)])
    data, run = work / f"data_{csv.stem}", work / f"run_{csv.stem}_b{args.batch_size}_n{args.nproc_per_node}"
    stages["prepare"] = run_stage("prepare", [sys.executable, "-m", "darec", "prepare", "--source", "taobao",
                                              "--input", str(csv), "--out", str(data), "--overwrite"])
    threads = ["--threads", str(args.threads)] if args.threads else []
    stages["train"] = run_stage("train", [
        sys.executable, "-m", "darec", "train", "--data", str(data), "--out", str(run), "--no-resume",
        "--preset", "dare", "--dim", str(args.dim), "--epochs", "1", "--eval-every", str(10**9),
        "--batch-size", str(args.batch_size), "--device", "cpu", "--nproc-per-node", str(args.nproc_per_node),
        *threads, *(f"--set={item}" for item in args.train_set)])
    result = json.loads((run / "result.json").read_text())
    manifest = json.loads((data / "manifest.json").read_text())
    out = {
        "benchmark": "full_scale", "command": " ".join(["python", *sys.argv]), "rows": args.rows if not args.csv
        else None, "csv": str(csv), "csv_bytes": csv.stat().st_size,
        "machine": {"device_name": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "torch": torch.__version__, "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
        "dataset": {"n_users": manifest["n_users"], "n_items": manifest["n_items"],
                    "n_categories": manifest["n_categories"], "splits": manifest["splits"]},
        "stages": stages,
        "pipeline_wall_s": stages["prepare"]["wall_s"] + stages["train"]["wall_s"],
        "pipeline_peak_rss_bytes": max(stages["prepare"]["peak_rss_bytes"], stages["train"]["peak_rss_bytes"]),
        "train": {"batch_size": args.batch_size, "processes": args.nproc_per_node, "steps": result["steps"],
                  "train_seconds": result["train_seconds"], "samples_per_s": result["train_samples_per_s"],
                  "environment": result["environment"], "config": result["config"]},
        "test": result["test"], "val": result["val"],
    }
    write_json(RESULTS / f"{args.name}.json", out)
    log.info("pipeline (prepare + train + test) %.1f s, peak %.2f GiB; training %.0f samples/s; test AUC %.4f",
             out["pipeline_wall_s"], out["pipeline_peak_rss_bytes"] / 2**30, result["train_samples_per_s"],
             result["test"]["auc"])
    log.info("wrote %s", RESULTS / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
