"""The Scorer must be the training model, only faster: same logits, same kept behaviours."""
from __future__ import annotations

import pytest
import torch

from darec.checkpoint import load_model_checkpoint, save_checkpoint
from darec.data.batch import Batch
from darec.errors import ConfigError, DataError
from darec.models import build_model, preset_config
from darec.serve.scorer import History, Scorer

DOT_PRESETS = ["dare", "dare_no_tr", "twin", "twin_hard", "twin_proj", "twin_no_tr", "twin_4e", "eta", "sdim"]
N_ITEMS, N_CATS = 80, 7


def _model(preset: str, *, max_len: int = 30, top_k: int = 6, **overrides):
    torch.manual_seed(0)
    if preset in ("dare", "dare_no_tr", "twin_4e"):
        overrides.setdefault("attention_dim", 4)  # K_A != K_R, as DARE is meant to run
    config = preset_config(preset, n_items=N_ITEMS, n_categories=N_CATS, max_len=max_len, top_k=top_k,
                           dim=8, init_std=0.2, **overrides)
    model = build_model(config).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial running statistics, so eval-mode BatchNorm matters
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model


def _histories(u: int, n: int, *, seed: int = 0) -> History:
    """Left-padded histories with 0, 3 (< K), n // 2 and n real behaviours."""
    g = torch.Generator().manual_seed(seed)
    real = torch.tensor([0, 3, n // 2, n] * u)[:u]
    mask = torch.arange(n).unsqueeze(0) >= (n - real).unsqueeze(1)                         # (U, N)
    items = torch.randint(1, N_ITEMS, (u, n), generator=g) * mask
    cats = torch.randint(1, 4, (u, n), generator=g) * mask  # few categories: hard search has matches
    return History(items=items, categories=cats)


def _candidates(u: int, c: int, *, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, N_ITEMS, (u, c), generator=g), torch.randint(1, 4, (u, c), generator=g)


def _model_logits(model, history: History, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    """The training forward pass on one row per (user, candidate): the independent reference."""
    u, c = items.shape
    n = history.items.shape[1]
    rep = lambda t: t.repeat_interleave(c, dim=0)  # noqa: E731  (U C, N)
    positions = torch.arange(n, 0, -1).expand(u * c, n) if history.positions is None else rep(history.positions)
    batch = Batch(hist_items=rep(history.items), hist_categories=rep(history.categories),
                  hist_positions=positions, mask=rep(history.items != 0 if history.mask is None else history.mask),
                  target_item=items.reshape(-1), target_category=cats.reshape(-1),
                  label=torch.zeros(u * c), user=torch.arange(u).repeat_interleave(c))
    with torch.no_grad():
        return model(batch).logit.reshape(u, c)


@pytest.mark.parametrize("preset", DOT_PRESETS)
def test_scorer_equals_training_forward(preset):
    model = _model(preset)
    history = _histories(4, 25)
    items, cats = _candidates(4, 9)
    expected = _model_logits(model, history, items, cats)
    got = Scorer(model).logits(history, items, cats)
    assert got.shape == (4, 9)
    assert expected.std() > 1e-3  # the comparison is not between constants
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(Scorer(model).score(history, items, cats), torch.sigmoid(expected),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["dare", "twin_hard", "eta", "sdim"])
def test_multi_embedding_scorer_equals_training_forward(preset):
    """M = 2 embedding sets: each set searches on its own and the head reads both head inputs."""
    model = _model(preset, n_embedding_sets=2)
    history = _histories(4, 25)
    items, cats = _candidates(4, 9)
    torch.testing.assert_close(Scorer(model).logits(history, items, cats),
                               _model_logits(model, history, items, cats), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["dare", "twin_hard"])
def test_history_longer_than_max_len_clamps_positions(preset):
    model = _model(preset, max_len=10)
    history = _histories(3, 40, seed=3)  # positions 40..1, the table ends at 10
    items, cats = _candidates(3, 5)
    torch.testing.assert_close(Scorer(model).logits(history, items, cats),
                               _model_logits(model, history, items, cats), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["dare", "twin", "twin_hard", "twin_proj", "twin_4e", "eta"])
def test_full_history_equals_history_precut_to_each_candidates_topk(preset):
    model = _model(preset, max_len=50, top_k=5)
    scorer = Scorer(model)
    u, c, n = 3, 4, 120
    history = _histories(u, n, seed=5)
    items, cats = _candidates(u, c, seed=6)
    full = scorer.logits(history, items, cats)                                             # (U, C)
    index = scorer.search(history, items, cats).index                                      # (U, C, K)
    k = index.shape[-1]
    positions = torch.arange(n, 0, -1).expand(u, n)
    cut = {name: t.gather(1, index.reshape(u, c * k)).reshape(u * c, k)                   # (U C, K)
           for name, t in (("items", history.items), ("categories", history.categories),
                           ("positions", positions), ("mask", history.items != 0))}
    precut = scorer.logits(History(**cut), items.reshape(u * c, 1), cats.reshape(u * c, 1)).reshape(u, c)
    torch.testing.assert_close(precut, full, rtol=1e-5, atol=1e-6)


def test_user_chunks_give_the_same_result():
    model = _model("dare")
    history = _histories(5, 30)
    items, cats = _candidates(5, 7)
    whole = Scorer(model).logits(history, items, cats)
    chunked = Scorer(model, max_scores=7 * 30 * 2).logits(history, items, cats)  # 2 users per chunk
    torch.testing.assert_close(chunked, whole)


def test_one_user_one_dimensional_inputs():
    model = _model("dare")
    history = _histories(4, 20)
    items, cats = _candidates(4, 3)
    one = Scorer(model).logits(History(history.items[2], history.categories[2]), items[2], cats[2])
    torch.testing.assert_close(one, Scorer(model).logits(history, items, cats)[2:3])


@pytest.mark.parametrize("preset", ["din", "din_full"])
def test_unsupported_models_raise_config_error(preset):
    with pytest.raises(ConfigError):
        Scorer(_model(preset))


def test_dot_full_search_is_unsupported():
    with pytest.raises(ConfigError, match="search"):
        Scorer(_model("twin", search="full"))


def test_bad_candidate_shapes_raise_data_error():
    model = _model("dare")
    history = _histories(2, 10)
    with pytest.raises(DataError):
        Scorer(model).logits(history, torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))


def test_checkpoint_round_trip(tmp_path):
    model = _model("twin_4e")
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 3})
    history = _histories(2, 15)
    items, cats = _candidates(2, 4)
    torch.testing.assert_close(Scorer.load(path).logits(history, items, cats),
                               Scorer(model).logits(history, items, cats))
    assert load_model_checkpoint(path).training is False
    with pytest.raises(DataError):
        Scorer.load(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", {"weights": 1})
    with pytest.raises(DataError, match="lacks \\['model_config', 'model'\\]"):
        Scorer.load(tmp_path / "other.pt")


def test_left_pad_keeps_the_most_recent():
    h = History.left_pad([[5, 6, 7, 8], [9]], [[1, 2, 3, 1], [2]], length=3)
    assert h.items.tolist() == [[6, 7, 8], [0, 0, 9]]
    assert h.categories.tolist() == [[2, 3, 1], [0, 0, 2]]
    assert h.mask.tolist() == [[True, True, True], [False, False, True]]


def test_darec_exports_scorer_lazily():
    import darec

    assert darec.Scorer is Scorer
