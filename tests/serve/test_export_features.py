"""`darec export` of models that read side features: the program takes one input per feature (hist_NAME (U, N),
user_NAME (U,)) and looks candidates' item features up in the item tables it holds. DARE and TWIN trained on
planted brand + behaviour type + time gap data score exactly like the eager Scorer through the torch program
and onnxruntime; a missing or malformed feature is one error naming it; a tampered artifact is refused; a
stored user scored from the export equals `darec serve`'s reply. Numeric features (float values, a float item
table) go through the same inputs."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from darec.cli import main
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.errors import ConfigError, DataError
from darec.models.config import FeatureField
from darec.serve.export import BACKENDS, export_model, load_exported
from darec.serve.history import History
from darec.serve.predict import load_scorer, user_histories
from darec.serve.program_check import INPUT_NAMES
from darec.serve.scorer import Scorer, ScorerModule
from tests.serve.test_export import _copy_tree, _forge, _model

MAX_LEN, TOP_K = 20, 5
PRESETS = ("dare", "twin")
SIDE = SyntheticConfig(n_users=30, n_items=80, n_categories=6, mean_length=225, n_brands=8, brand_loyalty=0.6,
                       strong_fraction=0.2, strong_weight=4.0, time_decay=True)


@pytest.fixture(scope="module")
def side_data(tmp_path_factory) -> PreparedDataset:
    """Planted data with brand (item feature), behaviour type and time gap (context features)."""
    return prepare_synthetic(SIDE, out=tmp_path_factory.mktemp("side") / "data", config=ProtocolConfig(max_len=MAX_LEN))


@pytest.fixture(scope="module")
def trained(side_data, tmp_path_factory):
    """preset -> (run folder, export folder): trained one epoch with every feature, exported by the CLI."""
    root = tmp_path_factory.mktemp("feature_runs")
    runs = {}
    for preset in PRESETS:
        run, out = root / f"run_{preset}", root / f"export_{preset}"
        assert main(["train", "--data", str(side_data.path), "--out", str(run), "--preset", preset, "--dim", "4",
                     "--top-k", str(TOP_K), "--epochs", "1", "--batch-size", "1024", "--device", "cpu",
                     "--features", "all", "--no-progress"]) == 0
        assert main(["export", str(run), "--out", str(out), "--data", str(side_data.path), "--no-progress"]) == 0
        runs[preset] = run, out
    return runs


def _random_batch(g: torch.Generator, spec: dict, u: int, n: int, c: int) -> tuple[History, torch.Tensor, torch.Tensor]:
    """Left-padded histories of varying lengths (user 0: none, user 1: fewer than K) with random codes (or values)
    of every feature the export reads, and random candidates."""
    real = torch.randint(0, n + 1, (u,), generator=g)
    real[:2] = torch.tensor([0, min(n, TOP_K - 2)])
    mask = torch.arange(n).unsqueeze(0) >= (n - real).unsqueeze(1)                          # (U, N)
    items = torch.randint(1, spec["n_items"], (u, n), generator=g) * mask
    cats = torch.randint(1, spec["n_categories"], (u, n), generator=g) * mask
    features, users = {}, {}
    for name, f in spec["features"].items():
        shape = (u,) if f["kind"] == "user" else (u, n)
        value = (torch.randn(shape, generator=g) if f["dtype"] == "float32"
                 else torch.randint(0, f["vocabulary"], shape, generator=g))
        if f["kind"] == "user":
            users[name] = value
        else:
            features[name] = value * mask
    history = History(items=items, categories=cats, mask=mask, features=features, user_features=users)
    return (history, torch.randint(0, spec["n_items"], (u, c), generator=g),
            torch.randint(0, spec["n_categories"], (u, c), generator=g))


def _spec(exported) -> dict:
    return {"n_items": exported.config.n_items, "n_categories": exported.config.n_categories,
            "features": exported.features}


def _assert_parity(scorer: Scorer, out, seed: int) -> None:
    """Torch program and onnxruntime equal the eager Scorer within 1e-5 on random batches of several shapes."""
    loaded = {backend: load_exported(out, backend=backend) for backend in BACKENDS}
    spec = _spec(loaded["torch"])
    g = torch.Generator().manual_seed(seed)
    for u, n, c in [(2, 1, 1), (3, TOP_K, 4), (5, 17, 6), (4, 2 * MAX_LEN, 3)]:
        history, items, cats = _random_batch(g, spec, u, n, c)
        expected = scorer.logits(history, items, cats)
        assert expected.std() > 1e-4  # not a comparison between constants
        for backend, model in loaded.items():
            torch.testing.assert_close(model.logits(history, items, cats), expected, rtol=0, atol=1e-5,
                                       msg=lambda m: f"{backend} {u, n, c}: {m}")


@pytest.mark.parametrize("preset", PRESETS)
def test_trained_feature_models_export_and_score_like_the_scorer(preset, trained, side_data):
    run, out = trained[preset]
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["exported"], manifest["onnx"]
    features = config["model_config"]["features"]  # the model's order
    assert [f["name"] for f in features] == ["behavior", "brand", "time_gap"]
    assert config["input_order"] == [*INPUT_NAMES, *(f"hist_{f['name']}" for f in features)]
    assert [(config["inputs"][f"hist_{f['name']}"]) for f in features] == \
        [{"shape": "(U, N)", "dtype": "int64", "feature": f["name"], "kind": f["kind"], "vocabulary": f["vocabulary"]}
         for f in features]
    assert features[1]["kind"] == "item" and features[1]["vocabulary"] == side_data.feature_specs["brand"]["vocabulary"]
    scorer = load_scorer(run, side_data)
    _assert_parity(scorer, out, seed=sum(map(ord, preset)))
    # stored users, with the features `darec predict` and `darec serve` gather for them
    users = np.arange(side_data.n_users)
    history = user_histories(side_data, users, MAX_LEN)
    g = torch.Generator().manual_seed(5)
    items = torch.randint(1, side_data.n_items, (len(users), 7), generator=g)
    cats = torch.from_numpy(np.asarray(side_data.item_categories, dtype=np.int64))[items]
    expected = scorer.score(history, items, cats)
    for backend in BACKENDS:
        torch.testing.assert_close(load_exported(out, backend=backend).score(history, items, cats), expected,
                                   rtol=0, atol=1e-6)


def test_candidate_item_features_come_from_the_exported_item_table(trained, side_data, tmp_path):
    """The program looks the candidates' brands up itself: the same model exported with another brand table
    scores the same request differently, and equals the Scorer given that other table."""
    run, out = trained["dare"]
    model = load_scorer(run, side_data).model
    table = np.asarray(side_data.item_features["brand"])
    shuffled = np.random.default_rng(0).permutation(table)
    export_model(model, tmp_path / "shuffled", item_features={"brand": shuffled}, onnx=False, progress=False)
    history = user_histories(side_data, np.arange(4), MAX_LEN)
    items = torch.arange(1, 9).repeat(4, 1)
    cats = torch.from_numpy(np.asarray(side_data.item_categories, dtype=np.int64))[items]
    original = load_exported(out).logits(history, items, cats)
    other = load_exported(tmp_path / "shuffled").logits(history, items, cats)
    assert (original - other).abs().max() > 1e-4
    torch.testing.assert_close(other, Scorer(model, item_features={"brand": shuffled}).logits(history, items, cats),
                               rtol=0, atol=1e-5)


def test_missing_or_malformed_features_are_one_error_naming_them(trained):
    _, out = trained["twin"]
    model = load_exported(out)
    g = torch.Generator().manual_seed(0)
    history, items, cats = _random_batch(g, _spec(model), 3, 8, 2)

    def with_features(**changes) -> History:
        features = {**history.features, **changes}
        return History(items=history.items, categories=history.categories, mask=history.mask,
                       features={k: v for k, v in features.items() if v is not None})

    cases = [(with_features(time_gap=None), "history feature 'time_gap' (input hist_time_gap), which the input "
                                            "does not carry"),
             (with_features(brand=history.features["brand"][:, 1:]), "'brand' (input hist_brand) must have shape"),
             (with_features(behavior=history.features["behavior"].float()), "'behavior' (input hist_behavior) must "
                                                                            "be integer codes"),
             (with_features(brand=history.features["brand"] + 100), "history feature 'brand' ids must be in")]
    for bad, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            model.logits(bad, items, cats)
        assert "\n" not in str(info.value)
    extra = with_features(unused=torch.zeros(3, 8))  # features the export does not read are ignored, as by the Scorer
    torch.testing.assert_close(model.logits(extra, items, cats), model.logits(history, items, cats))


def test_check_export_cli_scores_a_feature_export(trained, capsys):
    _, out = trained["dare"]
    assert main(["check-export", str(out)]) == 0
    assert "torch and onnxruntime" in capsys.readouterr().out


def test_exporting_an_item_feature_model_needs_its_dataset(trained, tmp_path, capsys):
    run, _ = trained["dare"]
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "item feature(s) ['brand']" in err and "--data" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _rewrite_config(export_dir, target, edit) -> None:
    """A copy of the export whose config.json is edited and whose manifest carries its new checksum."""
    _copy_tree(export_dir, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    data = json.dumps(config).encode()
    (target / "config.json").write_bytes(data)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (target / "manifest.json").write_text(json.dumps(manifest))


def _guard_on_a_feature(doc, entries):
    doc["guards_code"].append("L['features'][0].size()[0].__class__ is None")


def test_tampered_feature_exports_are_refused(trained, tmp_path):
    _, out = trained["dare"]
    changed = tmp_path / "changed"
    _copy_tree(out, changed)
    data = bytearray((changed / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0x01
    (changed / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch: model.pt2"):
        load_exported(changed)
    with pytest.raises(DataError, match="guard expression"):
        load_exported(_forge(out, tmp_path / "guard", _guard_on_a_feature))
    # config.json names the inputs the program check expects: another name, or one input fewer, is refused
    def rename(config):
        config["inputs"]["hist_x.__class__"] = config["inputs"].pop(config["input_order"][-1])
        config["input_order"][-1] = "hist_x.__class__"

    def drop_last(config):
        del config["inputs"][config["input_order"].pop()]

    _rewrite_config(out, tmp_path / "renamed", rename)
    _rewrite_config(out, tmp_path / "fewer", drop_last)
    for forged, reason in (("renamed", "is not hist_NAME or user_NAME"), ("fewer", "unexpected in_spec")):
        for backend in BACKENDS:
            with pytest.raises(DataError, match=reason if backend == "torch" or forged == "renamed" else "inputs are"):
                load_exported(tmp_path / forged, backend=backend)


def test_a_stored_user_scores_like_darec_serve(trained, side_data):
    """`darec export RUN --out DIR --data DS`, then a stored user's history (what `darec serve` gathers for it)
    through the export: the probabilities `darec serve --checkpoint RUN --data DS` answers."""
    from fastapi.testclient import TestClient

    from darec.data.id_maps import IdMaps
    from darec.serve.app import create_app

    run, out = trained["dare"]
    exported = load_exported(out)
    assert exported.ids_dir == out / "ids"
    ids = IdMaps.open(exported.path)
    users = [3, 17]
    raw_items = ids.decode("item", np.arange(1, 11)).to_list()
    items = torch.from_numpy(ids.encode("item", raw_items)).repeat(len(users), 1)
    cats = torch.from_numpy(np.asarray(side_data.item_categories, dtype=np.int64))[items]
    history = user_histories(side_data, np.array(users), exported.config.max_len)
    probabilities = exported.score(history, items, cats)
    with TestClient(create_app(run, side_data.path)) as client:
        for row, user in enumerate(ids.decode("user", users).to_list()):
            reply = client.post("/score", json={"user": user, "candidates": {"items": raw_items}})
            assert reply.status_code == 200, reply.text
            assert reply.json()["scores"] == pytest.approx(probabilities[row].tolist(), abs=1e-6)


def test_serve_predict_and_score_run_from_the_export_folder(trained, side_data, tmp_path):
    """`--checkpoint EXPORT_DIR`: darec serve, predict and score run the exported program (no checkpoint, no
    model code) and answer what the training run answers; a GPU device or another dataset is one line."""
    import polars as pl
    from fastapi.testclient import TestClient

    from darec.data.id_maps import IdMaps
    from darec.serve.app import create_app
    from darec.serve.export import ExportedModel

    run, out = trained["dare"]
    assert isinstance(load_scorer(out, side_data), ExportedModel)
    ids = IdMaps.open(side_data.path)
    users, raw_items = ids.decode("user", [2, 9]).to_list(), ids.decode("item", np.arange(1, 40, 3)).to_list()
    replies = {}
    for source in (run, out):
        with TestClient(create_app(source, side_data.path)) as client:
            replies[source] = [client.post("/score", json={"user": u, "candidates": {"items": raw_items}}).json()
                               for u in users]
    for from_run, from_export in zip(replies[run], replies[out], strict=True):
        assert from_export["scores"] == pytest.approx(from_run["scores"], abs=1e-6)
        assert np.std(from_run["scores"]) > 1e-4
    rows = tmp_path / "rows.csv"
    pl.DataFrame({"user": np.repeat(users, len(raw_items)), "item": raw_items * len(users)}).write_csv(rows)
    for source, name in ((run, "run"), (out, "export")):
        assert main(["predict", "--checkpoint", str(source), "--data", str(side_data.path), "--input", str(rows),
                     "--out", str(tmp_path / f"{name}.parquet")]) == 0
    np.testing.assert_allclose(pl.read_parquet(tmp_path / "export.parquet")["probability"].to_numpy(),
                               pl.read_parquet(tmp_path / "run.parquet")["probability"].to_numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="an export runs on CPU"):
        load_scorer(out, side_data, device="cuda")
    other = prepare_synthetic(dataclasses.replace(SIDE, seed=SIDE.seed + 1), out=tmp_path / "other",
                              config=ProtocolConfig(max_len=MAX_LEN))  # the same vocabularies, other events
    with pytest.raises(ConfigError, match="made with another dataset"):
        load_scorer(out, other)


NUMERIC = (FeatureField("brand", 6, "item"), FeatureField("price", 1, "item", numeric=True),
           FeatureField("dwell", 1, "context", "both", numeric=True), FeatureField("behavior", 3, "context", "score"),
           FeatureField("segment", 4, "user"))


@pytest.mark.parametrize("preset", ["dare", "twin", "sdim"])
def test_numeric_and_user_features_export_with_float_inputs(preset, tmp_path):
    """Random weights: a float item table (price), a float behaviour input (dwell), a user code (segment)."""
    model = _model(preset, features=NUMERIC)
    rng = np.random.default_rng(0)
    tables = {"brand": rng.integers(0, 6, model.config.n_items),
              "price": rng.normal(size=model.config.n_items).astype(np.float32)}
    export_model(model, tmp_path / "export", item_features=tables, progress=False)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    order = config["input_order"]
    assert [(name, config["inputs"][name]["shape"], config["inputs"][name]["dtype"]) for name in order[6:]] == [
        ("hist_brand", "(U, N)", "int64"), ("hist_price", "(U, N)", "float32"), ("hist_dwell", "(U, N)", "float32"),
        ("hist_behavior", "(U, N)", "int64"), ("user_segment", "(U,)", "int64")]
    assert ScorerModule(model, item_features=tables).input_names == tuple(order)
    _assert_parity(Scorer(model, item_features=tables), tmp_path / "export", seed=7)


def _pickled_constant(doc, entries):
    """A tensor constant whose payload torch would unpickle (torch.load(weights_only=False) on its bytes)."""
    config_name = next(n for n in entries if n.endswith("model_constants_config.json"))
    config = json.loads(entries[config_name])
    config["config"]["lifted_tensor_9"] = {"path_name": "tensor_9", "is_param": False, "use_pickle": True}
    entries[config_name] = json.dumps(config).encode()
    entries[config_name.replace("model_constants_config.json", "tensor_9")] = b"pickle"


def test_tensor_constants_are_refused(trained, tmp_path):
    """darec's programs make no tensor constants (a numeric feature's score part uses arange, not tensor([..])),
    so a program carrying one, here one torch would unpickle, is not darec's."""
    _, out = trained["dare"]
    with pytest.raises(DataError, match="unexpected archive entry 'data/constants/tensor_9'"):
        load_exported(_forge(out, tmp_path / "forged", _pickled_constant))


