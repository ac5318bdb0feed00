"""`darec serve`: the Scorer behind HTTP, for clients that speak raw ids.

One process loads the model, the prepared dataset (memory-mapped histories) and its raw-id maps once;
every request is validated by pydantic and encoded to internal ids and codes in a few vectorised calls on
the event loop (`darec.serve.request_codes`), then queued for the one scoring thread, which gathers stored
users' histories and scores the requests waiting together (`darec.serve.batching`: one `Scorer` call of U
users x C candidates per batch) and renders each reply's JSON; the event loop keeps reading requests and
answering /healthz meanwhile.

A bad request is always a 4xx with a one-line `detail`, never a 500:
    422  malformed JSON, wrong types, unknown fields, lengths that disagree, empty candidates, a side feature
         the model reads missing from an explicit history
    400  a body that is not UTF-8 or too deeply nested to parse (FastAPI's own answer)
    404  an unknown user; an unknown item, category or side-feature value under --unknown error
    413  a body above --max-body-bytes, more than --max-candidates candidates, a history longer
         than --max-history
"""
# No `from __future__ import annotations`: the endpoint's body type is a per-dataset class FastAPI must see.
import gc
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypeAliasType

from darec.data.id_maps import ID_KINDS, IdMaps, UnknownPolicy
from darec.data.store import PreparedDataset
from darec.serve.batching import MicroBatcher
from darec.serve.predict import load_scorer, user_histories
from darec.serve.request_codes import RequestEncoder
from darec.serve.scorer import History

__all__ = ["ServeSettings", "ScoreRequest", "ScoreResponse", "IntId", "StrId", "create_app", "app_from_environment",
           "SETTINGS_ENV"]

# `uvicorn --workers N` starts each worker by import string; the settings reach it through this variable.
SETTINGS_ENV = "DAREC_SERVE_SETTINGS"
_SHOWN_ERRORS = 5  # validation errors listed in a 422 (a list of 10,000 bad values stays a short reply)

# Raw ids as the dataset's readers saw them: integers or strings, whichever the dataset's id maps hold
# (`IdMaps.raw_dtype`); the request models are parametrised per dataset, so a wrong kind is a plain 422.
IntId = TypeAliasType("IntId", Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)])
StrId = TypeAliasType("StrId", Annotated[StrictStr, Field(min_length=1, max_length=256)])
UserId, ItemId, CategoryId = TypeVar("UserId"), TypeVar("ItemId"), TypeVar("CategoryId")
# A raw side-feature value: an id of the feature's map (dictionary), any id (hash), or a number (numeric)
FeatureValue = TypeAliasType("FeatureValue", IntId | StrictFloat | StrId | None)


