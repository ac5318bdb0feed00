"""`darec predict` throughput: rows/s and peak memory of batch prediction from a CSV and a Parquet file.

Set-up (made once under --work and reused): the default planted dataset (`darec synth`: 300 users, 4,000
items, L = 200), a DARE model trained on it for one epoch, and an input of --rows (user, item) rows in raw
ids drawn uniformly (users interleaved, the worst order for grouping). Each measurement runs
`predict_file` in a fresh process, so its peak RSS (from wait4) is the prediction's alone; the rows/s
figure counts scoring and writing, not the process start and model load.

    python benchmarks/predict_speed.py --rows 1000000 5000000 --threads 1

Writes benchmarks/results/predict_cpu.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from common import parse_args
from darec.checkpoint import load_checkpoint
from darec.data.id_maps import IdMaps
from darec.data.synthetic import prepare_synthetic
from darec.io import write_json
from darec.train.config import TrainConfig
from darec.train.trainer import train

log = logging.getLogger("benchmarks.predict_speed")
RESULTS = Path(__file__).resolve().parent / "results"
_CHILD = ("import json, sys; from darec.serve.predict import predict_file; "
          "print(json.dumps(predict_file(**json.loads(sys.argv[1]))))")


def setup(work: Path) -> tuple[Path, Path]:
    """(dataset, run directory), each made only when missing."""
    data, run = work / "planted", work / "run"
    if not (data / "manifest.json").is_file():
        prepare_synthetic(out=data)
    if not (run / "best.pt").is_file():
        train(data=data, out_dir=run, config=TrainConfig(preset="dare", epochs=1, batch_size=256, model={"dim": 8}))
    return data, run


def inputs_of(work: Path, data: Path, rows: int, seed: int) -> dict[str, Path]:
    """{format: input file} of `rows` uniformly random (user, item) raw-id pairs, made only when missing."""
    inputs = {"parquet": work / f"rows{rows}.parquet", "csv": work / f"rows{rows}.csv"}
    if not all(path.is_file() for path in inputs.values()):
        maps, rng = IdMaps.open(data), np.random.default_rng(seed)
        users = maps.decode("user", rng.integers(0, maps.size("user"), rows))
        items = maps.decode("item", rng.integers(1, maps.size("item") + 1, rows))
        frame = pl.DataFrame({"user": users, "item": items})
        frame.write_parquet(inputs["parquet"])
        frame.write_csv(inputs["csv"])
    return inputs


def measure(*, data: Path, run: Path, source: Path, out: Path, chunk_rows: int, threads: int | None) -> dict:
    """One `predict_file` call in a fresh process: its summary, wall time with start-up, and peak RSS."""
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    kwargs = {"checkpoint": str(run), "data": str(data), "input": str(source), "out": str(out),
              "chunk_rows": chunk_rows, "overwrite": True}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(kwargs)], stdout=subprocess.PIPE, env=env)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"predict failed with exit code {child.returncode}")
    summary = json.loads(stdout)
    return {"format": source.suffix.lstrip("."), "input_bytes": source.stat().st_size, "rows": summary["rows"],
            "seconds": summary["seconds"], "rows_per_s": summary["rows_per_second"],
            "wall_s_with_startup": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
            "output_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--chunk-rows", type=int, default=200_000)
    p.add_argument("--formats", nargs="+", choices=("parquet", "csv"), default=["parquet", "csv"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/darec-bench-predict"))
    args = parse_args(p, argv)
    data, run = setup(args.work)
    load_before = os.getloadavg()
    records = []
    for rows, kind in itertools.product(args.rows, args.formats):
        source = inputs_of(args.work, data, rows, args.seed)[kind]
        record = measure(data=data, run=run, source=source, out=args.work / f"out-{kind}.parquet",
                         chunk_rows=args.chunk_rows, threads=args.threads)
        records.append(record)
        log.info("%-8s %9d rows  %8.0f rows/s  peak RSS %6.0f MB", kind, record["rows"], record["rows_per_s"],
                 record["peak_rss_mb"])
    model = load_checkpoint(run / "best.pt", keys=("model_config",))["model_config"]
    out = {"benchmark": "predict_speed", "command": " ".join(["python", *sys.argv]),
           "device_name": platform.processor() or platform.machine(), "torch": torch.__version__,
           "polars": pl.__version__, "cpus": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
           "load_average_before": load_before, "load_average_at_end": os.getloadavg(),
           "dataset": "darec synth defaults (300 users, 4,000 items, 30 categories)",
           "model": {"preset": "dare", **{key: model[key] for key in ("dim", "attention_dim", "max_len", "top_k")}},
           "chunk_rows": args.chunk_rows, "row_order": "uniform random users and items", "records": records}
    write_json(RESULTS / "predict_cpu.json", out)
    log.info("wrote %s", RESULTS / "predict_cpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
