"""Training throughput (samples/s) through the real trainer path: loader -> forward -> backward -> step.

One command, any preset/dim/batch size/device; warm-up steps are excluded. The data is a random
prepared dataset at a chosen vocabulary (default Taobao's: 4,068,791 items, 9,408 categories, L = 200),
written once and reused; it carries no signal, only the shapes and the id distribution matter here.

    python benchmarks/train_throughput.py --device cpu --batch-size 512
    python benchmarks/train_throughput.py --device cuda --dim 16 --batch-size 8192 32768 --sparse-optimizer both

Writes benchmarks/results/NAME.json (default train_throughput_<device>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common import parse_args
from darec.data.loader import BatchLoader
from darec.data.protocol import SAMPLE_DTYPE, PreparedArrays
from darec.data.store import PreparedDataset, write_prepared
from darec.io import write_json
from darec.models import build_model, preset_config
from darec.train.config import TrainConfig
from darec.train import distributed
from darec.train.allocator import keep_freed_memory
from darec.train.trainer import Optimizers, regularised_weights, resolve_device, train_step

__all__ = ["random_dataset", "measure", "main"]

log = logging.getLogger("benchmarks.train_throughput")
RESULTS = Path(__file__).resolve().parent / "results"
TAOBAO_ITEMS, TAOBAO_CATEGORIES = 4_068_791, 9_408


def random_dataset(out: Path, *, n_items: int, n_categories: int, n_users: int, max_len: int,
                   per_user: int = 20, seed: int = 0) -> PreparedDataset:
    """A prepared dataset of uniformly random clicks: `n_users` histories of max_len + per_user clicks,
    `per_user` training samples each (cuts in the last `per_user` clicks), vocabulary incl. padding 0."""
    if (out / "manifest.json").is_file():
        ds = PreparedDataset.open(out)
        if (ds.n_items, ds.n_categories, ds.n_users, ds.max_len) == (n_items, n_categories, n_users, max_len):
            return ds
    rng = np.random.default_rng(seed)
    item_categories = np.concatenate([[0], rng.integers(1, n_categories, n_items - 1)]).astype(np.int32)
    length = max_len + per_user
    items = rng.integers(1, n_items, n_users * length).astype(np.int32)                # (U * T,)
    offsets = np.arange(n_users + 1, dtype=np.int64) * length
    samples = np.zeros(n_users * per_user, dtype=SAMPLE_DTYPE)
    samples["user"] = np.repeat(np.arange(n_users), per_user)
    samples["cut"] = np.tile(np.arange(max_len, length), n_users)
    samples["item"] = rng.integers(1, n_items, len(samples))
    samples["category"] = item_categories[samples["item"]]
    samples["label"] = rng.integers(0, 2, len(samples))
    small = samples[: min(len(samples), 1024)]
    arrays = PreparedArrays(offsets=offsets, items=items, categories=item_categories[items],
                            timestamps=np.arange(len(items), dtype=np.int64), item_categories=item_categories,
                            splits={"train": samples, "val": small, "test": small},
                            n_items=n_items, n_categories=n_categories)
    write_prepared(out, arrays, manifest={"source": "benchmark-random", "protocol": {"max_len": max_len}})
    return PreparedDataset.open(out)


def measure(dataset: PreparedDataset, config: TrainConfig, *, warmup: int, steps: int,
            progress: bool = True, profile: int = 0) -> dict[str, Any]:
    """samples/s over `steps` timed trainer steps after `warmup` untimed ones (same set-up as `train`).
    `profile` > 0 also records where the timed steps spent their time: the top `profile` operators by
    self CPU time (torch.profiler; the profiler's own overhead slows those steps)."""
    device = resolve_device(config.device)
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    torch.manual_seed(config.seed)
    keep_freed_memory()  # as `darec train` does
    model_config = preset_config(config.preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                                 **{"max_len": config.max_len or dataset.max_len, **config.model})
    model = build_model(model_config).to(device)
    if config.embedding_backend == "torchrec":  # tables sharded over a one-process group, as `darec train` does
        model = distributed.shard_tables(model, config, device, distributed.setup(device))
    model.train()
    optimizers = Optimizers(model, config, device)
    forward = torch.compile(model) if config.compile else model
    weights = regularised_weights(model)
    loader = BatchLoader(dataset, "train", batch_size=config.batch_size, shuffle=True, seed=config.seed,
                         max_len=model_config.max_len, drop_last=True, device=device)
    if len(loader) < warmup + steps:
        raise SystemExit(f"dataset has {len(loader)} batches, need {warmup + steps}: raise --users")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = loader.batches(0)
    loss = torch.zeros(())
    bar = tqdm(total=warmup + steps, disable=not progress, leave=False, unit="step",
               desc=f"{config.preset} b={config.batch_size}")
    for _ in range(warmup):
        loss = train_step(forward, next(batches), optimizers=optimizers, config=config, l2_weights=weights,
                          device=device)
        bar.update(1)
    sync()
    profiler = (torch.profiler.profile(activities=_activities(device)) if profile
                else contextlib.nullcontext())
    with profiler:
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(forward, next(batches), optimizers=optimizers, config=config, l2_weights=weights,
                              device=device)
            bar.update(1)
        sync()
        seconds = time.perf_counter() - start
    bar.close()
    record = {"preset": config.preset, "dim": model_config.dim, "attention_dim": model_config.attn_dim,
              "batch_size": config.batch_size, "max_len": model_config.max_len, "top_k": model_config.top_k,
              "aux_head": model_config.aux_head, "sparse_optimizer": config.sparse_optimizer,
              "embedding_backend": config.embedding_backend, "embedding_optimizer": config.embedding_optimizer,
              "precision": config.precision, "compile": config.compile, "deterministic": config.deterministic,
              "device": str(device), "warmup_steps": warmup, "steps": steps, "seconds": seconds,
              "samples_per_s": steps * config.batch_size / seconds, "final_loss": float(loss)}
    if device.type == "cuda":
        record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if profile:
        record["profile"] = _top_operators(profiler, profile)
    return record


def _activities(device: torch.device) -> list[Any]:
    cuda = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    return [torch.profiler.ProfilerActivity.CPU, *cuda]


def _top_operators(profiler: Any, n: int) -> list[dict[str, Any]]:
    """The `n` operators with the most self CPU time, with their share of all operators' self time."""
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in top]


