"""The planted data's learning threshold means something: the real search passes it, a search whose
scores are random noise does not, and the re-click shortcut alone stays below it."""
from __future__ import annotations

import pytest
import torch

from darec.data.batch import Batch
from darec.data.history_flags import shortcut_auc
from darec.data.store import PreparedDataset
from darec.models import search
from darec.train.config import TrainConfig
from darec.train.trainer import train

THRESHOLD = 0.65  # the AUC "learns the planted signal" means in the training tests
BUDGET = dict(batch_size=256, eval_batch_size=4096, epochs=2, lr=0.01, model={"dim": 8}, device="cpu")


def _random_scores(self, emb, batch: Batch) -> torch.Tensor:
    """Attention logits that ignore target and history: top-K and softmax weights are noise."""
    return torch.randn(batch.hist_items.shape, device=batch.hist_items.device)


def test_the_shortcut_alone_stays_below_the_threshold(planted_dir):
    assert shortcut_auc(PreparedDataset.open(planted_dir)) <= 0.60 < THRESHOLD


@pytest.fixture(scope="module")
def dare_auc(planted_dir, tmp_path_factory) -> float:
    result = train(data=planted_dir, config=TrainConfig(preset="dare", **BUDGET),
                   out_dir=tmp_path_factory.mktemp("dare"), progress=False)
    return result["test"]["auc"]


def test_dare_passes_the_threshold(dare_auc):
    assert dare_auc >= THRESHOLD


def test_random_attention_scores_fall_clearly_short(planted_dir, tmp_path, monkeypatch, dare_auc):
    monkeypatch.setattr(search.DotScore, "forward", _random_scores)
    result = train(data=planted_dir, config=TrainConfig(preset="dare", **BUDGET), out_dir=tmp_path, progress=False)
    assert result["test"]["auc"] < THRESHOLD - 0.05 < dare_auc - 0.1, (result["test"], dare_auc)