class ServeSettings(BaseModel):
    """What a server process is started with; the limits bound the work and memory of one request."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    checkpoint: Path
    data: Path
    device: str = "cpu"
    max_candidates: int = Field(1000, ge=1)
    max_history: int = Field(10_000, ge=1)
    max_body_bytes: int | None = Field(None, ge=1)  # None: enough for the two lists at their limits
    unknown: UnknownPolicy = "error"
    threads: int | None = Field(1, ge=1)  # torch threads per process (None: leave torch's setting)
    max_batch: int = Field(32, ge=1)  # requests scored together in one Scorer call
    batch_wait_ms: float = Field(0.0, ge=0, le=1000)  # how long a batch waits for more requests to join

    @property
    def body_limit(self) -> int:
        """Bytes: ~3 numbers of 24 characters per history behaviour and 2 per candidate, at least 1 MiB."""
        return self.max_body_bytes or max(1 << 20, 72 * self.max_history + 48 * self.max_candidates)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class HistoryIn(_Strict, Generic[ItemId, CategoryId]):
    """Behaviours oldest first (or in any order when `timestamps` are given: they are sorted by them), with
    the raw values of the side features a feature model reads (see docs/serving.md)."""

    items: list[ItemId]
    categories: list[CategoryId] | None = None  # default: each item's category in the dataset
    timestamps: list[float] | None = None
    features: dict[str, list[FeatureValue]] | None = None  # per behaviour, by feature name (null: missing)
    user_features: dict[str, FeatureValue] | None = None  # of the user, by feature name (absent: missing)
    time: float | None = None  # when the candidates are scored (time features); default the latest timestamp

    @model_validator(mode="after")
    def _same_lengths(self) -> "HistoryIn":
        features = {f"features.{name}": values for name, values in (self.features or {}).items()}
        _check_lengths("history", self.items, categories=self.categories, timestamps=self.timestamps, **features)
        return self


class CandidatesIn(_Strict, Generic[ItemId, CategoryId]):
    items: list[ItemId] = Field(min_length=1)
    categories: list[CategoryId] | None = None  # default: each item's category in the dataset

    @model_validator(mode="after")
    def _same_lengths(self) -> "CandidatesIn":
        _check_lengths("candidates", self.items, categories=self.categories)
        return self


class ScoreRequest(_Strict, Generic[UserId, ItemId, CategoryId]):
    """Score `candidates` for a stored user's history (`user`) or for an explicit `history`.
    Parametrised by the dataset's raw id types: `ScoreRequest[IntId, IntId, StrId]`."""

    user: UserId | None = None
    history: HistoryIn[ItemId, CategoryId] | None = None
    candidates: CandidatesIn[ItemId, CategoryId]
    top_k: Annotated[StrictInt, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _one_history(self) -> "ScoreRequest":
        if (self.user is None) == (self.history is None):
            raise ValueError("give exactly one of 'user' (a stored history) and 'history'")
        return self


class TopCandidates(BaseModel):
    items: list[Any]
    scores: list[float]


class ScoreResponse(BaseModel):
    """`scores[i]` is the click probability of `candidates.items[i]`; `top` the best `top_k`, best first."""

    scores: list[float]
    top: TopCandidates
    history_length: int  # behaviours the model saw (after the max_len cut and dropping unknown ones)
    unknown_candidates: list[Any]  # scored through the padding row (--unknown oov only)


def _check_lengths(what: str, items: list, **others: list | None) -> None:
    for name, values in others.items():
        if values is not None and len(values) != len(items):
            raise ValueError(f"{what}.{name} has {len(values)} values for {len(items)} items")


class _Model:
    """Everything a request needs, loaded once per process and only read afterwards (thread-safe)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.dataset = PreparedDataset.open(settings.data)
        self.ids = IdMaps.open(settings.data)
        self.scorer = load_scorer(settings.checkpoint, self.dataset, device=settings.device)
        self.codes = RequestEncoder(self.dataset, self.ids, self.scorer.config, unknown=settings.unknown)
        self.lengths = np.diff(np.asarray(self.dataset.offsets))                         # (n_users,) stored behaviours
        self.max_len = self.scorer.config.max_len
        self.request_model = ScoreRequest[tuple(IntId if self.codes.integer_ids[kind] else StrId for kind in ID_KINDS)]

    def info(self) -> dict[str, Any]:
        c, s = self.scorer.config, self.settings
        return {"model": {"search": c.search, "tables": c.tables, "dim": c.dim, "attention_dim": c.attn_dim,
                          "top_k": c.top_k, "max_len": c.max_len, "n_items": c.n_items,
                          "n_categories": c.n_categories, "features": [f.name for f in c.features]},
                "checkpoint": s.checkpoint.name, "device": str(self.scorer.device),
                "batching": {"max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms},
                "users": self.dataset.n_users, "unknown": s.unknown,
                "limits": {"max_candidates": s.max_candidates, "max_history": s.max_history,
                           "max_body_bytes": s.body_limit}}

    def encode(self, request: ScoreRequest) -> "_Encoded":
        """The request in internal ids, or the HTTPException (4xx) that refuses it: everything that can
        be wrong with a request shows here, before it joins a batch."""
        cands = request.candidates
        if len(cands.items) > self.settings.max_candidates:
            raise HTTPException(413, f"{len(cands.items)} candidates, at most {self.settings.max_candidates}")
        if request.history is not None and len(request.history.items) > self.settings.max_history:
            raise HTTPException(413, f"history of {len(request.history.items)} behaviours, at most "
                                     f"{self.settings.max_history}")
        items, known = self.codes.ids("item", cands.items, "candidates.items", allow_unknown=True)
        categories = self.codes.item_categories(items, cands.categories, "candidates.categories")
        candidates = {"cand_items": items, "cand_categories": categories, "known": known, "top_k": request.top_k,
                      "raw_candidates": np.asarray(cands.items, dtype=object)}
        if request.history is not None:
            history, users = self.codes.history(request.history)
            return _Encoded(user=None, length=len(history["items"]), history=history, user_features=users,
                            history_length=int(np.count_nonzero(history["items"])), **candidates)
        user = int(self.codes.ids("user", [request.user], "user", allow_unknown=False)[0][0])
        length = int(min(self.lengths[user], self.max_len))  # its history is gathered with its batch
        return _Encoded(user=user, length=length, history={}, user_features={}, history_length=length, **candidates)

    def score_batch(self, batch: Sequence["_Encoded"]) -> list[bytes]:
        """The JSON reply of every request in `batch`, in order. Requests with candidate counts and
        history lengths in the same powers-of-two bucket share one Scorer call (padded to the longest:
        padding candidates are dropped from the reply, padding behaviours are masked); bucketing bounds
        what padding can cost: less than twice the work of each request."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, encoded in enumerate(batch):
            key = (len(encoded.cand_items) - 1).bit_length(), encoded.length.bit_length()
            groups.setdefault(key, []).append(index)
        bodies: list[bytes] = [b""] * len(batch)
        for indices in groups.values():
            for index, body in zip(indices, self._score_group([batch[i] for i in indices])):
                bodies[index] = body
        return bodies

    def _score_group(self, group: list["_Encoded"]) -> list[bytes]:
        """One Scorer call for U requests: (U, N) left-padded histories, (U, C) right-padded candidates."""
        history = self._histories(group, max(1, max(e.length for e in group)))  # 1 masked slot if all are empty
        width = max(len(e.cand_items) for e in group)
        items = _padded([e.cand_items for e in group], width, left=False)  # padding item 0, category 0
        categories = _padded([e.cand_categories for e in group], width, left=False)
        probs = self.scorer.score(history, torch.from_numpy(items), torch.from_numpy(categories))
        probs = probs.cpu().numpy().astype(np.float64)                                    # (U, C)
        return [encoded.reply(row[:len(encoded.cand_items)]) for encoded, row in zip(group, probs)]

    def _histories(self, group: list["_Encoded"], length: int) -> History:
        """(U, length) left-padded histories with the model's side features: stored users' gathered from
        the dataset in one call (`user_histories`, as `darec predict` builds them), explicit ones from their
        encoded arrays (an unknown behaviour, id 0, is masked where it stands)."""
        stored = np.array([e.user is not None for e in group])
        users = np.array([e.user for e in group if e.user is not None], dtype=np.int64)
        if stored.all():
            return user_histories(self.dataset, users, length)
        given = [e for e in group if e.user is None]
        fields = {name: _padded([e.history[name] for e in given], length, left=True) for name in given[0].history}
        codes = {name: np.array([e.user_features[name] for e in given], dtype=np.int64)
                 for name in self.codes.user_features}
        mask = fields["items"] != 0
        if stored.any():
            read = user_histories(self.dataset, users, length)
            read_fields = {"items": read.items, "categories": read.categories} | dict(read.features)
            fields = {name: _rows_from(stored, read_fields[name].numpy(), sent) for name, sent in fields.items()}
            codes = {name: _rows_from(stored, read.user_features[name].numpy(), sent) for name, sent in codes.items()}
            mask = _rows_from(stored, read.mask.numpy(), mask)
        tensors = {name: torch.from_numpy(values) for name, values in fields.items()}
        return History(items=tensors.pop("items"), categories=tensors.pop("categories"), mask=torch.from_numpy(mask),
                       features=tensors, user_features={name: torch.from_numpy(c) for name, c in codes.items()})


def _rows_from(stored: np.ndarray, read: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Rows of a group in order: `read` (from the dataset) where `stored`, `given` (explicit) elsewhere."""
    out = np.empty((len(stored), *given.shape[1:]), dtype=np.result_type(read, given))
    out[stored], out[~stored] = read, given
    return out


def _padded(rows: list[np.ndarray], width: int, *, left: bool) -> np.ndarray:
    """(len(rows), width), each row's values at its right end (`left` padding) or its left end, 0 elsewhere:
    one boolean-mask assignment (row-major, so each row's values land in order), no loop."""
    lengths = np.array([len(row) for row in rows])
    columns = np.arange(width)
    keep = columns >= (width - lengths)[:, None] if left else columns < lengths[:, None]
    out = np.zeros((len(rows), width), dtype=np.result_type(*rows))
    out[keep] = np.concatenate(rows)
    return out


@dataclass(frozen=True)
class _Encoded:
    """One validated request in internal ids, waiting for its batch."""

    user: int | None             # the prepared user's row (its history is read with the batch), None: explicit
    length: int                  # history slots: min(stored, max_len), or the explicit history's after the cut
    history: dict[str, np.ndarray]  # explicit only: (length,) "items" (0 = unknown, masked), "categories", features
    user_features: dict[str, int]   # explicit only: code of each user feature the model reads (0 = missing)
    history_length: int          # behaviours the model sees (unknown ones dropped)
    cand_items: np.ndarray       # (C,)
    cand_categories: np.ndarray  # (C,)
    raw_candidates: np.ndarray   # (C,) object: the ids as sent, for the reply
    known: np.ndarray            # (C,) bool
    top_k: int

    def reply(self, probs: np.ndarray) -> bytes:
        """The response body for this request's (C,) click probabilities."""
        best = np.argsort(-probs, kind="stable")[:self.top_k]
        top = TopCandidates(items=self.raw_candidates[best].tolist(), scores=probs[best].tolist())
        response = ScoreResponse(scores=probs.tolist(), top=top, history_length=self.history_length,
                                 unknown_candidates=self.raw_candidates[~self.known].tolist())
        return response.model_dump_json().encode()


class BodyLimit:
    """Refuses request bodies above `limit` bytes with 413, whether announced (Content-Length) or
    chunked: the body is read here, at most limit + 1 bytes, before the app sees any of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send, 413 if declared.isdigit() else 400)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send, 413)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would say it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        detail = (f"request body above the limit of {self.limit} bytes" if status == 413
                  else "invalid Content-Length header")
        # No "Connection: close": uvicorn then reads and discards the rest of the body, so the client,
        # still sending, gets this answer instead of a connection reset.
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    """422 with the first few errors, without echoing the input back (it may be megabytes)."""
    if isinstance(err.body, bytes):  # FastAPI parses JSON only when the client says it is JSON
        return JSONResponse({"detail": "the body must be JSON, sent with Content-Type: application/json"},
                            status_code=422)
    errors = err.errors()
    shown = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:_SHOWN_ERRORS]]
    first = shown[0] if shown else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    return JSONResponse({"detail": f"{where}: {first['msg']} ({len(errors)} error(s))", "errors": shown},
                        status_code=422)


def create_app(checkpoint: str | Path, data: str | Path, **settings: Any) -> FastAPI:
    """The service for one checkpoint and the prepared dataset it was trained on.

    `settings` are the other fields of `ServeSettings` (device, max_candidates, max_history, max_body_bytes,
    unknown, threads, max_batch, batch_wait_ms); `threads` sets torch's process-wide thread count. Raises DataError / ConfigError for a bad checkpoint or dataset."""
    config = ServeSettings(checkpoint=Path(checkpoint), data=Path(data), **settings)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = _Model(config)
    batcher = MicroBatcher(model.score_batch, max_batch=config.max_batch, max_wait_s=config.batch_wait_ms / 1e3,
                           name="darec-scorer")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The model, torch, polars and FastAPI leave ~10^5 long-lived objects that every full collection
        # walks, holding the GIL (100-230 ms pauses measured under load: the p99); freezing them leaves
        # the collector only what requests allocate.
        gc.collect()
        gc.freeze()
        yield
        batcher.close()  # answers the requests already queued
        gc.unfreeze()  # collectable again once the app is gone (a process that builds several apps: tests)

    app = FastAPI(title="darec", summary="CTR scores of candidate items against long user histories",
                  exception_handlers={RequestValidationError: _validation_error}, lifespan=lifespan)
    app.state.model = model

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:  # on the event loop: answers while the scoring thread is busy
        info = model.info()
        info["batching"] |= {"batches": batcher.batches, "requests": batcher.items}
        return {"status": "ok", **info}

    @app.post("/score", response_model=ScoreResponse,
              responses={404: {"description": "unknown user or item id"},
                         413: {"description": "body, candidate list or history above the limits"},
                         422: {"description": "malformed request"}})
    async def score(request: model.request_model) -> Response:
        # encoded here (a bad id is this request's 4xx), scored on the scoring thread with the others waiting
        body = await batcher.submit(model.encode(request))
        return Response(body, media_type="application/json")

    app.add_middleware(BodyLimit, limit=config.body_limit)
    return app


def app_from_environment() -> FastAPI:
    """The app of a `uvicorn --workers N` worker: its settings are the JSON in $DAREC_SERVE_SETTINGS."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return create_app(**settings)
