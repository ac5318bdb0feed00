"""`darec serve`: raw-id requests scored like the training model; every bad request a 4xx, never a 500."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings

import httpx
import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from darec.cli import main
from darec.data.batch import Batch
from darec.data.store import PreparedDataset
from darec.serve.app import SETTINGS_ENV, IntId, ScoreRequest, StrId, app_from_environment, create_app
from tests.helpers import tiny_dare_checkpoint

with warnings.catch_warnings():  # starlette asks for httpx2, which is not needed here
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

MAX_LEN = 50


@pytest.fixture(scope="module")
def served(tiny_planted_dir, tmp_path_factory):
    """A tiny untrained DARE model (max_len 50 < every stored history) saved as a run directory."""
    dataset = PreparedDataset.open(tiny_planted_dir)
    run = tmp_path_factory.mktemp("run")
    model = tiny_dare_checkpoint(run / "best.pt", dataset, max_len=MAX_LEN)
    return model, run, tiny_planted_dir, dataset


@pytest.fixture(scope="module")
def client(served):
    _, run, data, _ = served
    with TestClient(create_app(run, data, max_candidates=30, max_history=300, threads=None)) as c:
        yield c


def _maps(data) -> dict[str, dict]:
    """raw -> internal id per kind, read straight from the parquet files (not through IdMaps)."""
    frames = {kind: pl.read_parquet(data / "ids" / f"{kind}.parquet") for kind in ("users", "items", "categories")}
    return {kind: dict(zip(frame["raw"].to_list(), frame["id"].to_list())) for kind, frame in frames.items()}


def _expected(model, hist_items, hist_cats, cand_items, cand_cats) -> np.ndarray:
    """The training forward pass, one row per candidate, on a history of internal ids (oldest first)."""
    n, c = len(hist_items), len(cand_items)
    rep = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64)).expand(c, n)  # noqa: E731
    batch = Batch(hist_items=rep(hist_items), hist_categories=rep(hist_cats),
                  hist_positions=torch.arange(n, 0, -1).expand(c, n), mask=rep(hist_items) != 0,
                  target_item=torch.as_tensor(cand_items, dtype=torch.int64),
                  target_category=torch.as_tensor(cand_cats, dtype=torch.int64),
                  label=torch.zeros(c), user=torch.zeros(c, dtype=torch.int64))
    with torch.no_grad():
        return torch.sigmoid(model(batch).logit).numpy()


def _raw(maps: dict, kind: str, internal) -> list:
    inverse = {v: k for k, v in maps[kind].items()}
    return [inverse[int(i)] for i in internal]


def test_healthz_names_the_model(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["model"]["max_len"] == MAX_LEN and body["model"]["attention_dim"] == 4
    assert body["limits"]["max_candidates"] == 30


def test_score_by_user_equals_training_forward_on_the_stored_history(client, served):
    model, _, data, dataset = served
    maps = _maps(data)
    row = 7
    user = _raw(maps, "users", [row])[0]
    cand_internal = np.array([3, 17, 5, 30, 11])
    cand_raw = _raw(maps, "items", cand_internal)
    response = client.post("/score", json={"user": user, "candidates": {"items": cand_raw}, "top_k": 3})
    assert response.status_code == 200, response.text
    result = response.json()

    lo, hi = int(dataset.offsets[row]), int(dataset.offsets[row + 1])
    hist = np.asarray(dataset.items[hi - MAX_LEN:hi]), np.asarray(dataset.categories[hi - MAX_LEN:hi])
    expected = _expected(model, *hist, cand_internal, np.asarray(dataset.item_categories)[cand_internal])
    assert expected.std() > 1e-4  # not a comparison between constants
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-5, atol=1e-7)
    order = np.argsort(-expected)[:3]
    assert result["top"]["items"] == [cand_raw[i] for i in order]
    np.testing.assert_allclose(result["top"]["scores"], expected[order], rtol=1e-5)
    assert result["history_length"] == MAX_LEN < hi - lo and result["unknown_candidates"] == []


def test_score_by_explicit_history_with_categories_and_timestamps(client, served):
    model, _, data, _ = served
    maps = _maps(data)
    rng = np.random.default_rng(0)
    n = MAX_LEN + 10  # longer than max_len: only the most recent MAX_LEN count
    items, cats = rng.integers(1, 41, n), rng.integers(1, 7, n)
    cand, cand_cats = np.array([2, 9, 4]), np.array([1, 6, 2])
    times = np.arange(n) * 10.0
    shuffle = rng.permutation(n)  # sent in any order, put back in time order by the timestamps
    body = {"history": {"items": _raw(maps, "items", items[shuffle]), "categories": _raw(maps, "categories", cats[shuffle]),
                        "timestamps": times[shuffle].tolist()},
            "candidates": {"items": _raw(maps, "items", cand), "categories": _raw(maps, "categories", cand_cats)}}
    response = client.post("/score", json=body)
    assert response.status_code == 200, response.text
    expected = _expected(model, items[-MAX_LEN:], cats[-MAX_LEN:], cand, cand_cats)
    np.testing.assert_allclose(response.json()["scores"], expected, rtol=1e-5, atol=1e-7)
    assert response.json()["history_length"] == MAX_LEN


def test_empty_explicit_history_is_scored(client, served):
    item = next(iter(_maps(served[2])["items"]))
    response = client.post("/score", json={"history": {"items": []}, "candidates": {"items": [item]}})
    assert response.status_code == 200 and response.json()["history_length"] == 0


def _bad_requests(user, item) -> dict[str, tuple[dict, int]]:
    """Class -> (httpx keyword arguments, expected status)."""
    def body(**fields):
        return {"json": {"user": user, "candidates": {"items": [item]}, **fields}}
    return {
        "invalid_json": ({"content": b'{"user": ', "headers": {"content-type": "application/json"}}, 422),
        "not_utf8": ({"content": b"\xff\xfe{", "headers": {"content-type": "application/json"}}, 400),
        "too_deeply_nested": ({"content": b"[" * 100_000 + b"]" * 100_000,
                               "headers": {"content-type": "application/json"}}, 400),
        "not_an_object": ({"json": [1, 2]}, 422),
        "null_body": ({"json": None}, 422),
        "no_content_type": ({"content": b'{"user": 1}'}, 422),
        "missing_candidates": ({"json": {"user": user}}, 422),
        "neither_user_nor_history": ({"json": {"candidates": {"items": [item]}}}, 422),
        "user_and_history": (body(history={"items": [item]}), 422),
        "unknown_field": (body(extra=1), 422),
        "string_item_for_integer_ids": ({"json": {"user": user, "candidates": {"items": [str(item)]}}}, 422),
        "float_item": ({"json": {"user": user, "candidates": {"items": [1.5]}}}, 422),
        "bool_user": ({"json": {"user": True, "candidates": {"items": [item]}}}, 422),
        "id_beyond_int64": ({"json": {"user": 2 ** 70, "candidates": {"items": [item]}}}, 422),
        "nested_list": ({"json": {"user": user, "candidates": {"items": [[item]]}}}, 422),
        "empty_candidates": ({"json": {"user": user, "candidates": {"items": []}}}, 422),
        "top_k_zero": (body(top_k=0), 422),
        "categories_length_mismatch": ({"json": {"user": user, "candidates": {"items": [item, item],
                                                                              "categories": [1]}}}, 422),
        "timestamps_length_mismatch": ({"json": {"history": {"items": [item], "timestamps": [1, 2]},
                                                 "candidates": {"items": [item]}}}, 422),
        "nan_timestamp": ({"content": b'{"history": {"items": [%d], "timestamps": [NaN]}, "candidates": {"items": [%d]}}'
                                      % (item, item), "headers": {"content-type": "application/json"}}, 422),
        "unknown_user": ({"json": {"user": -5, "candidates": {"items": [item]}}}, 404),
        "unknown_item": ({"json": {"user": user, "candidates": {"items": [item, 10 ** 9]}}}, 404),
        "unknown_history_item": ({"json": {"history": {"items": [10 ** 9]}, "candidates": {"items": [item]}}}, 404),
        "unknown_category": ({"json": {"user": user, "candidates": {"items": [item], "categories": [10 ** 9]}}}, 404),
        "too_many_candidates": ({"json": {"user": user, "candidates": {"items": [item] * 31}}}, 413),
        "history_too_long": ({"json": {"history": {"items": [item] * 301}, "candidates": {"items": [item]}}}, 413),
    }


@pytest.mark.parametrize("case", list(_bad_requests(0, 0)))
def test_bad_request_is_the_right_4xx_with_a_message(client, served, case):
    maps = _maps(served[2])
    kwargs, status = _bad_requests(next(iter(maps["users"])), next(iter(maps["items"])))[case]
    response = client.post("/score", **kwargs)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def test_unknown_user_is_404_even_under_oov(served):
    _, run, data, _ = served
    with TestClient(create_app(run, data, unknown="oov", threads=None)) as c:
        response = c.post("/score", json={"user": -5, "candidates": {"items": [next(iter(_maps(data)["items"]))]}})
    assert response.status_code == 404 and "user" in response.json()["detail"]


def test_oov_scores_unknown_candidates_through_padding_and_drops_unknown_behaviours(served):
    model, run, data, dataset = served
    maps = _maps(data)
    item_categories = np.asarray(dataset.item_categories)
    items = np.array([4, 8, 15, 16])
    raw_hist = _raw(maps, "items", items)
    raw_hist[1] = 10 ** 9  # an unknown behaviour: masked where it stands
    cand_raw = [_raw(maps, "items", [23])[0], 10 ** 9]
    with TestClient(create_app(run, data, unknown="oov", threads=None)) as c:
        response = c.post("/score", json={"history": {"items": raw_hist}, "candidates": {"items": cand_raw}})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["unknown_candidates"] == [10 ** 9] and result["history_length"] == 3
    hist_items = items.copy()
    hist_items[1] = 0
    cand = np.array([23, 0])  # the unknown candidate: padding item, padding category
    expected = _expected(model, hist_items, item_categories[hist_items], cand, item_categories[cand])
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-5, atol=1e-7)


def test_body_limit_refuses_announced_and_chunked_bodies(served):
    _, run, data, _ = served
    with TestClient(create_app(run, data, max_body_bytes=2_000, threads=None)) as c:
        big = b'{"user": 1, "candidates": {"items": [' + b"1, " * 1_000 + b"1]}}"
        assert c.post("/score", content=big, headers={"content-type": "application/json"}).status_code == 413
        chunks = iter([big[i:i + 500] for i in range(0, len(big), 500)])  # no Content-Length: chunked
        assert c.post("/score", content=chunks, headers={"content-type": "application/json"}).status_code == 413
        assert c.get("/healthz").status_code == 200


def test_worker_app_reads_its_settings_from_the_environment(served, monkeypatch):
    """`--workers N`: uvicorn builds each worker's app from $DAREC_SERVE_SETTINGS."""
    _, run, data, _ = served
    monkeypatch.setenv(SETTINGS_ENV, json.dumps({"checkpoint": str(run), "data": str(data), "max_candidates": 7,
                                                 "threads": None}))
    with TestClient(app_from_environment()) as c:
        assert c.get("/healthz").json()["limits"]["max_candidates"] == 7


