"""Safe outputs: a result appears whole or not at all, and nothing darec did not write is ever replaced.

* Temporaries are siblings of their target named `.NAME.tmp-PID-TOKEN` (and `.NAME.old-PID-TOKEN` during a
  fallback swap), so a later run can prove a leftover is darec's and that its writer is dead, then remove
  it (`clean_leftovers`).
* An existing output folder is replaced only if a caller-supplied test says darec wrote it, or the user
  passed `overwrite`; a file, a symbolic link, or a folder holding the input or the current directory is
  never replaced (`check_output_dir`).
* A folder is swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux, so a complete result is at the
  target at every instant. Where the file system cannot exchange, two renames are used and a kill between
  them is repaired on the next write or open (`recover_swap`).
* Files and folders get the user's umask (no 0600/0700 from mkstemp/mkdtemp), so teammates can read them.

Test hook: with the environment variable `DAREC_FAULT_AT=<phase>` (one of `FAULT_PHASES`) the process
SIGKILLs itself at that phase, so tests can kill a writer at exact points (tests/data/test_kill_prepare.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from darec.errors import DataError

__all__ = ["relative_files", "atomic_dir", "atomic_file", "write_json", "write_text", "check_output_dir", "clean_leftovers",
           "recover_swap", "fault_point", "FAULT_ENV", "FAULT_PHASES"]

FAULT_ENV = "DAREC_FAULT_AT"
FAULT_PHASES = ("writing", "before-swap", "between-renames", "after-swap")
# Errors of a file system (or OS) that cannot exchange two paths: fall back to two renames.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def fault_point(phase: str) -> None:
    """Test hook: SIGKILL this process at `phase` when `DAREC_FAULT_AT` names it (no-op otherwise)."""
    if os.environ.get(FAULT_ENV) == phase:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@contextlib.contextmanager
def _os_errors(action: str, path: Path) -> Iterator[None]:
    """An OSError (read-only place, /proc, disk full, a file where a folder should be) as one DataError line."""
    try:
        yield
    except OSError as err:
        raise DataError(f"cannot {action}: {err.strerror or err}", path=path) from None


def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftovers(target: Path) -> list[tuple[Path, str]]:
    """(path, kind) of every sibling named like a temporary of `target` whose writer is dead and owner is us."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(2))) and _owner(entry) == os.getuid():
            found.append((Path(entry.path), match.group(1)))
    return sorted(found)


def _owner(entry: os.DirEntry) -> int | None:
    try:
        return entry.stat(follow_symlinks=False).st_uid
    except FileNotFoundError:  # removed meanwhile by a concurrent run
        return None


def _pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists (so its temporaries are provably abandoned)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process, or a number no writer of ours could have had
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_swap(target: str | os.PathLike) -> bool:
    """Put back the previous result when a fallback swap was killed between its two renames.

    Returns True when `target` was missing and a dead writer's `.NAME.old-*` was renamed back to it.
    """
    target = Path(os.path.abspath(target))
    if os.path.lexists(target):
        return False
    olds = [path for path, kind in _leftovers(target) if kind == "old"]
    if not olds:
        return False
    with _os_errors("restore the previous output left aside by a killed run", target):
        os.rename(olds[-1], target)
    return True


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `target` left by killed darec runs (after `recover_swap`); returns them."""
    target = Path(os.path.abspath(target))
    recover_swap(target)
    removed = [path for path, _ in _leftovers(target)]
    for path in removed:
        _remove(path)
    return removed


def _contains(folder: Path, path: str | os.PathLike) -> bool:
    folder, inner = folder.resolve(), Path(path).resolve()
    return inner == folder or folder in inner.parents


def check_output_dir(target: str | os.PathLike, *, replaceable: Callable[[Path], bool] | None = None,
                     overwrite: bool = False, protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse (DataError) an output folder whose replacement could lose data; returns the absolute path.

    Allowed: a missing path, an empty folder, a folder `replaceable` recognises as darec's own, and (only
    with `overwrite`) any other folder. Never: a file, a symbolic link, a path under a file, or a folder
    holding one of `protect` (the inputs) or the current directory. A previous output that a killed swap
    left aside is put back first (`recover_swap`), so it is what gets checked.
    """
    target = Path(os.path.abspath(target))
    recover_swap(target)
    with _os_errors("inspect the output path", target):
        _check_output_dir(target, replaceable=replaceable, overwrite=overwrite, protect=protect)
    return target


def _check_output_dir(target: Path, *, replaceable: Callable[[Path], bool] | None, overwrite: bool,
                      protect: Sequence[str | os.PathLike]) -> None:
    for parent in reversed(target.parents):
        if parent.exists() and not parent.is_dir():
            raise DataError(f"cannot create the output folder: {parent} is a file", path=target)
    if target.is_symlink():
        raise DataError("the output path is a symbolic link; darec replaces only folders it wrote: "
                        "give the real path", path=target)
    if not target.exists():
        return
    if not target.is_dir():
        raise DataError("the output path is an existing file; darec never replaces a file: choose another path",
                        path=target)
    for kept, label in [*((p, str(p)) for p in protect), (Path.cwd(), "the current directory")]:
        if _contains(target, kept):
            raise DataError(f"the output folder contains {label}, which darec must not delete: choose another path",
                            path=target)
    if overwrite or not any(target.iterdir()) or (replaceable is not None and replaceable(target)):
        return
    raise DataError("the output folder exists and is not a dataset darec wrote (or holds other files): choose "
                    "another path, or pass --overwrite to replace it and everything in it", path=target)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); OSError when not supported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if rename is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Make `new` the content of `target`; afterwards `new` holds the previous content (or nothing)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    try:
        _exchange(new, target)
    except OSError as err:
        if err.errno not in _NO_EXCHANGE:
            raise
        old = _temp_name(target, "old")
        os.rename(target, old)
        fault_point("between-renames")
        os.rename(new, target)
        os.rename(old, new)  # the caller removes `new`, as after an exchange
    fault_point("after-swap")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replaceable: Callable[[Path], bool] | None = None,
               overwrite: bool = False, protect: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh sibling folder of `target`; when the block succeeds it replaces `target` in one step.

    An existing `target` must pass `check_output_dir` (checked before and again after the block). Leftovers
    of killed earlier runs are then cleaned. OSErrors become one-line DataErrors. On failure `target` is
    untouched and the temporary removed.
    """
    target = check_output_dir(target, replaceable=replaceable, overwrite=overwrite, protect=protect)
    with _os_errors("write the output folder", target):
        clean_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(target, "tmp")
        tmp.mkdir()
        try:
            yield tmp
            fault_point("before-swap")
            check_output_dir(target, replaceable=replaceable, overwrite=overwrite, protect=protect)
            _swap_in(tmp, target)
        finally:
            _remove(tmp)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it over `target` when the block succeeds."""
    target = Path(target)
    with _os_errors("write", target):
        clean_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(target, "tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_file(target) as handle:
        handle.write(text)


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Stable JSON (sorted keys, fixed indent) so identical results give identical bytes."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def relative_files(root: Path) -> set[str]:
    """Every entry under `root` that is not a real sub-folder (files, links, …), as posix paths: what a
    darec-written folder's manifest lists, so a folder holding anything else is not treated as ours."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        found.update((here / name).as_posix() for name in files)
        found.update((here / name).as_posix() for name in dirs if os.path.islink(os.path.join(folder, name)))
    return found
