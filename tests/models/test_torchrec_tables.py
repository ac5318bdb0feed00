"""Tables in torchrec compute what the plain nn.Embedding model computes: same output and table gradients from the
same weights, sharded or not; fbgemm's fused row-wise Adagrad is the textbook update of the plain gradient; a run
with `embedding_backend: torchrec` trains, resumes exactly and leaves a best.pt the plain model loads.
torchrec is optional (CI installs only `.[test]`): without it every test here is skipped."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from darec.checkpoint import load_checkpoint, load_distributed_checkpoint, load_model_checkpoint
from darec.data.batch import Batch
from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.models import build_model, preset_config
from darec.models.torchrec_tables import (TorchrecModel, fused_parameter_ids, load_plain_state_dict,
                                          plain_state_dict, shard, torchrec_available)
from darec.train.config import TrainConfig
from darec.train.trainer import TEST_LOGITS, Optimizers, predict, regularised_weights, train

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="torchrec / fbgemm not importable")

N_ITEMS, N_CATS, MAX_LEN = 60, 7, 12


def _model(preset: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if preset in ("dare", "twin_4e"):
        overrides.setdefault("attention_dim", 4)  # two widths: two EmbeddingCollections
    overrides.setdefault("init_std", 0.3)
    config = preset_config(preset, n_items=N_ITEMS, n_categories=N_CATS, max_len=MAX_LEN, top_k=4, dim=8,
                           **overrides)
    return build_model(config)


def _batch(b: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(MAX_LEN).unsqueeze(0) >= torch.randint(0, MAX_LEN, (b, 1), generator=g)
    items = torch.randint(1, N_ITEMS, (b, MAX_LEN), generator=g) * mask
    return Batch(hist_items=items, hist_categories=(items % (N_CATS - 1) + 1) * mask,
                 hist_positions=torch.arange(MAX_LEN, 0, -1).expand(b, MAX_LEN), mask=mask,
                 target_item=torch.randint(1, N_ITEMS, (b,), generator=g),
                 target_category=torch.randint(1, N_CATS, (b,), generator=g),
                 label=torch.randint(0, 2, (b,), generator=g).float(), user=torch.arange(b))


def _loss(out) -> torch.Tensor:
    return out.logit.square().sum() + (out.aux_logit.square().sum() if out.aux_logit is not None else 0)


@pytest.fixture
def one_rank_group():
    """A one-process process group (what `darec train` makes for torchrec without torchrun)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["twin", "dare", "twin_4e", "twin_proj"])
def test_same_output_and_table_gradients_as_the_plain_model(preset):
    plain = _model(preset).train()
    wrapped = TorchrecModel(copy.deepcopy(plain)).train()
    batch = _batch()
    ref, out = plain(batch), wrapped(batch)
    torch.testing.assert_close(out.logit, ref.logit)
    torch.testing.assert_close(out.aux_logit, ref.aux_logit)
    _loss(ref).backward()
    _loss(out).backward()
    grads = dict(wrapped.named_parameters())
    for key, weight in plain.named_parameters():
        name = key.removesuffix(".weight").replace(".", "__")
        table = next((g for k, g in grads.items() if k.endswith(f".embeddings.{name}.weight")), None)
        twin = table if table is not None else grads[f"model.{key}"]
        torch.testing.assert_close(twin.grad, weight.grad, msg=key)
    assert plain_state_dict(wrapped).keys() == plain.state_dict().keys()


def test_multi_embedding_sets_live_in_torchrec_too():
    plain = _model("dare", n_embedding_sets=2).eval()
    wrapped = TorchrecModel(copy.deepcopy(plain)).eval()
    assert sum(len(names) for names in wrapped.features.values()) == 2 * 2 * 3  # sets x tables x fields
    torch.testing.assert_close(wrapped(_batch()).logit, plain(_batch()).logit)


def test_sharded_tables_equal_the_plain_model_and_update_by_rowwise_adagrad(one_rank_group):
    plain = _model("dare").train()
    reference = copy.deepcopy(plain)
    lr = 0.05
    sharded = shard(copy.deepcopy(plain), device=torch.device("cpu"), optimizer="rowwise_adagrad", lr=lr).train()
    before = plain_state_dict(sharded)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(before[key], value, msg=key)  # weights start as the plain model's
    batch = _batch()
    out, ref = sharded(batch), reference(batch)
    torch.testing.assert_close(out.logit, ref.logit)
    sharded.fused_optimizer.zero_grad()
    _loss(out).backward()  # fbgemm updates the tables here
    _loss(ref).backward()
    after = plain_state_dict(sharded)
    for key, weight in reference.named_parameters():
        if "embeddings.sets" not in key:
            continue
        g = weight.grad                                                     # (rows, d) dense gradient
        moment = g.square().mean(1, keepdim=True)                           # row-wise Adagrad, first step
        expected = weight.detach() - lr * g / (moment.sqrt() + 1e-8)
        torch.testing.assert_close(after[key], expected, msg=key, atol=1e-6, rtol=1e-5)
        untouched = g.abs().sum(1) == 0
        assert torch.equal(after[key][untouched], before[key][untouched])


