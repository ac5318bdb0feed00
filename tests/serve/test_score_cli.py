"""`darec score` on a prepared dataset: JSON ranking equals the training model on the user's history;
users, items and categories are named by their raw ids in and out."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import torch

from darec.cli import main
from darec.data.batch import Batch
from darec.data.store import PreparedDataset
from tests.helpers import tiny_dare_checkpoint


def _checkpoint(tmp_path, dataset: PreparedDataset, *, max_len: int = 50):
    path = tmp_path / "best.pt"
    return tiny_dare_checkpoint(path, dataset, max_len=max_len), path


def _ids(data, kind: str) -> pl.DataFrame:
    """The raw <-> internal table of `kind`, read straight from the dataset's map file."""
    return pl.read_parquet(data / "ids" / f"{'categories' if kind == 'category' else kind + 's'}.parquet")


def test_score_cli_json_matches_model(planted_dir, tmp_path, capsys):
    dataset = PreparedDataset.open(planted_dir)
    model, ckpt = _checkpoint(tmp_path, dataset)
    out = tmp_path / "scores.json"
    users, items = _ids(planted_dir, "user"), _ids(planted_dir, "item")
    user = 7
    raw_user = users.filter(pl.col("id") == user)["raw"].item()
    raw_items = items.filter(pl.col("id").is_in([3, 17, 42, 99]))["raw"].to_list()
    length = 120  # longer than the model's max_len: positions past 50 clamp
    rc = main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", str(raw_user),
               "--candidates", *map(str, raw_items), "--max-len", str(length), "--top", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["user"] == raw_user
    ranking = result["ranking"]
    assert sorted(r["item"] for r in ranking) == sorted(raw_items) and all(r["known"] for r in ranking)
    probs = [r["probability"] for r in ranking]
    assert probs == sorted(probs, reverse=True)
    assert str(ranking[0]["item"]) in printed and len(printed.strip().splitlines()) == 2 + 2
    internal = dict(zip(items["raw"].to_list(), items["id"].to_list()))
    category_raw = dict(_ids(planted_dir, "category").select("id", "raw").iter_rows())
    assert [r["category"] for r in ranking] == [
        category_raw[int(dataset.item_categories[internal[r["item"]]])] for r in ranking]

    seq = slice(int(dataset.offsets[user]), int(dataset.offsets[user + 1]))
    hist_items = np.asarray(dataset.items[seq])[-length:].astype(np.int64)
    hist_cats = np.asarray(dataset.categories[seq])[-length:].astype(np.int64)
    assert result["history_length"] == len(hist_items) == length
    items = torch.tensor([internal[r["item"]] for r in ranking])
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
    assert main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", "1",
                 "--n-candidates", "25", "--json", str(out)]) == 0
    ranking = json.loads(out.read_text())["ranking"]
    assert len(ranking) == len({r["item"] for r in ranking}) == 25
    assert set(r["item"] for r in ranking) <= set(_ids(planted_dir, "item")["raw"].to_list())
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(tmp_path), "--data", str(planted_dir), "--user", "1",  # a run dir
                 "--candidates", "5", "999999", "--unknown", "oov", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    unknown = [r for r in json.loads(out.read_text())["ranking"] if not r["known"]]
    assert unknown == [{"item": 999999, "category": None, "known": False, "probability": unknown[0]["probability"]}]
    assert "1 unknown" in printed and "999999" in printed and "*" in printed
    for user, candidates, word in ((str(dataset.n_users + 1), [], "--user"), ("u1", [], "not an integer"),
                                   ("1", ["--candidates", "0"], "--candidates")):
        assert main(["score", "--checkpoint", str(ckpt), "--data", str(planted_dir), "--user", user,
                     *candidates]) == 2
        assert word in capsys.readouterr().err
    assert main(["score", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(planted_dir),
                 "--user", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("darec score: error:") == 1
