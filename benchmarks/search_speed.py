"""Search-stage time against history length for TWIN, DARE (K_A = K_R and K_R / 4), ETA, SDIM, TWIN-V2.

    python benchmarks/search_speed.py                 # CPU, and CUDA too when available
    python benchmarks/search_speed.py --device cuda   # GPU only

Three measurements per (method, N), median of `--repeats` after `--warmup` runs:
- `model`: the search module's forward in evaluation mode on B rows, each with its own N-long
  history: embedding lookups, hashing / clustering, retrieval, attention over the kept behaviours.
- `retrieval`: per target, from what a server caches per item or per user, on the same B rows
  (TWIN/DARE: dot products with cached keys + top-K; ETA: Hamming distances on cached packed codes
  + top-K; SDIM: one `embedding_bag` of m cells of the user's cached, normalised bucket sums, which
  is its whole interest; TWIN-V2: cluster-aware scores over the user's cached virtual items +
  top-K). Building the per-user caches (SDIM, TWIN-V2) is timed apart as `cache_build_ms`.
- `serve`: one whole `Scorer` request, one user with C candidates (each of --serve-candidates) and
  an N-long history (search, aggregation, MLP): the user's keys, signatures or bucket sums are
  built inside the request, once, and shared by the C candidates. TWIN-V2 has no serving form (its
  clusters are offline in production).
JSON goes to benchmarks/results/search_speed.json with the device, torch version and config.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import parse_args, time_call  # noqa: E402
from darec.data.batch import Batch  # noqa: E402
from darec.io import write_json  # noqa: E402
from darec.models.hashing import hamming, select_nearest_codes  # noqa: E402
from darec.models.presets import preset_config  # noqa: E402
from darec.models.search import select_topk  # noqa: E402
from darec.models.two_stage import build_model  # noqa: E402
from darec.serve.scorer import SERVE_SEARCHES, History, Scorer  # noqa: E402

log = logging.getLogger("search_speed")

# name -> (preset, model overrides beyond dim/top_k)
METHODS: dict[str, tuple[str, dict]] = {
    "twin": ("twin", {}),
    "dare_ka=kr": ("dare", {}),
    "dare_ka=kr/4": ("dare", {"attention_ratio": 4}),
    "eta": ("eta", {}),
    "sdim": ("sdim", {}),
    "twin_v2": ("twin_v2", {}),
}


def make_batch(*, batch_size: int, length: int, n_items: int, n_categories: int, device: torch.device,
               seed: int = 0) -> Batch:
    """Full-length random histories (no padding): the worst case for every method."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items, (batch_size, length), generator=g)
    return Batch(hist_items=items, hist_categories=items % (n_categories - 1) + 1,
                 hist_positions=torch.arange(length, 0, -1).expand(batch_size, length).clone(),
                 mask=torch.ones(batch_size, length, dtype=torch.bool),
                 target_item=torch.randint(1, n_items, (batch_size,), generator=g),
                 target_category=torch.randint(1, n_categories, (batch_size,), generator=g),
                 label=torch.zeros(batch_size), user=torch.arange(batch_size)).to(device)


def retrieval_fn(name: str, model, batch: Batch, top_k: int) -> Callable[[], object]:
    """Scoring + top-K from precomputed history keys / codes (what a serving cache holds)."""
    emb = model.embeddings
    query = emb.semantic("query", batch.target_item, batch.target_category)          # (B, D)
    keys = emb.semantic("key", batch.hist_items, batch.hist_categories)              # (B, N, D)
    if name == "eta":
        scorer = model.search.scorer
        q_codes, k_codes = scorer.codes(query), scorer.codes(keys)                   # (B, W), (B, N, W)
        return lambda: select_nearest_codes(-hamming(q_codes, k_codes).float(), batch, top_k)
    if name == "sdim":
        cache = sdim_cache(model, batch)                                            # (B, m nb, E)
        return lambda: model.search.lookup(cache, query.unsqueeze(1))               # (B, 1, E)
    if name == "twin_v2":
        virtual = model.search.virtual_items(emb, batch)                            # clusters, offline
        return lambda: model.search.search(query, virtual)
    return lambda: select_topk(torch.einsum("bd,bnd->bn", query, keys), batch, top_k)


def sdim_cache(model, batch: Batch) -> torch.Tensor:
    """SDIM's per-user cache (normalised value sums per hash and bucket) for every row of the batch."""
    emb = model.embeddings
    values = emb.values(batch.hist_items, batch.hist_categories, batch.hist_positions)  # (B, N, E)
    return model.search.user_cache(emb.semantic("key", batch.hist_items, batch.hist_categories), values, batch.mask)


def build_cache_fn(name: str, model, batch: Batch) -> Callable[[], object] | None:
    """Building the per-user cache that `retrieval` reads, where it is per user rather than per item."""
    if name == "sdim":
        return lambda: sdim_cache(model, batch)
    if name == "twin_v2":
        return lambda: model.search.virtual_items(model.embeddings, batch)
    return None


def serve_fn(model, batch: Batch, candidates: int, *, n_items: int, n_categories: int
             ) -> Callable[[], object] | None:
    """One Scorer request: the first row's history against `candidates` random candidates."""
    if model.config.search not in SERVE_SEARCHES:
        return None
    scorer = Scorer(model)
    history = History(items=batch.hist_items[:1], categories=batch.hist_categories[:1], mask=batch.mask[:1],
                      positions=batch.hist_positions[:1])
    g = torch.Generator().manual_seed(candidates)
    items = torch.randint(1, n_items, (1, candidates), generator=g).to(batch.mask.device)      # (1, C)
    cats = torch.randint(1, n_categories, (1, candidates), generator=g).to(batch.mask.device)
    return lambda: scorer.logits(history, items, cats)


