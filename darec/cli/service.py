"""`darec serve`: the HTTP scoring service (darec.serve.app) under uvicorn, on loopback unless told otherwise."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from darec.cli.arg_types import device_name, non_negative_int, positive_int

__all__ = ["register"]

log = logging.getLogger("darec")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained checkpoint over HTTP (POST /score, GET /healthz)",
                       description="Loads the model and the prepared dataset once and answers POST /score with "
                                   "click probabilities of candidate items, by raw ids; see docs/serving.md.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="best.pt of `darec train`, its run directory, or a `darec export` folder (CPU)")
    p.add_argument("--data", type=Path, required=True,
                   help="the prepared dataset the model was trained on (histories, raw-id maps)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; the service has no authentication)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--max-candidates", type=positive_int, default=1000, help="candidates per request (default 1000)")
    p.add_argument("--max-history", type=positive_int, default=10_000,
                   help="behaviours in an explicit history (default 10000)")
    p.add_argument("--max-body-bytes", type=positive_int,
                   help="request body limit (default: room for both lists at their limits, at least 1 MiB)")
    p.add_argument("--unknown", choices=("error", "oov"), default="error",
                   help="unknown item/category ids: error (404) or oov (padding row; candidates flagged, "
                        "history behaviours dropped). An unknown user is always 404")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="requests scored together in one model call (default 32): those that arrive while "
                        "the model is busy form the next batch")
    p.add_argument("--batch-wait-ms", type=_wait_ms, default=0.0,
                   help="how long a batch waits for more requests before it is scored (default 0: it takes "
                        "those already waiting)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with its own copy of the model (default 1)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    p.set_defaults(handler=_serve)


def _port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0 to 65535), got {value}")
    return value


def _wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds, got {text!r}") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1000 ms, got {text}")
    return value


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from darec.serve.app import SETTINGS_ENV, create_app

    settings = {"checkpoint": str(args.checkpoint), "data": str(args.data), "device": args.device,
                "max_candidates": args.max_candidates, "max_history": args.max_history,
                "max_body_bytes": args.max_body_bytes, "unknown": args.unknown, "threads": args.threads,
                "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms}
    app = create_app(**settings)  # also in the parent when --workers > 1: a bad path fails here, in one line
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the service has no authentication; anyone who can reach the port can use it",
                    args.host)
    options = {"host": args.host, "port": args.port, "access_log": args.access_log, "log_level": "info"}
    if args.workers == 1:
        uvicorn.run(app, **options)
    else:  # uvicorn starts each worker by import string; the settings travel in the environment
        del app
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        uvicorn.run("darec.serve.app:app_from_environment", factory=True, workers=args.workers, **options)
    return 0
