"""Load test of `darec serve`: a real uvicorn process on loopback, concurrent clients, bounded run.

For each model (by default DARE with K_A = K_R / 4 and TWIN with K_A = K_R, same data and shapes) it
starts `darec serve` on a free 127.0.0.1 port (all of them at once), waits for /healthz and sends each
--warmup requests; then --requests valid requests (--candidates candidates against histories of
--history behaviours) from --concurrency concurrent keep-alive clients, in --blocks blocks with the
models taking turns block by block (a change of the machine's load hits them alike); then --malformed
requests cycling through every class of bad request. It records throughput, latency percentiles, status
counts, the mean batch the server scored, CPU per request, the server's peak resident memory (VmHWM)
and whether /healthz still answers, and stops the servers. Nothing outside loopback is touched.

Without --checkpoint/--data it builds what it needs under a temporary folder: a planted synthetic dataset
whose users all have >= --history behaviours and untrained models of the same shapes (latency does not
depend on training).

    python benchmarks/serve_load.py                       # writes benchmarks/results/serve_load_cpu.json
    python benchmarks/serve_load.py --checkpoint RUN/best.pt --data DATA --presets served

Targets on a 2-core machine: 0 failed valid requests, every malformed request a 4xx, >= 200 requests/s,
p99 <= 100 ms. With a closed loop of C clients, mean latency ~= C / throughput (Little's law).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import numpy as np
import torch
from tqdm.auto import tqdm

from common import parse_args
from darec.checkpoint import save_checkpoint
from darec.data.id_maps import IdMaps
from darec.data.protocol import ProtocolConfig
from darec.data.store import PreparedDataset
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.io import write_json
from darec.models import build_model, preset_config

__all__ = ["main"]

log = logging.getLogger("benchmarks.serve_load")
RESULTS = Path(__file__).resolve().parent / "results"
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Call:
    """One prepared request: what it is, its body and the status it must get (None: any 2xx)."""

    kind: str
    body: bytes
    expect: int | None = None
    headers: dict[str, str] | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _synthetic(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """A planted dataset with every history >= --history and one untrained checkpoint per preset."""
    data = root / "data"
    length = args.history
    prepare_synthetic(SyntheticConfig(n_users=args.users, n_items=args.items, n_categories=30,
                                      mean_length=length + 200, min_length=length + 50), out=data,
                      config=ProtocolConfig())
    dataset = PreparedDataset.open(data)
    checkpoints = {}
    for name in args.presets:  # DARE: K_A = K_R / 4; TWIN: one table set, K_A = K_R
        preset, attention_dim = {"dare": ("dare", args.dim // 4), "twin": ("twin", None)}[name]
        torch.manual_seed(0)
        config = preset_config(preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                               max_len=length, dim=args.dim, attention_dim=attention_dim)
        checkpoints[name] = root / f"{name}.pt"
        save_checkpoint(checkpoints[name], {"model_config": config.to_dict(), "model": build_model(config).state_dict(),
                                            "step": 0})
    return data, checkpoints


def _valid_calls(data: Path, args: argparse.Namespace, n: int, seed: int) -> list[Call]:
    """`n` requests: random users with >= --history stored behaviours (an --explicit-share of them send
    that history explicitly), --candidates random catalogue items each; raw ids throughout."""
    dataset, ids = PreparedDataset.open(data), IdMaps.open(data)
    rng = np.random.default_rng(seed)
    lengths = np.diff(np.asarray(dataset.offsets))
    users = np.flatnonzero(lengths >= args.history)
    if not len(users):
        raise SystemExit(f"no user of {data} has {args.history} behaviours")
    chosen = rng.choice(users, n)
    raw_users = ids.decode("user", chosen).to_list()
    raw_items = np.asarray(ids.decode("item", rng.integers(1, dataset.n_items, (n, args.candidates)).ravel())
                           .to_list(), dtype=object).reshape(n, args.candidates)
    explicit = rng.random(n) < args.explicit_share
    calls = []
    for row in range(n):  # one JSON body per request, built before the clock starts
        body: dict[str, Any] = {"candidates": {"items": raw_items[row].tolist()}, "top_k": 10}
        if explicit[row]:
            hi = int(dataset.offsets[chosen[row] + 1])
            internal = np.asarray(dataset.items[hi - args.history:hi])
            body["history"] = {"items": ids.decode("item", internal).to_list()}
        else:
            body["user"] = raw_users[row]
        calls.append(Call("explicit" if explicit[row] else "user", json.dumps(body).encode()))
    return calls


def _malformed_calls(data: Path, args: argparse.Namespace, n: int) -> list[Call]:
    """`n` bad requests, cycling through every class with the status each must get."""
    ids = IdMaps.open(data)
    user = ids.decode("user", [0]).to_list()[0]
    item = ids.decode("item", [1]).to_list()[0]
    unknown_user, unknown_item = ("no-such-id" if isinstance(raw, str) else -12345 for raw in (user, item))

    def body(**fields: Any) -> bytes:
        return json.dumps({"user": user, "candidates": {"items": [item]}, **fields}).encode()

    classes = [
        Call("invalid_json", b'{"user": ', 422),
        Call("not_an_object", b"[1, 2, 3]", 422),
        Call("wrong_type", json.dumps({"user": user, "candidates": {"items": [[item]]}}).encode(), 422),
        Call("unknown_field", body(extra=1), 422),
        Call("user_and_history", body(history={"items": [item]}), 422),
        Call("empty_candidates", json.dumps({"user": user, "candidates": {"items": []}}).encode(), 422),
        Call("length_mismatch", json.dumps({"history": {"items": [item, item], "categories": [1]},
                                            "candidates": {"items": [item]}}).encode(), 422),
        Call("not_json_content_type", body(), 422, {"content-type": "text/plain"}),
        Call("unknown_user", json.dumps({"user": unknown_user, "candidates": {"items": [item]}}).encode(), 404),
        Call("unknown_item", json.dumps({"user": user, "candidates": {"items": [item, unknown_item]}}).encode(), 404),
        Call("too_many_candidates", json.dumps({"user": user, "candidates": {"items": [item] * (args.max_candidates + 1)}})
             .encode(), 413),
        Call("history_too_long", json.dumps({"history": {"items": [item] * (args.max_history + 1)},
                                             "candidates": {"items": [item]}}).encode(), 413),
        Call("body_too_large", b" " * (args.max_body_bytes + 1), 413),
    ]
    return [classes[i % len(classes)] for i in range(n)]


class _Connection:
    """One keep-alive HTTP/1.1 connection spoken through h11. httpx costs ~2 ms of CPU per request,
    which on a 2-core machine the load generator would take away from the server it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.http = h11.Connection(h11.CLIENT)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, response body); raises OSError / h11 errors when the connection fails."""
        if self.writer is None or self.http.our_state is not h11.IDLE:
            await self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.http = h11.Connection(h11.CLIENT)
        head = [("host", self.host), ("content-length", str(len(body))), *headers.items()]
        self.writer.write(self.http.send(h11.Request(method="POST", target=path, headers=head))
                          + self.http.send(h11.Data(data=body)) + self.http.send(h11.EndOfMessage()))
        await self.writer.drain()
        status, chunks = 0, []
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection mid-response")
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        return status, b"".join(chunks)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _drive(base: str, calls: list[Call], concurrency: int, label: str,
                 candidates: int | None = None) -> list[tuple[str, float, int]]:
    """Send every call from `concurrency` keep-alive connections; (kind, seconds, status) per call.
    Status 0: the connection failed; -1: a 200 whose body is not `candidates` scores (when given)."""
    host, port = base.removeprefix("http://").split(":")
    results: list[tuple[str, float, int]] = [("", 0.0, 0)] * len(calls)
    queue = iter(range(len(calls)))
    with tqdm(total=len(calls), desc=label, unit="req", leave=False) as bar:
        async def worker() -> None:
            connection = _Connection(host, int(port))
            for index in queue:
                call = calls[index]
                start = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        connection.post("/score", call.body, call.headers or JSON), timeout=60)
                    if status == 200 and candidates is not None and len(json.loads(body)["scores"]) != candidates:
                        status = -1
                except (OSError, asyncio.TimeoutError, h11.ProtocolError):
                    status = 0
                    await connection.close()
                results[index] = (call.kind, time.perf_counter() - start, status)
                bar.update()
            await connection.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the uvicorn workers of `--workers N`), from /proc (Linux)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid] + [p for child in children for p in _process_tree(child)]


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_memory_mib(pid: int) -> float:
    """Peak resident set (VmHWM) of the server, summed over its processes, in MiB."""
    return sum(_proc_status(p, "VmHWM") for p in _process_tree(pid)) / 1024


def _cpu_seconds(pid: int, *, thread: int | None = None) -> float:
    """User + system CPU seconds used so far by the server's processes (all their threads), or by one
    thread of process `pid` (the main thread, uvicorn's event loop, has the process's id)."""
    if thread is not None:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/task/{thread}/stat"))
    return sum(_stat_cpu_seconds(Path(f"/proc/{p}/stat")) for p in _process_tree(pid))


def _stat_cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def _serve(checkpoint: Path, data: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "darec", "serve", "--checkpoint", str(checkpoint), "--data", str(data),
               "--port", str(port), "--threads", str(args.server_threads), "--max-candidates",
               str(args.max_candidates), "--max-history", str(args.max_history),
               "--max-body-bytes", str(args.max_body_bytes), "--max-batch", str(args.max_batch),
               "--batch-wait-ms", str(args.batch_wait_ms),
               "--workers", str(args.workers), "--no-access-log"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"darec serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("darec serve did not answer /healthz within 120 s")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _summary(results: list[tuple[str, float, int]], seconds: float) -> dict[str, Any]:
    latency = np.array([r[1] for r in results]) * 1e3
    statuses = Counter(str(r[2]) for r in results)
    return {"requests": len(results), "seconds": seconds, "requests_per_s": len(results) / seconds,
            "latency_ms": {f"p{q}": float(np.percentile(latency, q)) for q in (50, 90, 99)}
                          | {"mean": float(latency.mean()), "max": float(latency.max())},
            "statuses": dict(sorted(statuses.items())),
            "failed": int(sum(1 for r in results if not 200 <= r[2] < 300))}


def _breakdown(checkpoint: Path, data: Path, call: Call, threads: int, repeats: int = 200) -> dict[str, float]:
    """CPU ms per phase of one valid request scored alone, in this process (one thread): what the server
    spends beyond their sum goes to uvicorn, FastAPI's routing and the hand-off to the scoring thread."""
    from darec.data.id_maps import IdMaps
    from darec.serve.app import create_app
    from darec.serve.scorer import History

    model = create_app(checkpoint, data, threads=threads).state.model
    ids, dataset = IdMaps.open(data), PreparedDataset.open(data)
    request = model.request_model.model_validate(json.loads(call.body))
    row = int(ids.encode("user", [request.user])[0])
    hi = int(dataset.offsets[row + 1])
    lo = max(int(dataset.offsets[row]), hi - model.max_len)
    history = History.left_pad([np.asarray(dataset.items[lo:hi])], [np.asarray(dataset.categories[lo:hi])])
    items = torch.from_numpy(ids.encode("item", request.candidates.items))
    categories = torch.from_numpy(np.asarray(dataset.item_categories, dtype=np.int64)[items.numpy()])
    encoded = model.encode(request)
    probs = model.scorer.score(history, items, categories)[0].numpy().astype(np.float64)

    def cpu_ms(fn) -> float:
        fn()
        start = time.thread_time()
        for _ in range(repeats):
            fn()
        return (time.thread_time() - start) * 1e3 / repeats

    return {"json_parse_and_validate": cpu_ms(lambda: model.request_model.model_validate(json.loads(call.body))),
            # as the server encodes them: validated integers as an int64 array (IdMaps' numpy-only path)
            "encode_user_id": cpu_ms(lambda: ids.encode("user", np.array([request.user]))),
            "encode_candidate_ids": cpu_ms(lambda: ids.encode("item", np.array(request.candidates.items))),
            "scorer": cpu_ms(lambda: model.scorer.score(history, items, categories)),
            "scorer_search_stage": cpu_ms(lambda: model.scorer.search(history, items, categories)),
            "encode_request": cpu_ms(lambda: model.encode(request)),
            "response_json": cpu_ms(lambda: encoded.reply(probs)),
            "endpoint_total": cpu_ms(lambda: model.score_batch([model.encode(request)]))}