def test_request_model_follows_the_datasets_raw_id_types():
    model = ScoreRequest[IntId, StrId, StrId]
    assert model.model_validate({"user": 3, "candidates": {"items": ["a", "b"]}}).candidates.items == ["a", "b"]
    with pytest.raises(ValidationError):
        model.model_validate({"user": 3, "candidates": {"items": [1]}})
    with pytest.raises(ValidationError):
        model.model_validate({"user": "3", "candidates": {"items": ["a"]}})


def test_serve_cli_bad_checkpoint_is_one_line_and_exit_2(served, tmp_path, capsys):
    _, _, data, _ = served
    assert main(["serve", "--checkpoint", str(tmp_path), "--data", str(data)]) == 2  # a folder without best.pt
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("darec serve: error:") and "best.pt" in err[0]


def _free_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    except OSError:
        return None


def test_real_uvicorn_process_answers_and_stops(served):
    _, run, data, _ = served
    port = _free_port()
    if port is None:
        pytest.skip("cannot bind a loopback port here")
    server = subprocess.Popen([sys.executable, "-m", "darec", "serve", "--checkpoint", str(run), "--data", str(data),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "no /healthz answer within 15 s"
                time.sleep(0.1)
        maps = _maps(data)
        response = httpx.post(f"{base}/score", json={"user": next(iter(maps["users"])),
                                                     "candidates": {"items": list(maps["items"])[:5]}}, timeout=10)
        assert response.status_code == 200 and len(response.json()["scores"]) == 5
    finally:
        server.terminate()
        _, log = server.communicate(timeout=15)
    assert "Finished server process" in log  # a graceful shutdown on SIGTERM (uvicorn then re-raises it)
