"""`darec predict`: raw-id rows in, the Scorer's probabilities out, in input order; bad input is one line."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from darec.cli import main
from darec.data.store import PreparedDataset
from darec.serve import predict as predict_module
from darec.serve.scorer import History, Scorer
from tests.helpers import tiny_dare_checkpoint

MAX_LEN = 12


@pytest.fixture(scope="module")
def run_dir(tiny_planted_dir, tmp_path_factory):
    """A `darec train`-like run directory holding a randomly initialised tiny DARE model as best.pt."""
    dataset = PreparedDataset.open(tiny_planted_dir)
    run = tmp_path_factory.mktemp("run")
    tiny_dare_checkpoint(run / "best.pt", dataset, max_len=MAX_LEN, init_std=0.3)
    return run


def _rows(n: int, seed: int = 0) -> pl.DataFrame:
    """Raw ids of the tiny planted data (users 1..30, items 1..40), users repeated and interleaved."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"row": np.arange(n), "user": rng.integers(1, 31, n), "item": rng.integers(1, 41, n),
                         "note": [f"r{i}" for i in range(n)]})


def _raw_to_internal(data, kind: str, raw: pl.Series) -> np.ndarray:
    """Reference lookup straight from the map file (a join), independent of IdMaps."""
    table = pl.read_parquet(data / "ids" / f"{'categories' if kind == 'category' else kind + 's'}.parquet")
    joined = pl.DataFrame({"raw": raw.cast(table["raw"].dtype)}).join(table, on="raw", how="left",
                                                                      maintain_order="left")
    return joined["id"].fill_null(0).to_numpy()


