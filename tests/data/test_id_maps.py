"""Raw <-> internal id maps: written by prepare/synth, exact round trips on real logs, encode/decode rules."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darec.data.id_maps import ID_FILES, IdMaps, RawIdError, feature_kind, write_id_maps
from darec.data.pipeline import SHIPPED_MOVIELENS, prepare
from darec.data.protocol import ProtocolConfig
from darec.data.readers import read_movielens, read_taobao
from darec.data.store import PreparedDataset
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared beside the checkout
TAOBAO_HEAD = SHARED / "data" / "taobao-userbehavior-head" / "UserBehavior.csv"


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> PreparedDataset:
    return prepare(source="movielens", out=tmp_path_factory.mktemp("ml") / "ml",
                   config=ProtocolConfig(targets="dense"))


def _assert_maps_invert_the_log(dataset: PreparedDataset, events: pl.DataFrame, min_clicks: int) -> None:
    """Decoding every stored click gives back exactly the raw log's clicks of the kept users."""
    maps = dataset.id_maps()
    lengths = np.diff(np.asarray(dataset.offsets))
    decoded = pl.DataFrame({
        "user": maps.decode("user", np.repeat(np.arange(dataset.n_users), lengths)),
        "item": maps.decode("item", np.asarray(dataset.items)),
        "category": maps.decode("category", np.asarray(dataset.categories)),
        "timestamp": np.asarray(dataset.timestamps),
    })
    raw = events.select("user", "item", "category", "timestamp").with_columns(pl.col("user", "item").cast(pl.Int64))
    if raw["category"].dtype.is_integer():
        raw = raw.with_columns(pl.col("category").cast(pl.Int64))
    kept = raw.group_by("user").len().filter(pl.col("len") >= min_clicks)["user"]
    expected = raw.filter(pl.col("user").is_in(kept.implode()))
    assert decoded.null_count().sum_horizontal().item() == 0
    assert decoded.sort(pl.all()).equals(expected.sort(pl.all()))
    assert sorted(maps.decode("user", np.arange(dataset.n_users)).to_list()) == sorted(kept.to_list())
    for kind, first, size in (("user", 0, dataset.n_users), ("item", 1, dataset.n_items - 1),
                              ("category", 1, dataset.n_categories - 1)):
        ids = np.arange(first, first + size)
        raw_ids = maps.decode(kind, ids)
        assert maps.size(kind) == size and raw_ids.n_unique() == size
        np.testing.assert_array_equal(maps.encode(kind, raw_ids), ids)                 # internal -> raw -> internal
        np.testing.assert_array_equal(maps.encode(kind, raw_ids.cast(pl.String)), ids)  # as CSV/HTTP text
        assert maps.decode(kind, maps.encode(kind, raw_ids.reverse())).equals(raw_ids.reverse().alias(kind))


def test_movielens_maps_round_trip(movielens):
    events = read_movielens(SHIPPED_MOVIELENS).frame
    _assert_maps_invert_the_log(movielens, events, min_clicks=20)
    maps = movielens.id_maps()
    assert maps.raw_dtype("user") == pl.Int64 and maps.raw_dtype("category") == pl.String  # genres stay text
    assert set(movielens.manifest["files"]) >= set(ID_FILES.values())


def test_taobao_maps_round_trip(tmp_path):
    if not TAOBAO_HEAD.is_file():
        pytest.skip("the Taobao 5,000-row fixture (../shared/data/taobao-userbehavior-head) is absent")
    config = ProtocolConfig(targets="dense", min_clicks=20)
    dataset = prepare(source="taobao", input=TAOBAO_HEAD, out=tmp_path / "tb", config=config)
    _assert_maps_invert_the_log(dataset, read_taobao(TAOBAO_HEAD).frame, min_clicks=20)


