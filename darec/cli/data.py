"""`darec prepare`, `darec synth`, `darec info`: thin wrappers over `darec.data.prepare` and friends."""
from __future__ import annotations

import argparse
from pathlib import Path

from darec.errors import ConfigError

__all__ = ["register", "parse_columns"]


def _protocol_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol (defaults reproduce the paper)")
    group.add_argument("--targets", choices=("paper", "dense"), default="paper",
                       help="paper: 19 train, 1 val, 1 test target per user; dense: every click after "
                            "--min-history is a target, each user's latest ones are val/test (small logs)")
    group.add_argument("--min-clicks", type=int, default=None,
                       help="users with fewer kept clicks are dropped (default 210 paper, 20 dense)")
    group.add_argument("--min-history", type=int, default=5, help="dense: clicks before a user's first target")
    group.add_argument("--val-fraction", type=float, default=0.1, help="dense: share of each user's targets")
    group.add_argument("--test-fraction", type=float, default=0.1, help="dense: share of each user's targets")
    group.add_argument("--max-len", type=int, default=200, help="history length L")
    group.add_argument("--negatives", type=int, default=2, help="negatives per positive")
    group.add_argument("--n-train-targets", type=int, default=19)
    group.add_argument("--train-stride", type=int, default=None,
                       help="gap between training targets (default 5 paper, 1 dense)")
    group.add_argument("--behaviors", nargs="+", default=None,
                       help="behaviour types kept (default: pv for taobao, click for tmall, all otherwise)")
    group.add_argument("--seed", type=int, default=0, help="negative-sampling seed")


def _protocol(args: argparse.Namespace):
    from darec.data.protocol import ProtocolConfig
    return ProtocolConfig(behaviors=tuple(args.behaviors) if args.behaviors else None, min_clicks=args.min_clicks,
                          max_len=args.max_len, n_negatives=args.negatives, n_train_targets=args.n_train_targets,
                          train_stride=args.train_stride, seed=args.seed, targets=args.targets,
                          min_history=args.min_history, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction)


def parse_columns(text: str | None, *, example: str = "user=uid,item=iid,category=cid,timestamp=ts"
                  ) -> dict[str, str] | None:
    """`--columns NAME=COL,...` as a mapping (None when not given)."""
    if text is None:
        return None
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(pair) != 2 for pair in pairs):
        raise ConfigError(f"--columns must look like {example}; got {text!r}")
    return {key.strip(): value.strip() for key, value in pairs}


def _run_prepare(args: argparse.Namespace) -> int:
    from darec.data.pipeline import prepare
    from darec.data.schema import load_schema
    dataset = prepare(source=args.source, input=args.input, out=args.out, config=_protocol(args), movies=args.movies,
                      columns=parse_columns(args.columns), skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite,
                      schema=load_schema(args.schema))
    print(summary(dataset.manifest, dataset.path))
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    from darec.data.synthetic import SyntheticConfig, prepare_synthetic
    synth = SyntheticConfig(n_users=args.users, n_items=args.items, n_categories=args.categories,
                            mean_length=args.mean_length, decay_rate=args.decay_rate, reclick=args.reclick,
                            n_favourites=args.favourites, n_brands=args.brands, brand_loyalty=args.brand_loyalty,
                            strong_fraction=args.strong_fraction, strong_weight=args.strong_weight,
                            time_decay=args.time_decay, time_unit=args.time_unit, seed=args.synth_seed)
    dataset = prepare_synthetic(synth, out=args.out, config=_protocol(args), overwrite=args.overwrite)
    print(summary(dataset.manifest, dataset.path))
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from darec.data.store import PreparedDataset
    from darec.data.history_flags import shortcut_stats
    dataset = PreparedDataset.open(args.dir, verify_hash=args.verify)
    print(summary(dataset.manifest, dataset.path))
    shortcut = shortcut_stats(dataset, "test")
    print(f"  re-click shortcut: {shortcut.positive_share:.0%} of test positives have their item in the history; "
          f"the flag alone scores AUC {shortcut.auc:.3f}")
    if args.verify:
        print("  verified      every array matches the content hash")
    return 0


