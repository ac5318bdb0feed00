"""Embedding collapse: information abundance on hand-made matrices, the tables it covers per layout,
multi-embedding with one set equal to the single-embedding model, and the analysis end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from darec.analysis.collapse import information_abundance, table_abundance
from darec.cli import main
from darec.models import build_model, preset_config
from darec.models.embedding import RoleEmbeddings
from darec.models.head import MLPHead, head_features
from darec.models.search import build_search
from darec.models.two_stage import init_weights
from tests.helpers import random_batch


def test_rank_one_matrix_has_abundance_one():
    rng = np.random.default_rng(0)
    assert information_abundance(np.outer(rng.normal(size=40), rng.normal(size=7))) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_orthonormal_columns_have_abundance_k(k):
    q, _ = np.linalg.qr(np.random.default_rng(k).normal(size=(50, k)))
    assert information_abundance(q) == pytest.approx(float(k))
    assert information_abundance(5.0 * q) == pytest.approx(float(k))                 # scale-free


def test_abundance_is_sum_over_max_singular_value():
    u, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 3)))
    v, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 3)))
    matrix = u @ np.diag([4.0, 2.0, 1.0]) @ v.T                                      # singular values 4, 2, 1
    assert information_abundance(matrix) == pytest.approx(7 / 4)
    assert information_abundance(np.zeros((5, 3))) == 0.0


@pytest.mark.parametrize(("preset", "sets"), [("twin", {"shared"}), ("dare", {"attention", "representation"}),
                                              ("twin_4e", {"query", "key", "target", "value"})])
def test_every_item_and_category_table_is_measured(preset, sets):
    model = build_model(preset_config(preset, n_items=40, n_categories=6, max_len=20, dim=4))
    got = table_abundance(model)
    assert set(got) == {f"{s}.{f}" for s in sets for f in ("item", "category")}
    for key, value in got.items():
        assert 1.0 <= value["ia"] <= value["width"] == 4
    assert got[f"{sorted(sets)[0]}.item"]["roles"]


def test_multi_embedding_sets_are_measured_alone_and_together():
    model = build_model(preset_config("twin", n_items=40, n_categories=6, max_len=20, dim=4, n_embedding_sets=3))
    got = table_abundance(model)
    assert {"shared.item", "shared.item@1", "shared.item@2", "shared.item@all"} <= set(got)
    assert got["shared.item@all"]["width"] == 12
    assert got["shared.item@all"]["ia"] > max(got[k]["ia"] for k in ("shared.item", "shared.item@1"))


class _Today(nn.Module):
    """The single-embedding model as `build_model` composed it before multi-embedding existed:
    embeddings -> search -> head (+ aux head), built and initialised in that order."""

    def __init__(self, config):
        super().__init__()
        width = 3 * config.token_dim
        self.embeddings, self.search = RoleEmbeddings(config), build_search(config)
        self.head, self.aux_head = MLPHead(width, config.hidden), MLPHead(width, config.aux_hidden)
        init_weights(self, std=config.init_std)

    def forward(self, batch):
        target = self.embeddings.target(batch.target_item, batch.target_category)
        interest = self.search(self.embeddings, batch, full=self.training)
        aux = self.aux_head(head_features(target, interest.r_full, target_aware=True))
        return self.head(head_features(target, interest.r, target_aware=True)), aux


@pytest.mark.parametrize("preset", ["twin", "dare", "eta"])
def test_one_embedding_set_is_todays_model_exactly(preset):
    config = preset_config(preset, n_items=50, n_categories=6, max_len=30, dim=4)
    assert config.n_embedding_sets == 1
    torch.manual_seed(7)
    model = build_model(config).train()
    torch.manual_seed(7)
    today = _Today(config).train()
    assert list(model.state_dict()) == list(today.state_dict())
    for key, value in today.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    batch = random_batch(min_real=1, seed=4)
    out = model(batch)
    logit, aux = today(batch)
    assert torch.equal(out.logit, logit) and torch.equal(out.aux_logit, aux)


def test_collapse_analysis_end_to_end(tiny_planted_dir, tmp_path):
    out = tmp_path / "analyses"
    code = main(["analyze", "collapse", "--data", str(tiny_planted_dir), "--out", str(out), "--presets", "twin",
                 "dare", "--embedding-sets", "1", "2", "--epochs", "1", "--batch-size", "64", "--eval-every", "3",
                 "--dim", "4", "--threads", "1", "--no-progress"])
    assert code == 0
    result = json.loads((out / "collapse" / "collapse.json").read_text())
    assert set(result["runs"]) == {"twin M=1", "twin M=2", "dare M=1", "dare M=2"}
    assert result["figures"] == ["collapse.png"]
    twin = result["runs"]["twin M=1"]
    steps = [p["step"] for p in twin["points"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 3
    assert twin["test_auc"] is not None and twin["points"][1]["val_auc"] is not None
    assert "shared.item@all" in result["runs"]["twin M=2"]["final"]
    common = result["common_step"]
    assert common == min(r["final"]["step"] for r in result["runs"].values())
    assert all(r["at_common_step"]["step"] <= common for r in result["runs"].values())
    trained = json.loads((out / "runs" / "collapse-twin-d4-s1-m1" / "result.json").read_text())
    assert trained["curve"][-1]["step"] == steps[-1]                                # the trainer's own run
    again = main(["analyze", "collapse", "--data", str(tiny_planted_dir), "--out", str(out), "--presets", "twin",
                  "--epochs", "1", "--batch-size", "64", "--eval-every", "3", "--dim", "4", "--threads", "1",
                  "--no-progress"])                                                 # reuses the finished trace
    assert again == 0
    assert json.loads((out / "collapse" / "collapse.json").read_text())["runs"]["twin M=1"]["points"] == twin["points"]