def test_synth_writes_maps_matching_the_planted_truth(tiny_planted_dir):
    maps = IdMaps.open(tiny_planted_dir)
    assert maps.decode("user", np.arange(maps.size("user"))).to_list() == list(range(1, 31))  # generator's ids
    with np.load(tiny_planted_dir / "planted_truth.npz") as truth:
        categories = truth["category_raw_ids"]
    np.testing.assert_array_equal(maps.decode("category", np.arange(1, len(categories) + 1)).to_numpy(), categories)


raw_ints = st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40, unique=True)
raw_texts = st.lists(st.text(st.characters(codec="utf-8"), min_size=0, max_size=8), min_size=1, max_size=40,
                     unique=True)


@settings(max_examples=60, deadline=None)
@given(users=st.one_of(raw_ints, raw_texts), items=st.one_of(raw_ints, raw_texts), data=st.data())
def test_encode_decode_property(users, items, data):
    with tempfile.TemporaryDirectory() as folder:
        write_id_maps(folder, {"user": pl.Series(users), "item": pl.Series(items), "category": pl.Series(["c"])})
        maps = IdMaps.open(folder)
        for kind, raw, first in (("user", users, 0), ("item", items, 1)):
            order = data.draw(st.permutations(range(len(raw))))
            asked = [raw[i] for i in order]
            expected = np.array(order) + first                                     # position in the file + first id
            np.testing.assert_array_equal(maps.encode(kind, asked), expected)
            assert maps.decode(kind, expected).to_list() == asked
            assert maps.known(kind, asked).all()
            if isinstance(raw[0], int):  # integer ids given as text (a CSV cell, an HTTP field) find the same ids
                np.testing.assert_array_equal(maps.encode(kind, [str(v) for v in asked]), expected)
            absent = max(raw) + 1 if isinstance(raw[0], int) else "".join(raw) + "x"
            assert maps.encode(kind, [absent], unknown="oov")[0] == maps.oov_id(kind)
            assert not maps.known(kind, [absent])[0]


@pytest.fixture
def small_maps(tmp_path) -> IdMaps:
    write_id_maps(tmp_path, {"user": pl.Series([170, 5, 9], dtype=pl.Int32), "item": pl.Series([30, 10, 20]),
                             "category": pl.Series(["Drama", "Comedy"])})
    return IdMaps.open(tmp_path)


def test_encode_compares_as_the_raw_dtype(small_maps):
    assert small_maps.encode("user", ["170", " 5", 9]).tolist() == [0, 1, 2]
    assert small_maps.encode("user", np.array([9.0, 170.0])).tolist() == [2, 0]  # integral floats are ints
    assert small_maps.encode("user", np.array([170, "9"], dtype=object)).tolist() == [0, 2]
    assert small_maps.encode("category", ["Comedy", "Drama"]).tolist() == [2, 1]
    assert small_maps.decode("item", [3, 0, 1]).to_list() == [20, None, 30]  # padding decodes to null
    assert small_maps.decode("user", [-1, 2]).to_list() == [None, 9]


@pytest.mark.parametrize(("raw", "words"), [
    (["5", "u170"], ["not an integer", "u170"]),
    ([5, None], ["missing value"]),
    ([5.5], ["not an integer", "5.5"]),
    ([5, 7, 8], ["not in the dataset", "2 of 3", "[7, 8]"]),
])
def test_encode_errors_name_the_value_and_position(small_maps, raw, words):
    with pytest.raises(RawIdError) as caught:
        small_maps.encode("user", raw)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    assert caught.value.position == next(i for i, v in enumerate(raw) if v not in (5, "5"))


def test_oov_policy(small_maps):
    assert small_maps.encode("item", [10, 99], unknown="oov").tolist() == [2, 0]       # padding row
    assert small_maps.encode("user", [5, 99], unknown="oov").tolist() == [1, -1]       # user 0 is real
    assert small_maps.known("user", ["u1", 170, None]).tolist() == [False, True, False]
    with pytest.raises(RawIdError, match="not an integer"):                            # malformed: oov or not
        small_maps.encode("item", ["x"], unknown="oov")
    with pytest.raises(DataError, match=r"\[-1, 3\)"):
        small_maps.decode("user", [3])


