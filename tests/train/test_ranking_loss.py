"""Ranking terms within candidate sets: hand-computed values, weight 0 = BCE exactly, whole sets per batch,
and the recorded logit gradients of negatives."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.train.config import TrainConfig
from darec.train.ranking import LogitGradients, listwise_loss, pairwise_loss
from darec.train.trainer import objective, ranking_of, train

# Two sets, rows interleaved: set 0 = rows 0, 2, 4 (positive 2.0; negatives 1.0, 3.0), set 1 = rows 1, 3
# (positive 0.0; negative -1.0), and set 2 = row 5, a positive without negatives (no ranking information).
LOGITS = torch.tensor([2.0, 0.0, 1.0, -1.0, 3.0, 5.0], dtype=torch.float64)
LABELS = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
SETS = torch.tensor([0, 1, 0, 1, 0, 2])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_hand_computed():
    expected = (_softplus(-(2 - 1)) + _softplus(-(2 - 3)) + _softplus(-(0 - -1))) / 3
    assert pairwise_loss(LOGITS, LABELS, SETS, 3).item() == pytest.approx(expected, rel=1e-12)


def test_listwise_hand_computed():
    set0 = -(2 - math.log(math.exp(2) + math.exp(1) + math.exp(3)))
    set1 = -(0 - math.log(math.exp(0) + math.exp(-1)))
    assert listwise_loss(LOGITS, LABELS, SETS, 3).item() == pytest.approx((set0 + set1) / 2, rel=1e-12)


def test_no_pairs_gives_zero_with_a_gradient_path():
    logits = torch.tensor([1.0, -2.0], requires_grad=True)
    for loss in (pairwise_loss, listwise_loss):
        value = loss(logits, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), 2)   # each row alone
        assert value.item() == 0.0
        value.backward()


def _out_and_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(12, generator=g, requires_grad=True)
    label = torch.tensor([1.0, 0.0, 0.0] * 4)
    batch = SimpleNamespace(label=label, set_ids=lambda: (torch.arange(12) // 3, 4))
    return SimpleNamespace(logit=logit, aux_logit=None), batch


def test_weight_zero_is_bce_exactly():
    out, batch = _out_and_batch()
    bce = objective(out, batch, config=TrainConfig(l2=0.0), l2_weights=[])
    for kind in ("pairwise", "listwise"):
        config = TrainConfig(l2=0.0, ranking_loss=kind, ranking_weight=0.0)
        assert ranking_of(config) == (kind, 0.0)
        assert torch.equal(objective(out, batch, config=config, l2_weights=[]), bce)
    with_term = objective(out, batch, config=TrainConfig(l2=0.0, ranking_loss="listwise"), l2_weights=[])
    assert with_term.item() == pytest.approx(bce.item() + listwise_loss(out.logit, batch.label, *batch.set_ids()).item())


def test_presets_choose_the_loss_when_the_config_does_not():
    assert ranking_of(TrainConfig(preset="dare")) == ("none", 0.0)
    assert ranking_of(TrainConfig(preset="ifa")) == ("listwise", 1.0)
    assert ranking_of(TrainConfig(preset="ifa", ranking_loss="none")) == ("none", 0.0)


def test_logit_gradients_of_bce_are_the_negatives_sigmoids():
    """For BCE alone d loss / d s_i = (sigmoid(s_i) - y_i) / B, so B |g| of a negative is sigmoid(s_i)."""
    out, batch = _out_and_batch(1)
    objective(out, batch, config=TrainConfig(l2=0.0), l2_weights=[]).backward()
    probe = LogitGradients()
    probe.add(out.logit.grad, batch.label)
    got = probe.flush()
    s = out.logit.detach()
    assert got["train_neg_logit_grad"] == pytest.approx(torch.sigmoid(s[batch.label == 0]).mean().item(), rel=1e-6)
    assert got["train_pos_logit_grad"] == pytest.approx((1 - torch.sigmoid(s[batch.label == 1])).mean().item(), rel=1e-6)
    assert probe.flush() == {"train_neg_logit_grad": 0.0, "train_pos_logit_grad": 0.0}


def test_listwise_raises_the_gradient_of_the_hardest_negative():
    """The listwise term pushes a negative in proportion to its softmax weight in its set."""
    out, batch = _out_and_batch(2)
    objective(out, batch, config=TrainConfig(l2=0.0), l2_weights=[]).backward()
    bce = out.logit.grad.clone()
    out.logit.grad = None
    objective(out, batch, config=TrainConfig(l2=0.0, ranking_loss="listwise"), l2_weights=[]).backward()
    extra = (out.logit.grad - bce).reshape(4, 3)
    softmax = torch.softmax(out.logit.detach().reshape(4, 3), dim=1)
    torch.testing.assert_close(extra[:, 1:], softmax[:, 1:] / 4)                  # mean over 4 positives
    torch.testing.assert_close(extra[:, 0], (softmax[:, 0] - 1) / 4)


def test_set_batches_hold_whole_sets_and_every_sample_once(tiny_planted_dir):
    dataset = PreparedDataset.open(tiny_planted_dir)
    group = 1 + 2  # the protocol's default negatives
    loader = BatchLoader(dataset, "train", batch_size=64, shuffle=True, seed=3, group_sets=True)
    for batch in loader.batches(1):
        sizes = torch.bincount(batch.candidate_set)
        assert torch.all(sizes == group) and len(batch) <= 64
        positives = torch.zeros(len(sizes)).index_add_(0, batch.candidate_set, batch.label)
        assert torch.all(positives == 1)
    order = loader.order(1)
    assert sorted(order.tolist()) == list(range(len(loader.samples)))
    starts = order[::group]
    assert np.all(loader.samples["label"][starts] == 1) and np.all(np.diff(order.reshape(-1, group), axis=1) == 1)


def test_row_batches_are_unchanged_and_carry_request_sets(tiny_planted_dir):
    dataset = PreparedDataset.open(tiny_planted_dir)
    loader = BatchLoader(dataset, "train", batch_size=50, shuffle=True, seed=3)
    order = np.random.default_rng([3, 0]).permutation(len(loader.samples))
    for b, batch in enumerate(loader.batches(0)):
        rows = loader.samples[order[b * 50:(b + 1) * 50]]
        assert torch.equal(batch.target_item, torch.from_numpy(rows["item"].astype(np.int64)))
        key = rows["user"].astype(np.int64) * 100_000 + rows["cut"]
        same = key[:, None] == key[None, :]
        assert np.array_equal(same, (batch.candidate_set[:, None] == batch.candidate_set[None, :]).numpy())


def test_training_with_weight_zero_equals_bce_training(tiny_planted_dir, tmp_path):
    base = TrainConfig(preset="dare", batch_size=64, epochs=1, model={"dim": 4}, device="cpu", threads=1)
    a = train(data=tiny_planted_dir, config=base, out_dir=tmp_path / "bce", progress=False)
    b = train(data=tiny_planted_dir, config=base.replace(ranking_loss="pairwise", ranking_weight=0.0),
              out_dir=tmp_path / "zero", progress=False)
    assert np.array_equal(np.load(tmp_path / "bce" / "test_logits.npy"), np.load(tmp_path / "zero" / "test_logits.npy"))
    assert a["test"] == b["test"]


def test_recorded_gradients_and_ranking_run_end_to_end(tiny_planted_dir, tmp_path):
    config = TrainConfig(preset="dare", batch_size=64, epochs=1, model={"dim": 4}, device="cpu", threads=1,
                         ranking_loss="listwise", record_logit_gradients=True)
    result = train(data=tiny_planted_dir, config=config, out_dir=tmp_path, progress=False)
    point = result["curve"][-1]
    assert 0 < point["train_neg_logit_grad"] and 0 < point["train_pos_logit_grad"]
    assert "train_neg_logit_grad" in (tmp_path / "curve.csv").read_text().splitlines()[0]
