"""The composed model: which tables exist, and which gradient paths reach them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from darec.models import PRESETS, build_model, preset_config
from darec.models.config import ModelConfig
from darec.models.head import head_features
from tests.helpers import random_batch

N_ITEMS, N_CATS = 50, 6


def _model(name: str, **kw):
    return build_model(preset_config(name, n_items=N_ITEMS, n_categories=N_CATS, max_len=30, dim=4, **kw))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_gives_finite_loss(name):
    model = _model(name)
    out = model(random_batch(min_real=1))
    assert out.logit.shape == (16,)
    assert torch.isfinite(out.logit).all()


@pytest.mark.parametrize(("name", "sets"), [
    ("twin", {"shared"}), ("dare", {"attention", "representation"}),
    ("twin_4e", {"query", "key", "target", "value"}), ("din", {"shared"}),
])
def test_table_sets_per_preset(name, sets):
    assert set(_model(name).embeddings.sets) == sets


def test_dare_attention_dim_is_independent():
    model = _model("dare", attention_dim=2)
    assert model.embeddings.sets["attention"].item.embedding_dim == 2
    assert model.embeddings.sets["representation"].item.embedding_dim == 4


def _path_gradients(model, batch):
    """Gradient reaching each table set from the attention roles and from the representation roles."""
    model.embeddings.recorder = []
    out = model(batch)
    loss = F.binary_cross_entropy_with_logits(out.logit, batch.label)
    loss = loss + F.binary_cross_entropy_with_logits(out.aux_logit, batch.label)
    lookups = model.embeddings.recorder
    grads = torch.autograd.grad(loss, [lk.output for lk in lookups], retain_graph=True)
    per_path: dict[tuple[str, str], float] = {}
    for lk, g in zip(lookups, grads):
        path = "attention" if lk.role in ("query", "key") else "representation"
        key = (path, lk.table_set)
        per_path[key] = per_path.get(key, 0.0) + float(g.abs().sum())
    loss.backward()
    model.embeddings.recorder = None
    return per_path


def test_dare_paths_reach_disjoint_tables():
    torch.manual_seed(0)
    grads = _path_gradients(_model("dare"), random_batch(min_real=5))
    assert grads[("attention", "attention")] > 0
    assert grads[("representation", "representation")] > 0
    assert ("attention", "representation") not in grads
    assert ("representation", "attention") not in grads


def test_twin_shared_tables_get_both_paths():
    torch.manual_seed(0)
    grads = _path_gradients(_model("twin"), random_batch(min_real=5))
    assert grads[("attention", "shared")] > 0
    assert grads[("representation", "shared")] > 0


def test_recorded_role_gradients_sum_to_the_table_gradient():
    """The per-role split used by the gradient analysis is exact: scattering each lookup's gradient
    into its table reproduces autograd's table gradient."""
    torch.manual_seed(0)
    model = _model("twin")
    batch = random_batch(min_real=5)
    model.embeddings.recorder = []
    out = model(batch)
    loss = F.binary_cross_entropy_with_logits(out.logit, batch.label)
    lookups = model.embeddings.recorder
    grads = torch.autograd.grad(loss, [lk.output for lk in lookups], retain_graph=True, allow_unused=True)
    loss.backward()
    for field in ("item", "category", "position"):
        table = model.embeddings.sets["shared"].table(field).weight
        total = torch.zeros_like(table)
        for lk, g in zip(lookups, grads):
            if lk.field == field and g is not None:
                total.index_add_(0, lk.ids.reshape(-1), g.reshape(-1, table.shape[1]))
        assert torch.allclose(total, table.grad, atol=1e-7)


def test_dot_score_matches_hand_formula():
    torch.manual_seed(0)
    model = _model("dare")
    batch = random_batch(min_real=30)
    emb = model.embeddings
    out = model.eval()(batch)
    a = emb.sets["attention"]
    q = torch.cat([a.item(batch.target_item), a.category(batch.target_category)], -1)
    k = torch.cat([a.item(batch.hist_items), a.category(batch.hist_categories)], -1)
    pos = (a.position(batch.hist_positions) * a.position.weight[0]).sum(-1) / math.sqrt(4)
    expected = (q.unsqueeze(1) * k).sum(-1) / math.sqrt(8) + pos
    assert torch.allclose(out.interest.scores, expected, atol=1e-6)


def test_twin_hard_weights_use_scores_once():
    torch.manual_seed(0)
    model = _model("twin_hard").eval()
    batch = random_batch(min_real=30)
    out = model(batch)
    kept = out.interest.scores.gather(1, out.interest.index)
    assert torch.allclose(out.interest.weights, torch.softmax(kept, -1), atol=1e-6)


def test_head_features_target_aware():
    v, r = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(head_features(v, r, target_aware=True), torch.cat([v, r, v * r], -1))
    assert torch.equal(head_features(v, r, target_aware=False), torch.cat([v, r], -1))


def test_shared_tables_reject_a_separate_attention_dim():
    from darec.errors import ConfigError
    with pytest.raises(ConfigError, match="attention_dim"):
        ModelConfig(n_items=5, n_categories=3, tables="shared", attention_dim=2)