def test_models_without_features_keep_the_six_inputs(tmp_path):
    """The six inputs, described as before; an export written before `input_order` existed still loads."""
    model = _model("dare")
    module = ScorerModule(model)
    assert module.input_names == INPUT_NAMES and module.feature_inputs == ()
    assert not [name for name, _ in module.named_buffers() if name.startswith("item_table_")]
    export_model(model, tmp_path / "export", onnx=False, progress=False)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["input_order"] == list(INPUT_NAMES) and config["inputs"] == {
        name: {"shape": "(U, C)" if name.startswith("cand") else "(U, N)",
               "dtype": "bool" if name == "hist_mask" else "int64"} for name in INPUT_NAMES}
    _rewrite_config(tmp_path / "export", tmp_path / "older", lambda c: c.pop("input_order"))
    history, items, cats = _random_batch(torch.Generator().manual_seed(0), {"n_items": model.config.n_items,
                                         "n_categories": model.config.n_categories, "features": {}}, 3, 9, 4)
    torch.testing.assert_close(load_exported(tmp_path / "older").logits(history, items, cats),
                               Scorer(model).logits(history, items, cats), rtol=0, atol=1e-5)


def test_feature_names_that_cannot_be_input_names_are_refused(tmp_path):
    model = _model("dare", features=(FeatureField("time gap", 5, "context", "score"),))
    with pytest.raises(ConfigError, match="is not hist_NAME or user_NAME"):
        export_model(model, tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists()
