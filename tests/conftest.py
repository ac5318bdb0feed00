"""The planted dataset, made once per test session through the public CLI."""
from __future__ import annotations

from pathlib import Path

import pytest

from darec.cli import main


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    """The default planted synthetic dataset (ground truth known)."""
    out = tmp_path_factory.mktemp("planted") / "data"
    assert main(["synth", "--out", str(out)]) == 0
    return out

