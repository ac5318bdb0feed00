"""Datasets made once per test session, and the process-wide settings every test gets back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from darec.cli import main
from darec.data.protocol import ProtocolConfig
from darec.data.synthetic import SyntheticConfig, prepare_synthetic


@pytest.fixture(autouse=True)
def _restore_threads():
    """`threads` / `--threads` change torch's process-wide setting; every test starts from the session's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def tiny_planted_dir(tmp_path_factory) -> Path:
    """30 users, 40 items, histories of 20: for tests that train several presets end to end in seconds."""
    out = tmp_path_factory.mktemp("tiny_planted") / "data"
    prepare_synthetic(SyntheticConfig(n_users=30, n_items=40, n_categories=6, mean_length=225),
                      out=out, config=ProtocolConfig(max_len=20))
    return out
