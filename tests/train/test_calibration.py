"""Calibrated, reproducible training: early stopping, checkpoint selection, temperature, schedule, clipping."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from darec.errors import ConfigError
from darec.train.config import TrainConfig
from darec.train.metrics import logloss
from darec.train.trainer import Optimizers, claim_run_dir, fit_temperature, learning_rate, train

TINY = dict(batch_size=512, eval_batch_size=4096, model={"dim": 4}, device="cpu", threads=1)


def test_temperature_is_recovered_from_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, 20_000)
    labels = rng.random(20_000) < 1 / (1 + np.exp(-true_logits))
    t = fit_temperature(3.0 * true_logits, labels)      # a model 3x overconfident
    assert t == pytest.approx(3.0, rel=0.08)
    assert logloss(labels, 3.0 * true_logits / t) < logloss(labels, 3.0 * true_logits)


def test_learning_rate_warms_up_then_follows_the_schedule():
    config = TrainConfig(lr=0.1, warmup_steps=4, lr_schedule="cosine")
    rates = [learning_rate(config, step, total_steps=14) for step in range(14)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4] == pytest.approx(0.1) and rates[9] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert learning_rate(TrainConfig(lr=0.1), 1000, total_steps=10) == 0.1


@pytest.mark.parametrize("sparse", [True, False])
def test_clipping_bounds_the_global_norm_of_dense_and_row_sparse_gradients(sparse):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Flatten(), torch.nn.Linear(6, 1))
    optimizers = Optimizers(model, TrainConfig(sparse_optimizer=sparse), torch.device("cpu"))
    (100 * model(torch.tensor([[1, 1], [2, 1]])).sum()).backward()
    grads = [p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
    before = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert optimizers.clip_grad_norm(1.0) == pytest.approx(before, rel=1e-5)
    grads = [p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) == pytest.approx(1.0, rel=1e-4)


def test_early_stopping_tests_the_best_validation_logloss_checkpoint(planted_dir, tmp_path):
    """An absurd learning rate overfits at once: training must stop early, and the tested weights must be
    those of the lowest validation logloss, not the last ones."""
    config = TrainConfig(preset="dare", lr=0.2, epochs=6, eval_every=3, patience=2, **TINY)
    result = train(data=planted_dir, config=config, out_dir=tmp_path, progress=False)
    curve = result["curve"]
    best = min(curve, key=lambda p: p["val_logloss"])
    assert result["early_stopped"] and result["best_step"] == best["step"]
    assert curve[-1]["step"] == best["step"] + 2 * 3                     # patience 2, every 3 steps
    assert result["val"]["logloss"] == pytest.approx(best["val_logloss"], abs=1e-6)


def test_temperature_scaling_never_worsens_validation_logloss(planted_dir, tmp_path):
    plain = train(data=planted_dir, config=TrainConfig(preset="twin", epochs=1, **TINY), out_dir=tmp_path / "a",
                  progress=False)
    scaled = train(data=planted_dir, config=TrainConfig(preset="twin", epochs=1, temperature_scaling=True, **TINY),
                   out_dir=tmp_path / "b", progress=False)
    assert scaled["val"]["logloss"] <= plain["val"]["logloss"] + 1e-9
    assert scaled["test"]["auc"] == pytest.approx(plain["test"]["auc"], abs=1e-12)  # a temperature keeps order
    assert scaled["temperature"] != 1.0 and plain["temperature"] == 1.0


def test_same_seed_and_threads_give_bit_identical_results_and_record_the_environment(planted_dir, tmp_path):
    config = TrainConfig(preset="dare", epochs=1, **TINY)
    a = train(data=planted_dir, config=config, out_dir=tmp_path / "a", progress=False)
    b = train(data=planted_dir, config=config, out_dir=tmp_path / "b", progress=False)
    assert a["test"] == b["test"]
    assert np.array_equal(np.load(tmp_path / "a" / "test_logits.npy"), np.load(tmp_path / "b" / "test_logits.npy"))
    env = json.loads((tmp_path / "a" / "result.json").read_text())["environment"]
    assert env == {"threads": 1, "torch": torch.__version__, "device": "cpu", "deterministic": True}


def test_a_folder_darec_did_not_write_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="did not write"):
        claim_run_dir(tmp_path, {"darec_run": 1})
    assert (tmp_path / "thesis.tex").read_text() == "precious" and not (tmp_path / "run.json").exists()
    claim_run_dir(tmp_path / "new", {"darec_run": 1})
    claim_run_dir(tmp_path / "new", {"darec_run": 1})              # its own folder: reused


@pytest.mark.parametrize("changes, key", [({"lr": "fast"}, "train.lr"), ({"batch_size": 1.5}, "train.batch_size"),
                                          ({"model": 3}, "train.model"), ({"device": "gpu0"}, "train.device"),
                                          ({"patience": 0}, "train.patience"), ({"select_metric": "acc"}, "select_metric")])
def test_wrong_types_are_one_line_naming_the_key_and_value(changes, key):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**changes)
    message = str(err.value)
    assert key in message and repr(next(iter(changes.values()))) in message and "\n" not in message
