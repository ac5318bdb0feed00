"""`--out` can never lose data: only a dataset darec wrote is replaced, everything else is refused (exit 2,
one line, nothing touched) unless `--overwrite`; a file, a link or a folder holding the input never."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from darec.cli import main
from darec.data.store import PreparedDataset
from darec.errors import DataError
from darec.io import atomic_file, clean_leftovers, write_text
from tests.data.inputs import SMALL, dead_pid, snapshot, taobao_log


@pytest.fixture
def log(tmp_path):
    return taobao_log(tmp_path / "ub.csv")


def _prepare(log, out, *extra):
    return main(["prepare", "--source", "taobao", "--input", str(log), "--out", str(out), *SMALL, *extra])


def _refused(capsys, root, argv_call, *needles):
    """Run `argv_call()`; it must exit 2 with one line containing every needle and change nothing under root."""
    before = snapshot(root)
    assert argv_call() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert all(needle in err for needle in needles), err
    assert snapshot(root) == before


def test_user_folder_is_refused_then_replaced_only_with_overwrite(tmp_path, log, capsys):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    _refused(capsys, tmp_path, lambda: _prepare(log, work), "not a dataset darec wrote", "--overwrite", str(work))
    assert _prepare(log, work, "--overwrite") == 0
    assert not (work / "thesis.tex").exists() and PreparedDataset.open(work).n_users == 5


def test_darec_dataset_is_replaced_but_not_once_a_user_file_is_added(tmp_path, log, capsys):
    out = tmp_path / "data"
    assert _prepare(log, out) == 0
    first = PreparedDataset.open(out).manifest["content_sha256"]
    taobao_log(log, seed=1)
    assert _prepare(log, out) == 0  # darec's own output: replaced without asking
    assert PreparedDataset.open(out).manifest["content_sha256"] != first
    (out / "notes.txt").write_text("mine")
    _refused(capsys, tmp_path, lambda: _prepare(log, out), "not a dataset darec wrote")


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_files_links_and_input_folders_are_never_replaced(tmp_path, log, capsys, flags):
    _refused(capsys, tmp_path, lambda: _prepare(log, log, *flags), "existing file")  # --out is the input itself
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    _refused(capsys, tmp_path, lambda: _prepare(log, other, *flags), "existing file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    _refused(capsys, tmp_path, lambda: _prepare(log, tmp_path / "link", *flags), "symbolic link")
    _refused(capsys, tmp_path, lambda: _prepare(log, tmp_path, *flags), "contains", str(log))  # holds the input


def test_the_current_directory_is_never_replaced(tmp_path, log, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("mine")
    monkeypatch.chdir(work)
    _refused(capsys, tmp_path, lambda: _prepare(log, ".", "--overwrite"), "current directory")


def test_unwritable_places_are_one_line_errors(tmp_path, log, capsys):
    _refused(capsys, tmp_path, lambda: _prepare(log, log / "out"), "is a file")
    if sys.platform == "linux":
        _refused(capsys, tmp_path, lambda: _prepare(log, "/proc/darec-out"), "cannot write")


def test_empty_folder_is_used(tmp_path, log):
    (tmp_path / "empty").mkdir()
    assert _prepare(log, tmp_path / "empty") == 0


def test_outputs_follow_the_umask(tmp_path, log):
    old = os.umask(0o027)
    try:
        assert _prepare(log, tmp_path / "data") == 0
        write_text(tmp_path / "run" / "note.txt", "x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "data", *(tmp_path / "data").rglob("*"),
                                                               tmp_path / "run" / "note.txt"]}
    assert modes["data"] == modes["sequences"] == 0o750  # not mkdtemp's 0o700
    assert modes["manifest.json"] == modes["train.npy"] == modes["note.txt"] == 0o640  # not mkstemp's 0o600


def test_leftovers_of_dead_writers_are_removed_and_nothing_else(tmp_path, log):
    out = tmp_path / "data"
    assert _prepare(log, out) == 0  # (with no `data`, a dead writer's `.data.old-*` would be restored instead)
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".data.tmp-{dead}-0123abcd", tmp_path / f".data.old-{dead}-89abcdef"]
    kept = [tmp_path / f".data.tmp-{alive}-0123abcd", tmp_path / ".data.tmp-backup",
            tmp_path / f".other.tmp-{dead}-0123abcd"]
    for path in stale + kept:
        path.mkdir()
        (path / "x.npy").write_bytes(b"42 MB of half-written arrays")
    assert _prepare(log, out) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".data")) == sorted(
        p.name for p in kept if p.name.startswith(".data"))


def test_interrupted_fallback_swap_is_recovered_on_open(tmp_path, log, capsys):
    """A kill between the two renames of the fallback swap leaves only `.NAME.old-PID-*`; opening restores it."""
    out = tmp_path / "data"
    assert _prepare(log, out) == 0
    expected = PreparedDataset.open(out).manifest["content_sha256"]
    out.rename(tmp_path / f".data.old-{dead_pid()}-0123abcd")
    assert main(["info", str(out)]) == 0 and expected in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data")] == []


def test_atomic_file_cleans_its_own_leftovers_only(tmp_path):
    target = tmp_path / "checkpoint.pt"
    stale, foreign = tmp_path / f".checkpoint.pt.tmp-{dead_pid()}-0123abcd", tmp_path / ".checkpoint.pt.tmp-user"
    stale.write_bytes(b"half")
    foreign.write_bytes(b"mine")
    with atomic_file(target, "wb") as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and not stale.exists() and foreign.read_bytes() == b"mine"
    assert clean_leftovers(target) == []


def test_write_prepared_refuses_in_the_library_too(tmp_path, log):
    from darec.data.pipeline import prepare
    from darec.data.protocol import ProtocolConfig
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.json").write_text(json.dumps({"format_version": 1}))  # looks darec-ish, but is not a manifest
    with pytest.raises(DataError, match="not a dataset darec wrote"):
        prepare(source="taobao", input=log, out=out, config=ProtocolConfig(min_clicks=10, n_train_targets=2))
    assert [p.name for p in out.iterdir()] == ["a.json"]