def _flags(value: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--preset", nargs="+", default=["dare"])
    p.add_argument("--dim", type=int, nargs="+", default=[16], help="K_R per field")
    p.add_argument("--attention-dim", type=int, help="K_A per field (default: = dim)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[512])
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--n-items", type=int, default=TAOBAO_ITEMS)
    p.add_argument("--n-categories", type=int, default=TAOBAO_CATEGORIES)
    p.add_argument("--users", type=int, help="histories in the random dataset (default: enough for all steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sparse-optimizer", choices=["on", "off", "both"], default="off")
    p.add_argument("--aux-head", choices=["on", "off", "both"], default="on")
    p.add_argument("--deterministic", choices=["on", "off", "both"], default="on")
    p.add_argument("--embedding-backend", nargs="+", choices=["plain", "torchrec"], default=["plain"],
                   help="torchrec: tables in torchrec, fbgemm's fused optimiser (optional dependency)")
    p.add_argument("--embedding-optimizer", choices=["adam", "rowwise_adagrad"], default="adam",
                   help="torchrec's fused optimiser (adam: CUDA only)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also record the top N operators by self CPU time of the timed steps (torch.profiler)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/darec-bench-data"))
    p.add_argument("--name", help="results file stem (default train_throughput_<device type>)")
    args = parse_args(p, argv)
    device = resolve_device(args.device)
    per_user = 20
    users = args.users or -(-max(args.batch_size) * (args.warmup + args.steps) // per_user)
    data_dir = args.data_dir / f"i{args.n_items}-c{args.n_categories}-u{users}-l{args.max_len}"
    dataset = random_dataset(data_dir, n_items=args.n_items, n_categories=args.n_categories, n_users=users,
                             max_len=args.max_len, per_user=per_user)
    records = []
    grid = itertools.product(args.preset, args.dim, args.batch_size, _flags(args.sparse_optimizer),
                             _flags(args.aux_head), _flags(args.deterministic), args.embedding_backend)
    for preset, dim, batch_size, sparse, aux, deterministic, backend in grid:
        model = {"dim": dim, "top_k": args.top_k, "aux_head": aux}
        if args.attention_dim:
            model["attention_dim"] = args.attention_dim
        config = TrainConfig(preset=preset, model=model, batch_size=batch_size, device=str(device),
                             sparse_optimizer=sparse, precision=args.precision, compile=args.compile,
                             deterministic=deterministic, max_len=args.max_len, embedding_backend=backend,
                             embedding_optimizer=args.embedding_optimizer)
        record = measure(dataset, config, warmup=args.warmup, steps=args.steps, profile=args.profile)
        records.append(record)
        log.info("%-10s dim=%-3d batch=%-6d sparse=%-5s aux=%-5s det=%-5s tables=%-8s %10.0f samples/s", preset, dim,
                 batch_size, sparse, aux, deterministic, backend, record["samples_per_s"])
    name = args.name or f"train_throughput_{device.type}"
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    out = {"benchmark": "train_throughput", "command": " ".join(["python", *sys.argv]), "device_name": device_name,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_average_at_end": os.getloadavg(), "n_items": args.n_items, "n_categories": args.n_categories,
           "records": records}
    write_json(RESULTS / f"{name}.json", out)
    log.info("wrote %s", RESULTS / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