def test_old_dataset_without_maps_opens_but_has_no_maps(movielens, tmp_path):
    old = tmp_path / "old"
    prepare(source="movielens", out=old, config=ProtocolConfig(targets="dense"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if not f.startswith("ids/")]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for file in ID_FILES.values():
        (old / file).unlink()
    dataset = PreparedDataset.open(old)  # still trains
    with pytest.raises(DataError, match="no raw-id maps"):
        dataset.id_maps()


def test_open_checks_the_maps_row_counts(tmp_path):
    data = tmp_path / "d"
    prepare_synthetic(SyntheticConfig(n_users=12, n_items=40, n_categories=5), out=data)
    pl.DataFrame({"raw": [1, 2], "id": [0, 1]}).write_parquet(data / ID_FILES["user"])
    with pytest.raises(DataError, match="id map has 2 rows, the dataset has 12 users"):
        PreparedDataset.open(data)


@settings(max_examples=80, deadline=None)
@given(stored=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30, unique=True),
       asked=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30), data=st.data())
def test_integer_arrays_encode_exactly_as_the_general_path(stored, asked, data):
    """A numpy integer array takes the numpy-only path; it must agree with the same ids given as a list
    (polars' conversion) on ids, unknown flags and the error it raises."""
    asked = asked + data.draw(st.lists(st.sampled_from(stored), max_size=30)) if stored else asked
    asked = data.draw(st.permutations(asked))
    with tempfile.TemporaryDirectory() as folder:
        write_id_maps(folder, {"user": pl.Series(stored, dtype=pl.Int64), "item": pl.Series([1]),
                               "category": pl.Series(["c"])})
        maps = IdMaps.open(folder)
        dtypes = [np.int64] + [t for t in (np.int32, np.int8, np.uint32, np.uint8)
                               if all(np.iinfo(t).min <= v <= np.iinfo(t).max for v in asked)]
        for dtype in dtypes:
            array = np.array(asked, dtype=dtype)
            np.testing.assert_array_equal(maps.encode("user", array, unknown="oov"),
                                          maps.encode("user", asked, unknown="oov"))
            np.testing.assert_array_equal(maps.known("user", array), maps.known("user", asked))
            outcomes = []
            for raw in (array, asked):
                try:
                    outcomes.append(maps.encode("user", raw).tolist())
                except RawIdError as err:
                    outcomes.append((str(err), err.position, err.value))
            assert outcomes[0] == outcomes[1]


def test_dictionary_feature_maps_encode_like_ids(tmp_path):
    """ids/features/NAME.parquet (codes 1..n, 0 = missing) is read under feature_kind(NAME) with the id rules."""
    write_id_maps(tmp_path, {"user": pl.Series([1]), "item": pl.Series([1]), "category": pl.Series(["c"])})
    (tmp_path / "ids" / "features").mkdir()
    pl.DataFrame({"raw": ["b7", "b2"], "id": [1, 2]}).write_parquet(tmp_path / "ids" / "features" / "brand.parquet")
    maps = IdMaps.open(tmp_path)
    brand = feature_kind("brand")
    assert maps.encode(brand, ["b2", "b7"]).tolist() == [2, 1] and maps.raw_dtype(brand) == pl.String
    assert maps.encode(brand, ["b2", "b9"], unknown="oov").tolist() == [2, 0] and maps.oov_id(brand) == 0
    assert maps.decode(brand, [0, 2]).to_list() == [None, "b2"]
    with pytest.raises(RawIdError, match="brand.parquet"):
        maps.encode(brand, ["b9"])
    for bad in ("feature:../users", "feature:Brand", "brand"):
        with pytest.raises(DataError, match="id kind"):
            maps.encode(bad, ["b2"])