def run(args: argparse.Namespace) -> dict:
    devices = [torch.device(d) for d in args.device]
    rows = []
    total = len(devices) * len(args.lengths) * len(METHODS) * len(args.top_k)
    bar = tqdm(total=total, desc="search speed", unit="cell")
    for device in devices:
        for length in args.lengths:
            batch = make_batch(batch_size=args.batch, length=length, n_items=args.items,
                               n_categories=args.categories, device=device)
            for top_k in args.top_k:
                for name, (preset, extra) in METHODS.items():
                    if name == "twin_v2" and length > args.twin_v2_max_len:
                        rows.append({"device": str(device), "method": name, "N": length, "top_k": top_k,
                                     "model_ms": None, "retrieval_ms": None, "cache_build_ms": None,
                                     "serve_ms": {},
                                     "skipped": f"N > --twin-v2-max-len {args.twin_v2_max_len}"})
                        bar.update(1)
                        continue
                    overrides = {"dim": args.dim, "top_k": top_k, "max_len": length, "aux_head": False}
                    if extra.get("attention_ratio"):
                        overrides["attention_dim"] = args.dim // extra["attention_ratio"]
                    torch.manual_seed(0)
                    model = build_model(preset_config(preset, n_items=args.items, n_categories=args.categories,
                                                      **overrides)).to(device).eval()
                    clock = lambda fn: None if fn is None else 1000 * time_call(  # noqa: E731
                        fn, device=device, warmup=args.warmup, repeats=args.repeats)["p50_s"]
                    with torch.no_grad():
                        row = {"device": str(device), "method": name, "N": length, "top_k": top_k,
                               "model_ms": clock(lambda: model.search(model.embeddings, batch, full=False)),
                               "retrieval_ms": clock(retrieval_fn(name, model, batch, top_k)),
                               "cache_build_ms": clock(build_cache_fn(name, model, batch)),
                               "serve_ms": {str(c): clock(serve_fn(model, batch, c, n_items=args.items,
                                                                   n_categories=args.categories))
                                            for c in args.serve_candidates}}
                    rows.append(row)
                    bar.update(1)
                    del model
    bar.close()
    return {"benchmark": "search_speed", "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "config": {"batch": args.batch, "serve_candidates": args.serve_candidates, "dim_per_field": args.dim, "items": args.items,
                       "categories": args.categories, "warmup": args.warmup, "repeats": args.repeats,
                       "eta_bits": 32, "sdim": "48 hashes x 3 bits", "twin_v2_cap": 8,
                       "dtype": "float32", "mode": "eval, no_grad, aux head off"},
            "rows": rows}


def markdown(result: dict) -> str:
    """Per (device, top_k): the model-path / retrieval table for B rows, then the serving table."""
    out = []
    rows = result["rows"]
    for device in sorted({r["device"] for r in rows}):
        for top_k in sorted({r["top_k"] for r in rows}):
            cells = [r for r in rows if r["device"] == device and r["top_k"] == top_k]
            lengths = sorted({r["N"] for r in cells})
            out.append(f"\n{device}, batch {result['config']['batch']}, K = {top_k}, K_R = "
                       f"{result['config']['dim_per_field']} per field (ms per batch: model path / retrieval only)\n")
            out.append("| method | " + " | ".join(f"N = {n}" for n in lengths) + " |")
            out.append("|---|" + "---|" * len(lengths))
            for method in METHODS:
                parts = []
                for n in lengths:
                    r = next(c for c in cells if c["method"] == method and c["N"] == n)
                    ret = "–" if r["retrieval_ms"] is None else f"{r['retrieval_ms']:.1f}"
                    model_ms = "skipped" if r["model_ms"] is None else f"{r['model_ms']:.1f}"
                    parts.append(f"{model_ms} / {ret}")
                out.append(f"| {method} | " + " | ".join(parts) + " |")
            candidates = result["config"]["serve_candidates"]
            out.append(f"\n{device}, one user, K = {top_k}: whole Scorer request (ms), C candidates\n")
            out.append("| method | " + " | ".join(f"C = {c}, N = {n}" for c in candidates for n in lengths) + " |")
            out.append("|---|" + "---|" * (len(lengths) * len(candidates)))
            for method in METHODS:
                found = [next(c for c in cells if c["method"] == method and c["N"] == n) for n in lengths]
                parts = ["–" if r["serve_ms"].get(str(c)) is None else f"{r['serve_ms'][str(c)]:.2f}"
                         for c in candidates for r in found]
                out.append(f"| {method} | " + " | ".join(parts) + " |")
            for method, what in (("sdim", "normalised bucket sums"), ("twin_v2", "clusters")):
                builds = [next(c for c in cells if c["method"] == method and c["N"] == n) for n in lengths]
                out.append(f"\n{method} per-user cache ({what}) built for all B rows, ms: " + ", ".join(
                    f"N = {r['N']}: " + ("skipped" if r["cache_build_ms"] is None else f"{r['cache_build_ms']:.1f}")
                    for r in builds))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--lengths", nargs="+", type=int, default=[200, 1000, 10000])
    parser.add_argument("--top-k", nargs="+", type=int, default=[20])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--serve-candidates", nargs="+", type=int, default=[256, 1000],
                        help="C values for the one-user Scorer request")
    parser.add_argument("--dim", type=int, default=64, help="K_R per field; DARE's small variant uses dim / 4")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--twin-v2-max-len", type=int, default=1000,
                        help="skip TWIN-V2 above this N: per-forward clustering of B x N histories is minutes on CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "search_speed.json")
    args = parse_args(parser, argv)
    if any(d.startswith("cuda") for d in args.device) and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    result = run(args)
    write_json(args.out, result)
    print(markdown(result))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
