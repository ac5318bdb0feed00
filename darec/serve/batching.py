"""Dynamic batching: requests that arrive while the model is busy are scored together in one call.

One worker thread owns the model. `submit` (on any asyncio event loop) queues an item and awaits its
result; the worker takes the first queued item, then every item already waiting, and, with a positive
`max_wait_s`, waits up to that long for more, until `max_batch` items, and calls `fn` once on the batch.
Under light load a request is scored alone at once; under heavy load the queue that builds up while one
batch is scored becomes the next batch, so the per-call costs (Python and torch dispatch, GIL hand-offs
between the event loop and the scoring thread) are paid once per batch instead of once per request.
This is the scheme of inference servers' dynamic batchers (a maximum batch size and a maximum delay).

`fn` returns one result per item; a result that is an exception fails that item alone (a request whose
problem shows only when scored). An exception raised by `fn` itself fails every item of that batch,
and only that batch: the worker goes on with the next one.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["MicroBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")

_CLOSE = object()  # queued by `close`: the worker stops once the items queued before it are answered


class MicroBatcher(Generic[In, Out]):
    """Calls `fn(batch)` on one worker thread with up to `max_batch` queued items at a time."""

    def __init__(self, fn: Callable[[Sequence[In]], Sequence[Out | BaseException]], *, max_batch: int,
                 max_wait_s: float = 0.0, name: str = "darec-batcher") -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.batches = self.items = 0  # scored so far: items / batches is the mean batch size
        # started by the first `submit`: a process that builds the app only to check it (the parent of
        # `uvicorn --workers N`) never runs one
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)

    async def submit(self, item: In) -> Out:
        """The result of `item` in the batch it is scored with (or the exception that failed it)."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._worker.ident is None:  # never started
                self._worker.start()
            self._queue.put((item, future))
        return await future

    def close(self) -> None:
        """Answers what is queued, then stops the worker thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._worker.ident is not None
            self._queue.put(_CLOSE)
        if started:
            self._worker.join()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            items = [item for item, _ in batch]
            self.batches, self.items = self.batches + 1, self.items + len(items)
            try:
                results: Sequence[Out | BaseException] = self.fn(items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except Exception as err:  # noqa: BLE001  (fails this batch's requests, not the worker)
                results = [err] * len(items)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for (_, future), result in zip(batch, results):
                by_loop.setdefault(future.get_loop(), []).append((future, result))
            for loop, settled in by_loop.items():  # one wake-up per event loop, not one per request
                try:
                    loop.call_soon_threadsafe(_settle, settled)
                except RuntimeError:  # that loop has closed: nobody waits for these results
                    pass

    def _next_batch(self) -> list | None:
        """The first queued item (blocking), then whatever arrives until the batch is full or the wait
        is over; None once `close` was called and everything before it was taken."""
        first = self._queue.get()
        if first is _CLOSE:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                self._queue.put(_CLOSE)  # stop after this batch
                break
            batch.append(item)
        return batch


def _settle(settled: list[tuple[asyncio.Future, object]]) -> None:
    """On the future's loop: hand each waiting request its result (requests cancelled meanwhile are skipped)."""
    for future, result in settled:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