def test_plain_weights_load_back_into_a_sharded_model(one_rank_group):
    plain = _model("twin").eval()
    sharded = shard(_model("twin", init_std=0.01), device=torch.device("cpu"), optimizer="rowwise_adagrad",
                    lr=0.01).eval()
    load_plain_state_dict(sharded, plain.state_dict())
    torch.testing.assert_close(sharded(_batch()).logit, plain(_batch()).logit)


SMALL = dict(preset="dare", batch_size=64, eval_batch_size=512, epochs=2, lr=0.02, eval_every=8, model={"dim": 8},
             device="cpu", embedding_backend="torchrec", embedding_optimizer="rowwise_adagrad")


def test_only_the_fused_optimiser_touches_the_tables(one_rank_group):
    sharded = shard(_model("dare"), device=torch.device("cpu"), optimizer="rowwise_adagrad", lr=0.01)
    tables = {id(p) for name, p in sharded.named_parameters() if name.startswith("collections.")}
    assert len(tables) == 6 and tables == fused_parameter_ids(sharded)
    optimizers = Optimizers(sharded, TrainConfig(**SMALL), torch.device("cpu"))
    assert optimizers.all[-1] is sharded.fused_optimizer
    assert not tables & {id(p) for opt in optimizers.all[:-1] for g in opt.param_groups for p in g["params"]}
    assert not tables & {id(p) for p in regularised_weights(sharded)}  # no L2 on tables, as in the plain model


def test_training_with_torchrec_tables_resumes_exactly_and_leaves_a_plain_best_pt(tiny_planted_dir, tmp_path):
    config = TrainConfig(**SMALL)
    full = train(data=tiny_planted_dir, config=config, out_dir=tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "checkpoint.dcp").is_dir() and not (tmp_path / "full" / "checkpoint.pt").exists()
    assert full["test"]["auc"] > 0.55, full["test"]

    cut = train(data=tiny_planted_dir, config=config, out_dir=tmp_path / "cut", max_steps=11, progress=False)
    assert cut == {"finished": False, "step": 11}
    resumed = train(data=tiny_planted_dir, config=config, out_dir=tmp_path / "cut", progress=False)
    assert resumed["test"] == full["test"]
    assert [p["val_logloss"] for p in resumed["curve"]] == [p["val_logloss"] for p in full["curve"]]

    model = load_model_checkpoint(tmp_path / "full" / "best.pt")  # the plain model, nn.Embedding tables
    dataset = PreparedDataset.open(tiny_planted_dir)
    loader = BatchLoader(dataset, "test", batch_size=512, max_len=model.config.max_len)
    logits = predict(model, loader, device=torch.device("cpu"))["logits"]
    np.testing.assert_allclose(logits, np.load(tmp_path / "full" / TEST_LOGITS), rtol=1e-5, atol=1e-6)
    saved = load_checkpoint(tmp_path / "full" / "best.pt")["model"]
    assert saved.keys() == build_model(model.config).state_dict().keys()


_TWO_RANKS = """
import sys
from darec.train.config import TrainConfig
from darec.train.trainer import train
train(data=sys.argv[1], config=TrainConfig(**{config}), out_dir=sys.argv[2], max_steps=9, progress=False)
"""


@pytest.mark.slow
def test_tables_sharded_over_two_processes_resume_in_one(tiny_planted_dir, tmp_path, caplog):
    config = {**SMALL, "threads": 1}
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS.format(config=repr(config)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tiny_planted_dir), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_distributed_checkpoint(tmp_path / "run" / "checkpoint.dcp", keys=("state", "environment"))
    assert saved["state"]["step"] == 9 and saved["environment"]["world_size"] == 2
    with caplog.at_level("INFO", logger="darec.train.trainer"):
        resumed = train(data=tiny_planted_dir, config=TrainConfig(**config), out_dir=tmp_path / "run", progress=False)
    assert "at step 9" in caplog.text  # two shards of every table re-sharded into one
    assert resumed["finished"] and resumed["test"]["n"] == len(PreparedDataset.open(tiny_planted_dir).split("test"))
