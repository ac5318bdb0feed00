"""`report.md` links relative to its own folder: moving the analyses and the table together keeps it working."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from urllib.parse import unquote

from darec.analysis.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_outputs(root: Path) -> tuple[Path, Path]:
    """An analysis folder with one convergence result and a Table 1 folder beside it (a name with a space)."""
    analyses, table = root / "analyses", root / "table 1"
    (analyses / "convergence").mkdir(parents=True)
    (analyses / "convergence" / "curves.png").write_bytes(PNG)
    result = {"threshold_auc": 0.6, "threshold_fraction_of_lift": 0.9, "data": "data/x", "figures": ["curves.png"],
              "models": {"dare": {"best_val_auc": 0.7, "steps_to_threshold": 40}}}
    (analyses / "convergence" / "convergence.json").write_text(json.dumps(result))
    table.mkdir()
    (table / "table.md").write_text("| DARE |\n|---|\n| 0.7 |\n")
    for name in ("table.csv", "runs.json", "curves.png"):
        (table / name).write_bytes(PNG if name.endswith(".png") else b"x\n")
    return analyses, table


def _link_targets(report: Path) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", report.read_text())


def test_every_link_resolves_after_the_folders_move(tmp_path):
    analyses, table = _fake_outputs(tmp_path / "before")
    report = write_report(analyses, table_dir=table)
    links = _link_targets(report)
    assert len(links) == 6  # table.csv, runs.json, curves.png (link and image), the json, the figure
    assert not any(link.startswith("/") or str(tmp_path) in link for link in links), links

    shutil.move(tmp_path / "before", tmp_path / "after" / "deeper")
    moved = tmp_path / "after" / "deeper" / "analyses" / "report.md"
    for link in links:
        assert (moved.parent / unquote(link)).is_file(), link
    assert "../table%201/table.csv" in links


def test_report_gets_the_users_umask(tmp_path):
    analyses, _ = _fake_outputs(tmp_path)
    old = os.umask(0o022)
    try:
        report = write_report(analyses)
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o644
