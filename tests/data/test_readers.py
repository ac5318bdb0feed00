"""Readers on real files and on every kind of bad input (file, line, column and value named)."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darec.data.pipeline import SHIPPED_MOVIELENS, prepare
from darec.data.protocol import ProtocolConfig
from darec.data.readers import read_generic, read_movielens, read_movielens_100k, read_taobao, read_tmall
from darec.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared beside the checkout
TAOBAO_HEAD = SHARED / "data" / "taobao-userbehavior-head" / "UserBehavior.csv"


def test_shipped_movielens_gives_the_paper_split(tmp_path):
    dataset = prepare(source="movielens", out=tmp_path / "ml")
    m = dataset.manifest
    assert m["n_users"] == 127
    assert {k: v["samples"] for k, v in m["splits"].items()} == {"train": 7239, "val": 381, "test": 381}
    assert m["splits"]["train"]["positives"] == 127 * 19


def test_movielens_category_is_first_genre():
    frame = read_movielens(SHIPPED_MOVIELENS).frame
    toy_story = frame.filter(pl.col("item") == 1)["category"].unique().to_list()
    assert toy_story == ["Adventure"]  # "Adventure|Animation|Children|Comedy|Fantasy"


@pytest.mark.skipif(not TAOBAO_HEAD.is_file(), reason="shared Taobao fixture absent")
def test_taobao_fixture(tmp_path):
    events = read_taobao(TAOBAO_HEAD)
    assert set(events.frame["behavior"].cast(pl.String).unique()) == {"pv"}
    dataset = prepare(source="taobao", input=TAOBAO_HEAD, out=tmp_path / "tb", config=ProtocolConfig(min_clicks=20))
    m = dataset.manifest
    assert m["n_users"] > 10 and m["splits"]["val"]["samples"] == 3 * m["n_users"]
    assert m["splits"]["train"]["positives"] <= 19 * m["n_users"]


def test_tmall_actions_and_empty_brand(write):
    path = write("log.csv", "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"
                            "1,10,5,3,,1101,0\n1,11,5,3,4,1011,2\n1,12,6,3,4,829,0\n")
    frame = read_tmall(path).frame
    assert frame["item"].to_list() == [10, 12] and frame["timestamp"].to_list() == [1101, 829]
    assert read_tmall(path, behaviors=("2",)).frame["item"].to_list() == [11]


def test_generic_csv_and_parquet(write, tmp_path):
    path = write("g.csv", "ts,uid,iid,cid,kind\n5,1,10,2,a\n6,1,11,2,b\n")
    mapping = {"user": "uid", "item": "iid", "category": "cid", "timestamp": "ts", "behavior": "kind"}
    frame = read_generic(path, columns=mapping, behaviors=["a"]).frame
    assert frame.select("user", "item", "category", "timestamp").rows() == [(1, 10, 2, 5)]
    pl.read_csv(path).write_parquet(tmp_path / "g.parquet")
    assert read_generic(tmp_path / "g.parquet", columns=mapping).frame.height == 2
    with pytest.raises(DataError, match="not in the header"):
        read_generic(path, columns={**mapping, "user": "nope"})


def test_movielens_100k(write):
    data = write("u.data", "1\t2\t5\t100\n1\t3\t4\t99\n")
    flags = ["0"] * 19
    flags[4] = flags[7] = "1"
    write("u.item", f"2|A (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n3|B|01-Jan-1995||http://y|{'|'.join(['0'] * 19)}\n")
    frame = read_movielens_100k(data).frame
    assert frame["category"].to_list() == [4, 0]


BAD = [
    ("wrong number of columns", "1,2,3,pv,100\n1,2,3,pv\n", 2, None, "1,2,3,pv"),
    ("wrong number of columns", "1,2,3,pv,100\n1,2,3,pv,100,7\n", 2, None, "1,2,3,pv,100,7"),
    ("not an integer", "1,2,3,pv,100\n\n1,x7,3,pv,102\n", 3, "item_id", "x7"),
    ("not an integer", "1,2,3,pv,100\n1,2,3,pv,1.5\n", 2, "timestamp", "1.5"),
    ("unknown value", "1,2,3,pv,100\n1,2,3,click,103\n", 2, "behavior_type", "click"),
]


@pytest.mark.parametrize("why,text,line,column,value", BAD)
def test_bad_rows_are_located(write, tmp_path, why, text, line, column, value):
    path = write("ub.csv", text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=why) as info:
        prepare(source="taobao", input=path, out=out, config=ProtocolConfig(min_clicks=3))
    err = info.value
    assert (str(err.path), err.line, err.column, err.value) == (str(path), line, column, value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ub.csv"]  # no half-written output


@pytest.mark.parametrize("text,match", [(None, "not found"), ("", "empty"), ("1,2,3,buy,100\n", "behaviour filter"),
                                        ("1,2,3,pv,100\n", "at least 210")])
def test_bad_files(write, tmp_path, text, match):
    path = tmp_path / "missing.csv" if text is None else write("ub.csv", text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old result")
    with pytest.raises(DataError, match=match) as info:
        prepare(source="taobao", input=path, out=out, overwrite=True)  # replaceable, yet kept: the input failed
    assert str(info.value.path) == str(path)
    assert (out / "keep.txt").read_text() == "old result" and len(list(tmp_path.iterdir())) == 1 + (text is not None)


def test_skip_bad_rows_counts_them(write, tmp_path):
    rows = "".join(f"1,{i},3,pv,{i}\n" for i in range(1, 8)) + "2,100,3,pv,1\n"  # user 2: a negative exists
    path = write("ub.csv", rows + "1,x,3,pv,9\n1,2,3,zz,10\n1,2\n")
    dataset = prepare(source="taobao", input=path, out=tmp_path / "out", skip_bad_rows=True,
                      config=ProtocolConfig(min_clicks=5, n_train_targets=1, n_negatives=1))
    assert dataset.manifest["skipped_rows"] == 3 and dataset.manifest["stats"]["n_events"] == 8


def test_tmall_bad_action_and_header(write):
    head = "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"
    with pytest.raises(DataError, match="out of range") as info:
        read_tmall(write("t.csv", head + "1,10,5,3,,1101,0\n1,10,5,3,,1101,9\n"))
    assert (info.value.line, info.value.column, info.value.value) == (3, "action_type", "9")
    with pytest.raises(DataError, match="header") as info:
        read_tmall(write("t2.csv", "user,item\n1,2\n"))
    assert info.value.line == 1


_field = st.one_of(st.integers(0, 2**31 - 1).map(str), st.sampled_from(["", "a", "1.5", "-", "-3", "99999999999"]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 50), st.integers(1, 9),
                               st.sampled_from(["pv", "buy", "cart", "fav"]), st.integers(0, 2**40)),
                     min_size=1, max_size=20),
       corrupt=st.none() | st.tuples(st.integers(0, 19), st.integers(0, 5), _field))
def test_taobao_parser_random_rows(tmp_path, rows, corrupt):
    lines = [",".join(map(str, r)) for r in rows]
    bad_line = None
    if corrupt is not None and corrupt[0] < len(lines):
        row, col, value = corrupt
        fields = lines[row].split(",")
        fields = fields[:col] + [value] + fields[col + 1:] if col < 5 else fields + [value]
        lines[row] = ",".join(fields)
        valid = len(fields) == 5 and all(f.isdigit() and int(f) < 2**31 for f in fields[:3]) \
            and fields[3] in {"pv", "buy", "cart", "fav"} and fields[4].isdigit()
        bad_line = None if valid else row + 1
    path = tmp_path / "ub.csv"
    path.write_text("\n".join(lines) + "\n")
    kept = [r for r in (line.split(",") for line in lines) if len(r) == 5 and r[3] == "pv"]
    if bad_line is not None:
        with pytest.raises(DataError) as info:
            read_taobao(path)
        assert info.value.line == bad_line
    elif not kept:
        with pytest.raises(DataError, match="behaviour filter"):
            read_taobao(path)
    else:
        frame = read_taobao(path).frame
        expected = list(dict.fromkeys((int(r[0]), int(r[1]), int(r[2]), int(r[4])) for r in kept))  # repeats dropped
        assert frame.select("user", "item", "category", "timestamp").rows() == expected