def _expected_logits(data, run, rows: pl.DataFrame, categories: np.ndarray | None = None) -> np.ndarray:
    """Each row scored on its own: its user's last MAX_LEN clicks (left_pad) and one candidate."""
    dataset = PreparedDataset.open(data)
    users = _raw_to_internal(data, "user", rows["user"])
    items = _raw_to_internal(data, "item", rows["item"])
    cats = np.asarray(dataset.item_categories)[items] if categories is None else categories
    offsets = np.asarray(dataset.offsets)
    history = History.left_pad([np.asarray(dataset.items[offsets[u]:offsets[u + 1]]) for u in users],
                               [np.asarray(dataset.categories[offsets[u]:offsets[u + 1]]) for u in users],
                               length=MAX_LEN)
    scorer = Scorer.load(run / "best.pt")
    cand_items, cand_cats = items[:, None].astype(np.int64), cats[:, None].astype(np.int64)  # writable copies
    return scorer.logits(history, torch.from_numpy(cand_items), torch.from_numpy(cand_cats))[:, 0].numpy()


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny block limits, so a small file exercises user splitting, width classes and several blocks."""
    monkeypatch.setattr(predict_module, "_MAX_CANDIDATES", 3)
    monkeypatch.setattr(predict_module, "_BLOCK_CELLS", 5 * MAX_LEN)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_predict_equals_the_scorer_row_by_row(suffix, tiny_planted_dir, run_dir, tmp_path, small_blocks, capsys):
    rows = _rows(300)
    source = tmp_path / f"in.{suffix}"
    rows.write_csv(source) if suffix == "csv" else rows.write_parquet(source)
    out = tmp_path / "out.parquet"
    assert main(["predict", "--checkpoint", str(run_dir), "--data", str(tiny_planted_dir), "--input", str(source),
                 "--out", str(out), "--chunk-rows", "37"]) == 0
    assert "300 rows" in capsys.readouterr().out
    result = pl.read_parquet(out)
    assert result.columns == ["row", "user", "item", "note", "logit", "probability"]
    assert result.select("row", "user", "item", "note").equals(rows)                 # input order and values kept
    expected = _expected_logits(tiny_planted_dir, run_dir, rows)
    np.testing.assert_allclose(result["logit"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["probability"].to_numpy(), 1 / (1 + np.exp(-expected)), rtol=1e-5, atol=1e-6)


def test_given_categories_mapped_columns_and_oov(tiny_planted_dir, run_dir, tmp_path, small_blocks):
    rows = _rows(60, seed=1).rename({"user": "uid", "item": "iid"})
    rows = rows.with_columns(iid=pl.when(pl.col("row") % 7 == 3).then(999).otherwise(pl.col("iid")),  # unknown
                             cid=(pl.col("row") % 6 + 1))
    source = tmp_path / "in.csv"
    rows.write_csv(source)
    out = tmp_path / "out.parquet"
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--data", str(tiny_planted_dir),
                 "--input", str(source), "--out", str(out), "--columns", "user=uid,item=iid,category=cid",
                 "--unknown", "oov"]) == 0
    result = pl.read_parquet(out)
    unknown = (rows["iid"] == 999).to_numpy()
    np.testing.assert_array_equal(result["known"].to_numpy(), ~unknown)
    cats = _raw_to_internal(tiny_planted_dir, "category", rows["cid"])
    expected = _expected_logits(tiny_planted_dir, run_dir, rows.rename({"uid": "user", "iid": "item"}), cats)
    np.testing.assert_allclose(result["logit"].to_numpy(), expected, rtol=1e-5, atol=1e-5)


def _bad_csv(tmp_path, text: str, name: str = "bad.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = [
    ("missing-column", lambda t: _bad_csv(t, "user,product\n1,2\n"), ["no item column", "bad.csv", "'item'"]),
    ("not-an-integer", lambda t: _bad_csv(t, "user,item\n1,2\n3,4\nu7,5\n"),
     ["not an integer", "line 4", "'user'", "'u7'", "row 3"]),
    ("unknown-item", lambda t: _bad_csv(t, "user,item\n1,2\n3,999\n"), ["not in the dataset", "line 3", "999"]),
    ("unknown-user", lambda t: _bad_csv(t, "user,item\n1,2\n31,5\n"), ["no history", "line 3", "'user'", "31"]),
    ("garbage-parquet", lambda t: _bad_csv(t, "not parquet at all", "x.parquet"), ["cannot read the input", "x.parquet"]),
    ("absent", lambda t: t / "nope.csv", ["not found", "nope.csv"]),
    ("wrong-suffix", lambda t: _bad_csv(t, "user,item\n1,2\n", "rows.txt"), ["rows.txt", ".csv or .parquet"]),
]


@pytest.mark.parametrize(("make", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(make, words, tiny_planted_dir, run_dir, tmp_path, capsys):
    source = make(tmp_path)
    out = tmp_path / "out.parquet"
    rc = main(["predict", "--checkpoint", str(run_dir), "--data", str(tiny_planted_dir), "--input", str(source),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(word in lines[0] for word in words), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_is_kept_unless_overwrite_and_a_failure_leaves_it(tiny_planted_dir, run_dir, tmp_path, capsys):
    source = tmp_path / "in.csv"
    _rows(20).write_csv(source)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    args = ["predict", "--checkpoint", str(run_dir), "--data", str(tiny_planted_dir), "--input", str(source),
            "--out", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    bad = _bad_csv(tmp_path, "user,item\n" + "1,2\n" * 50 + "1,999\n")
    assert main([*args[:-3], str(bad), "--out", str(out), "--overwrite", "--chunk-rows", "10"]) == 2
    assert out.read_bytes() == b"precious"                               # failed mid-file: old output untouched
    assert main([*args, "--overwrite"]) == 0 and pl.read_parquet(out).height == 20
    assert main([*args[:-3], str(source), "--out", str(source), "--overwrite"]) == 2  # never the input itself


def test_model_of_another_dataset_is_refused(tiny_planted_dir, easy_planted_dir, run_dir, tmp_path, capsys):
    source = tmp_path / "in.csv"
    _rows(5).write_csv(source)
    assert main(["predict", "--checkpoint", str(run_dir), "--data", str(easy_planted_dir), "--input", str(source),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "trained with n_items" in capsys.readouterr().err


def test_empty_input_gives_an_empty_output(tiny_planted_dir, run_dir, tmp_path):
    source = _bad_csv(tmp_path, "user,item\n")
    out = tmp_path / "out.parquet"
    assert main(["predict", "--checkpoint", str(run_dir), "--data", str(tiny_planted_dir), "--input", str(source),
                 "--out", str(out)]) == 0
    result = pl.read_parquet(out)
    assert result.height == 0 and result.columns == ["user", "item", "logit", "probability"]
