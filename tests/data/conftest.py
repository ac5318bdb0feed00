"""Shared helpers for the data tests: tiny hand-made logs written to tmp files."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write(tmp_path):
    """write(name, text) -> path of a new file under tmp_path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write
