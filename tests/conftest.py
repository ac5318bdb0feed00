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



@pytest.fixture(scope="session")
def easy_planted_dir(tmp_path_factory) -> Path:
    """The planted data before the re-click knob: 300 items (10 per category), slow decay. Every preset
    learns it within 2 epochs, so it is the smoke test that each preset trains at all; its re-click
    shortcut (flag AUC ≈ 0.85) means only the default planted data can tell a working search from a
    broken one (tests/train/test_planted_thresholds.py)."""
    out = tmp_path_factory.mktemp("easy_planted") / "data"
    assert main(["synth", "--out", str(out), "--items", "300", "--decay-rate", "0.3"]) == 0
    return out
