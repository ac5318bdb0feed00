"""Dynamic batching: requests scored together get exactly the replies they get alone, and one bad
item never fails the others."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import polars as pl
import pytest

from darec.data.store import PreparedDataset
from darec.serve.app import create_app
from darec.serve.batching import MicroBatcher
from tests.helpers import tiny_dare_checkpoint

MAX_LEN = 50


async def _gather(batcher: MicroBatcher, items: list) -> list:
    return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)


def test_waiting_items_form_batches_of_at_most_max_batch():
    gate, sizes = threading.Event(), []

    def double(batch):
        gate.wait()  # the first batch holds the worker until every item is queued
        sizes.append(len(batch))
        return [2 * x for x in batch]

    batcher = MicroBatcher(double, max_batch=4)

    async def run():
        pending = asyncio.ensure_future(_gather(batcher, list(range(10))))
        await asyncio.sleep(0.05)  # all 10 queued, the worker blocked in the first batch
        gate.set()
        return await pending

    assert asyncio.run(run()) == [2 * x for x in range(10)]
    batcher.close()
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) >= 3
    assert (batcher.batches, batcher.items) == (len(sizes), 10)


def test_max_wait_lets_a_batch_collect_requests_that_arrive_later():
    sizes = []
    batcher = MicroBatcher(lambda batch: sizes.append(len(batch)) or list(batch), max_batch=8, max_wait_s=0.5)

    async def run():
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.05)  # arrives while the first waits for company
        return await asyncio.gather(first, batcher.submit("b"))

    assert asyncio.run(run()) == ["a", "b"]
    batcher.close()
    assert sizes == [2]


def test_an_exception_result_fails_its_item_only_and_a_raising_batch_only_its_own():
    def fn(batch):
        if "boom" in batch:
            raise RuntimeError("internal")
        return [ValueError(x) if x == "bad" else x.upper() for x in batch]

    batcher = MicroBatcher(fn, max_batch=2, max_wait_s=0.2)
    good, bad = asyncio.run(_gather(batcher, ["ok", "bad"]))
    assert good == "OK" and isinstance(bad, ValueError)
    assert all(isinstance(r, RuntimeError) for r in asyncio.run(_gather(batcher, ["boom", "x"])))
    assert asyncio.run(_gather(batcher, ["next"])) == ["NEXT"]  # the worker survived the failed batch
    batcher.close()


def test_close_answers_queued_items_then_refuses_new_ones():
    batcher = MicroBatcher(lambda batch: list(batch), max_batch=3)

    async def run():
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0)  # all submitted
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        return await asyncio.gather(*pending)

    assert asyncio.run(run()) == list(range(5))
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher.submit(0))


@pytest.fixture(scope="module")
def app_and_maps(tiny_planted_dir, tmp_path_factory):
    """A tiny DARE service under --unknown oov whose batches wait long enough to collect every request."""
    dataset = PreparedDataset.open(tiny_planted_dir)
    run = tmp_path_factory.mktemp("run")
    tiny_dare_checkpoint(run / "best.pt", dataset, max_len=MAX_LEN)
    app = create_app(run, tiny_planted_dir, unknown="oov", threads=None, max_batch=64, batch_wait_ms=300)
    maps = {kind: pl.read_parquet(tiny_planted_dir / "ids" / f"{kind}.parquet")["raw"].to_list()
            for kind in ("users", "items")}
    return app, maps


def _mixed_requests(maps: dict, n: int) -> list[dict]:
    """Stored users and explicit histories of every length (0 to past max_len), 1 to 30 candidates
    (some unknown), various top_k: requests that land in different padding buckets of one batch."""
    rng = np.random.default_rng(5)
    users, items = maps["users"], maps["items"]
    requests = []
    for i in range(n):
        candidates = [items[j] for j in rng.integers(0, len(items), rng.integers(1, 31))]
        if i % 4 == 3:
            candidates[0] = 10 ** 9  # unknown: scored through the padding row
        body = {"candidates": {"items": candidates}, "top_k": int(rng.integers(1, 12))}
        if i % 2:
            body["user"] = users[int(rng.integers(len(users)))]
        else:
            length = int(rng.choice([0, 1, 7, MAX_LEN - 1, MAX_LEN + 20]))
            body["history"] = {"items": [items[j] for j in rng.integers(0, len(items), length)]}
        requests.append(body)
    return requests


def test_batched_replies_equal_replies_scored_alone(app_and_maps):
    app, maps = app_and_maps
    model = app.state.model
    requests = _mixed_requests(maps, 24)
    encoded = [model.encode(model.request_model.model_validate(r)) for r in requests]
    together = [json.loads(body) for body in model.score_batch(encoded)]
    alone = [json.loads(model.score_batch([e])[0]) for e in encoded]
    for request, joint, single in zip(requests, together, alone):
        assert len(joint["scores"]) == len(request["candidates"]["items"])
        np.testing.assert_allclose(joint["scores"], single["scores"], rtol=0, atol=1e-6)
        assert joint["top"]["items"] == single["top"]["items"]
        assert len(joint["top"]["items"]) == min(request["top_k"], len(request["candidates"]["items"]))
        assert (joint["history_length"], joint["unknown_candidates"]) == (single["history_length"],
                                                                          single["unknown_candidates"])
    assert np.std([s for reply in together for s in reply["scores"]]) > 1e-4  # not all constants


def test_concurrent_http_requests_are_batched_and_bad_ones_fail_alone(app_and_maps):
    """Good and bad requests sent at once: each good one gets its own scores (as scored alone), each bad
    one its 4xx, and the good ones were scored in fewer model calls than requests."""
    app, maps = app_and_maps
    model = app.state.model
    requests = _mixed_requests(maps, 12)
    bad = [{"user": -5, "candidates": {"items": [maps["items"][0]]}},  # unknown user: 404
           {"user": maps["users"][0], "candidates": {"items": []}}]   # empty candidates: 422
    alone = [json.loads(model.score_batch([model.encode(model.request_model.model_validate(r))])[0])
             for r in requests]

    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = (await client.get("/healthz")).json()["batching"]
            replies = await asyncio.gather(*(client.post("/score", json=r) for r in [*requests, *bad]))
            after = (await client.get("/healthz")).json()["batching"]
        return replies, after["batches"] - before["batches"], after["requests"] - before["requests"]

    replies, batches, scored = asyncio.run(send())
    assert [r.status_code for r in replies] == [200] * len(requests) + [404, 422]
    for reply, single in zip(replies, alone):
        np.testing.assert_allclose(reply.json()["scores"], single["scores"], rtol=0, atol=1e-6)
        assert reply.json()["top"]["items"] == single["top"]["items"]
    assert scored == len(requests) and batches < len(requests)


def test_an_internal_error_fails_its_batch_with_500_and_the_service_goes_on(app_and_maps, monkeypatch):
    app, maps = app_and_maps
    request = _mixed_requests(maps, 2)[1]

    def broken(*_):
        raise RuntimeError("scorer failed")

    async def send():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with monkeypatch.context() as patch:
                patch.setattr(app.state.model.scorer, "score", broken)
                failed = await client.post("/score", json=request)
            return failed, await client.post("/score", json=request)

    failed, next_one = asyncio.run(send())
    assert failed.status_code == 500 and next_one.status_code == 200
