"""The `darec` command: one entry point, thin subcommands that call library functions of the same name."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from darec.errors import DarecError

__all__ = ["main"]

# Each module defines `register(subparsers)`; a subcommand's handler is set with `set_defaults(handler=...)`.
_COMMAND_MODULES = ("darec.cli.data", "darec.cli.train", "darec.cli.serve", "darec.cli.analysis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except DarecError as err:
        print(f"darec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"darec {args.command}: interrupted; earlier outputs are untouched", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