def _scorer_interleaved(checkpoints: dict[str, Path], data: Path, args: argparse.Namespace, *, blocks: int = 30,
                        calls: int = 20) -> dict[str, dict[str, float]]:
    """Median ms of one Scorer call (and of its search stage) per model on one request's shapes, the
    models taking turns in blocks so that a change of the machine's load hits them alike: the search
    saving without HTTP around it."""
    from darec.serve.scorer import History, Scorer

    torch.set_num_threads(1)  # the CPU cost of a call, as `_breakdown` measures it
    dataset = PreparedDataset.open(data)
    rng = np.random.default_rng(3)
    hi = int(dataset.offsets[1])
    scorers = {name: Scorer.load(ckpt) for name, ckpt in checkpoints.items()}
    history = History.left_pad([np.asarray(dataset.items[:hi])], [np.asarray(dataset.categories[:hi])],
                               length=args.history)
    items = torch.from_numpy(rng.integers(1, dataset.n_items, args.candidates))
    categories = torch.from_numpy(np.asarray(dataset.item_categories, dtype=np.int64)[items.numpy()])
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(blocks):
        for name, scorer in scorers.items():
            for stage, fn in (("score", scorer.score), ("search", scorer.search)):
                fn(history, items, categories)
                start = time.perf_counter()
                for _ in range(calls):
                    fn(history, items, categories)
                times.setdefault((name, stage), []).append((time.perf_counter() - start) * 1e3 / calls)
    # the median block, and the fastest one (the least disturbed by other jobs)
    return {name: {f"{stage}_{stat}_ms": float(fn(times[name, stage])) for stage in ("score", "search")
                   for stat, fn in (("median", np.median), ("min", np.min))} for name in scorers}


