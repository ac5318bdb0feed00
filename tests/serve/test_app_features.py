"""`darec serve` with a feature model: an explicit history carrying raw side-feature values (dictionary and hash
features, behaviour type, time fields from the timestamps, user features) scores exactly like the stored user
it was read from; every missing, mis-sized, mis-typed or unknown value is a 4xx naming its field."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from darec.checkpoint import save_checkpoint
from darec.data.id_maps import IdMaps, feature_kind
from darec.data.loader import feature_fields
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.models import build_model, preset_config
from darec.serve.app import create_app
from tests.models.test_model_features import prepare_features

with warnings.catch_warnings():  # starlette asks for httpx2, which is not needed here
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

# the generic log of tests/models (string ids; brand and shop are functions of the item, `item-i` -> b{i % 5},
# s{i % 3}) with shop hashed, behaviour types, every time field and a user feature
LOG_SCHEMA = """
behaviors: [pv, buy, cart]
targets: [pv]
features:
  - {name: item, column: item}
  - {name: category, column: category}
  - {name: brand, column: brand}
  - {name: shop, column: shop, encoding: hash, buckets: 7}
behavior_type: true
time: {gap: true, gap_buckets: 12, hour: true, weekday: true}
user_features: [{name: segment, column: seg}]
"""
# the planted data (integer ids) with brands, buys among the clicks and sessions decaying in time
PLANTED = SyntheticConfig(n_users=12, n_items=120, n_categories=6, mean_length=225, n_brands=8,
                          brand_loyalty=0.5, strong_fraction=0.2, strong_weight=4.0, time_decay=True)
MAX_LEN = 20


def _served(dataset: PreparedDataset, folder: Path, preset: str = "dare") -> Path:
    """An untrained, seeded feature model reading every feature of `dataset` (exact parity needs weights, not
    training), saved as a checkpoint."""
    config = preset_config(preset, n_items=dataset.n_items, n_categories=dataset.n_categories, dim=4,
                           max_len=MAX_LEN, features=feature_fields(dataset), init_std=0.2)
    torch.manual_seed(3)
    save_checkpoint(folder / "best.pt", {"model_config": config.to_dict(), "model": build_model(config).state_dict(),
                                         "step": 1})
    return folder / "best.pt"


@pytest.fixture(scope="module")
def log_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("log_features")
    dataset = prepare_features(folder, LOG_SCHEMA)
    return dataset, _served(dataset, folder)


@pytest.fixture(scope="module")
def planted_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_features")
    dataset = prepare_synthetic(PLANTED, out=folder / "data", config=ProtocolConfig(max_len=MAX_LEN))
    return dataset, _served(dataset, folder, "twin")


def _raw_history(dataset: PreparedDataset, row: int) -> dict:
    """Stored user `row`'s whole history (longer than MAX_LEN) as a client would send it: raw ids, raw feature
    values (dictionary codes decoded through their maps; shop from the item, as the log derives it), timestamps."""
    ids = IdMaps.open(dataset.path)
    lo, hi = int(dataset.offsets[row]), int(dataset.offsets[row + 1])
    items = ids.decode("item", np.asarray(dataset.items[lo:hi])).to_list()
    features = {}
    for name, spec in dataset.feature_specs.items():
        if spec["level"] != "behavior" or spec["kind"] != "categorical":
            continue
        if spec["encoding"] == "hash":  # no map: the raw value, as the log wrote it
            features[name] = [f"s{int(item.removeprefix('item-')) % 3}" for item in items]
        else:
            features[name] = ids.decode(feature_kind(name), np.asarray(dataset.event_features[name][lo:hi])).to_list()
    users = {name: ids.decode(feature_kind(name), [int(codes[row])]).to_list()[0]
             for name, codes in dataset.user_features.items()}
    history = {"items": items, "categories": ids.decode("category", np.asarray(dataset.categories[lo:hi])).to_list(),
               "timestamps": np.asarray(dataset.timestamps[lo:hi]).tolist(), "features": features}
    return history | ({"user_features": users} if users else {})


def _candidates(dataset: PreparedDataset) -> list:
    return IdMaps.open(dataset.path).decode("item", np.arange(1, dataset.n_items, 3)).to_list()


@pytest.mark.parametrize("served", ["log_app", "planted_app"])
def test_explicit_history_scores_exactly_like_the_stored_user(served, request):
    dataset, checkpoint = request.getfixturevalue(served)
    ids = IdMaps.open(dataset.path)
    candidates = _candidates(dataset)
    app = create_app(checkpoint, dataset.path, threads=None)
    with TestClient(app) as client:
        for row in (0, 3, dataset.n_users - 1):
            user = ids.decode("user", [row]).to_list()[0]
            stored = client.post("/score", json={"user": user, "candidates": {"items": candidates}})
            given = client.post("/score", json={"history": _raw_history(dataset, row),
                                                "candidates": {"items": candidates}})
            assert stored.status_code == given.status_code == 200, given.text
            assert np.std(stored.json()["scores"]) > 1e-4  # not a comparison between constants
            assert given.json() == stored.json()
        # in one batch, stored and explicit rows side by side (one Scorer call): both equal the reply alone to
        # float rounding (rows of one batch go through other kernel paths: 3e-8 apart here)
        model = app.state.model
        body = {"candidates": {"items": candidates}}
        requests = [model.request_model.model_validate(body | {"user": ids.decode("user", [1]).to_list()[0]}),
                    model.request_model.model_validate(body | {"history": _raw_history(dataset, 1)})]
        together = model.score_batch([model.encode(r) for r in requests])
        alone = client.post("/score", json=body | {"history": _raw_history(dataset, 1)}).json()["scores"]
        for body in together:
            np.testing.assert_allclose(json.loads(body)["scores"], alone, rtol=0, atol=1e-6)


def test_explicit_feature_values_are_validated_and_named(log_app):
    dataset, checkpoint = log_app
    history = _raw_history(dataset, 2)
    candidates = {"items": _candidates(dataset)[:4]}

    def post(client, **changes):
        return client.post("/score", json={"history": history | changes, "candidates": candidates})

    def features(**changes):
        return history["features"] | changes

    with TestClient(create_app(checkpoint, dataset.path, threads=None)) as client:
        cases = {
            "history.features.brand": post(client, features={k: v for k, v in features().items() if k != "brand"}),
            "features.shop has": post(client, features=features(shop=features()["shop"][1:])),
            "history.features.colour": post(client, features=features(colour=features()["shop"])),
            "history.features.behavior": post(client, features=features(behavior=[1] + features()["behavior"][1:])),
            "history.timestamps": post(client, timestamps=None),
            "history.user_features.age": post(client, user_features={"age": "g1"}),
        }
        for words, response in cases.items():
            assert response.status_code == 422 and words in response.json()["detail"], (words, response.text)
        fractional = post(client, timestamps=[t + 0.5 for t in history["timestamps"]])
        assert fractional.status_code == 422 and "whole seconds" in fractional.json()["detail"]
        unknown = post(client, features=features(brand=["no-such-brand"] + features()["brand"][1:]))
        assert unknown.status_code == 404 and "history.features.brand: 1 brand value(s)" in unknown.json()["detail"]
        stranger = post(client, user_features={"segment": "no-such-segment"})
        assert stranger.status_code == 404 and "history.user_features.segment" in stranger.json()["detail"]
        assert post(client).status_code == 200

    # under oov an unknown value is the missing code 0, like a null; a user feature not sent is missing too
    with TestClient(create_app(checkpoint, dataset.path, threads=None, unknown="oov")) as client:
        first = len(history["items"]) - 1  # the most recent behaviour: within max_len
        unknown = post(client, features=features(brand=features()["brand"][:first] + ["?"]))
        null = post(client, features=features(brand=features()["brand"][:first] + [None]))
        assert unknown.status_code == null.status_code == 200 and unknown.json() == null.json()
        assert unknown.json() != post(client).json()
        absent = {k: v for k, v in history.items() if k != "user_features"}
        missing = client.post("/score", json={"history": absent, "candidates": candidates})
        assert missing.json() == post(client, user_features={"segment": "no-such-segment"}).json()


def test_time_features_are_computed_at_the_request_time(log_app):
    """Default time = the latest behaviour's (what stored users get); a later time moves every time gap."""
    dataset, checkpoint = log_app
    history = _raw_history(dataset, 4)
    candidates = {"items": _candidates(dataset)}
    with TestClient(create_app(checkpoint, dataset.path, threads=None)) as client:
        latest = max(history["timestamps"])
        scores = [client.post("/score", json={"history": history | extra, "candidates": candidates}).json()["scores"]
                  for extra in ({}, {"time": latest}, {"time": latest + 86_400})]
    assert scores[0] == scores[1] != scores[2]


