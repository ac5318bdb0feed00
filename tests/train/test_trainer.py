"""Training end to end on the planted data: every preset learns, and resuming is exact."""
from __future__ import annotations

import json

import pytest
import torch

from darec.checkpoint import load_checkpoint
from darec.models.presets import PRESETS
from darec.train.config import TrainConfig
from darec.train.trainer import train

SMALL = dict(batch_size=256, eval_batch_size=4096, epochs=2, lr=0.01, model={"dim": 8}, device="cpu")


# ETA, SDIM, TWIN-V2 and SIM learn (and reload) in tests/models/test_baselines.py.
BASELINES = {"eta", "sdim", "twin_v2", "sim_hard", "sim_soft"}


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - BASELINES))
def test_every_preset_learns_the_planted_signal(easy_planted_dir, tmp_path, preset):
    result = train(data=easy_planted_dir, config=TrainConfig(preset=preset, **SMALL), out_dir=tmp_path,
                   progress=False)
    assert result["test"]["auc"] >= 0.7, result["test"]  # a preset that does not train scores 0.5
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test"]["auc"] == result["test"]["auc"]
    assert (tmp_path / "curve.csv").read_text().startswith("step,")


def test_interrupted_then_resumed_run_equals_uninterrupted(planted_dir, tmp_path):
    config = TrainConfig(preset="dare", batch_size=512, epochs=2, eval_every=7, model={"dim": 4}, device="cpu")
    full = train(data=planted_dir, config=config, out_dir=tmp_path / "full", progress=False)
    partial = train(data=planted_dir, config=config, out_dir=tmp_path / "cut", max_steps=11, progress=False)
    assert partial == {"finished": False, "step": 11}
    resumed = train(data=planted_dir, config=config, out_dir=tmp_path / "cut", progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["test"] == full["test"]
    assert resumed["curve"] == [{**p, "train_loss": q["train_loss"]} for p, q in zip(full["curve"], resumed["curve"])]


def test_resume_refuses_a_different_configuration(planted_dir, tmp_path):
    from darec.errors import ConfigError

    config = TrainConfig(preset="twin", batch_size=512, epochs=1, model={"dim": 4}, device="cpu")
    train(data=planted_dir, config=config, out_dir=tmp_path, max_steps=2, progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        train(data=planted_dir, config=config.replace(lr=0.5), out_dir=tmp_path, progress=False)
