"""Builders shared by the data-safety tests: tiny valid logs, a small protocol, directory snapshots."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

# Small protocol for tiny logs: every generated user qualifies, negatives are easy to draw.
SMALL = ["--min-clicks", "10", "--n-train-targets", "2"]


def taobao_text(*, n_users: int = 5, n_clicks: int = 40, seed: int = 0) -> str:
    """A small valid Taobao-layout log (no header): `n_users` users with `n_clicks` pv clicks each."""
    rng = np.random.default_rng(seed)
    rows = [f"{u},{rng.integers(1, 300)},{rng.integers(1, 20)},pv,{1_000 + k}"
            for u in range(1, n_users + 1) for k in range(n_clicks)]
    return "\n".join(rows) + "\n"


def taobao_log(path: Path, **kwargs) -> Path:
    """`taobao_text(**kwargs)` written to `path`."""
    path.write_text(taobao_text(**kwargs))
    return path


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` (hidden ones included) → its bytes (None for a folder, the target for a
    link): equal before and after means nothing there was created, changed or removed."""
    def content(path: Path) -> bytes | str | None:
        if path.is_symlink():
            return str(path.readlink())
        return None if path.is_dir() else path.read_bytes()
    return {p.relative_to(root).as_posix(): content(p) for p in sorted(root.rglob("*"))}


def dead_pid() -> int:
    """The id of a process that has exited (for leftovers whose writer is provably gone)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)
