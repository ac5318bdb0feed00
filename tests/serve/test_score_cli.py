"""`darec score` on a prepared dataset: JSON ranking equals the training model on the user's history."""
from __future__ import annotations

import json

import numpy as np
import torch

from darec.checkpoint import save_checkpoint
from darec.cli import main
from darec.data.batch import Batch
from darec.data.store import PreparedDataset
from darec.models import build_model, preset_config


def _checkpoint(tmp_path, dataset: PreparedDataset, *, max_len: int = 50):
    torch.manual_seed(0)
    config = preset_config("dare", n_items=dataset.n_items, n_categories=dataset.n_categories, max_len=max_len,
                           attention_dim=4, dim=8, init_std=0.2)
    model = build_model(config).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model_config": config.to_dict(), "model": model.state_dict(), "step": 1})
    return model, path


def test_score_cli_json_matches_model(planted_dir, tmp_path, capsys):
    dataset = PreparedDataset.open(planted_dir)
    model, ckpt = _checkpoint(tmp_path, dataset)
    out = tmp_path / "scores.json"
    user, length = 7, 120  # longer than the model's max_len: positions past 50 clamp
    rc = main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", str(user),
               "--candidates", "3", "17", "42", "99", "--max-len", str(length), "--top", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    ranking = result["ranking"]
    assert sorted(r["item"] for r in ranking) == [3, 17, 42, 99]
    probs = [r["probability"] for r in ranking]
    assert probs == sorted(probs, reverse=True)
    assert str(ranking[0]["item"]) in printed and len(printed.strip().splitlines()) == 2 + 2

    seq = slice(int(dataset.offsets[user]), int(dataset.offsets[user + 1]))
    hist_items = np.asarray(dataset.items[seq])[-length:].astype(np.int64)
    hist_cats = np.asarray(dataset.categories[seq])[-length:].astype(np.int64)
    assert result["history_length"] == len(hist_items) == length
    items = torch.tensor([r["item"] for r in ranking])
    cats = torch.from_numpy(np.asarray(dataset.item_categories)[items.numpy()].astype(np.int64))
    b = len(items)
    batch = Batch(hist_items=torch.from_numpy(hist_items).expand(b, -1),
                  hist_categories=torch.from_numpy(hist_cats).expand(b, -1),
                  hist_positions=torch.arange(length, 0, -1).expand(b, -1),
                  mask=torch.ones(b, length, dtype=torch.bool), target_item=items, target_category=cats,
                  label=torch.zeros(b), user=torch.full((b,), user))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch).logit)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_score_cli_random_candidates_and_errors(planted_dir, tmp_path, capsys):
    dataset = PreparedDataset.open(planted_dir)
    _, ckpt = _checkpoint(tmp_path, dataset)
    out = tmp_path / "r.json"
    assert main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", "0",
                 "--n-candidates", "25", "--json", str(out)]) == 0
    ranking = json.loads(out.read_text())["ranking"]
    assert len(ranking) == len({r["item"] for r in ranking}) == 25
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir),
                 "--user", str(dataset.n_users)]) == 2
    assert main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", "0",
                 "--candidates", "0"]) == 2
    assert main(["score", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(planted_dir),
                 "--user", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("darec score: error:") == 3
