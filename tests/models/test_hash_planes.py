"""ETA's and SDIM's hash planes follow the run's seed, and serving uses the trained ones."""
from __future__ import annotations

import pytest
import torch

from darec.checkpoint import load_checkpoint
from darec.errors import ConfigError
from darec.models import build_model, preset_config
from darec.serve import Scorer
from darec.train.config import TrainConfig
from darec.train.trainer import train

PLANES = {"eta": "search.scorer.planes", "sdim": "search.planes"}


def _planes(preset: str, global_seed: int, **options) -> torch.Tensor:
    torch.manual_seed(global_seed)
    model = build_model(preset_config(preset, n_items=50, n_categories=6, max_len=30, dim=8, search_options=options))
    return dict(model.named_buffers())[PLANES[preset]]


@pytest.mark.parametrize("preset", sorted(PLANES))
def test_planes_follow_torch_seed_unless_pinned(preset):
    assert torch.equal(_planes(preset, 1), _planes(preset, 1))
    assert not torch.equal(_planes(preset, 1), _planes(preset, 2))
    assert torch.equal(_planes(preset, 1, seed=7), _planes(preset, 2, seed=7))    # the option pins them
    with pytest.raises(ConfigError, match="seed"):
        _planes(preset, 1, seed=-1)


@pytest.fixture
def one_thread():
    """Training on a busy 2-core machine is 10x faster on one thread (conftest restores the setting)."""
    torch.set_num_threads(1)


def test_trained_planes_come_from_the_training_seed_and_serving_uses_them(tiny_planted_dir, tmp_path, one_thread):
    def trained(seed: int, name: str) -> torch.Tensor:
        config = TrainConfig(preset="eta", seed=seed, batch_size=256, epochs=1, model={"dim": 4}, device="cpu")
        train(data=tiny_planted_dir, config=config, out_dir=tmp_path / name, progress=False)
        return load_checkpoint(tmp_path / name / "best.pt")["model"][PLANES["eta"]]

    first, again, other = trained(1, "a"), trained(1, "b"), trained(2, "c")
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(99)  # serving builds the model under another seed; the checkpoint's planes must win
    served = Scorer.load(tmp_path / "a" / "best.pt").model.search.scorer.planes
    assert torch.equal(served, first)
