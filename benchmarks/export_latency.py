"""`darec export`: how long exporting takes, and the exported program's latency against the eager Scorer.

Builds one model (random weights: latency does not depend on training), exports it with
`darec.serve.export.export_model` (torch.export + ONNX, each checked against the eager scorer), then
times one request shape per --shapes entry (U users x N behaviours x C candidates) three ways: the eager
`Scorer.logits`, the exported program (`load_exported(backend="torch")`) and onnxruntime
(`backend="onnxruntime"`, as many threads as torch), p50/p90 over --repeats calls after --warmup. Every
timed output is compared with the eager logits (largest absolute difference reported).

    python benchmarks/export_latency.py

Writes benchmarks/results/export_cpu.json (or --name).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from common import parse_args, time_call
from darec.io import write_json
from darec.models import build_model, preset_config
from darec.serve.export import export_model, load_exported
from darec.serve.history import History
from darec.serve.scorer import Scorer

__all__ = ["main"]

log = logging.getLogger("benchmarks.export_latency")
RESULTS = Path(__file__).resolve().parent / "results"


def _shape(text: str) -> tuple[int, int, int]:
    users, length, candidates = (int(part) for part in text.split(","))
    return users, length, candidates


def _request(users: int, length: int, candidates: int, *, n_items: int, n_categories: int):
    g = torch.Generator().manual_seed(0)
    history = History(items=torch.randint(1, n_items, (users, length), generator=g),
                      categories=torch.randint(1, n_categories, (users, length), generator=g))
    return (history, torch.randint(1, n_items, (users, candidates), generator=g),
            torch.randint(1, n_categories, (users, candidates), generator=g))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dare")
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--n-categories", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--attention-dim", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(1, 1000, 100), (64, 1000, 100)],
                        metavar="U,N,C")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--name", default="export_cpu")
    args = parse_args(parser, argv)
    load_at_start = os.getloadavg()

    torch.manual_seed(0)
    config = preset_config(args.preset, n_items=args.n_items, n_categories=args.n_categories, dim=args.dim,
                           attention_dim=args.attention_dim, top_k=args.top_k, max_len=args.max_len)
    model = build_model(config).eval()
    scorer = Scorer(model)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = export_model(model, Path(tmp) / "export", preset=args.preset)
        export_s = time.perf_counter() - start
        log.info("export: %.1f s", export_s)
        loaded, load_s = {}, {}
        for backend in ("torch", "onnxruntime"):
            start = time.perf_counter()
            loaded[backend] = load_exported(Path(tmp) / "export", backend=backend)
            load_s[backend] = time.perf_counter() - start
        rows = []
        for users, length, candidates in args.shapes:
            request = _request(users, length, candidates, n_items=args.n_items, n_categories=args.n_categories)
            expected = scorer.logits(*request)
            row = {"users": users, "length": length, "candidates": candidates}
            row["eager"] = time_call(lambda: scorer.logits(*request), device=cpu, warmup=args.warmup,
                                     repeats=args.repeats)
            for backend, exported in loaded.items():
                row[backend] = time_call(lambda exported=exported: exported.logits(*request), device=cpu,
                                         warmup=args.warmup, repeats=args.repeats)
                row[f"{backend}_max_abs_diff"] = float((exported.logits(*request) - expected).abs().max())
                row[f"{backend}_vs_eager_p50"] = row[backend]["p50_s"] / row["eager"]["p50_s"]
            log.info("U=%d N=%d C=%d: eager %.2f ms, torch.export %.2f ms, onnxruntime %.2f ms (p50)", users,
                     length, candidates, 1e3 * row["eager"]["p50_s"], 1e3 * row["torch"]["p50_s"],
                     1e3 * row["onnxruntime"]["p50_s"])
            rows.append(row)
    out = {"benchmark": "export_latency", "command": "python benchmarks/export_latency.py "
           + " ".join(argv if argv is not None else sys.argv[1:]),
           "preset": args.preset, "n_items": args.n_items, "n_categories": args.n_categories, "dim": args.dim,
           "attention_dim": args.attention_dim, "top_k": args.top_k, "export_s": export_s, "load_s": load_s,
           "files": {name: entry["size"] for name, entry in manifest["files"].items()}, "onnx": manifest["onnx"],
           "requests": rows, "device": "cpu", "device_name": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__,
           "threads": torch.get_num_threads(),
           "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    write_json(RESULTS / f"{args.name}.json", out)
    log.info("wrote %s", RESULTS / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