def test_explicit_history_order_comes_from_the_timestamps(planted_app):
    dataset, checkpoint = planted_app
    history = _raw_history(dataset, 5)
    assert len(set(history["timestamps"])) == len(history["timestamps"])  # a strict order to recover
    order = np.random.default_rng(0).permutation(len(history["items"]))
    shuffled = {key: [values[i] for i in order] for key, values in history.items() if key != "features"}
    shuffled["features"] = {name: [values[i] for i in order] for name, values in history["features"].items()}
    candidates = {"items": _candidates(dataset)}
    with TestClient(create_app(checkpoint, dataset.path, threads=None)) as client:
        replies = [client.post("/score", json={"history": h, "candidates": candidates}).json()
                   for h in (history, shuffled)]
    assert replies[0] == replies[1]


def test_numeric_features_of_an_explicit_history_are_normalised_as_prepare_did(tmp_path):
    """Raw numbers sent for a numeric behaviour feature go through the normalisation recorded in the manifest:
    the stored user's raw dwell values (the log's, ts % 13) score like the stored user; a string is a 422."""
    import polars as pl

    from tests.models.test_model_features import write_feature_log

    log = write_feature_log(tmp_path / "log.csv")
    pl.read_csv(log).with_columns(dwell=pl.col("ts") % 13).write_csv(log)
    dataset = prepare_features(tmp_path, LOG_SCHEMA + "numeric: [{name: dwell, column: dwell}]\n")
    checkpoint = _served(dataset, tmp_path)
    history = _raw_history(dataset, 0)
    history["features"]["dwell"] = (np.asarray(history["timestamps"]) % 13).tolist()  # as the log wrote them
    candidates = {"items": _candidates(dataset)}
    with TestClient(create_app(checkpoint, dataset.path, threads=None)) as client:
        user = IdMaps.open(dataset.path).decode("user", [0]).to_list()[0]
        stored = client.post("/score", json={"user": user, "candidates": candidates})
        given = client.post("/score", json={"history": history, "candidates": candidates})
        history["features"]["dwell"] = ["long"] + history["features"]["dwell"][1:]
        refused = client.post("/score", json={"history": history, "candidates": candidates})
    assert stored.status_code == given.status_code == 200, given.text
    np.testing.assert_allclose(given.json()["scores"], stored.json()["scores"], rtol=0, atol=1e-6)
    assert refused.status_code == 422 and refused.json()["detail"].startswith("history.features.dwell: values must")
