"""`darec score`: rank candidate items for one user of a prepared dataset with a trained checkpoint.

Users, items and categories are named by their raw ids (as in the input log) on the command line and in
every output; the dataset's id maps (`<dataset>/ids/`) translate them.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from darec.cli.arg_types import device_name, non_negative_int, positive_int
from darec.errors import ConfigError, DataError

__all__ = ["register", "score_user"]

log = logging.getLogger("darec")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score candidate items for one user with a trained checkpoint",
                       description="Scores candidates against the user's most recent --max-len clicks with one "
                                   "search pass over the history (darec.Scorer) and prints the best ones. "
                                   "Users, items and categories are raw ids, as in the input log.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="best.pt (or checkpoint.pt) of `darec train`, the run directory, or a `darec export` folder")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory (histories, categories)")
    p.add_argument("--user", required=True, help="raw user id (as in the input log)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--candidates", nargs="+", metavar="ITEM", help="candidate raw item ids")
    group.add_argument("--n-candidates", type=positive_int, default=100,
                       help="score this many random items of the dataset instead (default 100)")
    p.add_argument("--unknown", choices=("error", "oov"), default="error",
                   help="a candidate the dataset does not know: error (default), or oov: score it through the "
                        "padding row and mark it unknown. An unknown user is always an error")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random candidates")
    p.add_argument("--max-len", type=positive_int, help="history length (default: the model's max_len; may be longer)")
    p.add_argument("--top", type=positive_int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", type=Path, help="also write every candidate's probability here")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N | auto")
    p.set_defaults(handler=_score)


def score_user(*, checkpoint: Path, data: Path, user: Any, candidates: Any = None,
               n_candidates: int = 100, seed: int = 0, max_len: int | None = None,
               device: str = "cpu", unknown: str = "error") -> dict[str, Any]:
    """Probabilities of the candidates (raw item ids) for `user` (raw id), best first, with what was scored.

    Every id in the result is raw; under `unknown="oov"` an unknown candidate is scored through the padding
    row, keeps the raw id it was given and has `known: false` (and category null)."""
    import numpy as np
    import torch

    from darec.data.id_maps import RawIdError
    from darec.data.store import PreparedDataset
    from darec.serve.predict import load_scorer, user_histories

    dataset = PreparedDataset.open(data)
    maps = dataset.id_maps()
    scorer = load_scorer(checkpoint, dataset, device=device)
    length = scorer.config.max_len if max_len is None else max_len
    if length < 1:
        raise ConfigError(f"--max-len must be >= 1, got {length}")
    if candidates is None:
        if not 1 <= n_candidates < dataset.n_items:
            raise ConfigError(f"--n-candidates must be in [1, {dataset.n_items - 1}], got {n_candidates}")
        ids = np.random.default_rng(seed).choice(np.arange(1, dataset.n_items), n_candidates, replace=False)
        raw_items = maps.decode("item", ids)
    else:
        try:
            raw_items = maps.as_raw("item", candidates)
            ids = maps.encode("item", raw_items, unknown=unknown)
        except RawIdError as err:
            raise DataError(f"--candidates: {err.reason}", value=err.value) from None
    try:
        raw_user = maps.as_raw("user", [user])
        row = int(maps.encode("user", raw_user)[0])
    except RawIdError as err:
        raise DataError(f"--user: {err.reason}", path=data, value=err.value) from None
    history = user_histories(dataset, np.array([row]), length)
    categories = np.asarray(dataset.item_categories)[ids].astype(np.int64)   # oov item -> padding category 0
    probs = scorer.score(history, torch.from_numpy(ids)[None], torch.from_numpy(categories)[None])[0].cpu().numpy()
    order = np.argsort(-probs, kind="stable")
    raw_categories = maps.decode("category", categories)
    return {"checkpoint": str(checkpoint), "data": str(data), "user": raw_user[0],
            "history_length": int(history.mask.sum()), "max_len": length, "unknown": unknown,
            "ranking": [{"item": item, "category": category, "probability": float(prob), "known": bool(known)}
                        for item, category, prob, known in zip(raw_items.gather(order).to_list(),
                                                               raw_categories.gather(order).to_list(),
                                                               probs[order].tolist(), ids[order] != 0)]}


def _score(args: argparse.Namespace) -> int:
    from darec.io import write_json

    result = score_user(checkpoint=args.checkpoint, data=args.data, user=args.user, candidates=args.candidates,
                        n_candidates=args.n_candidates, seed=args.seed, max_len=args.max_len, device=args.device,
                        unknown=args.unknown)
    ranking = result["ranking"]
    n_unknown = sum(not row["known"] for row in ranking)
    print(f"user {result['user']}: {result['history_length']} behaviours, {len(ranking)} candidates"
          + (f", {n_unknown} unknown (scored through the padding row, marked *)" if n_unknown else ""))
    print(f"{'rank':>4}  {'item':>8}  {'category':>8}  probability")
    for rank, row in enumerate(ranking[:args.top], start=1):
        mark = "" if row["known"] else " *"
        category = "-" if row["category"] is None else row["category"]
        print(f"{rank:>4}  {row['item']!s:>8}  {category!s:>8}  {row['probability']:.4f}{mark}")
    if args.json is not None:
        write_json(args.json, result)
        log.info("wrote %s", args.json)
    return 0
