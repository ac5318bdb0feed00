"""The feature schema (issue 14): the default changes nothing, extra columns and behaviour types are kept as
the schema says, and bad schemas or values are one line, exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from darec.cli import main
from darec.data.pipeline import prepare
from darec.data.protocol import ProtocolConfig
from darec.data.schema import SHIPPED_SCHEMAS, FeatureSchema, load_schema
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from tests.data.inputs import snapshot, taobao_log

TAOBAO_HEAD = Path("/work/shared/data/taobao-userbehavior-head/UserBehavior.csv")
SMALL = ProtocolConfig(min_clicks=10, n_train_targets=3)
COLUMNS = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts"}


def test_default_schema_writes_the_same_bytes(tmp_path):
    log = taobao_log(tmp_path / "ub.csv")
    prepare(source="taobao", input=log, out=tmp_path / "plain", config=SMALL)
    prepare(source="taobao", input=log, out=tmp_path / "schema", config=SMALL,
            schema=load_schema(SHIPPED_SCHEMAS / "default.yaml"))
    assert load_schema(SHIPPED_SCHEMAS / "default.yaml") == FeatureSchema()
    assert snapshot(tmp_path / "plain") == snapshot(tmp_path / "schema")


def _tmall(tmp_path, n_users=4, n_clicks=20, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type"]
    for u in range(n_users):
        for k in range(n_clicks):
            item = int(rng.integers(1, 40))
            brand = "" if item % 9 == 0 else str(500 + item % 6 + k % 2)  # an item's brand may change
            rows.append(f"{u},{item},{item % 5},{item % 3},{brand},{1101 + k},{int(rng.integers(0, 2)) * 2}")
    path = tmp_path / "tmall.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_tmall_seller_and_brand(tmp_path):
    path = _tmall(tmp_path)
    dataset = prepare(source="tmall", input=path, out=tmp_path / "ds", config=ProtocolConfig(min_clicks=5),
                      schema=load_schema("tmall"))
    raw = pl.read_csv(path).filter(pl.col("action_type") == 0)
    assert set(dataset.event_features) == {"seller", "brand"} and set(dataset.item_features) == {"seller", "brand"}
    brand_map = pl.read_parquet(tmp_path / "ds" / "ids" / "features" / "brand.parquet")
    raw_of = dict(zip(brand_map["id"].to_list(), brand_map["raw"].to_list()))
    raw_of[0] = None
    items = dataset.id_maps().decode("item", np.arange(1, dataset.n_items)).to_list()
    last_brand = dict(raw.select("item_id", "brand_id").iter_rows())  # the last click's brand of each item
    assert [raw_of[c] for c in dataset.item_features["brand"][1:]] == [last_brand[i] for i in items]
    for row in range(dataset.n_users):  # per event: the brand of that click, in time order
        seq = slice(int(dataset.offsets[row]), int(dataset.offsets[row + 1]))
        user = dataset.id_maps().decode("user", [row])[0]
        expected = raw.filter(pl.col("user_id") == user).sort("time_stamp", maintain_order=True)["brand_id"]
        assert [raw_of[c] for c in dataset.event_features["brand"][seq]] == expected.to_list()


@pytest.mark.skipif(not TAOBAO_HEAD.is_file(), reason="Taobao fixture not present")
def test_taobao_multi_behaviour_targets_stay_clicks(tmp_path):
    config = ProtocolConfig(min_clicks=50)
    clicks = prepare(source="taobao", input=TAOBAO_HEAD, out=tmp_path / "pv", config=config)
    multi = prepare(source="taobao", input=TAOBAO_HEAD, out=tmp_path / "all", config=config,
                    schema=load_schema("taobao"))
    assert multi.n_users == clicks.n_users and multi.offsets[-1] > clicks.offsets[-1]
    codes = pl.read_parquet(tmp_path / "all" / "ids" / "features" / "behavior.parquet")
    pv = codes.filter(pl.col("raw") == "pv")["id"].item()
    behaviour = multi.event_features["behavior"]
    assert (np.asarray(behaviour) != pv).any()  # histories hold buys, carts, favs
    for name in ("train", "val", "test"):
        samples = multi.split(name)
        where = multi.offsets[samples["user"]] + samples["cut"]
        positive = samples["label"] == 1
        assert (behaviour[where] == pv).all()  # every target (and so every negative's cut) is a click
        assert (multi.items[where[positive]] == samples["item"][positive]).all()
        # the same click targets as the clicks-only protocol, counted in clicks
        assert len(samples) == len(clicks.split(name))


def test_hash_encoding_and_numeric(tmp_path):
    log = pl.DataFrame({"uid": np.repeat(np.arange(3), 15), "iid": np.arange(45) % 20,
                        "cid": np.arange(45) % 4, "ts": np.arange(45),
                        "shop": [f"s{i % 11}" for i in range(45)], "price": np.arange(45) * 2.0})
    log.write_csv(tmp_path / "log.csv")
    (tmp_path / "s.yaml").write_text(
        "features:\n  - {name: item, column: item}\n  - {name: category, column: category}\n"
        "  - {name: shop, column: shop, encoding: hash, buckets: 7}\n"
        "numeric: [{name: price, column: price, normalize: standard}]\n")
    dataset = prepare(source="generic", input=tmp_path / "log.csv", out=tmp_path / "ds", columns=COLUMNS,
                      config=ProtocolConfig(min_clicks=10, n_train_targets=2), schema=load_schema(tmp_path / "s.yaml"))
    shop = np.asarray(dataset.event_features["shop"])
    assert shop.min() >= 1 and shop.max() <= 7
    same = pl.DataFrame({"raw": log["shop"], "code": shop})  # one code per raw value (a function of it)
    assert same.group_by("raw").agg(pl.col("code").n_unique())["code"].max() == 1
    price = np.asarray(dataset.event_features["price"], dtype=np.float64)
    assert abs(price.mean()) < 1e-6 and abs(price.std(ddof=1) - 1) < 1e-5
    assert not (tmp_path / "ds" / "ids" / "features" / "shop.parquet").exists()


def _bad(tmp_path, capsys, args, schema_text):
    (tmp_path / "s.yaml").write_text(schema_text)
    before = snapshot(tmp_path)
    rc = main(["prepare", *args, "--schema", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"),
               "--min-clicks", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert snapshot(tmp_path) == before
    return err


BASE = "features:\n  - {name: item, column: item}\n  - {name: category, column: category}\n"


def test_schema_naming_a_missing_column(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("uid,iid,cid,ts\n1,2,3,4\n")
    err = _bad(tmp_path, capsys, ["--source", "generic", "--input", str(log), "--columns",
                                  "user=uid,item=iid,category=cid,timestamp=ts"],
               BASE + "  - {name: brand, column: brand_id}\n")
    assert "'brand'" in err and "'brand_id'" in err
    err = _bad(tmp_path, capsys, ["--source", "taobao", "--input", str(log)], BASE + "  - {name: brand, column: brand}\n")
    assert "feature 'brand'" in err and "taobao" in err


def test_numeric_feature_with_strings(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("uid,iid,cid,ts,price\n1,2,3,4,1.5\n1,3,3,5,cheap\n")
    err = _bad(tmp_path, capsys, ["--source", "generic", "--input", str(log), "--columns",
                                  "user=uid,item=iid,category=cid,timestamp=ts"],
               BASE + "numeric: [{name: price, column: price}]\n")
    assert all(s in err for s in ("not a number", "line 3", "'price'", "'cheap'")), err


def test_vocabulary_too_large(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("uid,iid,cid,ts,shop\n" + "".join(f"1,{i},3,{i},s{i}\n" for i in range(5)))
    err = _bad(tmp_path, capsys, ["--source", "generic", "--input", str(log), "--columns",
                                  "user=uid,item=iid,category=cid,timestamp=ts"],
               BASE + "  - {name: shop, column: shop, max_vocabulary: 3}\n")
    assert all(s in err for s in ("feature 'shop'", "column 'shop'", "'s3'", "encoding: hash")), err


@pytest.mark.parametrize("text,needle", [
    ("features: [{name: brand, column: brand}]\n", "must start with"),
    (BASE + "  - {name: shop, column: s, encoding: hash}\n", "buckets"),
    (BASE + "  - {name: shop, column: s, colour: red}\n", "colour"),
    ("behaviors: [pv]\ntargets: [buy]\n", "not among"),
    ("features: [", "not valid YAML"),
])
def test_invalid_schema_files(tmp_path, text, needle):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_schema(tmp_path / "s.yaml")
