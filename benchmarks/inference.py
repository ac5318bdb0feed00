"""Scorer latency and throughput against history length N, candidates C and attention width K_A.

For every K_A in --attention-dims (DARE: decoupled tables, K_R = --dim), C in --candidates and N in
--lengths it times one request (1 user, C candidates, N behaviours): the search stage alone and the
whole scoring (search + K value tokens + MLP), p50/p90 over --repeats runs after --warmup runs. It
reports the search-time ratio as K_A halves, the 64 users x 100 candidates x N = 10,000 batch, the
fused Triton search against the plain one on CUDA, and on CUDA the peak training memory per batch size.

    python benchmarks/inference.py --device cpu
    python benchmarks/inference.py --device cuda          # adds fused-vs-plain and training memory

Writes benchmarks/results/NAME.json (default inference_<device type>.json).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common import parse_args, time_call
from darec.io import write_json
from darec.models import build_model, preset_config
from darec.serve.fused_search import triton_available
from darec.serve.scorer import History, Scorer
from darec.train.trainer import resolve_device

__all__ = ["main"]

log = logging.getLogger("benchmarks.inference")
RESULTS = Path(__file__).resolve().parent / "results"


def _request(u: int, c: int, n: int, *, n_items: int, n_categories: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items, (u, n), generator=g)
    history = History(items=items.to(device), categories=torch.randint(1, n_categories, (u, n), generator=g).to(device))
    cand = torch.randint(1, n_items, (u, c), generator=g).to(device)
    return history, cand, torch.randint(1, n_categories, (u, c), generator=g).to(device)


def _scorer(attention_dim: int, args: argparse.Namespace, device: torch.device, fused: bool | None) -> Scorer:
    torch.manual_seed(0)
    config = preset_config(args.preset, n_items=args.n_items, n_categories=args.n_categories, max_len=args.max_len,
                           dim=args.dim, attention_dim=attention_dim, top_k=args.top_k, aux_head=False)
    return Scorer(build_model(config).to(device), fused=fused)


def _training_memory(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Peak GPU memory of training steps per batch size, via train_throughput's measurement."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import measure, random_dataset  # noqa: PLC0415  (sibling script)

    from darec.train.config import TrainConfig

    users = -(-max(args.train_batch_sizes) * 6 // 20)
    dataset = random_dataset(Path(args.data_dir) / f"mem-i{args.n_items}-u{users}", n_items=args.n_items,
                             n_categories=args.n_categories, n_users=users, max_len=200)
    out = []
    for batch_size in args.train_batch_sizes:
        config = TrainConfig(preset=args.preset, model={"dim": args.dim}, batch_size=batch_size,
                             device=str(device), max_len=200)
        rec = measure(dataset, config, warmup=2, steps=3, progress=False)
        out.append({k: rec[k] for k in ("batch_size", "peak_memory_bytes", "samples_per_s")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--preset", default="dare", help="a dot-score preset with decoupled tables")
    p.add_argument("--attention-dims", type=int, nargs="+", default=[128, 64, 32, 16], help="K_A per field")
    p.add_argument("--dim", type=int, default=16, help="K_R per field")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--lengths", type=int, nargs="+", default=[200, 1000, 10_000])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200, help="the model's position table (longer histories clamp)")
    p.add_argument("--n-items", type=int, default=1_000_000, help="item vocabulary (tables of n_items x K_A)")
    p.add_argument("--n-categories", type=int, default=9_408)
    p.add_argument("--batch-users", type=int, default=64, help="users in the batched case")
    p.add_argument("--batch-candidates", type=int, default=100)
    p.add_argument("--batch-length", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--train-batch-sizes", type=int, nargs="+", default=[2048, 8192, 32768],
                   help="CUDA only: batch sizes for the peak training memory table")
    p.add_argument("--data-dir", default="/tmp/darec-bench-data")
    p.add_argument("--name", help="results file stem (default inference_<device type>)")
    args = parse_args(p, argv)
    device = resolve_device(args.device)
    fused_modes = [False, True] if device.type == "cuda" and triton_available() else [False]
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    requests, batched = [], []
    total = len(args.attention_dims) * len(fused_modes) * (len(args.candidates) * len(args.lengths) + 1)
    bar = tqdm(total=total, unit="case", desc="inference")
    for attention_dim in args.attention_dims:
        for fused in fused_modes:
            scorer = _scorer(attention_dim, args, device, fused)
            for c in args.candidates:
                for n in args.lengths:
                    h, ci, cc = _request(1, c, n, n_items=args.n_items, n_categories=args.n_categories,
                                         device=device, seed=n + c)
                    search = time_call(lambda: scorer.search(h, ci, cc), **timing)
                    total_t = time_call(lambda: scorer.logits(h, ci, cc), **timing)
                    requests.append({"attention_dim": attention_dim, "fused": fused, "users": 1, "candidates": c,
                                     "length": n, "search": search, "score": total_t,
                                     "candidates_per_s": c / total_t["p50_s"]})
                    bar.update(1)
            u, c, n = args.batch_users, args.batch_candidates, args.batch_length
            h, ci, cc = _request(u, c, n, n_items=args.n_items, n_categories=args.n_categories, device=device, seed=7)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rec = {"attention_dim": attention_dim, "fused": fused, "users": u, "candidates": c, "length": n,
                   "search": time_call(lambda: scorer.search(h, ci, cc), **timing),
                   "score": time_call(lambda: scorer.logits(h, ci, cc), **timing)}
            rec["candidates_per_s"] = u * c / rec["score"]["p50_s"]
            if device.type == "cuda":
                rec["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
            batched.append(rec)
            bar.update(1)
            del scorer
    bar.close()

    ratios = []
    dims = sorted(args.attention_dims, reverse=True)
    for rec in requests:
        if rec["attention_dim"] not in dims[:-1]:
            continue
        half = next((r for r in requests if r["attention_dim"] == rec["attention_dim"] // 2
                     and all(r[k] == rec[k] for k in ("fused", "candidates", "length"))), None)
        if half is not None:
            ratios.append({"from": rec["attention_dim"], "to": half["attention_dim"], "fused": rec["fused"],
                           "candidates": rec["candidates"], "length": rec["length"],
                           "search_time_ratio": half["search"]["p50_s"] / rec["search"]["p50_s"],
                           "score_time_ratio": half["score"]["p50_s"] / rec["score"]["p50_s"]})
    out = {"benchmark": "inference", "command": " ".join(["python", *sys.argv]),
           "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
           "triton": triton_available(), "preset": args.preset, "dim": args.dim, "top_k": args.top_k,
           "n_items": args.n_items, "requests": requests, "batched": batched, "halving_ratios": ratios}
    if device.type == "cuda":
        out["training_peak_memory"] = _training_memory(args, device)
    name = args.name or f"inference_{device.type}"
    write_json(RESULTS / f"{name}.json", out)
    for rec in requests:
        log.info("K_A=%-4d fused=%-5s C=%-5d N=%-6d search p50 %8.2f ms  score p50 %8.2f ms  p90 %8.2f ms",
                 rec["attention_dim"], rec["fused"], rec["candidates"], rec["length"], 1e3 * rec["search"]["p50_s"],
                 1e3 * rec["score"]["p50_s"], 1e3 * rec["score"]["p90_s"])
    for rec in batched:
        log.info("batch K_A=%-4d fused=%-5s %dx%dx%d: score p50 %.1f ms, %.0f candidates/s", rec["attention_dim"],
                 rec["fused"], rec["users"], rec["candidates"], rec["length"], 1e3 * rec["score"]["p50_s"],
                 rec["candidates_per_s"])
    log.info("wrote %s", RESULTS / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
