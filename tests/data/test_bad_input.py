"""Every class of bad input a hostile user tried (issue 11): one clear line naming file, line or row, column
and value where known, exit code 2, no traceback, and nothing outside darec's own outputs changed."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import zipfile

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darec.cli import main
from darec.data.readers import read_generic, read_taobao, read_tmall
from darec.data.store import PreparedDataset
from darec.errors import DataError
from tests.data.inputs import SMALL, snapshot, taobao_text


def _zip(text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ub.csv", text)
    return buffer.getvalue()


_TEXT = taobao_text()
_LINES = _TEXT.splitlines(keepends=True)
# name -> (file bytes, extra CLI arguments, substrings the one-line message must contain)
TAOBAO_CASES = {
    "invalid utf-8": ("".join(_LINES[:99]).encode() + b"1,2,3,p\xffv,100\n", [],
                      ["invalid UTF-8", "line 100", "behavior_type"]),
    "binary garbage": (bytes(range(256)) * 20, [], ["binary file"]),
    "garbage mid-file": ("".join(_LINES[:20]).encode() + b"\x8f\x02\xfe,\x1f\x80\n" + "".join(_LINES[20:]).encode(),
                         [], ["line 21"]),
    "zip": (_zip(_TEXT), [], ["zip archive"]),
    "truncated gzip": (gzip.compress(_TEXT.encode())[:300], [], ["truncated"]),
    "negative id": ((_TEXT + "-3,5,5,pv,100\n").encode(), [], ["negative", "line 201", "user_id", "'-3'"]),
    "negative timestamp": ((_TEXT + "3,5,5,pv,-100\n").encode(), [], ["negative", "line 201", "timestamp"]),
    "columns with taobao": (_TEXT.encode(), ["--columns", "user=a,item=b,category=c,timestamp=d"],
                            ["--columns", "generic"]),
    "max-len 0": (_TEXT.encode(), ["--max-len", "0"], ["max_len", ">= 1"]),
    "directory as input": (None, [], ["folder"]),
}


@pytest.mark.parametrize("name", TAOBAO_CASES)
def test_bad_taobao_input_is_one_line_exit_2_and_changes_nothing(tmp_path, capsys, name):
    data, extra, needles = TAOBAO_CASES[name]
    source = tmp_path / "in"
    source.mkdir()
    log = source / "ub.csv"
    if data is not None:
        log.write_bytes(data)
    before = snapshot(tmp_path)
    code = main(["prepare", "--source", "taobao", "--input", str(source if data is None else log),
                 "--out", str(tmp_path / "out"), *SMALL, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("darec prepare: error: ") and all(n in err for n in needles), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("header,columns,needles", [
    ("u,i,i,t", "user=u,item=i,category=c,timestamp=t", ["repeated", "line 1", "'i'"]),
    ("u,i,c,t", "user=u,item=i,category=i,timestamp=t", ["two fields"]),
    ("u,i,c,t", "user=u,item=x,category=c,timestamp=t", ["not in the header"]),
])
def test_bad_generic_headers(tmp_path, capsys, header, columns, needles):
    log = tmp_path / "log.csv"
    log.write_text(header + "\n1,2,3,4\n")
    before = snapshot(tmp_path)
    assert main(["prepare", "--source", "generic", "--input", str(log), "--columns", columns,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(n in err for n in needles), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("values,needles", [
    ([1.0, 2.5, 3.0], ["bad row 2", "not an integer", "'i'", "2.5"]),
    ([1.0, float("nan"), 3.0], ["bad row 2", "not an integer"]),
    ([1, -2, 3], ["bad row 2", "negative", "'-2'"]),
    ([True, False, True], ["Boolean", "integers"]),
])
def test_parquet_ids_must_be_non_negative_integers(tmp_path, values, needles):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"u": [1, 1, 2], "i": values, "c": [1, 1, 1], "t": [1, 2, 3]}).write_parquet(path)
    with pytest.raises(DataError) as info:
        read_generic(path, columns={"user": "u", "item": "i", "category": "c", "timestamp": "t"})
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_integral_parquet_floats_are_accepted(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"u": [1.0, 2.0], "i": [7.0, 3.0], "c": [1, 1], "t": [5, 6]}).write_parquet(path)
    frame = read_generic(path, columns={"user": "u", "item": "i", "category": "c", "timestamp": "t"}).frame
    assert frame["item"].to_list() == [7, 3] and frame["item"].dtype == pl.Int64


def test_every_row_duplicated_gives_the_same_dataset_and_is_counted(tmp_path, capsys):
    once, twice = tmp_path / "once.csv", tmp_path / "twice.csv"
    once.write_text(_TEXT)
    twice.write_text(_TEXT + _TEXT)
    assert main(["prepare", "--source", "taobao", "--input", str(once), "--out", str(tmp_path / "a"), *SMALL]) == 0
    assert main(["prepare", "--source", "taobao", "--input", str(twice), "--out", str(tmp_path / "b"), *SMALL]) == 0
    assert "200 exact duplicates dropped" in capsys.readouterr().out
    a, b = PreparedDataset.open(tmp_path / "a").manifest, PreparedDataset.open(tmp_path / "b").manifest
    assert a["content_sha256"] == b["content_sha256"] and (a["duplicate_rows"], b["duplicate_rows"]) == (0, 200)


def test_real_head_duplicated_keeps_its_users(tmp_path, capsys):
    """The issue's replay: the Taobao head file twice over used to turn 47 users into 51."""
    from tests.data.test_readers import TAOBAO_HEAD
    if not TAOBAO_HEAD.is_file():
        pytest.skip("the Taobao 5,000-row fixture (../shared/data/taobao-userbehavior-head) is absent")
    twice = tmp_path / "twice.csv"
    twice.write_bytes(TAOBAO_HEAD.read_bytes() * 2)
    hashes = []
    for log, out in ((TAOBAO_HEAD, "a"), (twice, "b")):
        assert main(["prepare", "--source", "taobao", "--input", str(log), "--out", str(tmp_path / out),
                     "--min-clicks", "20"]) == 0
        hashes.append(PreparedDataset.open(tmp_path / out).manifest["content_sha256"])
    assert hashes[0] == hashes[1]


