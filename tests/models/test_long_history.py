"""Histories of thousands of behaviours: the loader serves them, training runs, only K value tokens are built."""
from __future__ import annotations

import math

import numpy as np
import torch

from darec.checkpoint import load_checkpoint
from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.models import build_model, preset_config
from darec.train.config import TrainConfig
from darec.train.trainer import Optimizers, regularised_weights, train, train_step
from tests.helpers import random_batch

LONG = 2_000


def test_loader_serves_histories_longer_than_prepared(planted_dir):
    dataset = PreparedDataset.open(planted_dir)
    assert dataset.max_len < LONG
    loader = BatchLoader(dataset, "train", batch_size=16, max_len=LONG)
    batch = next(loader.batches(0))
    assert batch.hist_items.shape == batch.mask.shape == (16, LONG)
    assert batch.hist_positions[0].tolist() == list(range(LONG, 0, -1))
    samples = dataset.split("train")[:16]
    for row, sample in enumerate(samples):  # independent slice of the CSR
        start = int(dataset.offsets[sample["user"]])
        expected = np.asarray(dataset.items[max(start, start + sample["cut"] - LONG):start + sample["cut"]])
        real = batch.hist_items[row][batch.mask[row]].numpy()
        np.testing.assert_array_equal(real, expected)
        assert int(batch.mask[row].sum()) == min(int(sample["cut"]), LONG)
        assert not batch.mask[row, : LONG - len(expected)].any()


def test_training_steps_with_2000_behaviours_without_aux_head(planted_dir):
    dataset = PreparedDataset.open(planted_dir)
    config = TrainConfig(preset="dare", model={"aux_head": False, "attention_dim": 8, "dim": 8},
                         batch_size=32, max_len=LONG, device="cpu")
    torch.manual_seed(0)
    model = build_model(preset_config("dare", n_items=dataset.n_items, n_categories=dataset.n_categories,
                                      max_len=LONG, aux_head=False, attention_dim=8, dim=8)).train()
    assert model.aux_head is None
    optimizers = Optimizers(model, config, torch.device("cpu"))
    before = model.embeddings.sets["attention"].item.weight.detach().clone()
    loader = BatchLoader(dataset, "train", batch_size=32, shuffle=True, seed=0, max_len=LONG)
    batches = loader.batches(0)
    losses = [float(train_step(model, next(batches), optimizers=optimizers, config=config,
                               l2_weights=regularised_weights(model), device=torch.device("cpu")))
              for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, model.embeddings.sets["attention"].item.weight)  # the search table learns


def test_trainer_runs_with_long_max_len(planted_dir, tmp_path):
    config = TrainConfig(preset="dare", model={"aux_head": False, "dim": 4}, batch_size=32, max_len=LONG,
                         device="cpu", eval_every=1000)
    result = train(data=planted_dir, config=config, out_dir=tmp_path, max_steps=2, progress=False)
    assert result == {"finished": False, "step": 2}
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["model_config"]["max_len"] == LONG
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _value_lookup_shapes(aux_head: bool) -> set[tuple[int, ...]]:
    torch.manual_seed(0)
    model = build_model(preset_config("dare", n_items=50, n_categories=6, max_len=300, top_k=7,
                                      aux_head=aux_head)).train()
    batch = random_batch(batch_size=5, length=300, min_real=100)
    model.embeddings.recorder = []
    model(batch)
    return {tuple(r.ids.shape) for r in model.embeddings.recorder if r.role == "value"}


def test_representation_path_materialises_only_k_tokens():
    assert _value_lookup_shapes(aux_head=False) == {(5, 7)}            # (B, K), never (B, L)
    assert _value_lookup_shapes(aux_head=True) == {(5, 7), (5, 300)}   # the aux head reads the whole history


def test_row_sparse_adam_equals_torch_sparse_adam():
    """The trainer's sparse_optimizer path (large vocabularies): same update as torch.optim.SparseAdam."""
    from darec.train.trainer import RowSparseAdam

    torch.manual_seed(0)
    ours, ref = torch.nn.Embedding(40, 5, sparse=True), torch.nn.Embedding(40, 5, sparse=True)
    ref.load_state_dict(ours.state_dict())
    optimizers = [(ours, RowSparseAdam([ours.weight], lr=0.05)), (ref, torch.optim.SparseAdam([ref.weight], lr=0.05))]
    untouched = torch.arange(30, 40)
    start = ours.weight.detach().clone()
    for step in range(6):
        ids = torch.randint(0, 30, (25,))  # repeats: gradients of one row must be summed
        weight = torch.randn(25, 5)
        for emb, opt in optimizers:
            opt.zero_grad()
            (emb(ids) * weight).sum().backward()
            opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.weight[untouched], start[untouched])
    assert not torch.equal(ours.weight[:30], start[:30])
