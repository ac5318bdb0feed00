"""`darec score`: rank candidate items for one user of a prepared dataset with a trained checkpoint."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from darec.cli.arg_types import device_name, non_negative_int, positive_int
from darec.errors import ConfigError, DataError

__all__ = ["register", "score_user"]

log = logging.getLogger("darec")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score candidate items for one user with a trained checkpoint",
                       description="Scores candidates against the user's most recent --max-len clicks with one "
                                   "search pass over the history (darec.Scorer) and prints the best ones.")
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt (or checkpoint.pt) of `darec train`")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory (histories, categories)")
    p.add_argument("--user", type=non_negative_int, required=True,
                   help="prepared user index (the `user` column of the splits)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--candidates", type=int, nargs="+", metavar="ITEM", help="candidate item ids")
    group.add_argument("--n-candidates", type=positive_int, default=100,
                       help="score this many random item ids instead (default 100)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random candidates")
    p.add_argument("--max-len", type=positive_int, help="history length (default: the model's max_len; may be longer)")
    p.add_argument("--top", type=positive_int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", type=Path, help="also write every candidate's probability here")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N | auto")
    p.set_defaults(handler=_score)


def score_user(*, checkpoint: Path, data: Path, user: int, candidates: np.ndarray | None = None,
               n_candidates: int = 100, seed: int = 0, max_len: int | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Probabilities of the candidates for `user`, best first, with what was scored."""
    from darec.data.store import PreparedDataset
    from darec.serve.scorer import History, Scorer
    from darec.train.trainer import resolve_device

    dataset = PreparedDataset.open(data)
    if not 0 <= user < dataset.n_users:
        raise DataError(f"--user must be in [0, {dataset.n_users}), got {user}", path=data)
    scorer = Scorer.load(checkpoint, device=resolve_device(device))
    for what in ("n_items", "n_categories"):
        trained, here = getattr(scorer.config, what), getattr(dataset, what)
        if trained != here:
            raise ConfigError(f"checkpoint {checkpoint} was trained with {what}={trained}, dataset {data} has "
                              f"{here}: score with the dataset the model was trained on")
    length = scorer.config.max_len if max_len is None else max_len
    if length < 1:
        raise ConfigError(f"--max-len must be >= 1, got {length}")
    if candidates is None:
        if not 1 <= n_candidates < dataset.n_items:
            raise ConfigError(f"--n-candidates must be in [1, {dataset.n_items - 1}], got {n_candidates}")
        candidates = np.random.default_rng(seed).choice(np.arange(1, dataset.n_items), n_candidates, replace=False)
    candidates = np.asarray(candidates, dtype=np.int64)
    bad = candidates[(candidates < 1) | (candidates >= dataset.n_items)]
    if len(bad):
        raise ConfigError(f"candidate ids must be in [1, {dataset.n_items - 1}], got {bad[:5].tolist()}")
    lo, hi = int(dataset.offsets[user]), int(dataset.offsets[user + 1])
    history = History.left_pad([np.asarray(dataset.items[lo:hi])], [np.asarray(dataset.categories[lo:hi])],
                               length=length)
    categories = np.asarray(dataset.item_categories)[candidates].astype(np.int64)
    probs = scorer.score(history, torch.from_numpy(candidates), torch.from_numpy(categories))[0].cpu().numpy()
    order = np.argsort(-probs, kind="stable")
    return {"checkpoint": str(checkpoint), "data": str(data), "user": user,
            "history_length": int(min(hi - lo, length)), "max_len": length,
            "ranking": [{"item": int(candidates[i]), "category": int(categories[i]), "probability": float(probs[i])}
                        for i in order]}


def _score(args: argparse.Namespace) -> int:
    from darec.io import write_json

    result = score_user(checkpoint=args.checkpoint, data=args.data, user=args.user,
                        candidates=None if args.candidates is None else np.array(args.candidates),
                        n_candidates=args.n_candidates, seed=args.seed, max_len=args.max_len, device=args.device)
    print(f"user {result['user']}: {result['history_length']} behaviours, "
          f"{len(result['ranking'])} candidates")
    print(f"{'rank':>4}  {'item':>8}  {'category':>8}  probability")
    for rank, row in enumerate(result["ranking"][:args.top], start=1):
        print(f"{rank:>4}  {row['item']:>8}  {row['category']:>8}  {row['probability']:.4f}")
    if args.json is not None:
        write_json(args.json, result)
        log.info("wrote %s", args.json)
    return 0