# --- damaged prepared datasets: caught when opened, before any training ---------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    log = root / "ub.csv"
    log.write_text(_TEXT)
    assert main(["prepare", "--source", "taobao", "--input", str(log), "--out", str(root / "data"), *SMALL]) == 0
    return root / "data"


def _edit_manifest(change):
    def apply(path):
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps(change(manifest)))
    return apply


def _truncate(name, keep):
    def apply(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:int(len(data) * keep)])
    return apply


DAMAGE = {
    "half-size train.npy": (_truncate("train.npy", 0.5), ["train.npy", "truncated"]),
    "zero-byte val.npy": (_truncate("val.npy", 0), ["val.npy", "truncated"]),
    "deleted test.npy": (lambda p: (p / "test.npy").unlink(), ["test.npy", "missing"]),
    "n_items too small": (_edit_manifest(lambda m: {**m, "n_items": 5}), ["item_categories.npy", "(5,)"]),
    "n_items too large": (_edit_manifest(lambda m: {**m, "n_items": m["n_items"] + 1}), ["item_categories.npy"]),
    "manifest is a list": (_edit_manifest(lambda m: [m]), ["list"]),
    "manifest lacks protocol": (_edit_manifest(lambda m: {k: v for k, v in m.items() if k != "protocol"}),
                                ["'protocol'", "required"]),
    "max_len a string": (_edit_manifest(lambda m: {**m, "protocol": {**m["protocol"], "max_len": "200"}}),
                         ["protocol.max_len", "integer"]),
    "manifest not json": (lambda p: (p / "manifest.json").write_bytes(b"\xff\x00{"), ["unreadable manifest"]),
    "cut past the user's clicks": (lambda p: _set_field(p, "test.npy", "cut", 10**6), ["cut", "1000000"]),
    "item id past n_items": (lambda p: _set_field(p, "val.npy", "item", 10**6), ["item ids", "1000000"]),
    "trailing bytes": (lambda p: (p / "train.npy").write_bytes((p / "train.npy").read_bytes() + b"x"),
                       ["train.npy", "bytes, expected"]),
}


