"""Gateway throughput and latency: changes/s delivered by ``pgcapture gateway`` to consumers,
against reading the same stream straight from JetStream.

Throw-away PostgreSQL cluster and nats-server. A source's stream is filled once with narrow rows
(inserted in transactions of 1,000, stored by a ``pgcapture capture`` process that is stopped
before anything is measured, so it takes no CPU). Then, for each repeat, every measurement gets
a gateway process of its own (``python -m pgcapture gateway --config FILE``, TLS and tokens
disabled: loopback) and its consumers, each a process of its own (``python bench/gateway.py
--client ...``), all on URIs with ``start = "beginning"``:

- ``one``: one ``CaptureBatched`` consumer (each ``CaptureBatch`` parsed with protobuf and
  acknowledged with one ``ack_range``) and one ``Capture`` consumer (one message per change,
  each acknowledged by its checkpoint; fewer changes), timed from the consumer's first message
  to its acknowledgement of the last change; the reference, in the same repeat, is one process
  reading the stream from JetStream with nats-py (``read_batches``: an ordered consumer, each
  ``LogBatch`` payload decoded with protobuf);
- ``ten``: ten ``CaptureBatched`` consumers sharing one URI (the changes are split between them:
  all changes over the time from the first message of any to the last acknowledgement of any),
  and ten consumers of ten URIs (each gets every change: the sum over the same span);
- ``latency``: capture and gateway run while pgbench commits single-row transactions at a fixed
  rate; the row holds ``clock_timestamp()`` of its insert and one ``CaptureBatched`` consumer
  computes its handler's time minus that time; then, at the same rate, a consumer reading the
  stream straight from JetStream (an ordered consumer, every record and change decoded with
  protobuf) does the same, as the reference for what capture and JetStream alone take.

Consumers connect first and start together, so their start-up is not timed. CPU seconds of the
gateway, nats-server and the consumers come from ``/proc/PID/stat``. A consumer that receives
nothing for ``--stall-seconds`` (or a shared URI whose JetStream consumer stops advancing) is
reported as stalled; its rate counts what it received up to its last acknowledgement.

    uv run python bench/gateway.py --rows 500000 --repeat 3
    uv run python bench/gateway.py --quick
    uv run python bench/gateway.py --only latency --latency-rates 500,2000 --latency-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import grpc
import nats
import nats.errors
import nats.js.errors
import psycopg
from google.protobuf.struct_pb2 import Struct
from nats.js import api
from procstat import process_cpu

from pgcapture.capture.reader import SlotReader
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.log.batch import decode_batch
from pgcapture.log.reader import read_batches
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.proto import pb, pb_grpc

NARROW: Final = (
    "CREATE TABLE bench_narrow (id bigserial PRIMARY KEY, tid int, bid int, aid int, delta int, "
    "mtime timestamptz, filler char(22))",
    "INSERT INTO bench_narrow (tid, bid, aid, delta, mtime, filler) "
    "SELECT g % 10, g % 100, g, g % 1000, now(), NULL FROM generate_series({lo}, {hi}) g",
)
LATENCY_TABLES: Final = (
    "CREATE TABLE bench_lat (id bigserial PRIMARY KEY, at timestamptz NOT NULL)",
    "CREATE TABLE bench_lat_done (id int PRIMARY KEY)",
)
ROWS_PER_TX: Final = 1000
THROUGHPUT_SOURCE: Final = "gw"
LATENCY_SOURCE: Final = "lat"
CHANGE_TAG: Final = b"\x1a"  # a stored Message holding a Change
PG_EPOCH: Final = 946_684_800  # 2000-01-01 UTC in Unix seconds
CHANNEL_OPTIONS: Final = [("grpc.max_receive_message_length", 64 << 20)]


# --- consumers (``--client`` mode, one process each) ------------------------------------------


@dataclass
class Stats:
    """What one consumer saw: changes, the wall times (``time.time()``, comparable between
    processes) of its first message and of its last acknowledgement, and its CPU seconds in
    between."""

    mode: str
    changes: int = 0
    messages: int = 0
    first: float = 0.0
    last: float = 0.0
    cpu: float = 0.0
    error: str = ""
    stalled: bool = False  # nothing came for the idle limit: the consumer gave up
    latencies: list[float] = field(default_factory=list)
    _cpu_start: float = 0.0

    def begin(self) -> None:
        if not self.messages:
            self.first = time.time()
            self._cpu_start = time.process_time()

    def report(self) -> dict[str, Any]:
        if self.messages:
            self.cpu = time.process_time() - self._cpu_start
        out: dict[str, Any] = {
            "mode": self.mode, "changes": self.changes, "messages": self.messages,
            "first": self.first, "last": self.last, "cpu": self.cpu, "error": self.error,
            "stalled": self.stalled,
        }  # fmt: skip
        if self.mode == "latency":
            lat = sorted(self.latencies)
            out["count"] = len(lat)
            if len(lat) >= 2:
                cut = statistics.quantiles(lat, n=100)
                out.update(p50=cut[49], p99=cut[98], max=lat[-1])
            out["slow"] = sum(1 for v in lat if v > 0.1)
        return out


def init_request(uri: str) -> pb.CaptureRequest:
    return pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=Struct()))


async def wait_for_go() -> None:
    """Tell the parent this consumer is connected, then wait for its "go" on stdin."""
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("the benchmark did not say go")


async def supervise(work: Awaitable[None], stats: Stats, idle: float) -> None:
    """Run ``work`` until it ends, SIGTERM comes, or (``idle`` > 0) no message arrived for
    ``idle`` seconds: then the consumer is marked stalled."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    seen, since = stats.messages, time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait(
                {task, stopping}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                exc = task.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    stats.error = f"stream ended with {exc.code().name}: {exc.details()}"
                elif exc is not None:
                    stats.error = repr(exc)
                return
            if stopping in done:
                return
            if stats.messages != seen:
                seen, since = stats.messages, time.monotonic()
            elif idle and time.monotonic() - since > idle:
                stats.stalled = True
                return
    finally:
        for t in (task, stopping):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def batched_loop(call: Any, stats: Stats, expect: int) -> None:
    """CaptureBatched: parse each batch, count its changes, acknowledge it with one range."""
    while True:
        batch = await call.read()
        if batch is grpc.aio.EOF:
            stats.error = "the gateway ended the stream"
            return
        stats.begin()
        messages = batch.messages
        changes = 0
        for message in messages:
            if message.HasField("change"):
                changes += 1
        last_id = batch.first_id + len(messages) - 1
        rng = pb.CaptureAckRange(first_id=batch.first_id, last_id=last_id)
        await call.write(pb.CaptureRequest(ack_range=rng))
        stats.last = time.time()
        stats.messages += 1
        stats.changes += changes
        if expect and stats.changes >= expect:
            return