def summary(manifest: dict, path: Path | str) -> str:
    """A readable multi-line view of a manifest."""
    p = manifest.get("protocol", {})
    lines = [f"prepared dataset {path}",
             f"  source        {manifest.get('source')} ({', '.join(manifest.get('inputs', []))})",
             f"  users kept    {manifest['n_users']:,} of {manifest['stats'].get('n_users_total', 0):,}"
             f" (>= {p.get('min_clicks')} clicks); {manifest['n_events']:,} clicks stored",
             f"  vocab         {manifest['n_items']:,} items, {manifest['n_categories']:,} categories (incl. padding 0)",
             f"  protocol      max_len {p.get('max_len')}, {p.get('n_negatives')} negatives, "
             + (f"dense targets after {p.get('min_history')} clicks (val {p.get('val_fraction')}, test "
                f"{p.get('test_fraction')} of each user's), train every {p.get('train_stride')}"
                if p.get("targets") == "dense" else
                f"{p.get('n_train_targets')} train targets every {p.get('train_stride')}")
             + f", seed {p.get('seed')}, behaviours {p.get('behaviors') or 'all'}"]
    for name, split in manifest["splits"].items():
        lines.append(f"  {name:<13} {split['samples']:,} samples ({split['positives']:,} positive)")
    lines.append(f"  skipped rows  {manifest.get('skipped_rows', 0):,} bad, "
                 f"{manifest.get('duplicate_rows', 0):,} exact duplicates dropped")
    if manifest.get("features"):
        lines.append("  features      " + ", ".join(
            f"{name} ({spec['kind']}, {spec['level']}" + (f", {spec['vocabulary']:,} codes)" if "vocabulary" in spec
                                                          else ")") for name, spec in manifest["features"].items()))
    if "planted_truth" in manifest:
        lines.append(f"  planted truth {manifest['planted_truth'].get('file')}")
    lines.append(f"  sha256        {manifest['content_sha256']}")
    return "\n".join(lines)


def _overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder even if darec did not write it (and all it holds); "
                             "a darec dataset there is replaced without it, a file or a folder holding the input never")


def register(subparsers: argparse._SubParsersAction) -> None:
    prep = subparsers.add_parser("prepare", help="raw log -> prepared dataset (CSR sequences + samples)")
    prep.add_argument("--source", required=True, choices=("taobao", "tmall", "movielens", "generic"))
    prep.add_argument("--input", type=Path, default=None, help="raw file (default for movielens: the shipped copy)")
    prep.add_argument("--movies", type=Path, default=None, help="MovieLens movies.csv / u.item (default: beside input)")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--columns", default=None,
                      help="generic: user=COL,item=COL,category=COL,timestamp=COL[,behavior=COL][,FEATURE=COL...]")
    prep.add_argument("--schema", default=None,
                      help="feature schema YAML (docs/features.md), or a shipped one by name: default, taobao, tmall")
    prep.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows (counted) instead of failing")
    _overwrite_arg(prep)
    _protocol_args(prep)
    prep.set_defaults(handler=_run_prepare)

    synth = subparsers.add_parser("synth", help="generate planted synthetic data and prepare it")
    synth.add_argument("--out", type=Path, required=True)
    from darec.data.synthetic import SyntheticConfig
    planted = SyntheticConfig()  # one source of truth for the generator's defaults
    synth.add_argument("--users", type=int, default=planted.n_users)
    synth.add_argument("--items", type=int, default=planted.n_items)
    synth.add_argument("--categories", type=int, default=planted.n_categories)
    synth.add_argument("--mean-length", type=int, default=planted.mean_length)
    synth.add_argument("--decay-rate", type=float, default=planted.decay_rate)
    synth.add_argument("--reclick", type=float, default=planted.reclick,
                       help="probability that a click re-visits a favourite item (higher: stronger re-click shortcut)")
    synth.add_argument("--favourites", type=int, default=planted.n_favourites,
                       help="favourite items per (user, category)")
    synth.add_argument("--synth-seed", type=int, default=planted.seed,
                       help="generator seed (--seed is the sampling seed)")
    side = synth.add_argument_group("side signals (docs/features.md#evidence; off by default), stored as features")
    side.add_argument("--brands", type=int, default=planted.n_brands, help="brands over the items (0: none)")
    side.add_argument("--brand-loyalty", type=float, default=planted.brand_loyalty,
                      help="probability that a fresh click picks the brand of one of the user's last 5 clicks")
    side.add_argument("--strong-fraction", type=float, default=planted.strong_fraction,
                      help="share of behaviours that are 'buy' rather than 'click'")
    side.add_argument("--strong-weight", type=float, default=planted.strong_weight,
                      help="weight of a 'buy' in the state that drives the next categories")
    side.add_argument("--time-decay", action="store_true",
                      help="timestamps in sessions and the decay in time: exp(-decay_rate * gap / time_unit)")
    side.add_argument("--time-unit", type=float, default=planted.time_unit, help="seconds (with --time-decay)")
    _overwrite_arg(synth)
    _protocol_args(synth)
    synth.set_defaults(handler=_run_synth)

    info = subparsers.add_parser("info", help="summarise a prepared dataset")
    info.add_argument("dir", type=Path)
    info.add_argument("--verify", action="store_true", help="also recompute the content hash (reads every byte)")
    info.set_defaults(handler=_run_info)
