"""`darec export` (a run as a self-contained serving artifact) and `darec check-export`."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained model as a torch.export program (+ ONNX) with its id maps",
                       description="Writes a self-contained folder: model.pt2 (torch.export), model.onnx (when the "
                                   "search exports to ONNX), config.json (the program's inputs, side features "
                                   "included), the dataset's ids/ and manifest.json (sha256 of every file). Load it "
                                   "with darec.serve.export.load_exported, without darec's model or training code. "
                                   "See docs/serving.md.")
    p.add_argument("run", type=Path, metavar="RUN",
                   help="run folder of `darec train` (its best.pt) or a checkpoint file")
    p.add_argument("--out", type=Path, required=True, help="export folder to write (replaced only if darec wrote it)")
    p.add_argument("--data", type=Path, help="the run's prepared dataset: copies its id maps (ids/) into the export, "
                                             "and the item tables of a model with item features (needed then); "
                                             "must be the dataset the run recorded")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX model")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an export darec wrote")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_export)

    p = sub.add_parser("check-export", help="verify an export folder and score a random batch with each backend",
                       description="Verifies every checksum, refuses a program darec did not write, loads model.pt2 "
                                   "(and model.onnx) and checks both give the same logits on a random batch.")
    p.add_argument("path", type=Path, metavar="DIR", help="export folder written by `darec export`")
    p.set_defaults(handler=_check)


def _export(args: argparse.Namespace) -> int:
    from darec.serve.export import export_run

    manifest = export_run(args.run, args.out, data=args.data, onnx=not args.no_onnx, overwrite=args.overwrite,
                          progress=not args.no_progress)
    for name, entry in manifest["files"].items():
        print(f"{entry['size']:>12,}  {name}")
    if not manifest["onnx"]["exported"]:
        print(f"no model.onnx: {manifest['onnx']['reason']}")
    print(f"-> {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from darec.serve.export import check_export

    result = check_export(args.path)
    agreement = "" if len(result["backends"]) == 1 else f", agreeing within {result['gap']:.2g} x the tolerance"
    print(f"{args.path}: checksums and program ok; {' and '.join(result['backends'])} scored a random "
          f"{result['shape'][0]} x {result['shape'][1]} batch{agreement}")
    if not result["onnx"]["exported"]:
        print(f"no model.onnx: {result['onnx']['reason']}")
    return 0
