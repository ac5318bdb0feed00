"""`darec predict`: score a CSV/Parquet file of (user, item[, category]) rows in raw ids into a Parquet file."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from darec.cli.arg_types import device_name, positive_int

__all__ = ["register"]

log = logging.getLogger("darec")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="batch click probabilities for a file of (user, item) rows in raw ids",
                       description="Streams the input in chunks; each chunk's rows are grouped by user so a "
                                   "user's history is searched once for all of its items. The output Parquet "
                                   "holds the input's rows in order plus logit and probability, and appears "
                                   "only when every row is scored.")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt, a `darec train` run directory, or a `darec export` folder (CPU)")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset the model was trained on")
    p.add_argument("--input", type=Path, required=True,
                   help=".csv (with header) or .parquet with columns user, item and optional category (raw ids)")
    p.add_argument("--out", type=Path, required=True, help="output .parquet file")
    p.add_argument("--columns", default=None,
                   help="the input's column names when they differ: user=COL,item=COL[,category=COL]")
    p.add_argument("--unknown", choices=("error", "oov"), default="error",
                   help="an item or category the dataset does not know: error (default), or oov: score it "
                        "through the padding row and set known=false. An unknown user is always an error")
    p.add_argument("--max-len", type=positive_int, help="history length (default: the model's max_len)")
    p.add_argument("--chunk-rows", type=positive_int, default=None,
                   help="input rows scored at a time (default: darec.serve.predict.DEFAULT_CHUNK_ROWS, "
                        "200,000; bounds memory)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from darec.cli.data import parse_columns
    from darec.serve.predict import DEFAULT_CHUNK_ROWS, predict_file

    summary = predict_file(checkpoint=args.checkpoint, data=args.data, input=args.input, out=args.out,
                           unknown=args.unknown, max_len=args.max_len, device=args.device,
                           chunk_rows=args.chunk_rows or DEFAULT_CHUNK_ROWS, overwrite=args.overwrite,
                           columns=parse_columns(args.columns, example="user=uid,item=iid,category=cid"))
    unknown = f", {summary['unknown_candidates']:,} unknown candidates" if args.unknown == "oov" else ""
    print(f"wrote {summary['out']}: {summary['rows']:,} rows{unknown} "
          f"({summary['rows_per_second']:,.0f} rows/s)")
    return 0
