"""SIGKILL `darec prepare` at every phase of writing and swapping: `--out` must still hold a loadable dataset
(the old one, or the new one once swapped), and the next run must remove what the killed one left."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import darec.io
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.io import FAULT_ENV, FAULT_PHASES
from tests.data.inputs import taobao_log

_SMALL = ProtocolConfig(min_clicks=10, n_train_targets=2)
_REPO = Path(__file__).resolve().parents[2]


def _unsupported(a, b):
    raise OSError(errno.EINVAL, "no exchange here")


def _prepare(log, out, *, swap: str) -> str:
    """One `prepare`; swap "fallback" makes renameat2 look unsupported, forcing the two-rename swap."""
    if swap == "fallback":
        darec.io._exchange = _unsupported
    return prepare(source="taobao", input=log, out=out, config=_SMALL).manifest["content_sha256"]


def _killed_prepare(log, out, *, swap: str, fault: str) -> subprocess.CompletedProcess:
    """`_prepare` in a child process that SIGKILLs itself at `fault` (the library call: importing the CLI's
    every subcommand would dominate the test's time)."""
    code = f"from tests.data.test_kill_prepare import _prepare; _prepare({str(log)!r}, {str(out)!r}, swap={swap!r})"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, FAULT_ENV: fault}, cwd=_REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _restore_exchange(monkeypatch):
    monkeypatch.setattr(darec.io, "_exchange", darec.io._exchange)


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".data."))


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
@pytest.mark.parametrize("phase", FAULT_PHASES)
def test_killed_prepare_leaves_a_loadable_dataset(tmp_path, swap, phase):
    if swap == "exchange" and phase == "between-renames":
        pytest.skip("an exchange has no second rename")
    out = tmp_path / "data"
    old_log, new_log = taobao_log(tmp_path / "old.csv", seed=1), taobao_log(tmp_path / "new.csv", seed=2)
    old = _prepare(old_log, out, swap=swap)

    killed = _killed_prepare(new_log, out, swap=swap, fault=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _leftovers(tmp_path)  # it died holding a temporary
    if phase != "between-renames":  # there `out` is briefly absent; the next open puts the old one back
        assert (out / "manifest.json").is_file()
    loaded = PreparedDataset.open(out, verify_hash=True).manifest["content_sha256"]
    assert (loaded == old) == (phase in ("writing", "before-swap", "between-renames"))

    new = _prepare(new_log, out, swap=swap)  # the next run cleans up
    assert _leftovers(tmp_path) == [] and new != old
    assert PreparedDataset.open(out, verify_hash=True).manifest["content_sha256"] == new


def test_killed_first_prepare_leaves_no_partial_dataset(tmp_path):
    out = tmp_path / "data"
    log = taobao_log(tmp_path / "ub.csv")
    assert _killed_prepare(log, out, swap="exchange", fault="before-swap").returncode == -signal.SIGKILL
    assert not out.exists() and _leftovers(tmp_path)
    _prepare(log, out, swap="exchange")
    assert _leftovers(tmp_path) == [] and PreparedDataset.open(out).n_users == 5
