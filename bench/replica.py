"""Replica apply: seconds for a replica to apply a source's transactions, pgcapture against a
native PostgreSQL subscription.

Two throw-away clusters (source and replica, Unix sockets, fsync off) and a nats-server. For
each workload (pgbench's TPC-B-like transactions; bulk inserts of narrow rows; bulk inserts of
61-column rows) the schema and initial data are built once in a template database on the source
and copied to a template database on the replica (``pg_dump | psql``), so every replica database
made from it starts equal to every source database made from the other. Every workload ends with
one marker transaction (``INSERT INTO bench_done``), committed after all the others.

``apply``: the workload runs once, on a fresh source database, while ``pgcapture capture`` stores
it in JetStream and a native logical slot (``pgoutput``, created with the publication before the
workload) keeps the same WAL. Then, for each repeat, alternately:

- native: a fresh replica database subscribes (``CREATE SUBSCRIPTION ... WITH (create_slot =
  false, slot_name = <a copy of the slot>, copy_data = false, binary = true)``), timed from that
  statement until the marker row is on the replica;
- pgcapture: a fresh replica database gets the position the source had before the workload
  (``set_position``), then ``python -m pgcapture replicate`` starts, timed from the process start
  until the marker row is on the replica.

``e2e``: both run while the workload runs (one after the other, each on a fresh source and
replica database): subscription or capture + replicate is started and a warm-up marker has
arrived before the workload starts; timed are the workload and the catch-up from its end (the
marker's commit) until the marker is on the replica.

After every run each table is compared on source and replica (row count and an md5 over every
row in key order); a difference stops the benchmark.

    uv run python bench/replica.py --repeat 3
    uv run python bench/replica.py --only pgbench --scale 10 --transactions 20000 --modes apply
    uv run python bench/replica.py --only narrow --modes apply --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nats
import nats.errors
import psycopg
from procstat import process_cpu

from pgcapture.capture.reader import SlotReader
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.replica.store import set_position

SOURCE_SETTINGS: Final = {"max_wal_size": "8GB", "wal_sender_timeout": "0"}
# PostgreSQL 15's launcher starts an apply worker at most once per wal_retrieve_retry_interval
# (5 s by default): that wait would count against the native subscription.
REPLICA_SETTINGS: Final = {
    "max_wal_size": "8GB",
    "wal_receiver_timeout": "0",
    "wal_retrieve_retry_interval": "10ms",
}
MARKER_TABLE: Final = "CREATE TABLE bench_done (id int PRIMARY KEY)"
WIDE_GROUPS: Final = 15  # (int, text, numeric, timestamptz) x 15 + id = 61 columns


@dataclass(frozen=True)
class Workload:
    """What a benchmark run writes on the source: ``setup`` builds the schema and initial data
    of a database, ``run`` writes the measured transactions into a copy of it."""

    name: str
    label: str
    transactions: int
    rows: int  # rows inserted, updated or deleted by ``run``
    tables: tuple[tuple[str, str], ...]  # (table, ORDER BY of its checksum over alias t)
    setup: Callable[[LocalPostgres, str], None]
    run: Callable[[LocalPostgres, str], None]

    @property
    def table_names(self) -> list[str]:
        return [t for t, _ in self.tables]


def pgbench_workload(scale: int, transactions: int, clients: int) -> Workload:
    per_client = max(1, transactions // clients)

    def setup(cluster: LocalPostgres, db: str) -> None:
        pgbench(cluster, db, "-i", "-q", "-s", str(scale))
        sql(cluster.dsn(db), MARKER_TABLE)

    def run(cluster: LocalPostgres, db: str) -> None:
        out = pgbench(cluster, db, "-n", "-c", str(clients), "-j", str(min(clients, 2)),
                      "-t", str(per_client))  # fmt: skip
        match = re.search(r"number of transactions actually processed: (\d+)", out)
        if match is None or int(match[1]) != per_client * clients:
            raise SystemExit(f"pgbench did not run all its transactions:\n{out}")

    return Workload(
        "pgbench",
        f"pgbench -s {scale}, {clients} clients",
        per_client * clients,
        per_client * clients * 4,  # 3 updates + 1 insert per transaction
        (
            ("pgbench_accounts", "t.aid"),
            ("pgbench_branches", "t.bid"),
            ("pgbench_tellers", "t.tid"),
            ("pgbench_history", "t::text"),
        ),
        setup,
        run,
    )


def bulk_workload(
    name: str, label: str, create: str, insert: str, rows: int, per_tx: int
) -> Workload:
    table = create.split()[2]

    def setup(cluster: LocalPostgres, db: str) -> None:
        sql(cluster.dsn(db), create, MARKER_TABLE)

    def run(cluster: LocalPostgres, db: str) -> None:
        with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
            for lo in range(1, rows + 1, per_tx):
                conn.execute(insert.format(lo=lo, hi=min(lo + per_tx - 1, rows)))

    return Workload(name, label, -(-rows // per_tx), rows, ((table, "t.id"),), setup, run)


NARROW: Final = (
    "CREATE TABLE bench_narrow (id bigint PRIMARY KEY, tid int, bid int, aid int, delta int, "
    "mtime timestamptz, filler char(22))",
    "INSERT INTO bench_narrow SELECT g, g % 10, g % 100, g, g % 1000, now(), NULL "
    "FROM generate_series({lo}, {hi}) g",
)
WIDE: Final = (
    "CREATE TABLE bench_wide (id bigint PRIMARY KEY, "
    + ", ".join(f"i{i} int, t{i} text, n{i} numeric, ts{i} timestamptz" for i in range(WIDE_GROUPS))
    + ")",
    "INSERT INTO bench_wide SELECT g, "
    + ", ".join(
        f"g + {i}, md5((g + {i})::text), g * 1.25 + {i}, now() + interval '{i} s'"
        for i in range(WIDE_GROUPS)
    )
    + " FROM generate_series({lo}, {hi}) g",
)


# --- clusters, databases, processes ---------------------------------------------------------


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def scalar(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def pgbench(cluster: LocalPostgres, db: str, *args: str) -> str:
    cmd = [str(cluster.bin_dir / "pgbench"), "-h", str(cluster.socket_dir),
           "-p", str(cluster.port), "-U", "postgres", *args, db]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pgbench {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def create_db(cluster: LocalPostgres, db: str, template: str | None = None) -> None:
    suffix = f" TEMPLATE {template}" if template else ""
    sql(cluster.dsn(), f"CREATE DATABASE {db}{suffix}")


def drop_db(cluster: LocalPostgres, db: str) -> None:
    sql(cluster.dsn(), f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def copy_database(source: LocalPostgres, db: str, replica: LocalPostgres, to: str) -> None:
    """``pg_dump | psql``: the replica database ``to`` becomes equal to the source's ``db``."""
    create_db(replica, to)
    dump = subprocess.Popen(
        [str(source.bin_dir / "pg_dump"), "-h", str(source.socket_dir), "-p", str(source.port),
         "-U", "postgres", db],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    subprocess.run(
        [str(replica.bin_dir / "psql"), "-h", str(replica.socket_dir), "-p", str(replica.port),
         "-U", "postgres", "-q", "-v", "ON_ERROR_STOP=1", "-d", to],
        stdin=dump.stdout, stdout=subprocess.DEVNULL, check=True,
    )  # fmt: skip
    assert dump.stdout is not None
    dump.stdout.close()
    if dump.wait() != 0:
        raise SystemExit(f"pg_dump of {db} failed")
    sql(replica.dsn(to), "VACUUM ANALYZE")


def current_lsn(dsn: str) -> LSN:
    return LSN.parse(scalar(dsn, "SELECT pg_current_wal_lsn()::text"))


def write_marker(dsn: str, marker: int) -> LSN:
    """Commit the marker transaction; returns the WAL position just before it (every earlier
    commit is below it, the marker's commit above)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        conn.execute("INSERT INTO bench_done VALUES (%s)", (marker,))
    return LSN.parse(row[0])


ARRIVAL: Final = (
    "SELECT EXISTS (SELECT FROM bench_done WHERE id = %s), EXISTS (SELECT FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid())"
)


def wait_marker(
    dsn: str, marker: int, children: tuple[Child, ...] = (), timeout: float = 3600
) -> tuple[float, float]:
    """``perf_counter()`` when the marker row is on the replica, and when another backend (the
    apply worker, or replicate's connection) was first seen in the replica database (both
    polled every 10 ms); fails if one of ``children`` exits meanwhile."""
    connected = float("nan")
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.perf_counter() + timeout
        while True:
            row = conn.execute(ARRIVAL, (marker,)).fetchone()
            assert row is not None
            if row[1] and connected != connected:
                connected = time.perf_counter()
            if row[0]:
                done = time.perf_counter()
                return done, connected if connected == connected else done
            for child in children:
                if (failure := child.failure()) is not None:
                    stop_all(*children)
                    raise SystemExit(failure)
            if time.perf_counter() > deadline:
                raise SystemExit(f"marker {marker} did not reach the replica in {timeout:.0f} s")
            time.sleep(0.01)


def checksums(dsn: str, workload: Workload) -> dict[str, tuple[int, str]]:
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, order in workload.tables:
            row = conn.execute(
                f"SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY {order})) "
                f"FROM {table} t"
            ).fetchone()
            assert row is not None
            out[table] = (row[0], row[1] or "")
    return out


def verify(expected: dict[str, tuple[int, str]], dsn: str, workload: Workload, what: str) -> None:
    """Fail the benchmark unless every table on the replica equals the source's."""
    got = checksums(dsn, workload)
    wrong = [
        f"{t}: source has {expected[t][0]:,} rows (md5 {expected[t][1]}), "
        f"replica {got[t][0]:,} rows (md5 {got[t][1]})"
        for t in expected
        if got[t] != expected[t]
    ]
    if wrong:
        raise SystemExit(f"{what}: the replica differs from the source:\n  " + "\n  ".join(wrong))


def cluster_cpu(cluster: LocalPostgres) -> dict[int, float]:
    """CPU seconds of the postmaster and each of its children (backends, walsenders, workers)."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    out = {postmaster: process_cpu(postmaster)}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                    "SC_CLK_TCK"
                )
    return out


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass
class Cpu:
    """CPU seconds spent during one measured apply."""

    client: float = 0.0  # the replicate process (0 for the native subscription)
    replica: float = 0.0  # the replica cluster's processes (apply worker or replicate's backend)
    source: float = 0.0  # the source cluster's processes (the walsender)
    nats_server: float = 0.0


class CpuWatch:
    """CPU of the replica and source clusters, nats-server and a client process between
    ``__init__`` and ``stop()``."""

    def __init__(self, replica: LocalPostgres, source: LocalPostgres, server: LocalNats) -> None:
        self.replica, self.source = replica, source
        assert server.process is not None
        self.nats_pid = server.process.pid
        self.before = (cluster_cpu(replica), cluster_cpu(source), process_cpu(self.nats_pid))

    def stop(self, client: int | None = None) -> Cpu:
        return Cpu(
            process_cpu(client) if client is not None else 0.0,
            cpu_since(self.before[0], cluster_cpu(self.replica)),
            cpu_since(self.before[1], cluster_cpu(self.source)),
            process_cpu(self.nats_pid) - self.before[2],
        )


def pgcapture_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgcapture", *args, "--log-level", "warning"]


@dataclass
class Child:
    """A ``pgcapture`` process; its output goes to a log file, shown when it fails."""

    what: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, what: str, args: list[str]) -> Child:
        log = Path(tempfile.mkstemp(prefix=f"bench-{what.replace(' ', '-')}-", suffix=".log")[1])
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        return cls(what, proc, log)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return "\n".join(f"    {line}" for line in text) or "    (no output)"

    def failure(self) -> str | None:
        """Why the process has ended, None while it runs."""
        if self.proc.poll() is None:
            return None
        return f"{self.what} exited with status {self.proc.returncode}; its output:\n{self.tail()}"

    def stop(self) -> str | None:
        """SIGTERM, then wait; what went wrong, or None."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"{self.what} did not stop within 60 s of SIGTERM:\n{self.tail()}"
        if self.proc.returncode not in (0, -signal.SIGTERM):
            return self.failure()
        self.log.unlink(missing_ok=True)
        return None


def stop_all(*children: Child | None) -> None:
    """Stop every child, then fail if one of them failed."""
    problems = [p for c in children if c is not None and (p := c.stop()) is not None]
    if problems:
        raise SystemExit("\n".join(problems))


def start_capture(dsn: str, nats_url: str, name: str, tables: list[str]) -> Child:
    return Child.start(
        "pgcapture capture",
        pgcapture_cmd("capture", "--dsn", dsn, "--nats", nats_url, "--source", name,
                      "--slot", name, "--publication", name, "--tables", ",".join(tables)),
    )  # fmt: skip


def start_replicate(dsn: str, nats_url: str, name: str, profile: Path | None = None) -> Child:
    """``pgcapture replicate``; under cProfile, its statistics written to ``profile``."""
    cmd = pgcapture_cmd("replicate", "--nats", nats_url, "--source", name, "--dsn", dsn)
    if profile is not None:
        cmd[1:1] = ["-m", "cProfile", "-o", str(profile)]
    return Child.start("pgcapture replicate", cmd)


async def prepare_capture(dsn: str, name: str, tables: list[str]) -> None:
    """pgcapture's source setup (DDL capture, publication ``name``, slot ``name``)."""
    setup = SlotReader(dsn, name, publication=name, tables=tables)
    await setup.open()
    await setup.close()


async def give_position(dsn: str, name: str, lsn: LSN) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await set_position(conn, name, lsn, origin="bench")


def stream_name(name: str) -> str:
    return "PGCAPTURE_" + name.upper()


async def wait_for_stream(nats_url: str, stream: str, before_marker: LSN) -> None:
    """Until the stream holds the marker transaction's Commit (a one-row transaction: seq 2)."""
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(3600):
            while True:
                with contextlib.suppress(nats.errors.Error):
                    tail = await read_tail(nc.jetstream(), stream)
                    cp = tail.checkpoint
                    if cp is not None and cp.lsn > before_marker and cp.seq >= 2:
                        return
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def wait_stream_created(nats_url: str, stream: str, capture: Child) -> None:
    """Until capture has created its stream: replicate would wait for it with a backoff,
    which is not what the end-to-end run measures."""
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(nats.errors.Error):
                    await nc.jetstream().stream_info(stream)
                    return
                if (failure := capture.failure()) is not None:
                    raise SystemExit(failure)
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def stream_bytes(nats_url: str, stream: str) -> tuple[int, int]:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages, info.state.bytes
    finally:
        await nc.close()


async def delete_stream(nats_url: str, stream: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        with contextlib.suppress(nats.errors.Error):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def native_setup(source: LocalPostgres, db: str, workload: Workload, slot: str) -> None:
    tables = ", ".join([*workload.table_names, "bench_done"])
    sql(
        source.dsn(db),
        f"CREATE PUBLICATION native FOR TABLE {tables}",
        f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')",
    )


def subscribe(source: LocalPostgres, db: str, replica: LocalPostgres, rdb: str, slot: str) -> None:
    conninfo = source.dsn(db).replace("'", "''")
    sql(
        replica.dsn(rdb),
        f"CREATE SUBSCRIPTION {slot} CONNECTION '{conninfo}' PUBLICATION native WITH "
        f"(create_slot = false, slot_name = '{slot}', copy_data = false, binary = true, "
        "enabled = true)",
    )


def unsubscribe(replica: LocalPostgres, rdb: str, slot: str) -> None:
    """Drops the subscription and its slot on the source."""
    sql(replica.dsn(rdb), f"DROP SUBSCRIPTION {slot}")


def drop_slot(dsn: str, slot: str) -> None:
    sql(dsn, f"SELECT pg_drop_replication_slot('{slot}')")


# --- apply: the workload is stored first, then applied --------------------------------------


@dataclass
class Apply:
    workload: Workload
    stream_messages: int = 0
    stream_bytes: int = 0
    native: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)
    native_start: list[float] = field(default_factory=list)  # until the worker connected
    ours_start: list[float] = field(default_factory=list)  # until replicate connected
    native_cpu: list[Cpu] = field(default_factory=list)
    ours_cpu: list[Cpu] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median(self.native) / median(self.ours)

    @property
    def native_applying(self) -> float:
        """Median seconds from the apply worker's connection to the marker."""
        return median(t - s for t, s in zip(self.native, self.native_start, strict=True))

    @property
    def ours_applying(self) -> float:
        """Median seconds from replicate's connection to the marker (start-up excluded)."""
        return median(t - s for t, s in zip(self.ours, self.ours_start, strict=True))


def measure_apply(
    source: LocalPostgres,
    replica: LocalPostgres,
    server: LocalNats,
    w: Workload,
    repeat: int,
    methods: set[str],
    profile: bool = False,
) -> Apply:
    db, name, template = f"{w.name}_apply", f"{w.name}_apply", f"{w.name}_tmpl"
    tables = [*w.table_names, "bench_done"]
    create_db(source, db, template)
    # The native slot and publication first: pgcapture's stream then starts after their DDL.
    native_setup(source, db, w, "native")
    ours = "pgcapture" in methods
    if ours:
        asyncio.run(prepare_capture(source.dsn(db), name, tables))
    start = current_lsn(source.dsn(db))
    capture = start_capture(source.dsn(db), server.url, name, tables) if ours else None
    result = Apply(w)
    try:
        started = time.perf_counter()
        w.run(source, db)
        before_marker = write_marker(source.dsn(db), 1)
        print(f"  {w.label}: workload written in {time.perf_counter() - started:.1f} s", flush=True)
        if ours:
            asyncio.run(wait_for_stream(server.url, stream_name(name), before_marker))
            print(f"  {w.label}: stored in JetStream after {time.perf_counter() - started:.1f} s")
    finally:
        stop_all(capture)
    if ours:
        result.stream_messages, result.stream_bytes = asyncio.run(
            stream_bytes(server.url, stream_name(name))
        )
    expected = checksums(source.dsn(db), w)
    for i in range(repeat):
        if "native" in methods:
            seconds, startup, cpu = apply_native(source, db, replica, server, w, i, expected)
            result.native.append(seconds)
            result.native_start.append(startup)
            result.native_cpu.append(cpu)
            print(f"  {w.label}: native {seconds:.2f} s", flush=True)
        if ours:
            seconds, startup, cpu = apply_pgcapture(
                source, replica, server, w, name, start, i, expected
            )
            result.ours.append(seconds)
            result.ours_start.append(startup)
            result.ours_cpu.append(cpu)
            print(f"  {w.label}: pgcapture {seconds:.2f} s", flush=True)
    if ours and profile:  # not counted: cProfile slows it down
        apply_pgcapture(source, replica, server, w, name, start, repeat, expected, profile=True)
    drop_slot(source.dsn(db), "native")
    if ours:
        drop_slot(source.dsn(db), name)
        asyncio.run(delete_stream(server.url, stream_name(name)))
    drop_db(source, db)
    return result


def apply_native(
    source: LocalPostgres,
    db: str,
    replica: LocalPostgres,
    server: LocalNats,
    w: Workload,
    i: int,
    expected: dict[str, tuple[int, str]],
) -> tuple[float, float, Cpu]:
    rdb, slot = f"{w.name}_native_{i}", f"native_{i}"
    create_db(replica, rdb, f"{w.name}_tmpl")
    sql(source.dsn(db), f"SELECT pg_copy_logical_replication_slot('native', '{slot}')")
    sql(replica.dsn(), "CHECKPOINT")
    watch = CpuWatch(replica, source, server)
    started = time.perf_counter()
    subscribe(source, db, replica, rdb, slot)
    done, connected = wait_marker(replica.dsn(rdb), 1)
    cpu = watch.stop()
    seconds, startup = done - started, connected - started
    unsubscribe(replica, rdb, slot)
    verify(expected, replica.dsn(rdb), w, f"{w.label}, native subscription, run {i + 1}")
    drop_db(replica, rdb)
    return seconds, startup, cpu


def apply_pgcapture(
    source: LocalPostgres,
    replica: LocalPostgres,
    server: LocalNats,
    w: Workload,
    name: str,
    start: LSN,
    i: int,
    expected: dict[str, tuple[int, str]],
    profile: bool = False,
) -> tuple[float, float, Cpu]:
    rdb = f"{w.name}_pgcapture_{i}"
    stats = (
        Path(tempfile.mkstemp(prefix="bench-replicate-", suffix=".prof")[1]) if profile else None
    )
    create_db(replica, rdb, f"{w.name}_tmpl")
    asyncio.run(give_position(replica.dsn(rdb), name, start))
    sql(replica.dsn(), "CHECKPOINT")
    watch = CpuWatch(replica, source, server)
    started = time.perf_counter()
    replicate = start_replicate(replica.dsn(rdb), server.url, name, stats)
    try:
        done, connected = wait_marker(replica.dsn(rdb), 1, (replicate,))
        cpu = watch.stop(replicate.proc.pid)
        seconds, startup = done - started, connected - started
    finally:
        stop_all(replicate)
    if stats is not None:
        print(
            f"\nprofile of pgcapture replicate, {w.label} (wall {seconds:.2f} s):", file=sys.stderr
        )
        pstats.Stats(str(stats), stream=sys.stderr).sort_stats("tottime").print_stats(30)
        stats.unlink()
    verify(expected, replica.dsn(rdb), w, f"{w.label}, pgcapture replicate, run {i + 1}")
    drop_db(replica, rdb)
    return seconds, startup, cpu


# --- e2e: applied while the workload runs ---------------------------------------------------


@dataclass
class EndToEnd:
    workload: Workload
    native_write: list[float] = field(default_factory=list)  # workload seconds
    native_catch_up: list[float] = field(default_factory=list)  # workload end to marker applied
    ours_write: list[float] = field(default_factory=list)
    ours_catch_up: list[float] = field(default_factory=list)


def timed_workload(
    source: LocalPostgres,
    db: str,
    w: Workload,
    rdsn: str,
    children: tuple[Child, ...] = (),
) -> tuple[float, float]:
    """Warm-up marker through, then the workload and its marker: (seconds writing, seconds from
    the marker's commit until it is on the replica)."""
    write_marker(source.dsn(db), 0)
    wait_marker(rdsn, 0, children, timeout=300)
    started = time.perf_counter()
    w.run(source, db)
    write_marker(source.dsn(db), 1)
    written = time.perf_counter()
    return written - started, wait_marker(rdsn, 1, children)[0] - written


def measure_e2e(
    source: LocalPostgres,
    replica: LocalPostgres,
    server: LocalNats,
    w: Workload,
    repeat: int,
    methods: set[str],
) -> EndToEnd:
    result = EndToEnd(w)
    for i in range(repeat):
        if "native" in methods:
            e2e_native(source, replica, w, i, result)
        if "pgcapture" in methods:
            e2e_pgcapture(source, replica, server, w, i, result)
    return result


def e2e_native(
    source: LocalPostgres, replica: LocalPostgres, w: Workload, i: int, result: EndToEnd
) -> None:
    template = f"{w.name}_tmpl"
    db, rdb, slot = f"{w.name}_e2e_native_{i}", f"{w.name}_e2e_native_{i}", f"e2e_{i}"
    create_db(source, db, template)
    create_db(replica, rdb, template)
    native_setup(source, db, w, slot)
    sql(replica.dsn(), "CHECKPOINT")
    subscribe(source, db, replica, rdb, slot)
    write_s, catch_up = timed_workload(source, db, w, replica.dsn(rdb))
    unsubscribe(replica, rdb, slot)
    verify(checksums(source.dsn(db), w), replica.dsn(rdb), w, f"{w.label}, e2e native")
    result.native_write.append(write_s)
    result.native_catch_up.append(catch_up)
    print(f"  {w.label}: e2e native: written in {write_s:.2f} s, caught up {catch_up:.2f} s")
    drop_db(source, db)
    drop_db(replica, rdb)


def e2e_pgcapture(
    source: LocalPostgres,
    replica: LocalPostgres,
    server: LocalNats,
    w: Workload,
    i: int,
    result: EndToEnd,
) -> None:
    template = f"{w.name}_tmpl"
    db, rdb, name = f"{w.name}_e2e_ours_{i}", f"{w.name}_e2e_ours_{i}", f"{w.name}_e2e_{i}"
    tables = [*w.table_names, "bench_done"]
    create_db(source, db, template)
    create_db(replica, rdb, template)
    asyncio.run(prepare_capture(source.dsn(db), name, tables))
    asyncio.run(give_position(replica.dsn(rdb), name, current_lsn(source.dsn(db))))
    sql(replica.dsn(), "CHECKPOINT")
    capture = start_capture(source.dsn(db), server.url, name, tables)
    replicate = None
    try:
        asyncio.run(wait_stream_created(server.url, stream_name(name), capture))
        replicate = start_replicate(replica.dsn(rdb), server.url, name)
        write_s, catch_up = timed_workload(source, db, w, replica.dsn(rdb), (capture, replicate))
    finally:
        stop_all(replicate, capture)
    verify(checksums(source.dsn(db), w), replica.dsn(rdb), w, f"{w.label}, e2e pgcapture")
    result.ours_write.append(write_s)
    result.ours_catch_up.append(catch_up)
    print(f"  {w.label}: e2e pgcapture: written in {write_s:.2f} s, caught up {catch_up:.2f} s")
    drop_slot(source.dsn(db), name)
    drop_db(source, db)
    drop_db(replica, rdb)
    asyncio.run(delete_stream(server.url, stream_name(name)))


# --- main -----------------------------------------------------------------------------------


def prepare_templates(source: LocalPostgres, replica: LocalPostgres, w: Workload) -> None:
    template = f"{w.name}_tmpl"
    create_db(source, template)
    started = time.perf_counter()
    w.setup(source, template)
    sql(source.dsn(template), "VACUUM ANALYZE")
    copy_database(source, template, replica, template)
    verify(checksums(source.dsn(template), w), replica.dsn(template), w, f"{w.label}, template")
    print(f"  {w.label}: templates ready in {time.perf_counter() - started:.1f} s", flush=True)


def startup_seconds() -> float:
    """Wall time of ``python -m pgcapture --version``: the interpreter and the CLI's imports, a
    part of every pgcapture apply time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pgcapture", "--version"],
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="pgbench,narrow,wide",
                        help="comma-separated workloads: pgbench, narrow, wide")  # fmt: skip
    parser.add_argument("--modes", default="apply,e2e", help="comma-separated: apply, e2e")
    parser.add_argument("--methods", default="native,pgcapture", help="native, pgcapture")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale factor")
    parser.add_argument("--transactions", type=int, default=20_000, help="pgbench transactions")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients")
    parser.add_argument("--rows", type=int, default=1_000_000, help="narrow rows")
    parser.add_argument("--rows-per-tx", type=int, default=100_000, help="narrow rows per tx")
    parser.add_argument("--wide-rows", type=int, default=200_000, help="wide rows")
    parser.add_argument("--wide-rows-per-tx", type=int, default=20_000, help="wide rows per tx")
    parser.add_argument(
        "--profile", action="store_true",
        help="run the last pgcapture apply of each workload under cProfile (an extra run)",
    )  # fmt: skip
    args = parser.parse_args()
    chosen, modes = args.only.split(","), set(args.modes.split(","))
    methods = set(args.methods.split(","))
    workloads = {
        "pgbench": lambda: pgbench_workload(args.scale, args.transactions, args.clients),
        "narrow": lambda: bulk_workload(
            "narrow", "bulk narrow (7 columns)", *NARROW, args.rows, args.rows_per_tx
        ),
        "wide": lambda: bulk_workload(
            "wide", f"bulk wide ({WIDE_GROUPS * 4 + 1} columns)", *WIDE, args.wide_rows,
            args.wide_rows_per_tx,
        ),
    }  # fmt: skip
    unknown = [w for w in chosen if w not in workloads] + sorted(modes - {"apply", "e2e"})
    unknown += sorted(methods - {"native", "pgcapture"})
    if unknown:
        raise SystemExit(f"unknown workload or mode: {', '.join(unknown)}")
    load = os.getloadavg()
    applied: list[Apply] = []
    e2e: list[EndToEnd] = []
    with (
        LocalPostgres.create(settings=SOURCE_SETTINGS) as source,
        LocalPostgres.create(settings=REPLICA_SETTINGS) as replica,
        LocalNats() as server,
    ):
        startup = startup_seconds() if "pgcapture" in methods else float("nan")
        for key in chosen:
            w = workloads[key]()
            prepare_templates(source, replica, w)
            if "apply" in modes:
                applied.append(
                    measure_apply(source, replica, server, w, args.repeat, methods, args.profile)
                )
            if "e2e" in modes:
                e2e.append(measure_e2e(source, replica, server, w, args.repeat, methods))
            drop_db(source, f"{w.name}_tmpl")
            drop_db(replica, f"{w.name}_tmpl")
    print(f"\nload average before and after: {load[0]:.2f}, {os.getloadavg()[0]:.2f}")
    print(f"`python -m pgcapture --version` takes {startup:.2f} s (interpreter, imports)")
    if applied:
        print_apply(applied, args.repeat)
    if e2e:
        print_e2e(e2e, args.repeat)


def print_apply(results: list[Apply], repeat: int) -> None:
    print(f"\napply (medians of {repeat}; ratio = native / pgcapture, > 1: pgcapture is faster)\n")
    print("| workload | transactions | rows | native s | pgcapture s | ratio "
          "| native rows/s | pgcapture rows/s | native s after connecting "
          "| pgcapture s after connecting | ratio after connecting |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w, native, ours = r.workload, median(r.native), median(r.ours)
        after = r.native_applying / r.ours_applying
        print(
            f"| {w.label} | {w.transactions:,} | {w.rows:,} | {native:.2f} | {ours:.2f} "
            f"| {r.ratio:.2f} | {w.rows / native:,.0f} | {w.rows / ours:,.0f} "
            f"| {r.native_applying:.2f} | {r.ours_applying:.2f} | {after:.2f} |"
        )
    print("\nWhere the time goes (medians): seconds until the apply worker or replicate connected")
    print("to the replica database; CPU seconds of the replicate process, the replica cluster,")
    print("the source cluster and nats-server during the apply; the stream's size\n")
    print("| workload | method | wall | connected after | replicate CPU | replica postgres CPU "
          "| source postgres CPU | nats-server CPU | stream |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for method, wall, start, cpus in (
            ("native", r.native, r.native_start, r.native_cpu),
            ("pgcapture", r.ours, r.ours_start, r.ours_cpu),
        ):
            med = {f: median(getattr(c, f) for c in cpus) for f in Cpu.__annotations__}
            stream = (
                f"{r.stream_messages:,} messages, {r.stream_bytes / 2**20:,.0f} MiB"
                if method == "pgcapture"
                else ""
            )
            print(
                f"| {r.workload.label} | {method} | {median(wall):.2f} | {median(start):.2f} "
                f"| {med['client']:.2f} | {med['replica']:.2f} | {med['source']:.2f} "
                f"| {med['nats_server']:.2f} | {stream} |"
            )
    print("\nevery run:")
    for r in results:
        print(f"  {r.workload.label}: native {fmt(r.native)}; pgcapture {fmt(r.ours)}")


def print_e2e(results: list[EndToEnd], repeat: int) -> None:
    print(f"\ne2e: applied while the workload runs (medians of {repeat}; seconds)\n")
    print("| workload | native: workload | native: catch-up after it | pgcapture: workload "
          "| pgcapture: catch-up after it |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.workload.label} | {median(r.native_write):.2f} "
            f"| {median(r.native_catch_up):.2f} "
            f"| {median(r.ours_write):.2f} | {median(r.ours_catch_up):.2f} |"
        )
    print("\nevery run (workload + catch-up):")
    for r in results:
        native = ", ".join(
            f"{a:.2f}+{b:.2f}" for a, b in zip(r.native_write, r.native_catch_up, strict=True)
        )
        ours = ", ".join(
            f"{a:.2f}+{b:.2f}" for a, b in zip(r.ours_write, r.ours_catch_up, strict=True)
        )
        print(f"  {r.workload.label}: native {native}; pgcapture {ours}")


def median(values: Any) -> float:
    """The median, NaN when a method was left out."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
