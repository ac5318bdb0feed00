"""`darec train`, `darec table`, `darec presets`, `darec demo`."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from darec.cli.arg_types import config_file, shipped_configs
from darec.errors import ConfigError

__all__ = ["register", "train_config_from_args"]

log = logging.getLogger("darec")


# Flags with a name or meaning of their own; every other TrainConfig field becomes `--field-name` below.
_SPECIAL = {"preset", "model", "seed"}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig option as a flag (help from its description), plus the model shortcuts."""
    from darec.train.config import TrainConfig

    p.add_argument("--config", type=config_file,
                   help="YAML run config (train options, preset, model: {...}), or a shipped one by name: "
                        + ", ".join(sorted(shipped_configs())))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. --set lr=0.001 --set model.top_k=50 (repeatable)")
    p.add_argument("--attention-dim", help="model: K_A per field (decoupled tables only)")
    p.add_argument("--top-k", help="model: behaviours kept by the search (default 20)")
    group = p.add_argument_group("training options (TrainConfig; also settable in --config or with --set)")
    for name, field in TrainConfig.model_fields.items():
        if name in _SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{field.description} (default: {field.default})")
        else:
            group.add_argument(flag, dest=name, metavar=name.upper(),
                               help=f"{field.description} (default: {field.default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="train in N processes on this machine (re-launches itself through torchrun; one "
                        "device each on GPUs, shared CPU otherwise; see docs/scale.md)")


def _value(raw: str) -> Any:
    """Command-line text as YAML (so `null`, `1e-3`, `true` work); types are checked by TrainConfig."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def train_config_from_args(args: argparse.Namespace, **fixed: Any):
    """Defaults < --config YAML < named flags < --set overrides; validated once, at the end."""
    from darec.train.config import TrainConfig, load_run_config

    base = load_run_config(args.config).to_dict() if args.config else TrainConfig().to_dict()
    model = dict(base.pop("model"))
    for name in TrainConfig.model_fields:
        raw = getattr(args, name, None) if name not in _SPECIAL else None
        if raw is not None:
            base[name] = raw if isinstance(raw, bool) else _value(raw)
    base.update(fixed)
    for key, raw in (("attention_dim", args.attention_dim), ("top_k", args.top_k),
                     ("dim", getattr(args, "dim", None))):
        if raw is not None:
            model[key] = _value(str(raw))
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("model."):
            model[key[6:]] = _value(raw)
        else:
            base[key.removeprefix("train.")] = _value(raw)
    return TrainConfig.from_dict({**base, "model": model})


def _train(args: argparse.Namespace) -> int:
    from darec.models.presets import preset_config  # validates model overrides before training
    from darec.train.trainer import train

    config = train_config_from_args(args, preset=args.preset, seed=args.seed)
    preset_config(config.preset, n_items=2, n_categories=2, **config.model)
    if config.features not in ("all", "none"):  # named features: checked against the data before any output
        from darec.data.loader import feature_fields
        from darec.data.store import PreparedDataset

        feature_fields(PreparedDataset.open(args.data), config.features)
    if (status := _relaunch(args)) is not None:
        return status
    result = train(data=args.data, config=config, out_dir=args.out, resume=not args.no_resume,
                   progress=not args.no_progress)
    if _is_main():
        print(f"{config.preset}: best validation AUC {result['val']['auc']:.5f} at step {result['best_step']}; "
              f"test AUC {result['test']['auc']:.5f}, GAUC {result['test']['gauc']:.5f}, "
              f"logloss {result['test']['logloss']:.5f}  ->  {args.out}/result.json")
    return 0


def _table(args: argparse.Namespace) -> int:
    from darec.train.table import TableSpec, resolve_presets, run_table

    config = train_config_from_args(args)
    spec = TableSpec(presets=resolve_presets(args.presets), dims=tuple(args.dims), seeds=tuple(args.seeds))
    if (status := _relaunch(args)) is not None:
        return status
    run_table(data=args.data, out_dir=args.out, spec=spec, base=config, progress=not args.no_progress)
    if _is_main():
        print((Path(args.out) / "table.md").read_text())
    return 0


def _relaunch(args: argparse.Namespace) -> int | None:
    """`--nproc-per-node N` outside torchrun: this command line again as N processes (its exit status);
    None when this process should train itself. The data is opened here first, so a bad --data is one line."""
    from darec.data.store import PreparedDataset
    from darec.train.distributed import launched, relaunch

    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nproc_per_node == 1 or launched():
        return None
    PreparedDataset.open(args.data)
    return relaunch(args.nproc_per_node)


def _is_main() -> bool:
    from darec.train.distributed import current

    return current().is_main


def _presets(args: argparse.Namespace) -> int:
    from darec.models.presets import PRESETS, TABLE1_PRESETS

    for name, preset in PRESETS.items():
        mark = "*" if name in TABLE1_PRESETS else " "
        print(f"{mark} {name:<12} {preset.description}")
    print("\n* = a row of the paper's Table 1 (`--presets table1`); `--presets all` runs every preset")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from darec.demo import DEMO_PRESETS, run_demo

    print(run_demo(out_dir=args.out, seeds=tuple(args.seeds), presets=tuple(args.presets or DEMO_PRESETS),
                   progress=not args.no_progress))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one preset on a prepared dataset")
    p.add_argument("--preset", default="dare", help="see `darec presets` (default dare)")
    p.add_argument("--data", required=True, type=Path, help="a directory written by `darec prepare`")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="run directory")
    p.add_argument("--dim", help="model: K_R, embedding dim per field (default 16)")
    p.add_argument("--seed", default="1", help="initialisation and shuffling seed")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    _add_run_options(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser("table", help="Table 1: presets x dims x seeds, mean (std) of test AUC")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/table"))
    p.add_argument("--presets", nargs="+", default=["table1"],
                   help="preset names, `table1` (the paper's rows) or `all`")
    p.add_argument("--dims", nargs="+", type=int, default=[16, 64, 128])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    _add_run_options(p)
    p.set_defaults(handler=_table)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(handler=_presets)

    p = sub.add_parser("demo", help="the main job: Table 1 rows compared on MovieLens (dense protocol) and "
                                    "planted data, with intervals and paired tests")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--presets", nargs="+", help="default: DIN, TWIN, TWIN (w/ proj.), TWIN-4E, DARE; "
                                                "`table1` for every Table 1 row")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_demo)
