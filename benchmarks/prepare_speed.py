"""Time `darec prepare --source taobao` on UserBehavior-layout files: wall time and peak RSS of a subprocess.

usage: python benchmarks/prepare_speed.py FILE.csv [FILE.csv ...] [--out benchmarks/results/prepare_speed.json]
Make inputs with: python ../shared/tools/make_userbehavior.py /tmp/ub10m.csv 10000000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

__all__ = ["measure", "main"]

log = logging.getLogger("prepare_speed")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def measure(path: Path, extra: list[str]) -> dict:
    """Run one prepare in a fresh process (the only child, so RUSAGE_CHILDREN's max RSS is its peak)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "prepared"
        cmd = [sys.executable, "-m", "darec", "prepare", "--source", "taobao", "--input", str(path),
               "--out", str(out), *extra]
        script = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
                  "rc = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
                  "w = time.perf_counter() - t; "
                  "print(json.dumps({'rc': rc, 'wall_s': w, "
                  "'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
        result = json.loads(subprocess.run([sys.executable, "-c", script, *cmd], check=True,
                                           capture_output=True, text=True).stdout)
        if result["rc"] != 0:
            raise SystemExit(f"prepare failed on {path} (exit {result['rc']})")
        manifest = json.loads((out / "manifest.json").read_text())
        sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.npy")}
    samples = sum(s["samples"] for s in manifest["splits"].values())
    split_bytes = sum(sizes[f"{s}.npy"] for s in ("train", "val", "test"))
    return {
        "input": path.name, "input_bytes": path.stat().st_size,
        "rows": int(pl.scan_csv(path, has_header=False).select(pl.len()).collect().item()),
        "wall_s": round(result["wall_s"], 2), "peak_rss_gib": round(result["peak_rss_kb"] / 2**20, 3),
        "n_users": manifest["n_users"], "n_items": manifest["n_items"], "n_categories": manifest["n_categories"],
        "samples": samples, "bytes_per_sample_splits": round(split_bytes / samples, 1),
        "bytes_per_sample_total": round(sum(sizes.values()) / samples, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare_speed.json")
    parser.add_argument("--repeats", type=int, default=1, help="runs per file; the fastest is kept")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = []
    for path in args.inputs:
        best = min((measure(path, extra) for _ in range(args.repeats)), key=lambda r: r["wall_s"])
        log.info("%s: %.2f s wall, %.2f GiB peak RSS, %d samples", path.name, best["wall_s"], best["peak_rss_gib"],
                 best["samples"])
        runs.append(best)
    import darec
    report = {"benchmark": "prepare_speed", "command": "darec prepare --source taobao", "device": _cpu(),
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "versions": {"python": platform.python_version(), "polars": pl.__version__, "numpy": np.__version__,
                           "darec": darec.__version__},
              "time": time.strftime("%Y-%m-%d"), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