class _Meter:
    """What one server did over the blocks of valid requests it was sent: the replies, the seconds they
    took, and the CPU seconds of the server (all threads; its event-loop thread), of this client and of the
    whole machine meanwhile, summed over the blocks."""

    def __init__(self, pid: int, base: str) -> None:
        self.pid, self.base = pid, base
        self.results: list[tuple[str, float, int]] = []
        self.totals = Counter()

    def _readings(self) -> Counter:
        batching = httpx.get(f"{self.base}/healthz").json()["batching"]
        return Counter({"seconds": time.perf_counter(), "server": _cpu_seconds(self.pid),
                        "loop": _cpu_seconds(self.pid, thread=self.pid), "client": time.process_time(),
                        "machine": _machine_busy_seconds(), "batches": batching["batches"],
                        "requests": batching["requests"]})

    def run(self, calls: list[Call], args: argparse.Namespace, label: str) -> None:
        before = self._readings()
        self.results += asyncio.run(_drive(self.base, calls, args.concurrency, label, args.candidates))
        after = self._readings()
        self.totals.update({key: after[key] - before[key] for key in after})

    def summary(self, workers: int) -> dict[str, Any]:
        t, n = self.totals, len(self.results)
        out = _summary(self.results, t["seconds"])
        out["cpu_ms_per_request"] = {"server": t["server"] * 1e3 / n, "client": t["client"] * 1e3 / n}
        if workers == 1:  # one process: its batch counts and its event loop's share (HTTP, FastAPI, id encoding)
            out["mean_batch"] = t["requests"] / t["batches"]
            out["cpu_ms_per_request"]["server_event_loop_thread"] = t["loop"] * 1e3 / n
        # cores kept busy meanwhile by everything else on the machine (other users' jobs)
        out["other_processes_cores"] = (t["machine"] - t["server"] - t["client"]) / t["seconds"]
        out["by_kind"] = {kind: _summary([r for r in self.results if r[0] == kind], t["seconds"])["latency_ms"]
                          for kind in sorted({r[0] for r in self.results})}
        return out