def _set_field(path, name, field, value):
    samples = np.load(path / name)
    samples[field][0] = value
    np.save(path / name, samples)


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_dataset_fails_at_open(prepared, tmp_path, capsys, name):
    damage, needles = DAMAGE[name]
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    damage(copy)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as info:
        PreparedDataset.open(copy)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert main(["info", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_info_verify_recomputes_the_hash(prepared, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(prepared, copy)
    assert main(["info", "--verify", str(copy)]) == 0 and "verified" in capsys.readouterr().out
    stamps = np.load(copy / "sequences" / "timestamps.npy")
    stamps[0] += 1  # still consistent, so only the hash can tell
    np.save(copy / "sequences" / "timestamps.npy", stamps)
    assert main(["info", str(copy)]) == 0
    capsys.readouterr()
    assert main(["info", "--verify", str(copy)]) == 2 and "content hash mismatch" in capsys.readouterr().err


# --- readers never answer anything but a DataError or a valid result -------------------------------------

def _valid(events) -> None:
    frame = events.frame
    assert frame.height > 0 and frame.columns == ["user", "item", "category", "timestamp", "behavior"]
    assert frame.select(pl.min_horizontal(pl.col("user", "item", "category", "timestamp").min())).item() >= 0
    assert not frame.is_duplicated().any()


_TAOBAO_ALPHABET = "0123456789,-pvbuycartfav\n\r\t \x00\x1f\xff\ufffdé"
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=st.one_of(st.binary(max_size=400),
                      st.text(alphabet=_TAOBAO_ALPHABET, max_size=400).map(lambda t: t.encode("utf-8", "replace")),
                      st.lists(st.sampled_from(_LINES[:5] + ["1,2,3,pv,-1\n", "1,2\n", "\xff,1,1,pv,1\n", "\n"]),
                               max_size=12).map(lambda lines: "".join(lines).encode("latin-1", "replace"))))
def test_taobao_reader_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "ub.csv"
    path.write_bytes(data)
    for skip in (False, True):
        try:
            _valid(read_taobao(path, skip_bad_rows=skip))
        except DataError as err:
            assert "\n" not in str(err)


_TMALL_HEAD = b"user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type\n"


@_SETTINGS
@given(body=st.binary(max_size=300) | st.text(alphabet="0123456789,-\n", max_size=300).map(str.encode))
def test_tmall_and_generic_readers_on_arbitrary_bytes(tmp_path, body):
    tmall, generic = tmp_path / "t.csv", tmp_path / "g.csv"
    tmall.write_bytes(_TMALL_HEAD + body)
    generic.write_bytes(b"u,i,c,t\n" + body)
    for read in (lambda: read_tmall(tmall), lambda: read_generic(generic, columns={
            "user": "u", "item": "i", "category": "c", "timestamp": "t"}, skip_bad_rows=True)):
        try:
            _valid(read())
        except DataError as err:
            assert "\n" not in str(err)


@_SETTINGS
@given(items=st.lists(st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=True, allow_infinity=True)),
                      min_size=1, max_size=20))
def test_parquet_reader_accepts_exactly_the_non_negative_integral_values(tmp_path, items):
    path = tmp_path / "log.parquet"
    values = [float(v) for v in items]
    pl.DataFrame({"u": [1] * len(values), "i": values, "c": [1] * len(values),
                  "t": list(range(len(values)))}).write_parquet(path)
    ok = all(v == v and abs(v) != float("inf") and v >= 0 and v == int(v) and v < 2**63 for v in values)
    try:
        frame = read_generic(path, columns={"user": "u", "item": "i", "category": "c", "timestamp": "t"}).frame
    except DataError:
        assert not ok
    else:
        assert ok and frame["item"].to_list() == [int(v) for v in values]
