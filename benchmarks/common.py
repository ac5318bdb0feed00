"""What every benchmark script shares: start-up (CPU threads, logging) and the timing of one call.

The scripts run as `python benchmarks/NAME.py`, so this directory is on `sys.path` and they import
it as `common`.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["parse_args", "time_call"]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Adds `--threads`, parses `argv`, logs INFO lines to stderr and pins torch's CPU threads if asked
    (on a busy 2-core machine one thread is steadier than two)."""
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """p50/p90/mean seconds of `fn()` over `repeats` calls after `warmup` (CUDA work is synchronised
    before the clock starts and before it stops)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"p50_s": float(np.percentile(times, 50)), "p90_s": float(np.percentile(times, 90)),
            "mean_s": float(np.mean(times)), "repeats": repeats}
