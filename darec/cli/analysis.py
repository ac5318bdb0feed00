"""`darec analyze KIND` and `darec report DIR`: thin wrappers over `darec.analysis`."""
from __future__ import annotations

import argparse
from pathlib import Path

from darec.cli.arg_types import non_negative_int, positive_int

__all__ = ["register"]

_KINDS = ("gradients", "attention", "retrieval", "discriminability", "convergence", "attention-size", "collapse",
          "all")


def _analyze(args: argparse.Namespace) -> int:
    from darec.analysis import analyze
    from darec.analysis.common import ANALYSIS_TRAIN

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    changes = {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
               "eval_every": args.eval_every, "device": args.device, "features": args.features}
    train = ANALYSIS_TRAIN.replace(**{k: v for k, v in changes.items() if v is not None})
    results = analyze(args.kind, data=args.data, out=args.out, runs=args.runs,
                      presets=tuple(args.presets) if args.presets else None, train=train, dim=args.dim,
                      steps=args.steps, sizes=tuple(args.sizes), representation_dim=args.representation_dim,
                      cluster_features=args.cluster_features, embedding_sets=tuple(args.embedding_sets),
                      progress=not args.no_progress)
    for kind, result in results.items():
        figures = ", ".join(result.get("figures", []))
        print(f"{kind}: {args.out / kind / (kind + '.json')}  figures: {figures}")
    print(f"next: darec report {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from darec.analysis import write_report

    path = write_report(args.dir, table_dir=args.table)
    print(f"report: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="the paper's analyses: figures (PNG) + numbers (JSON) per kind")
    p.add_argument("kind", choices=_KINDS)
    p.add_argument("--data", type=Path, required=True, help="a directory written by `darec prepare`/`synth`")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/<kind>/*.png and OUT/<kind>/<kind>.json")
    p.add_argument("--runs", type=Path, default=None, help="trained runs to reuse/create (default OUT/runs)")
    p.add_argument("--presets", nargs="+", default=None, help="models to compare (default: per analysis)")
    p.add_argument("--steps", type=positive_int, default=100, help="gradients: training steps observed (default 100)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="training and K-means seed (default 1)")
    p.add_argument("--dim", type=positive_int, default=16, help="K_R, embedding dim per field (default 16)")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[128, 64, 32, 16],
                   help="attention-size: K_A values for DARE / shared dims for TWIN")
    p.add_argument("--representation-dim", type=positive_int, default=None,
                   help="attention-size: DARE's fixed K_R (default: the largest --sizes value)")
    p.add_argument("--cluster-features", choices=["h", "head-input"], default="h",
                   help="discriminability: cluster h = v_t*r (the paper's, default) or the whole head input "
                        "[v_t, r, v_t*r] (the reference's)")
    p.add_argument("--embedding-sets", type=positive_int, nargs="+", default=[1],
                   help="collapse: multi-embedding set counts M, each preset trained once per M (default 1)")
    p.add_argument("--features", default=None,
                   help="side features the models read: all (default: every one the dataset has), none (the "
                        "paper's model) or NAME,NAME; such runs are named RUNS/<preset>-...-f<features>-s<seed>")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs per run (default 2)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch (default 256)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between validations (default 10)")
    p.add_argument("--device", default=None, help="training device: auto | cpu | cuda")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (1 is much faster on a busy 2-core machine)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_analyze)

    p = sub.add_parser("report", help="gather analyses (and Table 1) into DIR/report.md")
    p.add_argument("dir", type=Path, help="the --out of `darec analyze`")
    p.add_argument("--table", type=Path, default=None, help="the --out of `darec table` (default: DIR)")
    p.set_defaults(handler=_report)
