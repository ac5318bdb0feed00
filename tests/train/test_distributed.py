"""Multi-process training: rank shares of a global batch, gathered metrics, DCP checkpoints across world sizes,
and 2 processes (torchrun, gloo on CPU) against 1 process on the planted data."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from darec.checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.errors import DataError
from darec.train.config import TrainConfig
from darec.train.distributed import _without_flag, resumable
from darec.train.trainer import TEST_LOGITS, train

# Small enough for CI: DARE at dim 8 on the easy planted data, one thread per process, validated only at the
# end (so both runs test their last weights: early-stopping picks would add their own noise).
CONFIG = dict(preset="dare", batch_size=512, eval_batch_size=4096, epochs=2, lr=0.01, eval_every=1000,
              model={"dim": 8}, device="cpu", threads=1)


@pytest.mark.parametrize("group_sets", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_partition_every_global_batch(tiny_planted_dir, group_sets, world):
    dataset = PreparedDataset.open(tiny_planted_dir)
    whole = BatchLoader(dataset, "train", batch_size=64, shuffle=True, seed=3, group_sets=group_sets)
    shards = [BatchLoader(dataset, "train", batch_size=64, shuffle=True, seed=3, group_sets=group_sets,
                          shard=(rank, world)) for rank in range(world)]
    keys = (whole.samples["user"].astype(np.int64) << 32) | whole.samples["cut"]
    for epoch in (0, 1):
        per_rank = [list(s.indices(epoch)) for s in shards]
        global_batches = list(whole.indices(epoch))
        assert all(len(batches) == len(global_batches) for batches in per_rank)  # ranks step together
        for b, batch in enumerate(global_batches):
            parts = [batches[b] for batches in per_rank]
            assert all(len(p) > 0 for p in parts)
            assert np.array_equal(np.concatenate(parts), batch)  # contiguous, in order, nothing lost or doubled
            if group_sets:  # no candidate set is cut between ranks
                assert len({k for p in parts for k in set(keys[p])}) == sum(len(set(keys[p])) for p in parts)
            else:
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_batch_smaller_than_the_world_repeats_its_last_row(tiny_planted_dir):
    dataset = PreparedDataset.open(tiny_planted_dir)
    n = len(dataset.split("val"))
    shards = [BatchLoader(dataset, "val", batch_size=n - 1, shard=(rank, 3)) for rank in range(3)]
    last = [list(s.indices(0))[-1] for s in shards]  # the last global batch holds one row
    assert [p.tolist() for p in last] == [[n - 1]] * 3


def test_dcp_checkpoint_round_trip_keeps_every_value(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    obj = {"model": model.state_dict(), "optimizer": [optimizer.state_dict()],
           "state": {"step": 3, "curve": [], "best_value": None}, "config": {"model": {}, "lr": 0.01},
           "rng": {"torch": torch.get_rng_state()}}
    save_distributed_checkpoint(tmp_path / "ck", obj)
    save_distributed_checkpoint(tmp_path / "ck", obj)  # replaces its own folder
    back = load_distributed_checkpoint(tmp_path / "ck", keys=("model", "optimizer"))
    assert back["state"] == obj["state"] and back["config"] == obj["config"]
    for key, value in obj["model"].items():
        assert torch.equal(back["model"][key], value), key
    assert back["optimizer"][0]["param_groups"] == obj["optimizer"][0]["param_groups"]
    assert back["optimizer"][0]["state"].keys() == obj["optimizer"][0]["state"].keys()  # int keys kept
    assert torch.equal(back["rng"]["torch"], obj["rng"]["torch"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporaries left
    with pytest.raises(DataError, match="lacks"):
        load_distributed_checkpoint(tmp_path / "ck", keys=("environment",))


class _Boom:
    """Pickles as a call of os.system: what a hostile checkpoint folder's metadata could hold."""

    def __reduce__(self):
        import os
        return os.system, ("touch pwned",)


def test_dcp_metadata_naming_a_foreign_global_is_refused_unrun(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    save_distributed_checkpoint(folder, {"model": {"w": torch.ones(2)}})
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="refused global posix.system"):
        load_distributed_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


def test_resume_across_world_sizes_ignores_only_per_launch_settings():
    one = {"threads": 2, "torch": "2.13", "device": "cpu", "deterministic": True}
    two = {**one, "threads": 1, "world_size": 2}
    assert resumable(two, one) and resumable(one, two)
    assert not resumable({**one, "threads": 1}, one)  # same world size: bit-exact environment only
    assert not resumable({**two, "torch": "2.12"}, one)


def test_relaunch_drops_only_its_own_flag():
    argv = ["train", "--data", "d", "--nproc-per-node", "2", "--seed", "3", "--nproc-per-node=4"]
    assert _without_flag(argv, "--nproc-per-node") == ["train", "--data", "d", "--seed", "3"]


_INTERRUPTED = """
import sys
from darec.train.config import TrainConfig
from darec.train.trainer import train
train(data=sys.argv[1], config=TrainConfig(**{config}), out_dir=sys.argv[2], max_steps={steps}, progress=False)
"""


def _flags(config: dict) -> list[str]:
    flags = ["--preset", config["preset"], "--dim", str(config["model"]["dim"]), "--device", config["device"]]
    for key in ("batch_size", "eval_batch_size", "epochs", "lr", "eval_every", "threads"):
        flags += ["--" + key.replace("_", "-"), str(config[key])]
    return flags


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(easy_planted_dir, tmp_path, caplog):
    """Same global batch: the 2-process step is the 1-process step up to float rounding, which Adam then
    amplifies (a thread-count change moves this AUC by up to ~0.004, docs/scale.md)."""
    config = TrainConfig(**CONFIG)
    single = train(data=easy_planted_dir, config=config, out_dir=tmp_path / "one", progress=False)

    done = subprocess.run([sys.executable, "-m", "darec", "train", "--nproc-per-node", "2", "--data",
                           str(easy_planted_dir), "--out", str(tmp_path / "two"), "--no-progress", *_flags(CONFIG)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test AUC") == 1  # rank 0 reports
    double = json.loads((tmp_path / "two" / "result.json").read_text())
    assert double["environment"]["world_size"] == 2
    n_test = len(PreparedDataset.open(easy_planted_dir).split("test"))
    assert double["test"]["n"] == n_test == len(np.load(tmp_path / "two" / TEST_LOGITS))  # every row once
    assert double["steps"] == single["steps"]
    assert abs(double["test"]["auc"] - single["test"]["auc"]) <= 0.005, (double["test"], single["test"])
    assert (tmp_path / "two" / "checkpoint.dcp").is_dir() and not (tmp_path / "two" / "checkpoint.pt").exists()

    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED.format(config=repr(CONFIG), steps=15))
    cut = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(easy_planted_dir), str(tmp_path / "cut")],
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert load_distributed_checkpoint(tmp_path / "cut" / "checkpoint.dcp", keys=("state",))["state"]["step"] == 15

    with caplog.at_level("INFO", logger="darec.train.trainer"):
        resumed = train(data=easy_planted_dir, config=config, out_dir=tmp_path / "cut", progress=False)
    assert "at step 15" in caplog.text
    assert resumed["finished"] and resumed["steps"] == single["steps"]
    assert resumed["environment"] == single["environment"]
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "checkpoint.dcp").exists()
    assert abs(resumed["test"]["auc"] - single["test"]["auc"]) <= 0.02  # it trained on from step 15