async def capture_loop(call: Any, stats: Stats, expect: int) -> None:
    """Capture (the Go project's method): acknowledge each change by its checkpoint."""
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            stats.error = "the gateway ended the stream"
            return
        stats.begin()
        ack = pb.CaptureAck(checkpoint=message.checkpoint)
        await call.write(pb.CaptureRequest(ack=ack))
        stats.last = time.time()
        stats.messages += 1
        stats.changes += 1
        if expect and stats.changes >= expect:
            return


def column(fields: Iterable[pb.Field], name: str) -> bytes:
    for f in fields:
        if f.name == name:
            return f.binary
    raise SystemExit(f"column {name} missing from a change")


class LatencyHandler:
    """For each ``bench_lat`` row, the handler's time minus the row's ``at`` (binary
    timestamptz: int64 microseconds since 2000-01-01 UTC). A ``bench_lat_done`` row with a
    positive id is a warm-up marker (the first one prints "live"), one with id <= 0 ends the
    run."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.live = False
        self.end = False

    def handle(self, change: pb.Change, now: float) -> None:
        stats = self.stats
        if change.table == "bench_lat":
            at = int.from_bytes(column(change.new, "at"), "big", signed=True)
            stats.latencies.append(now - PG_EPOCH - at / 1e6)
            stats.changes += 1
        elif change.table == "bench_lat_done":
            marker = int.from_bytes(column(change.new, "id"), "big", signed=True)
            if marker <= 0:
                self.end = True
            elif not self.live:
                self.live = True
                print("live", flush=True)


async def latency_loop(call: Any, stats: Stats) -> None:
    """CaptureBatched, each change through a ``LatencyHandler``."""
    handler = LatencyHandler(stats)
    while True:
        batch = await call.read()
        if batch is grpc.aio.EOF:
            stats.error = "the gateway ended the stream"
            return
        now = time.time()
        stats.begin()
        for message in batch.messages:
            handler.handle(message.change, now)
        last_id = batch.first_id + len(batch.messages) - 1
        rng = pb.CaptureAckRange(first_id=batch.first_id, last_id=last_id)
        await call.write(pb.CaptureRequest(ack_range=rng))
        stats.last = time.time()
        stats.messages += 1
        if handler.end:
            return


async def gateway_client(args: argparse.Namespace) -> Stats:
    stats = Stats(args.client)
    async with grpc.aio.insecure_channel(args.address, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 120)
        await wait_for_go()
        stub = pb_grpc.DBLogGatewayStub(channel)
        call = stub.Capture() if args.client == "capture" else stub.CaptureBatched()
        await call.write(init_request(args.uri))
        if args.client == "batched":
            work = batched_loop(call, stats, args.expect)
        elif args.client == "capture":
            work = capture_loop(call, stats, args.expect)
        else:
            work = latency_loop(call, stats)
        await supervise(work, stats, args.idle)
        call.cancel()
    return stats


async def direct_client(args: argparse.Namespace) -> Stats:
    """The reference: the stream read straight from JetStream with nats-py."""
    stats = Stats("direct")
    nc = await nats.connect(args.nats)
    try:
        js = nc.jetstream()
        await js.stream_info(args.stream)
        await wait_for_go()

        async def work() -> None:
            async for batch in read_batches(js, args.stream):
                stats.begin()
                changes = 0
                for record in batch.records:
                    if record.message[:1] == CHANGE_TAG:
                        changes += 1
                stats.last = time.time()
                stats.messages += 1
                stats.changes += changes

        await supervise(work(), stats, args.idle)
    finally:
        await nc.close()
    return stats


async def direct_latency_client(args: argparse.Namespace) -> Stats:
    """The latency reference: new messages of the stream straight from JetStream (an ordered
    consumer), each record and change decoded with protobuf, through a ``LatencyHandler``."""
    stats = Stats("latency")
    nc = await nats.connect(args.nats)
    try:
        js = nc.jetstream()
        info = await js.stream_info(args.stream)
        subject = (info.config.subjects or [">"])[0]
        sub = await js.subscribe(
            subject,
            stream=args.stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW),
        )
        await wait_for_go()
        handler = LatencyHandler(stats)

        async def work() -> None:
            while not handler.end:
                msg = await sub.next_msg(timeout=None)
                now = time.time()
                stats.begin()
                for record in decode_batch(msg.data):
                    if record.message[:1] == CHANGE_TAG:
                        handler.handle(pb.Message.FromString(record.message).change, now)
                stats.last = time.time()
                stats.messages += 1

        await supervise(work(), stats, args.idle)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return stats


def client_main(args: argparse.Namespace) -> None:
    run = {"direct": direct_client, "direct-latency": direct_latency_client}.get(
        args.client, gateway_client
    )
    stats = asyncio.run(run(args))
    print(json.dumps(stats.report()), flush=True)


# --- processes ---------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        text = []
    return "\n".join(f"    {line}" for line in text) or "    (no output)"


class Service:
    """A ``pgcapture`` process (gateway or capture) whose output goes to a log file; with
    ``profile``, run under cProfile, its profile printed to stderr when it stops."""

    def __init__(self, what: str, args: list[str], profile: bool = False) -> None:
        self.what = what
        fd, name = tempfile.mkstemp(prefix=f"bench-{what}-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        self.profile = self.log.with_suffix(".prof") if profile else None
        python = [sys.executable]
        if self.profile is not None:
            python += ["-m", "cProfile", "-o", str(self.profile)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*python, "-m", "pgcapture", *args], stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(
                f"{self.what} exited with status {self.proc.returncode}; its output:\n"
                f"{log_tail(self.log)}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.what} did not stop within 30 s of SIGTERM; killed")
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)
        if self.profile is not None and self.profile.exists():
            print(f"\nprofile of the {self.what} process:", file=sys.stderr)
            stats = pstats.Stats(str(self.profile), stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(30)
            self.profile.unlink()


class Client:
    """A consumer process (``--client``): says "ready" once connected, starts on "go", prints
    its ``Stats`` as one JSON line at the end."""

    def __init__(self, what: str, args: list[str]) -> None:
        self.what = what
        fd, name = tempfile.mkstemp(prefix="bench-client-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--client", *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str] | None) -> None:
        assert out is not None
        for line in out:
            self.lines.put(line.strip())
        self.lines.put(None)

    def line(self, timeout: float, services: Iterable[Service] = ()) -> str | None:
        """The next line, or None after ``timeout`` seconds; fails if the client or one of
        ``services`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                for service in services:
                    service.check()
                if time.monotonic() >= deadline:
                    return None
                continue
            if line is None:
                self.proc.wait()
                raise SystemExit(
                    f"{self.what} exited with status {self.proc.returncode}; its output:\n"
                    f"{log_tail(self.log)}"
                )
            return line

    def expect(self, word: str, timeout: float, services: Iterable[Service] = ()) -> None:
        line = self.line(timeout, services)
        if line != word:
            raise SystemExit(f"{self.what}: expected {word!r}, got {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float, services: Iterable[Service] = ()) -> dict[str, Any]:
        line = self.line(timeout, services)
        if line is None:
            raise SystemExit(f"{self.what}: no result within {timeout:.0f} s")
        result: dict[str, Any] = json.loads(line)
        if result["error"]:
            raise SystemExit(f"{self.what}: {result['error']}")
        return result

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.log.unlink(missing_ok=True)


@dataclass
class Env:
    """The servers of one benchmark run and the files shared by its processes."""

    pg: LocalPostgres
    nats: LocalNats
    workdir: Path
    profile: bool = False  # run gateways under cProfile
    marker: int = 0  # the last id given to a bench_lat_done row

    def next_marker(self) -> int:
        self.marker += 1
        return self.marker

    @property
    def dsn(self) -> str:
        return self.pg.dsn("bench")

    @property
    def nats_pid(self) -> int:
        assert self.nats.process is not None
        return self.nats.process.pid

    def stream(self, source: str) -> str:
        return f"PGCAPTURE_{source.upper()}"

    def write_config(self, port: int, uris: dict[str, tuple[str, str]]) -> Path:
        """A configuration file with both sources and ``uris`` (name: (source, start))."""
        q = json.dumps  # a JSON string is a TOML basic string
        lines = [
            "[nats]", f"url = {q(self.nats.url)}",
            "[log]", 'level = "warning"',
            f"[sources.{THROUGHPUT_SOURCE}]", f"dsn = {q(self.dsn)}",
            f'slot = "{THROUGHPUT_SOURCE}"', f'publication = "{THROUGHPUT_SOURCE}"',
            'tables = ["bench_narrow"]',
            f"[sources.{LATENCY_SOURCE}]", f"dsn = {q(self.dsn)}",
            f'slot = "{LATENCY_SOURCE}"', f'publication = "{LATENCY_SOURCE}"',
            'tables = ["bench_lat", "bench_lat_done"]',
            "[gateway]", f'listen = "127.0.0.1:{port}"',
            "[gateway.tls]", "disabled = true",
            "[gateway.auth]", "disabled = true",
        ]  # fmt: skip
        for name, (source, start) in uris.items():
            lines += [f"[gateway.uris.{name}]", f"source = {q(source)}", f"start = {q(start)}"]
        path = self.workdir / f"gateway-{port}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def gateway(self, uris: dict[str, tuple[str, str]]) -> tuple[Service, str]:
        port = free_port()
        config = self.write_config(port, uris)
        args = ["gateway", "--config", str(config)]
        return Service("gateway", args, self.profile), f"127.0.0.1:{port}"


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


async def prepare_slot(dsn: str, name: str, tables: list[str]) -> None:
    """Publication and slot ``name`` (as capture makes them) before anything is written."""
    setup = SlotReader(dsn, name, publication=name, tables=tables)
    await setup.open()
    await setup.close()


async def delete_consumers(nats_url: str, stream: str, names: Iterable[str]) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(stream, name)
    finally:
        await nc.close()


# --- filling the stream ------------------------------------------------------------------------


@dataclass
class StreamInfo:
    changes: int
    messages: int
    bytes: int
    seconds: float  # capture: process start to the last commit stored


def fill_stream(env: Env, rows: int) -> StreamInfo:
    """Write ``rows`` narrow rows in transactions of 1,000, then run ``pgcapture capture`` until
    the stream holds the last transaction's Commit, and stop it."""
    sql(env.dsn, NARROW[0])
    asyncio.run(prepare_slot(env.dsn, THROUGHPUT_SOURCE, ["bench_narrow"]))
    before_last = LSN(0)
    last_rows = 0
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        for lo in range(1, rows + 1, ROWS_PER_TX):
            hi = min(lo + ROWS_PER_TX - 1, rows)
            if hi == rows:
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert row is not None
                before_last, last_rows = LSN.parse(row[0]), hi - lo + 1
            conn.execute(NARROW[1].format(lo=lo, hi=hi))
    config = env.write_config(free_port(), {})
    started = time.perf_counter()
    capture = Service("capture", ["capture", "--config", str(config), "--source", "gw"])
    try:
        asyncio.run(wait_commit(env, before_last, last_rows + 1, capture))
        seconds = time.perf_counter() - started
    finally:
        capture.stop()
    return asyncio.run(count_stream(env.nats.url, env.stream(THROUGHPUT_SOURCE), seconds))


async def wait_commit(env: Env, after: LSN, seq: int, capture: Service) -> None:
    """Until the stream's last record is the Commit (``seq``) of a transaction past ``after``."""
    nc = await nats.connect(env.nats.url)
    try:
        async with asyncio.timeout(1800):
            while True:
                capture.check()
                with contextlib.suppress(nats.errors.Error):
                    tail = await read_tail(nc.jetstream(), env.stream(THROUGHPUT_SOURCE))
                    cp = tail.checkpoint
                    if cp is not None and cp.lsn > after and cp.seq >= seq:
                        return
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def count_stream(nats_url: str, stream: str, seconds: float) -> StreamInfo:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        changes = 0
        async for batch in read_batches(js, stream):
            changes += sum(1 for r in batch.records if r.message[:1] == CHANGE_TAG)
        return StreamInfo(changes, info.state.messages, info.state.bytes, seconds)
    finally:
        await nc.close()


# --- throughput --------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured delivery: changes over the span from the first consumer's first message to
    the last consumer's last acknowledgement, and CPU seconds meanwhile. ``stalls`` says which
    consumers (or URIs) stopped receiving before they had everything."""

    changes: int
    expected: int
    seconds: float
    gateway_cpu: float
    client_cpu: float  # all consumers together
    nats_cpu: float
    per_client: list[int]
    stalls: list[str]

    @property
    def rate(self) -> float:
        return self.changes / self.seconds


def run_clients(
    env: Env,
    specs: list[list[str]],
    expected: int,
    gateway: Service | None,
    until: Callable[[], Coroutine[Any, Any, list[str]]] | None = None,
) -> Run:
    """Start one consumer per ``specs``, wait until all are connected, start them together;
    each ends on its own (or stalls), or all are told to stop once ``until`` returns (the
    stalls it saw)."""
    services = [gateway] if gateway is not None else []
    clients: list[Client] = []
    stalls: list[str] = []
    try:
        for i, spec in enumerate(specs):
            clients.append(Client(f"consumer {i + 1} ({spec[0]} {' '.join(spec[3:5])})", spec))
        for c in clients:
            c.expect("ready", 180, services)
        pids = [gateway.pid] if gateway is not None else []
        cpu_before = [process_cpu(p) for p in pids], process_cpu(env.nats_pid)
        for c in clients:
            c.go()
        if until is not None:
            stalls += asyncio.run(until())
            for c in clients:
                c.terminate()
        results = [c.result(3600, services) for c in clients]
        gateway_cpu = sum(process_cpu(p) for p in pids) - sum(cpu_before[0])
        nats_cpu = process_cpu(env.nats_pid) - cpu_before[1]
    finally:
        for c in clients:
            c.stop()
    for c, r in zip(clients, results, strict=True):
        if r["stalled"]:
            stalls.append(f"{c.what}: nothing more after {r['changes']:,} changes")
    got = [r for r in results if r["messages"]]
    if not got:
        raise SystemExit("no consumer received anything")
    first, last = min(r["first"] for r in got), max(r["last"] for r in got)
    return Run(
        sum(r["changes"] for r in results), expected, last - first, gateway_cpu,
        sum(r["cpu"] for r in results), nats_cpu, [r["changes"] for r in results], stalls,
    )  # fmt: skip


def measure_direct(env: Env, expect: int, idle: float) -> Run:
    spec = ["direct", "--nats", env.nats.url, "--stream", env.stream(THROUGHPUT_SOURCE)]
    return run_clients(env, [[*spec, "--idle", str(idle)]], expect, None)


def measure_gateway(
    env: Env, uris: list[str], mode: str, expect: int, idle: float, clients_per_uri: int = 1
) -> Run:
    """Consumers of ``uris`` (``clients_per_uri`` each) on a fresh gateway; each expects
    ``expect`` changes, or, when several share a URI, all stop once its JetStream consumer
    has acknowledged every stream message (or made no progress for ``idle`` seconds)."""
    gateway, address = env.gateway({u: (THROUGHPUT_SOURCE, "beginning") for u in uris})
    stream = env.stream(THROUGHPUT_SOURCE)
    try:
        shared = clients_per_uri > 1
        specs = [
            [mode, "--address", address, "--uri", uri, "--expect", str(0 if shared else expect),
             "--idle", str(0 if shared else idle)]
            for uri in uris
            for _ in range(clients_per_uri)
        ]  # fmt: skip
        until = None
        if shared:
            until = lambda: wait_consumers_done(env.nats.url, stream, uris, gateway, idle)  # noqa: E731
        expected = expect * (1 if shared else len(uris))
        run = run_clients(env, specs, expected, gateway, until)
    finally:
        gateway.stop()
    asyncio.run(delete_consumers(env.nats.url, stream, (f"pgcapture_{u}" for u in uris)))
    return run


async def wait_consumers_done(
    nats_url: str, stream: str, uris: list[str], gw: Service, idle: float
) -> list[str]:
    """Until the JetStream consumer of every URI has its acknowledgement floor at the stream's
    last message (the gateway acknowledges a message only once every change of it was
    acknowledged by a client), or its floor has not moved for ``idle`` seconds: those URIs
    are returned as stalled."""
    nc = await nats.connect(nats_url)
    stalled: list[str] = []
    try:
        js = nc.jetstream()
        last = (await js.stream_info(stream)).state.last_seq
        floors = dict.fromkeys(uris, (-1, time.monotonic()))
        async with asyncio.timeout(3600):
            while floors:
                gw.check()
                for uri, (floor, since) in list(floors.items()):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        info = await js.consumer_info(stream, f"pgcapture_{uri}")
                        now = info.ack_floor.stream_seq if info.ack_floor else 0
                        if now >= last:
                            del floors[uri]
                        elif now != floor:
                            floors[uri] = (now, time.monotonic())
                        elif time.monotonic() - since > idle:
                            stalled.append(
                                f"URI {uri}: its stream messages acknowledged up to {now} of "
                                f"{last}, no progress for {idle:.0f} s"
                            )
                            del floors[uri]
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return stalled


@dataclass
class Throughput:
    label: str
    clients: int
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))


def throughput(
    env: Env, info: StreamInfo, args: argparse.Namespace, parts: set[str]
) -> list[Throughput]:
    n, m, k = info.changes, min(args.capture_rows, info.changes), args.clients
    idle = args.stall_seconds
    direct = Throughput("direct JetStream read (nats-py, `read_batches`)", 1)
    batched = Throughput("CaptureBatched, 1 consumer", 1)
    capture = Throughput("Capture, 1 consumer", 1)
    shared = Throughput(f"CaptureBatched, {k} consumers sharing 1 URI", k)
    fanout = Throughput(f"CaptureBatched, {k} URIs, 1 consumer each (each gets all)", k)
    for i in range(args.repeat):
        print(f"repeat {i + 1} of {args.repeat}", flush=True)
        step(direct, measure_direct(env, n, idle))
        if "one" in parts:
            step(batched, measure_gateway(env, [f"b{i}"], "batched", n, idle))
            step(capture, measure_gateway(env, [f"c{i}"], "capture", m, idle))
        if "ten" in parts:
            step(shared, measure_gateway(env, [f"s{i}"], "batched", n, idle, k))
            fan = [f"f{i}_{j}" for j in range(k)]
            step(fanout, measure_gateway(env, fan, "batched", n, idle))
    return [t for t in (direct, batched, capture, shared, fanout) if t.runs]


def step(result: Throughput, run: Run) -> None:
    result.runs.append(run)
    spread = ""
    if len(run.per_client) > 1:
        spread = f" (per consumer {min(run.per_client):,} to {max(run.per_client):,})"
    print(
        f"  {result.label}: {run.changes:,} of {run.expected:,} changes in {run.seconds:.2f} s "
        f"= {run.rate:,.0f}/s{spread}; CPU s: gateway {run.gateway_cpu:.2f}, "
        f"consumers {run.client_cpu:.2f}, nats-server {run.nats_cpu:.2f}",
        flush=True,
    )
    for stall in run.stalls:
        print(f"    STALLED: {stall}", flush=True)
    if not run.stalls and run.changes != run.expected:
        print(f"    warning: {run.changes:,} changes received, {run.expected:,} expected")


def ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def print_throughput(results: list[Throughput], repeat: int) -> None:
    direct = statistics.median(r.rate for r in results[0].runs)
    print(
        f"\nthroughput (medians of {repeat}; changes/s = changes received / seconds from the "
        "first message to the last acknowledgement; ratio against the direct read)\n"
    )
    print(
        "| consumer | processes | changes | seconds | changes/s | ratio to direct "
        "| gateway CPU s | consumers CPU s | nats-server CPU s | gateway µs per change "
        "| runs that stalled |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = statistics.median(run.rate for run in r.runs)
        changes = statistics.median(run.changes for run in r.runs)
        gw = statistics.median(run.gateway_cpu / run.changes for run in r.runs)
        per_change = f"{gw * 1e6:.1f}" if gw else "–"
        stalled = sum(1 for run in r.runs if run.stalls)
        print(
            f"| {r.label} | {r.clients} | {changes:,.0f} | {r.median('seconds'):.2f} "
            f"| {rate:,.0f} | {ratio(rate / direct)} | {r.median('gateway_cpu'):.2f} "
            f"| {r.median('client_cpu'):.2f} | {r.median('nats_cpu'):.2f} | {per_change} "
            f"| {stalled} of {len(r.runs)} |"
        )
    print("\nevery run (changes/s; changes received of expected when short):")
    for r in results:
        runs = [
            f"{run.rate:,.0f}"
            + (f" ({run.changes:,} of {run.expected:,})" if run.changes != run.expected else "")
            for run in r.runs
        ]
        print(f"  {r.label}: " + ", ".join(runs))


# --- latency -----------------------------------------------------------------------------------


@dataclass
class Latency:
    rate: int
    reader: str  # "gateway" or "direct"
    achieved: float  # pgbench's tps
    committed: int
    received: int
    p50: float
    p99: float
    maximum: float
    slow: int  # rows over 100 ms
    capture_cpu: float
    gateway_cpu: float
    client_cpu: float
    nats_cpu: float
    seconds: float  # the pgbench window the CPU figures cover


def latency(env: Env, args: argparse.Namespace) -> list[Latency]:
    """Capture and a gateway run for all rates; for each rate, one CaptureBatched consumer (on
    a URI of its own), then one consumer reading the stream straight from JetStream."""
    sql(env.dsn, *LATENCY_TABLES)
    asyncio.run(prepare_slot(env.dsn, LATENCY_SOURCE, ["bench_lat", "bench_lat_done"]))
    rates = [int(r) for r in args.latency_rates.split(",")]
    gateway, address = env.gateway({f"lat{r}": (LATENCY_SOURCE, "new") for r in rates})
    capture = Service(
        "capture", ["capture", "--config", str(env.write_config(0, {})), "--source", "lat"]
    )
    out: list[Latency] = []
    try:
        for rate in rates:
            for reader in ("gateway", "direct"):
                if reader == "gateway":
                    spec = ["latency", "--address", address, "--uri", f"lat{rate}"]
                    spec += ["--idle", str(args.stall_seconds)]
                else:
                    stream = env.stream(LATENCY_SOURCE)
                    spec = ["direct-latency", "--nats", env.nats.url, "--stream", stream]
                    spec += ["--idle", str(args.stall_seconds)]
                lat = measure_latency(env, rate, reader, spec, gateway, capture, args)
                out.append(lat)
                print(
                    f"  {rate:,}/s, {reader}: {lat.received:,} rows, p50 {lat.p50 * 1e3:.2f} ms, "
                    f"p99 {lat.p99 * 1e3:.2f} ms, max {lat.maximum * 1e3:.1f} ms, "
                    f"{lat.slow:,} over 100 ms",
                    flush=True,
                )
    finally:
        gateway.stop()
        capture.stop()
    return out


def measure_latency(
    env: Env,
    rate: int,
    reader: str,
    spec: list[str],
    gateway: Service,
    capture: Service,
    args: argparse.Namespace,
) -> Latency:
    client = Client(f"latency consumer ({reader}, {rate}/s)", spec)
    services = (gateway, capture)
    try:
        client.expect("ready", 180, services)
        client.go()
        deadline = time.monotonic() + 120
        while True:  # warm-up markers until the consumer has one: the path is live
            sql(env.dsn, f"INSERT INTO bench_lat_done VALUES ({env.next_marker()})")
            line = client.line(0.5, services)
            if line == "live":
                break
            if line is not None or time.monotonic() > deadline:
                raise SystemExit(f"{client.what}: expected 'live', got {line!r}")
        pids = (capture.pid, gateway.pid, client.proc.pid, env.nats_pid)
        before = [process_cpu(p) for p in pids]
        started = time.perf_counter()
        committed, tps = run_pgbench(env, rate, args.latency_seconds)
        seconds = time.perf_counter() - started
        capture_cpu, gateway_cpu, client_cpu, nats_cpu = (
            process_cpu(p) - b for p, b in zip(pids, before, strict=True)
        )
        sql(env.dsn, f"INSERT INTO bench_lat_done VALUES ({-env.next_marker()})")
        result = client.result(120, services)
    finally:
        client.stop()
    if result["stalled"]:
        print(f"    STALLED: {client.what}: nothing more after {result['count']:,} rows")
    if result["count"] != committed:
        print(
            f"warning: pgbench committed {committed:,} rows at {rate}/s, the {reader} consumer "
            f"received {result['count']:,}"
        )
    return Latency(
        rate, reader, tps, committed, result["count"], result["p50"], result["p99"],
        result["max"], result["slow"], capture_cpu, gateway_cpu, client_cpu, nats_cpu, seconds,
    )  # fmt: skip


def run_pgbench(env: Env, rate: int, seconds: int) -> tuple[int, float]:
    """Single-row inserts at ``rate``/s for ``seconds``: (transactions, pgbench's tps)."""
    script = env.workdir / "insert.sql"
    script.write_text("INSERT INTO bench_lat (at) VALUES (clock_timestamp());\n")
    pg = env.pg
    proc = subprocess.run(
        [str(pg.bin_dir / "pgbench"), "-n", "-h", str(pg.socket_dir), "-p", str(pg.port),
         "-U", "postgres", "-c", "4", "-j", "2", "-R", str(rate), "-T", str(seconds),
         "-f", str(script), "bench"],
        capture_output=True, text=True,
    )  # fmt: skip
    count = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
    tps = re.search(r"tps = ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or count is None or tps is None:
        raise SystemExit(f"pgbench failed:\n{proc.stdout}\n{proc.stderr}")
    return int(count[1]), float(tps[1])


def print_latency(results: list[Latency]) -> None:
    print("\ncommit-to-handler latency (handler time - clock_timestamp() of the insert); the")
    print("gateway's CaptureBatched consumer, then a consumer reading JetStream directly\n")
    print(
        "| target rate | consumer | achieved (pgbench tps) | rows | p50 | p99 | max | over 100 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.rate:,}/s | {r.reader} | {r.achieved:,.0f} | {r.received:,} "
            f"| {r.p50 * 1e3:.2f} ms | {r.p99 * 1e3:.2f} ms | {r.maximum * 1e3:.1f} ms "
            f"| {r.slow:,} |"
        )
    print("\nCPU during the pgbench window (seconds of CPU per second of wall)\n")
    print("| target rate | consumer | capture | gateway | consumer | nats-server |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s = r.seconds
        print(
            f"| {r.rate:,}/s | {r.reader} | {r.capture_cpu / s:.2f} | {r.gateway_cpu / s:.2f} "
            f"| {r.client_cpu / s:.2f} | {r.nats_cpu / s:.2f} |"
        )


# --- main --------------------------------------------------------------------------------------


PROCESSES: Final = """\
processes: nats-server (one process), the gateway (`python -m pgcapture gateway`, one process
per measurement), every consumer (`python bench/gateway.py --client ...`, one process each),
capture (`python -m pgcapture capture`, stopped before the throughput parts; running in the
latency part), PostgreSQL (idle in the throughput parts); this script only starts them and
waits. Nothing is pinned: the kernel schedules all of them on the machine's {cpus} CPUs."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000, help="changes in the stream")
    parser.add_argument("--capture-rows", type=int, default=20_000,
                        help="changes read by the Capture (one per message) consumer")  # fmt: skip
    parser.add_argument("--clients", type=int, default=10, help="consumers in the `ten` part")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="one,ten,latency",
                        help="comma-separated parts: one, ten, latency")  # fmt: skip
    parser.add_argument("--latency-rates", default="500,2000", help="transactions/s")
    parser.add_argument("--latency-seconds", type=int, default=10)
    parser.add_argument("--stall-seconds", type=float, default=10.0,
                        help="seconds without a message: the consumer stalled")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one repeat: a smoke check of every part")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="run each gateway under cProfile, print its profile")  # fmt: skip
    # consumer mode (internal): one consumer process
    parser.add_argument("--client",
                        choices=["batched", "capture", "latency", "direct", "direct-latency"],
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    if args.quick:
        args.rows, args.capture_rows, args.repeat = 20_000, 5_000, 1
        args.latency_rates, args.latency_seconds = "200,500", 3
    parts = set(args.only.split(","))
    if unknown := parts - {"one", "ten", "latency"}:
        raise SystemExit(f"unknown part: {', '.join(sorted(unknown))}")
    print(PROCESSES.format(cpus=os.cpu_count()), flush=True)
    load = os.getloadavg()
    results: list[Throughput] = []
    lat: list[Latency] = []
    info = None
    settings = {"max_wal_size": "8GB", "wal_sender_timeout": "0"}
    with (
        LocalPostgres.create(settings=settings) as pg,
        LocalNats() as server,
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as workdir,
    ):
        sql(pg.dsn(), "CREATE DATABASE bench")
        env = Env(pg, server, Path(workdir), args.profile)
        if parts & {"one", "ten"}:
            info = fill_stream(env, args.rows)
            print(
                f"stream: {info.changes:,} changes in {info.messages:,} messages "
                f"({info.changes / max(info.messages, 1):,.0f} changes per message), "
                f"{info.bytes / 2**20:,.0f} MiB (stored by capture in {info.seconds:.1f} s, "
                "then capture stopped)",
                flush=True,
            )
            results = throughput(env, info, args, parts)
        if "latency" in parts:
            lat = latency(env, args)
    print(f"\nload average before and after: {load[0]:.2f}, {os.getloadavg()[0]:.2f}")
    if results:
        print_throughput(results, args.repeat)
    if lat:
        print_latency(lat)


if __name__ == "__main__":
    main()
