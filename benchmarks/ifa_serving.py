"""Serving cost per request: IFA's one-stage linear attention against DARE's and TWIN's search + top-K.

One request = 1 user with N history behaviours and C candidates, scored by `darec.serve.Scorer` (the same
path `darec score` and the HTTP service use), p50/p90 over --repeats calls after --warmup. DARE and TWIN
build a (C, N) score matrix per request (O(C N d_A)); IFA folds the history once (O(N d_A d_R)) and every
candidate reads it (O(C d_A d_R)). Two-stage cases with C * N above --max-scores are skipped (the score
matrix alone would not fit the bounded run); they are listed under "skipped".

Crossovers: for every N, the smallest measured C at which IFA is faster than each two-stage model (and
for every C the smallest N), "never" when it is slower at every measured size, "always" when faster at
the smallest one.

    python benchmarks/ifa_serving.py --threads 1

Writes benchmarks/results/NAME.json (default ifa_serving_<device type>.json).
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
from darec.serve.scorer import History, Scorer
from darec.train.trainer import resolve_device

__all__ = ["main", "crossovers"]

log = logging.getLogger("benchmarks.ifa_serving")
RESULTS = Path(__file__).resolve().parent / "results"
TWO_STAGE = ("dare", "twin")


def _request(c: int, n: int, *, n_items: int, n_categories: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    history = History(items=torch.randint(1, n_items, (1, n), generator=g).to(device),
                      categories=torch.randint(1, n_categories, (1, n), generator=g).to(device))
    return (history, torch.randint(1, n_items, (1, c), generator=g).to(device),
            torch.randint(1, n_categories, (1, c), generator=g).to(device))


def _scorer(preset: str, args: argparse.Namespace, device: torch.device) -> Scorer:
    torch.manual_seed(0)
    config = preset_config(preset, n_items=args.n_items, n_categories=args.n_categories, max_len=args.max_len,
                           dim=args.dim, top_k=args.top_k, aux_head=False)
    return Scorer(build_model(config).to(device))


def crossovers(requests: list[dict[str, Any]], *, along: str, fixed: str) -> dict[str, dict[str, Any]]:
    """For every two-stage preset and every value of `fixed`: the smallest value of `along` at which IFA's
    p50 is below the preset's ("always" if already at the smallest measured one, "never" if nowhere)."""
    p50 = {(r["preset"], r["candidates"], r["length"]): r["score"]["p50_s"] for r in requests}
    out: dict[str, dict[str, Any]] = {}
    for preset in TWO_STAGE:
        out[preset] = {}
        for value in sorted({r[fixed] for r in requests if r["preset"] == preset}):
            key = lambda x: (x, value) if along == "candidates" else (value, x)  # noqa: E731
            sizes = sorted(x for x in {r[along] for r in requests if r["preset"] == preset}
                           if ("ifa", *key(x)) in p50 and (preset, *key(x)) in p50)
            faster = [x for x in sizes if p50[("ifa", *key(x))] < p50[(preset, *key(x))]]
            first = next((x for i, x in enumerate(sizes) if all(p50[("ifa", *key(y))] < p50[(preset, *key(y))]
                                                               for y in sizes[i:])), None)
            out[preset][str(value)] = ("never" if not faster else "always" if first == sizes[0]
                                       else first if first is not None else f"mixed: {faster}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--candidates", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000, 10_000])
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    p.add_argument("--presets", nargs="+", default=["ifa", *TWO_STAGE])
    p.add_argument("--dim", type=int, default=16, help="K_R = K_A per field for every preset")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200, help="position table (longer histories clamp)")
    p.add_argument("--n-items", type=int, default=100_000)
    p.add_argument("--n-categories", type=int, default=1_000)
    p.add_argument("--max-scores", type=int, default=10_000_000,
                   help="skip two-stage cases whose (C, N) score matrix is larger than this")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--name", help="results file stem (default ifa_serving_<device type>)")
    args = parse_args(p, argv)
    device = resolve_device(args.device)
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    requests, skipped = [], []
    cases = [(preset, c, n) for preset in args.presets for c in args.candidates for n in args.lengths]
    bar = tqdm(total=len(cases), unit="case", desc="ifa serving")
    for preset in args.presets:
        scorer = _scorer(preset, args, device)
        for c in args.candidates:
            for n in args.lengths:
                bar.update(1)
                if preset in TWO_STAGE and c * n > args.max_scores:
                    skipped.append({"preset": preset, "candidates": c, "length": n})
                    continue
                h, ci, cc = _request(c, n, n_items=args.n_items, n_categories=args.n_categories, device=device,
                                     seed=c + n)
                score = time_call(lambda: scorer.logits(h, ci, cc), **timing)
                requests.append({"preset": preset, "candidates": c, "length": n, "score": score,
                                 "candidates_per_s": c / score["p50_s"]})
        del scorer
    bar.close()
    out = {"benchmark": "ifa_serving", "command": " ".join(["python", *sys.argv]), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(), "dim": args.dim,
           "top_k": args.top_k, "n_items": args.n_items, "max_scores": args.max_scores, "requests": requests,
           "skipped": skipped,
           "crossover_candidates_per_length": crossovers(requests, along="candidates", fixed="length"),
           "crossover_length_per_candidates": crossovers(requests, along="length", fixed="candidates")}
    name = args.name or f"ifa_serving_{device.type}"
    write_json(RESULTS / f"{name}.json", out)
    for rec in requests:
        log.info("%-5s C=%-6d N=%-7d p50 %9.2f ms  p90 %9.2f ms", rec["preset"], rec["candidates"], rec["length"],
                 1e3 * rec["score"]["p50_s"], 1e3 * rec["score"]["p90_s"])
    log.info("smallest C at which IFA is faster, per N: %s", out["crossover_candidates_per_length"])
    log.info("smallest N at which IFA is faster, per C: %s", out["crossover_length_per_candidates"])
    log.info("wrote %s", RESULTS / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
