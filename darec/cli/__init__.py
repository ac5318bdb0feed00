"""The `darec` command: one entry point, thin subcommands that call library functions of the same name."""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys

from darec import __version__
from darec.errors import DarecError

__all__ = ["main"]

# Each module defines `register(subparsers)`; a subcommand's handler is set with `set_defaults(handler=...)`.
_COMMAND_MODULES = ("darec.cli.data", "darec.cli.train", "darec.cli.serve", "darec.cli.predict", "darec.cli.service",
                    "darec.cli.export", "darec.cli.analysis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"darec {__version__}")
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
        return _fail(args.command, str(err))
    except BrokenPipeError:  # the reader went away (`darec score ... | head`): nothing left to tell anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:
        if not _is_users_os_error(err):
            raise  # not about a path the user named: a bug, keep its traceback
        return _fail(args.command, _os_error_line(err))
    except KeyboardInterrupt:
        print(f"darec {args.command}: interrupted; earlier outputs are untouched", file=sys.stderr)
        return 130
    return int(result or 0)


# Failures of the machine or file system rather than of darec: a full disk, a read-only or pseudo file system.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}


def _is_users_os_error(err: OSError) -> bool:
    """A path the user gave (or one under it) cannot be read or written: their input, not our bug."""
    return err.filename is not None or err.errno in _ENVIRONMENT_ERRNOS


def _os_error_line(err: OSError) -> str:
    what = err.strerror or type(err).__name__
    if err.errno == errno.ENOTDIR:
        what += " (a part of the path is a regular file)"
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{what} ({' -> '.join(paths)})" if paths else what


def _fail(command: str, line: str) -> int:
    """The one line a user sees for an input they can fix; `-v` adds the traceback for a bug report."""
    logging.getLogger("darec").debug("details", exc_info=True)
    print(f"darec {command}: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
