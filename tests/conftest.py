"""Session-wide prepared datasets, made once through the public CLI."""
from __future__ import annotations

from pathlib import Path

import pytest

from darec.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    """The default planted synthetic dataset (ground truth known)."""
    out = tmp_path_factory.mktemp("planted") / "data"
    assert main(["synth", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def movielens_dir(tmp_path_factory) -> Path:
    """The shipped MovieLens ratings under the paper's protocol."""
    out = tmp_path_factory.mktemp("movielens") / "data"
    assert main(["prepare", "--source", "movielens", "--out", str(out)]) == 0
    return out
