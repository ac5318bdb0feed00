"""String user / item / category ids (issue 14): every reader takes them where asked, the generic reader
detects them per column, and prepare -> train -> score names them back as they were written."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from darec.checkpoint import save_checkpoint
from darec.cli import main
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.readers import read_generic, read_taobao, read_tmall
from darec.data.store import PreparedDataset
from darec.errors import DataError
from darec.models import build_model, preset_config

SMALL = ProtocolConfig(min_clicks=10, n_train_targets=3)
COLUMNS = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts"}


def _log(n_users: int = 6, n_clicks: int = 30, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 80, size=n_users * n_clicks)
    return pl.DataFrame({"uid": [f"u{u}" for u in range(n_users) for _ in range(n_clicks)],
                         "iid": [f"item-{i}" for i in items], "cid": [f"c{i % 7}" for i in items],
                         "ts": np.tile(np.arange(n_clicks) * 60 + 1_000, n_users)})


def test_generic_csv_string_ids_round_trip(tmp_path):
    log = _log()
    log.write_csv(tmp_path / "log.csv")
    dataset = prepare(source="generic", input=tmp_path / "log.csv", out=tmp_path / "ds", columns=COLUMNS,
                      config=SMALL)
    maps = dataset.id_maps()
    assert all(maps.raw_dtype(kind) == pl.String for kind in ("user", "item", "category"))
    # independent expectation: the CSR holds each user's items in file order, named back by the maps
    for row in range(dataset.n_users):
        user = maps.decode("user", [row])[0]
        seq = slice(int(dataset.offsets[row]), int(dataset.offsets[row + 1]))
        assert maps.decode("item", dataset.items[seq]).to_list() == log.filter(pl.col("uid") == user)["iid"].to_list()
        assert maps.decode("category", dataset.categories[seq]).to_list() == \
            log.filter(pl.col("uid") == user)["cid"].to_list()


def test_mixed_integer_and_string_columns(tmp_path):
    log = _log().with_columns(pl.col("iid").str.strip_prefix("item-").cast(pl.Int64))
    log.write_csv(tmp_path / "log.csv")
    frame = read_generic(tmp_path / "log.csv", columns=COLUMNS).frame
    assert (frame.schema["user"], frame.schema["item"], frame.schema["category"]) == (pl.String, pl.Int64, pl.String)


def test_parquet_string_ids(tmp_path):
    path = tmp_path / "log.parquet"
    _log().write_parquet(path)
    assert read_generic(path, columns=COLUMNS).frame.schema["item"] == pl.String
    with pytest.raises(DataError, match="not an integer"):
        read_generic(path, columns=COLUMNS, string_ids=False)


def test_published_layouts_take_string_ids_when_asked(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("u1,i9,c3,pv,100\nu1,i8,c3,pv,101\n")
    with pytest.raises(DataError, match="not an integer") as info:
        read_taobao(path)
    assert (info.value.line, info.value.column, info.value.value) == (1, "user_id", "u1")
    assert read_taobao(path, string_ids=True).frame["item"].to_list() == ["i9", "i8"]
    tmall = tmall_file(tmp_path)
    frame = read_tmall(tmall, string_ids=True, extra=["brand"]).frame
    assert frame["user"].to_list() == ["a", "a"] and frame["brand"].to_list() == ["b1", None]


def tmall_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"
                    "a,x,c,s1,b1,1101,0\na,y,c,s2,,1102,0\n")
    return path


def test_prepare_train_score_with_string_ids(tmp_path, capsys):
    _log(n_users=8, n_clicks=40).write_csv(tmp_path / "log.csv")
    data = tmp_path / "ds"
    dataset = prepare(source="generic", input=tmp_path / "log.csv", out=data, columns=COLUMNS, config=SMALL)
    torch.manual_seed(0)
    config = preset_config("dare", n_items=dataset.n_items, n_categories=dataset.n_categories, max_len=50, dim=4)
    save_checkpoint(tmp_path / "best.pt", {"model_config": config.to_dict(),
                                           "model": build_model(config).eval().state_dict(), "step": 1})
    out = tmp_path / "scores.json"
    assert main(["score", "--checkpoint", str(tmp_path / "best.pt"), "--data", str(data), "--user", "u3",
                 "--candidates", "item-5", "item-7", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["user"] == "u3" and sorted(r["item"] for r in result["ranking"]) == ["item-5", "item-7"]
    assert all(r["category"].startswith("c") for r in result["ranking"])
    capsys.readouterr()