def _load_tests(checkpoints: dict[str, Path], data: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every model's server runs at once (an idle one costs nothing); the valid requests go in --blocks
    blocks, the models taking turns block by block, so that a change of the machine's load hits them
    alike. Then each server gets the malformed requests and is asked /healthz."""
    valid = _valid_calls(data, args, args.requests + args.warmup, seed=1)
    malformed = _malformed_calls(data, args, args.malformed)
    user_call = next(c for c in valid if c.kind == "user")
    breakdowns = {name: _breakdown(ckpt, data, user_call, threads=1) for name, ckpt in checkpoints.items()}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name, checkpoint in checkpoints.items():
            servers[name] = _serve(checkpoint, data, args)
        meters = {}
        for name, (server, base) in servers.items():
            asyncio.run(_drive(base, valid[:args.warmup], args.concurrency, f"{name} warm-up"))
            meters[name] = _Meter(server.pid, base)
        measured = valid[args.warmup:]
        for block in np.array_split(np.arange(len(measured)), args.blocks):
            for name, meter in meters.items():
                meter.run([measured[i] for i in block], args, f"{name} valid")
        runs = {}
        for name, (server, base) in servers.items():
            start = time.perf_counter()
            bad = asyncio.run(_drive(base, malformed, args.concurrency, f"{name} malformed"))
            expected = {call.kind: call.expect for call in malformed}
            by_class = {kind: dict(Counter(str(r[2]) for r in bad if r[0] == kind)) for kind in expected}
            health = httpx.get(f"{base}/healthz", timeout=10.0)
            runs[name] = {"model": health.json()["model"], "valid": meters[name].summary(args.workers),
                          "cpu_ms_per_phase_in_process": breakdowns[name],
                          "malformed": {"requests": len(bad), "seconds": time.perf_counter() - start,
                                        "all_4xx": all(400 <= r[2] < 500 for r in bad),
                                        "wrong_status": sum(1 for r in bad if r[2] != expected[r[0]]),
                                        "server_errors": sum(1 for r in bad if r[2] >= 500 or r[2] == 0),
                                        "by_class": {k: {"expected": expected[k], "got": v}
                                                     for k, v in by_class.items()}},
                          "healthz_after": health.status_code == 200 and health.json().get("status") == "ok",
                          "server_peak_rss_mib": _peak_memory_mib(server.pid)}
        return runs
    finally:
        for server, _ in servers.values():
            _stop(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint (with --data) instead of building two")
    parser.add_argument("--data", type=Path, help="the checkpoint's prepared dataset")
    parser.add_argument("--presets", nargs="+", choices=["dare", "twin"], default=["dare", "twin"],
                        help="without --checkpoint: the synthetic models to build and serve, in order (default: both)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--blocks", type=int, default=10,
                        help="the valid requests are sent in this many blocks, the models taking turns")
    parser.add_argument("--malformed", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--history", type=int, default=1_000, help="behaviours per history (= the model's max_len)")
    parser.add_argument("--explicit-share", type=float, default=0.1,
                        help="share of valid requests that send the history explicitly instead of a user id")
    parser.add_argument("--dim", type=int, default=64, help="K_R of the synthetic models (DARE: K_A = K_R / 4)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--server-threads", type=int, default=2,
                        help="darec serve --threads (default 2: the scoring thread's torch ops use the core the "
                             "event loop leaves idle)")
    parser.add_argument("--max-batch", type=int, default=32, help="darec serve --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="darec serve --batch-wait-ms")
    parser.add_argument("--workers", type=int, default=1, help="darec serve --workers")
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--max-history", type=int, default=10_000)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load_cpu.json")
    args = parse_args(parser, argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if (args.checkpoint is None) != (args.data is None):
        parser.error("--checkpoint and --data go together")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="darec-serve-load-") as tmp:
        if args.checkpoint is None:
            data, checkpoints = _synthetic(Path(tmp), args)
        else:
            data, checkpoints = args.data, {"served": args.checkpoint}
        runs = _load_tests(checkpoints, data, args)
        interleaved = _scorer_interleaved(checkpoints, data, args) if len(checkpoints) > 1 else None
    for name, run in runs.items():
        v = run["valid"]
        log.info("%s: %.0f req/s, p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, failed %d, mean batch %s; "
                 "CPU per request: server %.2f ms, "
                 "client %.2f ms; other processes kept %.1f cores busy; malformed all 4xx: %s "
                 "(wrong status %d); healthz after: %s; peak RSS %.0f MiB", name, v["requests_per_s"],
                 v["latency_ms"]["p50"], v["latency_ms"]["p90"], v["latency_ms"]["p99"], v["failed"],
                 f"{v['mean_batch']:.1f}" if "mean_batch" in v else "n/a (several workers)",
                 v["cpu_ms_per_request"]["server"], v["cpu_ms_per_request"]["client"], v["other_processes_cores"],
                 run["malformed"]["all_4xx"], run["malformed"]["wrong_status"], run["healthz_after"],
                 run["server_peak_rss_mib"])
    out = {"benchmark": "serve_load", "command": " ".join(["python", *sys.argv]),
           "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                       "load_average_before": load_before, "load_average_after": os.getloadavg()},
           "torch": torch.__version__, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()},
           "runs": runs}
    if interleaved is not None:
        out["scorer_interleaved"] = interleaved
        log.info("one Scorer call, models taking turns: %s", interleaved)
    if {"dare", "twin"} <= runs.keys():
        out["dare_over_twin"] = {q: runs["dare"]["valid"]["latency_ms"][q] / runs["twin"]["valid"]["latency_ms"][q]
                                 for q in ("p50", "p90", "p99")} | {
            "throughput": runs["dare"]["valid"]["requests_per_s"] / runs["twin"]["valid"]["requests_per_s"]}
    write_json(args.out, out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
