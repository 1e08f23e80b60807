"""Chaos soak: the whole pipeline under a randomized workload and random faults, then checked.

On throw-away servers (a source and a replica PostgreSQL cluster, a 3-node JetStream cluster
with the source's stream at 3 replicas) it runs ``pgcapture capture``, ``replicate``,
``gateway``, ``controller`` and ``dumper``, each as its own process on one configuration file,
and consumers (bench/chaos_consumer.py, written with ``pgcapture.client``, one process each)
that keep the tables they receive in SQLite files. Consumer ``all`` follows every table on an
ordered URI; consumer ``some`` follows ``items`` and the created tables on an unordered URI.

The workload (``--workers`` connections, about ``--rate`` transactions/s in all) writes
transactions of 1 to a few hundred rows, large values (100 kB to ``--max-value``) in table
``big``, updates that leave those values unchanged (TOAST), deletes, and DDL: add and drop
column, create and drop table, create index, truncate. Every update sets ``version`` from one
sequence, so a row's versions only grow, and every transaction inserts its id into
``chaos_txlog``: the source's own list of committed transactions. ``pgcapture dump schedule``
asks for dumps of ``items`` now and then.

Faults, drawn from ``--seed``: SIGKILL of a random process (the pgcapture ones and the
consumers), restarted at once with the same command; PostgreSQL restarts (source or replica,
``-m fast`` or ``-m immediate``); kill -9 of one NATS node, restarted a few seconds later. A
process that exits by itself is logged with its reason and started again after
``--restart-delay``, as a supervisor would.

At the end the workload and the faults stop, everything catches up (at most ``--catch-up``
seconds) and three checks run:

1. the stream, read back with ``pgcapture.log.reader``: checkpoints strictly increase, every
   transaction is whole (Begin, changes numbered 1..n, Commit), and every id of
   ``chaos_txlog`` on the source appears exactly once (no other transaction but DDL-only ones);
2. the replica equals the source, table by table (columns and every row);
3. each consumer's state equals the source for the tables it follows, and no row went back in
   time (see bench/chaos_consumer.py).

It prints the figures (transactions, rows, bytes, kills per process, PostgreSQL restarts, NATS
node kills, recovery times, final lag) and PASS/FAIL per check; exits 1 when a check fails,
130 on Ctrl-C.
Every process and directory it made is removed at the end, on Ctrl-C and on failure too
(``--keep`` keeps the directory, with every process's log, the consumers' files and
``timeline.txt``: every fault, restart, exit and recovery with its time).

    uv run --frozen python bench/chaos.py --duration 10m
    uv run --frozen python bench/chaos.py --duration 2m --seed 7 --max-value 700kB
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nats as natslib
import psycopg
from chaos_consumer import canonical
from psycopg import sql

from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.nats import free_port
from pgcapture.log import read_batches, read_tail
from pgcapture.proto import pb
from pgcapture.replica.store import set_position

SOURCE: Final = "chaos"
DB: Final = "chaos"
STREAM: Final = "PGCAPTURE_CHAOS"
HERE: Final = Path(__file__).resolve().parent
SOME_REGEX: Final = r"^(items|t_[0-9]+)$"
SETUP: Final = (
    "CREATE SEQUENCE chaos_version",
    "CREATE SEQUENCE chaos_txseq",
    "CREATE TABLE chaos_txlog (id bigint PRIMARY KEY, worker int NOT NULL, kind text NOT NULL)",
    "CREATE TABLE items (id bigint PRIMARY KEY, version bigint NOT NULL, n int NOT NULL, "
    "payload text)",
    "CREATE TABLE big (id bigint PRIMARY KEY, version bigint NOT NULL, n int NOT NULL, blob text)",
)
ADDED_TYPES: Final = ("int", "text", "boolean", "numeric(12,2)")
SIZE_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmM]?)i?[bB]?$")
DURATION_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")
TIMELINE: Final[list[str]] = []  # every fault and restart, written to timeline.txt


def note(text: str) -> None:
    TIMELINE.append(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {text}")


def parse_size(text: str) -> int:
    match = SIZE_RE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 700kB or 2MB")
    scale = {"": 1, "k": 1000, "m": 1000_000}[match[2].lower()]
    return int(float(match[1]) * scale)


def parse_duration(text: str) -> float:
    match = DURATION_RE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s or 10m")
    return float(match[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[match[2]]


# --- figures ------------------------------------------------------------------------------------


@dataclass
class Figures:
    transactions: int = 0  # committed (as far as the workload knows)
    failed: Counter[str] = field(default_factory=Counter)  # transactions that failed, by error
    rows: int = 0
    bytes: int = 0
    large_values: int = 0
    ddl: Counter[str] = field(default_factory=Counter)
    pg_restarts: list[tuple[str, str, float]] = field(default_factory=list)  # cluster, mode, s
    nats_kills: list[tuple[str, float, float]] = field(default_factory=list)  # node, down, up s
    dumps: int = 0
    dump_failures: list[str] = field(default_factory=list)
    workload_seconds: float = 0.0
    settle_seconds: float = 0.0  # from the workload's end until every process is healthy
    pg_healthy: list[float] = field(default_factory=list)  # from a restart to all healthy
    nats_healthy: list[float] = field(default_factory=list)  # from a node kill to all healthy
    watchers: set[asyncio.Task[None]] = field(default_factory=set)
    lag: dict[str, str] = field(default_factory=dict)
    checks: list[tuple[str, bool, list[str]]] = field(default_factory=list)


# --- supervised processes -----------------------------------------------------------------------


@dataclass
class Proc:
    """A child process, started again with the same command after a kill or an exit."""

    name: str
    argv: list[str]
    log: Path
    health: str = ""  # HOST:PORT of its /healthz, "" for none
    popen: subprocess.Popen[bytes] | None = None
    kills: list[float] = field(default_factory=list)  # when
    exits: list[tuple[float, int, str]] = field(default_factory=list)  # when, status, why
    recoveries: list[float] = field(default_factory=list)  # seconds from kill/exit to healthy
    down_since: float | None = None
    restart_at: float | None = None

    def start(self) -> None:
        note(f"start {self.name}")
        with self.log.open("ab") as out:
            out.write(f"--- start at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL, then the same command again at once."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        note(f"SIGKILL {self.name}")
        now = time.monotonic()
        self.kills.append(now)
        if self.down_since is None:
            self.down_since = now
        self.restart_at = None
        self.start()

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def why(self) -> str:
        """The last error line of its log."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            return "(no log)"
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["(no output)"])[-1][:400]


class Supervisor:
    """Restarts processes that exit on their own and times recoveries through /healthz."""

    def __init__(self, restart_delay: float) -> None:
        self.procs: dict[str, Proc] = {}
        self.restart_delay = restart_delay

    def add(self, proc: Proc) -> Proc:
        self.procs[proc.name] = proc
        proc.start()
        return proc

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            for proc in self.procs.values():
                if proc.popen is not None and proc.popen.poll() is not None:
                    proc.exits.append((now, proc.popen.returncode, proc.why()))
                    note(f"{proc.name} exited with status {proc.popen.returncode}: {proc.why()}")
                    proc.popen = None
                    proc.down_since = proc.down_since or now
                    proc.restart_at = now + self.restart_delay
                if proc.popen is None and proc.restart_at is not None and now >= proc.restart_at:
                    proc.restart_at = None
                    proc.start()
                if (
                    proc.down_since is not None
                    and proc.popen is not None
                    and proc.health
                    and await healthy(proc.health)
                ):
                    proc.recoveries.append(time.monotonic() - proc.down_since)
                    note(f"{proc.name} healthy")
                    proc.down_since = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    async def all_healthy(self, seconds: float) -> list[str]:
        """Waits until every process runs (and answers /healthz); the names that do not."""
        deadline = time.monotonic() + seconds
        while True:
            bad = [
                p.name
                for p in self.procs.values()
                if p.popen is None or (p.health and not await healthy(p.health))
            ]
            if not bad or time.monotonic() > deadline:
                return bad
            await asyncio.sleep(0.2)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


async def healthy(address: str) -> bool:
    """GET /healthz answers 200."""
    host, port = address.rsplit(":", 1)
    try:
        async with asyncio.timeout(1):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
            await writer.drain()
            status = await reader.readline()
            writer.close()
            return b" 200 " in status
    except (OSError, TimeoutError):
        return False


# --- the servers --------------------------------------------------------------------------------


class Servers:
    """The source and replica clusters and the three NATS nodes, all under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        settings = {"max_wal_size": "2GB", "wal_sender_timeout": "30s"}
        self.source = LocalPostgres.create(workdir, settings)
        self.replica = LocalPostgres.create(workdir, settings)
        self.nats: list[LocalNats] = []

    def start(self) -> None:
        routes = [free_port() for _ in range(3)]
        route_urls = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
        for i, port in enumerate(routes):
            args = [
                "--server_name",
                f"n{i + 1}",
                "--cluster_name",
                "chaos",
                "--cluster",
                f"nats://127.0.0.1:{port}",
                "--routes",
                route_urls,
            ]
            node = LocalNats(base_dir=self.workdir / f"nats{i + 1}", extra_args=args)
            self.nats.append(node)
            node.start()
            node.port = int(node.url.rsplit(":", 1)[1])  # kept across restarts
        for cluster in (self.source, self.replica):
            cluster.start()
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DB}")

    @property
    def nats_urls(self) -> list[str]:
        return [node.url for node in self.nats]

    def destroy(self) -> None:
        for node in self.nats:
            node.stop(signal.SIGKILL)
        for cluster in (self.source, self.replica):
            cluster.stop("immediate")


def write_config(path: Path, servers: Servers, ports: dict[str, str]) -> None:
    q = json.dumps  # a JSON string is a TOML basic string
    path.write_text(
        f"[nats]\nurl = {q(servers.nats_urls)}\n"
        '[log]\nlevel = "warning"\nformat = "text"\n'
        f"[sources.{SOURCE}]\ndsn = {q(servers.source.dsn(DB))}\n"
        f"[sources.{SOURCE}.stream]\nreplicas = 3\n"
        f"[sources.{SOURCE}.replica]\ndsn = {q(servers.replica.dsn(DB))}\n"
        f"[gateway]\nlisten = {q(ports['gateway'])}\ncontroller = {q(ports['controller'])}\n"
        "[gateway.tls]\ndisabled = true\n[gateway.auth]\ndisabled = true\n"
        f'[gateway.uris.all]\nsource = "{SOURCE}"\nstart = "beginning"\nordered = true\n'
        f"dumper = {q(ports['dumper'])}\n"
        f'[gateway.uris.some]\nsource = "{SOURCE}"\nstart = "beginning"\nack_wait = "15s"\n'
        f"dumper = {q(ports['dumper'])}\n"
        f"[controller]\nlisten = {q(ports['controller'])}\nchunk_rows = 500\nreplicas = 3\n"
        f'[dumper]\nlisten = {q(ports["dumper"])}\nsource = "{SOURCE}"\n'
    )


def pgcapture(command: str, config: Path, metrics: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pgcapture",
        command,
        "--config",
        str(config),
        "--metrics-listen",
        metrics,
        *extra,
    ]


# --- the workload -------------------------------------------------------------------------------


class Workload:
    """Transactions of every kind on the source, from ``workers`` connections; worker ``w``
    writes only ids with ``id % workers == w``, so each row has one writer and its versions
    grow in commit order."""

    def __init__(
        self, dsn: str, rng: random.Random, args: argparse.Namespace, figures: Figures
    ) -> None:
        self.dsn = dsn
        self.rng = rng
        self.args = args
        self.figures = figures
        self.tables: dict[str, dict[str, str]] = {}  # table -> added column -> type
        self.next_table = 1
        self.next_column = 1

    async def setup(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            for statement in SETUP:
                await conn.execute(statement)
            await conn.commit()
        await self.load_schema()

    async def load_schema(self) -> None:
        """The tables and added columns as the catalog has them (after an unknown outcome)."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name <> 'chaos_txlog'"
            )
            tables: dict[str, dict[str, str]] = {}
            for table, column, kind in await cur.fetchall():
                added = tables.setdefault(table, {})
                if column.startswith("c_"):
                    added[column] = "numeric(12,2)" if kind == "numeric" else kind
        self.tables = tables
        numbers = [int(t[2:]) for t in tables if t.startswith("t_")]
        self.next_table = max([self.next_table, *(n + 1 for n in numbers)])

    async def run(self, worker: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.rng.random())
        pause = self.args.workers / self.args.rate
        conn: psycopg.AsyncConnection[Any] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=5)
                kind, rows, size = await self.transaction(conn, worker, rng)
                self.figures.transactions += 1
                self.figures.rows += rows
                self.figures.bytes += size
                if kind.startswith("ddl"):
                    self.figures.ddl[kind[4:]] += 1
            except psycopg.Error as exc:
                first = (str(exc).splitlines() or [""])[0]
                self.figures.failed[f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', first)}"] += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        await conn.rollback()
                if isinstance(exc, psycopg.OperationalError):
                    if conn is not None:
                        await conn.close()
                    conn = None
                    await asyncio.sleep(0.5)
                with contextlib.suppress(psycopg.Error, OSError):
                    await self.load_schema()
            await asyncio.sleep(rng.expovariate(1 / pause))
        if conn is not None:
            await conn.close()

    async def transaction(
        self, conn: psycopg.AsyncConnection[Any], worker: int, rng: random.Random
    ) -> tuple[str, int, int]:
        roll = rng.random()
        if roll < self.args.ddl_share and worker == 0:
            kind, rows, size = await self.ddl(conn, rng)
        elif roll < 0.08:
            kind, rows, size = await self.large_value(conn, worker, rng)
        elif roll < 0.13:
            kind, rows, size = "bulk", await self.bulk(conn, worker, rng), 0
        else:
            kind, size = "small", 0
            rows = sum([await self.small(conn, worker, rng) for _ in range(rng.randint(1, 6))])
        await conn.execute(
            "INSERT INTO chaos_txlog VALUES (nextval('chaos_txseq'), %s, %s)", (worker, kind)
        )
        await conn.commit()
        if kind.startswith("ddl"):
            await self.load_schema()
        return kind, rows + 1, size

    def own_id(self, worker: int, rng: random.Random, keys: int) -> int:
        workers: int = self.args.workers
        return rng.randrange(keys // workers) * workers + worker

    def data_tables(self) -> list[str]:
        return [t for t in self.tables if t != "big"]

    async def small(
        self, conn: psycopg.AsyncConnection[Any], worker: int, rng: random.Random
    ) -> int:
        name = rng.choice(self.data_tables())
        table = sql.Identifier(name)
        ident = self.own_id(worker, rng, 2000)
        roll = rng.random()
        if roll < 0.45:
            query = sql.SQL(
                "INSERT INTO {} (id, version, n, payload) VALUES "
                "(%s, nextval('chaos_version'), 0, md5(random()::text)) "
                "ON CONFLICT (id) DO UPDATE SET version = nextval('chaos_version'), "
                "n = {}.n + 1"
            )
            cur = await conn.execute(query.format(table, table), (ident,))
        elif roll < 0.85:
            sets: list[sql.Composable] = [sql.SQL("version = nextval('chaos_version'), n = n + 1")]
            added = self.tables[name]
            if added and rng.random() < 0.5:
                column = rng.choice(sorted(added))
                value = column_value(added[column], rng)
                sets.append(sql.SQL("{} = {}").format(sql.Identifier(column), sql.Literal(value)))
            update = sql.SQL("UPDATE {} SET {} WHERE id = %s")
            cur = await conn.execute(update.format(table, sql.SQL(", ").join(sets)), (ident,))
        else:
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE id = %s").format(table), (ident,)
            )
        return max(cur.rowcount, 0)

    async def bulk(
        self, conn: psycopg.AsyncConnection[Any], worker: int, rng: random.Random
    ) -> int:
        """A few hundred rows in one statement: inserted or updated, or deleted."""
        table = sql.Identifier(rng.choice(self.data_tables()))
        first = rng.randrange(0, 2000)
        last = first + rng.randint(20, 600)
        w, n = worker, self.args.workers
        if rng.random() < 0.8:
            query = sql.SQL(
                "INSERT INTO {} (id, version, n, payload) SELECT g, nextval('chaos_version'), 0, "
                "repeat(md5(g::text), 1 + g %% 20) FROM generate_series(%s::int, %s::int) g "
                "WHERE g %% %s = %s ON CONFLICT (id) DO UPDATE "
                "SET version = nextval('chaos_version'), n = {}.n + 1"
            ).format(table, table)
        else:
            query = sql.SQL("DELETE FROM {} WHERE id BETWEEN %s AND %s AND id %% %s = %s").format(
                table
            )
        cur = await conn.execute(query, (first, last, n, w))
        return max(cur.rowcount, 0)

    async def large_value(
        self, conn: psycopg.AsyncConnection[Any], worker: int, rng: random.Random
    ) -> tuple[str, int, int]:
        """A value of 100 kB to --max-value in ``big``, or an update that leaves it alone."""
        ident = self.own_id(worker, rng, 40)
        if rng.random() < 0.4:
            cur = await conn.execute(
                "UPDATE big SET version = nextval('chaos_version'), n = n + 1 WHERE id = %s",
                (ident,),
            )
            return "toast", max(cur.rowcount, 0), 0
        size = rng.randint(min(100_000, self.args.max_value), self.args.max_value)
        value = base64.b64encode(rng.randbytes(size * 3 // 4 + 3)).decode()[:size]
        cur = await conn.execute(
            "INSERT INTO big VALUES (%s, nextval('chaos_version'), 0, %s) ON CONFLICT (id) DO "
            "UPDATE SET version = nextval('chaos_version'), n = big.n + 1, blob = excluded.blob",
            (ident, value),
        )
        self.figures.large_values += 1
        return "large", max(cur.rowcount, 0), size

    async def ddl(
        self, conn: psycopg.AsyncConnection[Any], rng: random.Random
    ) -> tuple[str, int, int]:
        created = [t for t in self.tables if t.startswith("t_")]
        with_added = [t for t, cols in self.tables.items() if cols]
        choices = ["add_column", "create_table", "create_index"]
        if with_added:
            choices.append("drop_column")
        if created:
            choices += ["truncate", "drop_table"] if len(created) > 1 else ["truncate"]
        what = rng.choice(choices)
        if what == "add_column":
            table = rng.choice(self.data_tables())
            column, kind = f"c_{self.next_column}", rng.choice(ADDED_TYPES)
            self.next_column += 1
            statement = f"ALTER TABLE {table} ADD COLUMN {column} {kind}"
        elif what == "drop_column":
            table = rng.choice(with_added)
            statement = f"ALTER TABLE {table} DROP COLUMN {rng.choice(sorted(self.tables[table]))}"
        elif what == "create_table":
            table = f"t_{self.next_table}"
            self.next_table += 1
            statement = (
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, "
                "n int NOT NULL, payload text, amount numeric(12,2) DEFAULT 1.50, "
                "flag boolean DEFAULT true)"
            )
        elif what == "create_index":
            table = rng.choice(self.data_tables())
            statement = f"CREATE INDEX ON {table} (n)"
        elif what == "truncate":
            statement = f"TRUNCATE {rng.choice(created)}"
        else:
            statement = f"DROP TABLE {rng.choice(created)}"
        await conn.execute(statement)
        return f"ddl {what}", 0, 0


def column_value(kind: str, rng: random.Random) -> Any:
    if kind == "integer":
        return rng.randint(-1000, 1000)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind.startswith("numeric"):
        return f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}"
    return f"v{rng.randint(0, 10**6)}"


async def schedule_dumps(
    config: Path, every: float, rng: random.Random, stop: asyncio.Event, figures: Figures
) -> None:
    """``pgcapture dump schedule`` of ``items`` to a random URI now and then."""
    while not await stopped(stop, rng.expovariate(1 / every)):
        uri = rng.choice(("all", "some"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgcapture",
            "dump",
            "schedule",
            "--config",
            str(config),
            "--uri",
            uri,
            "--table",
            "public.items",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        note(f"dump schedule --uri {uri}: status {proc.returncode}")
        if proc.returncode == 0:
            figures.dumps += 1
        else:
            lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
            figures.dump_failures.append(lines[-1][:300])


async def stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps ``seconds`` unless ``stop`` is set first; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# --- faults -------------------------------------------------------------------------------------


async def kill_processes(
    sup: Supervisor, every: float, rng: random.Random, stop: asyncio.Event
) -> None:
    names = sorted(sup.procs)
    while not await stopped(stop, rng.expovariate(1 / every)):
        sup.procs[rng.choice(names)].kill()


async def healthy_again(sup: Supervisor, since: float, out: list[float]) -> None:
    """Seconds from ``since`` until every pgcapture process answers /healthz (at most 120)."""
    procs = [p for p in sup.procs.values() if p.health]
    while time.monotonic() < since + 120:
        if all([p.popen is not None and await healthy(p.health) for p in procs]):
            out.append(time.monotonic() - since)
            return
        await asyncio.sleep(0.2)


async def restart_postgres(
    servers: Servers,
    sup: Supervisor,
    every: float,
    rng: random.Random,
    stop: asyncio.Event,
    figures: Figures,
) -> None:
    while not await stopped(stop, rng.expovariate(1 / every)):
        which = rng.choice(("source", "replica"))
        cluster = servers.source if which == "source" else servers.replica
        mode = rng.choice(("fast", "immediate"))
        started = time.monotonic()
        note(f"restart {which} PostgreSQL -m {mode}")
        await asyncio.to_thread(restart_cluster, cluster, mode)
        note(f"{which} PostgreSQL started")
        figures.pg_restarts.append((which, mode, time.monotonic() - started))
        figures.watchers.add(asyncio.create_task(healthy_again(sup, started, figures.pg_healthy)))


def restart_cluster(cluster: LocalPostgres, mode: str) -> None:
    """``pg_ctl stop -m MODE`` and ``pg_ctl start``: what ``pg_ctl restart -m MODE`` does."""
    cluster.stop(mode)
    cluster.start()


async def kill_nats_nodes(
    servers: Servers,
    sup: Supervisor,
    every: float,
    rng: random.Random,
    stop: asyncio.Event,
    figures: Figures,
) -> None:
    while not await stopped(stop, rng.expovariate(1 / every)):
        node = rng.choice(servers.nats)
        down = rng.uniform(2, 10)
        killed = time.monotonic()
        node.kill()
        note(f"kill -9 NATS node {node.base_dir.name}")
        await asyncio.sleep(down)
        started = time.monotonic()
        await asyncio.to_thread(node.start)
        note(f"NATS node {node.base_dir.name} started")
        figures.nats_kills.append((node.base_dir.name, down, time.monotonic() - started))
        figures.watchers.add(asyncio.create_task(healthy_again(sup, killed, figures.nats_healthy)))


# --- catching up --------------------------------------------------------------------------------


async def scalar(dsn: str, query: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        return None if row is None else row[0]


async def until(
    check: Callable[[], Awaitable[bool]], deadline: float, interval: float = 0.5
) -> bool:
    """Whether ``check()`` came true before ``deadline`` (tried at least once)."""
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def catch_up(
    servers: Servers, files: dict[str, Path], figures: Figures, seconds: float
) -> bool:
    """A last transaction, then until the stream, the replica and the consumers have it."""
    src, rep = servers.source.dsn(DB), servers.replica.dsn(DB)
    lag = await scalar(
        src, "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
    )
    figures.lag["slot lag once the faults ended"] = f"{int(lag or 0):,} bytes"
    before = await scalar(src, "SELECT pg_current_wal_lsn()")
    await scalar(
        src, "INSERT INTO chaos_txlog VALUES (nextval('chaos_txseq'), -1, 'final') RETURNING id"
    )
    started = time.monotonic() - figures.settle_seconds  # the workload stopped then
    deadline = time.monotonic() + seconds
    nc = await natslib.connect(servers.nats_urls)

    async def stream_has_it() -> bool:
        tail = await read_tail(nc.jetstream(), STREAM)
        return tail.checkpoint is not None and tail.checkpoint.lsn >= lsn_int(before)

    async def replica_has_it() -> bool:
        pos = await scalar(rep, f"SELECT lsn FROM pgcapture.sources WHERE id = '{SOURCE}'")
        return pos is not None and lsn_int(str(pos)) >= lsn_int(before)

    async def wait(name: str, check: Callable[[], Awaitable[bool]], interval: float) -> bool:
        ok = await until(check, deadline, interval)
        figures.lag[name] = (
            f"caught up {time.monotonic() - started:.1f} s after the workload stopped"
            if ok
            else f"NOT caught up within {seconds:.0f} s"
        )
        return ok

    try:
        waits = [wait("stream", stream_has_it, 0.5), wait("replica", replica_has_it, 0.5)]
        waits += [
            wait(f"consumer {uri}", functools.partial(consumer_equal, src, path, uri), 2.0)
            for uri, path in files.items()
        ]
        results = await asyncio.gather(*waits)
    finally:
        await nc.close()
    return all(results)


def lsn_int(text: str) -> int:
    high, low = str(text).split("/")
    return (int(high, 16) << 32) + int(low, 16)


# --- the checks ---------------------------------------------------------------------------------


@dataclass
class Scan:
    """What reading the stream found: problems, counts, and how often each log id appeared."""

    problems: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    seen: Counter[int] = field(default_factory=Counter)
    previous: tuple[int, int] | None = None
    tx: tuple[int, int] | None = None  # the open transaction: lsn, last seq
    logged = False  # the open transaction has its chaos_txlog row
    public = False  # it changed a table outside the pgcapture schema

    def record(self, lsn: int, seq: int, message: pb.Message) -> None:
        cp = (lsn, seq)
        if self.previous is not None and cp <= self.previous:
            self.problems.append(f"checkpoint {cp_text(cp)} after {cp_text(self.previous)}")
        self.previous = cp
        kind = message.WhichOneof("type")
        if kind == "begin":
            if self.tx is not None:
                self.problems.append(f"transaction {cp_text(self.tx)} has no Commit")
            if seq != 0:
                self.problems.append(f"Begin at {cp_text(cp)}: seq is not 0")
            self.tx, self.logged, self.public = cp, False, False
            self.stats["transactions"] += 1
            return
        if self.tx is None or self.tx[0] != lsn or seq != self.tx[1] + 1:
            self.problems.append(f"{kind} at {cp_text(cp)} out of its transaction's order")
        self.tx = cp
        if kind == "change":
            self.change(message.change)
        elif kind == "truncate":
            self.stats["truncates"] += 1
            self.public = True
        elif kind == "commit":
            if self.public and not self.logged:
                self.problems.append(f"transaction {cp_text(cp)} changes tables without a log row")
            if not self.public:
                self.stats["transactions of DDL logs only"] += 1
            self.tx = None

    def change(self, change: pb.Change) -> None:
        self.stats["changes"] += 1
        if change.schema == "pgcapture":
            return
        self.public = True
        if change.table == "chaos_txlog" and change.op == pb.Change.INSERT:
            ident = next(f.binary for f in change.new if f.name == "id")
            self.seen[int.from_bytes(ident, "big", signed=True)] += 1
            self.logged = True


async def check_stream(servers: Servers) -> tuple[bool, list[str], dict[str, int]]:
    """Exactly once and in order, against ``chaos_txlog`` on the source."""
    scan = Scan()
    nc = await natslib.connect(servers.nats_urls)
    try:
        async for batch in read_batches(nc.jetstream(), STREAM, patience=30):
            scan.stats["messages"] += 1
            for record in batch.records:
                scan.record(record.lsn, record.seq, pb.Message.FromString(record.message))
        info = await nc.jetstream().stream_info(STREAM)
        scan.stats["bytes"] = info.state.bytes
    finally:
        await nc.close()
    if scan.tx is not None:
        scan.problems.append(f"the stream ends inside transaction {cp_text(scan.tx)}")
    async with await psycopg.AsyncConnection.connect(servers.source.dsn(DB)) as conn:
        cur = await conn.execute("SELECT id FROM chaos_txlog")
        committed = {row[0] for row in await cur.fetchall()}
    missing = sorted(committed - scan.seen.keys())
    extra = sorted(scan.seen.keys() - committed)
    doubled = sorted(k for k, n in scan.seen.items() if n > 1)
    if missing:
        scan.problems.append(f"{len(missing)} committed transactions missing, ids {missing[:10]}")
    if extra:
        scan.problems.append(f"{len(extra)} transactions not committed on the source: {extra[:10]}")
    if doubled:
        scan.problems.append(f"{len(doubled)} transactions more than once, ids {doubled[:10]}")
    scan.stats["transactions in chaos_txlog"] = len(committed)
    return not scan.problems, scan.problems, {k: v for k, v in scan.stats.items() if v}


def cp_text(cp: tuple[int, ...]) -> str:
    return f"{cp[0] >> 32:X}/{cp[0] & 0xFFFFFFFF:X}#{cp[1]}"


async def table_columns(conn: psycopg.AsyncConnection[Any]) -> dict[str, list[tuple[str, str]]]:
    cur = await conn.execute(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY 1, 2"
    )
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in await cur.fetchall():
        out.setdefault(table, []).append((column, kind))
    return out


async def row_digests(
    conn: psycopg.AsyncConnection[Any], table: str, columns: list[str]
) -> dict[int, str]:
    query = sql.SQL("SELECT id, md5(ROW({})::text) FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
    )
    cur = await conn.execute(query)
    return {ident: digest for ident, digest in await cur.fetchall()}


async def check_replica(servers: Servers) -> tuple[bool, list[str]]:
    problems: list[str] = []
    async with (
        await psycopg.AsyncConnection.connect(servers.source.dsn(DB)) as src,
        await psycopg.AsyncConnection.connect(servers.replica.dsn(DB)) as rep,
    ):
        theirs, ours = await table_columns(src), await table_columns(rep)
        for table in sorted(theirs.keys() | ours.keys()):
            if table not in ours:
                problems.append(f"{table}: missing on the replica")
                continue
            if table not in theirs:
                problems.append(f"{table}: on the replica, not on the source")
                continue
            if theirs[table] != ours[table]:
                problems.append(
                    f"{table}: columns {theirs[table]} on the source, {ours[table]} on the replica"
                )
                continue
            columns = [c for c, _ in theirs[table]]
            a, b = await row_digests(src, table, columns), await row_digests(rep, table, columns)
            if a != b:
                problems.append(f"{table}: {describe_diff(a, b)}")
    return not problems, problems


def describe_diff(expected: dict[Any, Any], held: dict[Any, Any]) -> str:
    missing = sorted(expected.keys() - held.keys())
    extra = sorted(held.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & held.keys() if expected[k] != held[k])
    return (
        f"{len(expected)} rows on the source, {len(held)} held; {len(missing)} missing "
        f"{missing[:8]}, {len(extra)} extra {extra[:8]}, {len(differ)} different {differ[:8]}"
    )


State = dict[str, tuple[list[str], dict[int, dict[str, str]]]]  # table -> columns, rows


async def source_state(dsn: str, regex: str | None) -> State:
    """The source's tables (those ``regex`` selects), each row as canonical column values."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        tables = await table_columns(conn)
        out: State = {}
        for table in tables:
            if regex is not None and not re.search(regex, table):
                continue
            cur = await conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            names = [d.name for d in cur.description or ()]
            rows = {
                row[0]: {n: canonical(v) for n, v in zip(names, row, strict=True)}
                for row in await cur.fetchall()
            }
            out[table] = (names, rows)
    return out


def consumer_rows(path: Path) -> dict[str, dict[int, dict[str, str]]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[str, dict[int, dict[str, str]]] = {}
        for tbl, ident, cols in db.execute("SELECT tbl, id, cols FROM rows WHERE deleted = 0"):
            out.setdefault(tbl, {})[ident] = json.loads(cols)
        return out
    finally:
        db.close()


def consumer_diff(expected: State, path: Path) -> list[str]:
    """Where the consumer's rows differ from the source's, over the source's columns (a column
    the consumer never received a value of counts as NULL: added later, no change since)."""
    held = consumer_rows(path)
    problems = []
    for table, (columns, rows) in sorted(expected.items()):
        fitted = {
            ident: {c: cols.get(c, "N") for c in columns}
            for ident, cols in held.get(table, {}).items()
        }
        if fitted != rows:
            problems.append(f"{table}: {describe_diff(rows, fitted)}")
    return problems


def uri_regex(uri: str) -> str | None:
    return SOME_REGEX if uri == "some" else None


async def consumer_equal(dsn: str, path: Path, uri: str) -> bool:
    expected = await source_state(dsn, uri_regex(uri))
    return not await asyncio.to_thread(consumer_diff, expected, path)


async def check_consumer(dsn: str, path: Path, uri: str) -> tuple[bool, list[str], dict[str, int]]:
    expected = await source_state(dsn, uri_regex(uri))
    problems = await asyncio.to_thread(consumer_diff, expected, path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counts = dict(db.execute("SELECT name, n FROM counters").fetchall())
        travels = [
            f"at {time.strftime('%H:%M:%S', time.localtime(at))} {detail}"
            for at, detail in db.execute(
                "SELECT at, detail FROM events WHERE kind = 'time_travel' ORDER BY at"
            )
        ]
    finally:
        db.close()
    if travels:
        problems.append(f"{len(travels)} rows went back in time: " + "; ".join(travels[:5]))
    return not problems, problems, counts


def consumer_recoveries(path: Path, kills: list[float], offset: float) -> list[float]:
    """From each kill (monotonic) to the first change the next process handled."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        starts = sorted(db.execute("SELECT started, first_handled FROM starts").fetchall())
    finally:
        db.close()
    out = []
    for kill in kills:
        wall = kill + offset
        after = [f for s, f in starts if s >= wall - 0.5 and f is not None]
        if after:
            out.append(after[0] - wall)
    return out


# --- the run ------------------------------------------------------------------------------------


async def soak(
    args: argparse.Namespace, servers: Servers, sup: Supervisor, figures: Figures
) -> bool:
    work = servers.workdir
    ports = {name: f"127.0.0.1:{free_port()}" for name in ("gateway", "controller", "dumper")}
    metrics = {
        name: f"127.0.0.1:{free_port()}"
        for name in ("capture", "replicate", "gateway", "controller", "dumper")
    }
    config = work / "pgcapture.toml"
    write_config(config, servers, ports)
    logs = work / "logs"
    logs.mkdir()
    src = servers.source.dsn(DB)

    def add(name: str, argv: list[str], health: str = "") -> None:
        sup.add(Proc(name, argv, logs / f"{name}.log", health))

    add(
        "capture",
        pgcapture("capture", config, metrics["capture"], "--source", SOURCE),
        metrics["capture"],
    )
    if not await until(lambda: slot_exists(src), time.monotonic() + 60):
        raise SystemExit(f"capture did not create its slot: {sup.procs['capture'].why()}")
    async with await psycopg.AsyncConnection.connect(servers.replica.dsn(DB), autocommit=True) as c:
        await set_position(c, SOURCE, 0, "an empty source, captured from its start")
    rng = random.Random(args.seed)
    workload = Workload(src, random.Random(rng.random()), args, figures)
    await workload.setup()
    add(
        "replicate",
        pgcapture("replicate", config, metrics["replicate"], "--source", SOURCE),
        metrics["replicate"],
    )
    for name in ("dumper", "controller", "gateway"):
        extra = ["--instance", "chaos-controller"] if name == "controller" else []
        add(name, pgcapture(name, config, metrics[name], *extra), metrics[name])
    files = {uri: work / f"consumer-{uri}.sqlite" for uri in ("all", "some")}
    for uri, path in files.items():
        argv = [
            sys.executable,
            str(HERE / "chaos_consumer.py"),
            "--target",
            ports["gateway"],
            "--uri",
            uri,
            "--db",
            str(path),
        ]
        if uri_regex(uri):
            argv += ["--table-regex", SOME_REGEX]
        add(f"consumer {uri}", argv)
    if bad := await sup.all_healthy(60):
        raise SystemExit("not healthy after 60 s: " + ", ".join(bad))
    print(
        f"everything runs; {args.duration:.0f} s of workload and faults (seed {args.seed})",
        flush=True,
    )

    stop_all, stop_faults, stop_work = asyncio.Event(), asyncio.Event(), asyncio.Event()
    watcher = asyncio.create_task(sup.watch(stop_all))
    rngs = [random.Random(rng.random()) for _ in range(4)]
    fault_tasks = [
        asyncio.create_task(kill_processes(sup, args.kill_every, rngs[0], stop_faults)),
        asyncio.create_task(
            restart_postgres(servers, sup, args.pg_every, rngs[1], stop_faults, figures)
        ),
        asyncio.create_task(
            kill_nats_nodes(servers, sup, args.nats_every, rngs[2], stop_faults, figures)
        ),
        asyncio.create_task(schedule_dumps(config, args.dump_every, rngs[3], stop_faults, figures)),
    ]
    workers = [asyncio.create_task(workload.run(w, stop_work)) for w in range(args.workers)]
    started = time.monotonic()
    progress = asyncio.create_task(report_progress(figures, sup, started, stop_all))
    try:
        await asyncio.sleep(args.duration)
        stop_faults.set()
        await asyncio.gather(*fault_tasks)
        stop_work.set()
        await asyncio.gather(*workers)
        note("workload and faults stopped")
        figures.workload_seconds = time.monotonic() - started
        print("workload and faults stopped; catching up", flush=True)
        stopped_at = time.monotonic()
        if bad := await sup.all_healthy(60):
            print("not running or not healthy after the faults: " + ", ".join(bad), flush=True)
        figures.settle_seconds = time.monotonic() - stopped_at
        caught_up = await catch_up(servers, files, figures, args.catch_up)
        ok, problems, stats = await check_stream(servers)
        figures.checks.append(("stream exactly once and in order", ok, problems))
        figures.lag.update({f"stream {k}": f"{v:,}" for k, v in stats.items()})
        ok, problems = await check_replica(servers)
        figures.checks.append(("replica equal to the source", ok, problems))
        for uri, path in files.items():
            ok, problems, counts = await check_consumer(src, path, uri)
            figures.checks.append(
                (f"consumer {uri} equal to the source, no time travel", ok, problems)
            )
            figures.lag.update({f"consumer {uri} {k}": f"{v:,}" for k, v in counts.items()})
        figures.checks.append(("everything caught up in time", caught_up, []))
    finally:
        stop_faults.set()
        stop_work.set()
        stop_all.set()
        tasks = (*fault_tasks, *workers, watcher, progress, *figures.watchers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    offset = time.time() - time.monotonic()
    for uri, path in files.items():
        proc = sup.procs[f"consumer {uri}"]
        proc.recoveries = consumer_recoveries(path, proc.kills, offset)
    return all(ok for _, ok, _ in figures.checks)


async def slot_exists(dsn: str) -> bool:
    return bool(await scalar(dsn, "SELECT count(*) FROM pg_replication_slots"))


async def report_progress(
    figures: Figures, sup: Supervisor, started: float, stop: asyncio.Event
) -> None:
    while not await stopped(stop, 15):
        kills = sum(len(p.kills) for p in sup.procs.values())
        exits = sum(len(p.exits) for p in sup.procs.values())
        print(
            f"  {time.monotonic() - started:5.0f} s: {figures.transactions:,} transactions, "
            f"{figures.rows:,} rows, {figures.bytes / 1e6:,.1f} MB of large values; {kills} kills, "
            f"{exits} exits, {len(figures.pg_restarts)} PostgreSQL restarts, "
            f"{len(figures.nats_kills)} NATS kills, {figures.dumps} dumps",
            flush=True,
        )


def seconds_summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s"


def print_report(args: argparse.Namespace, figures: Figures, sup: Supervisor) -> None:
    print(f"\nseed {args.seed}, {figures.workload_seconds:.0f} s of workload and faults")
    print(
        f"transactions committed: {figures.transactions:,} ({sum(figures.failed.values()):,} "
        "failed, by error:)"
    )
    for reason, n in figures.failed.most_common(8):
        print(f"  {n} x {reason[:160]}")
    print(
        f"rows written: {figures.rows:,}; large values: {figures.large_values:,}, "
        f"{figures.bytes / 1e6:,.1f} MB (max {args.max_value:,} bytes)"
    )
    print(f"DDL: {dict(figures.ddl)}")
    print(
        f"dumps scheduled: {figures.dumps}, refused: {len(figures.dump_failures)}"
        + (f" (last: {figures.dump_failures[-1]})" if figures.dump_failures else "")
    )
    print("\n| process | SIGKILLs | exits by itself | recovery after a kill or exit |")
    print("|---|---|---|---|")
    for proc in sup.procs.values():
        print(
            f"| {proc.name} | {len(proc.kills)} | {len(proc.exits)} | "
            f"{seconds_summary(proc.recoveries)} ({len(proc.recoveries)}) |"
        )
    print(
        f"| all | {sum(len(p.kills) for p in sup.procs.values())} | "
        f"{sum(len(p.exits) for p in sup.procs.values())} | |"
    )
    for proc in sup.procs.values():
        reasons = Counter(f"status {code}: {why}" for _, code, why in proc.exits)
        for reason, n in reasons.most_common(5):
            print(f"  {proc.name} exited {n}x, {reason}")
    restarts = Counter(f"{c} -m {m}" for c, m, _ in figures.pg_restarts)
    print(
        f"\nPostgreSQL restarts: {len(figures.pg_restarts)} {dict(restarts)}; stop and start "
        f"{seconds_summary([s for _, _, s in figures.pg_restarts])}; every pgcapture process "
        f"healthy again {seconds_summary(figures.pg_healthy)} after the restart began"
    )
    print(
        f"NATS node kills: {len(figures.nats_kills)} "
        f"{dict(Counter(n for n, _, _ in figures.nats_kills))}; down "
        f"{seconds_summary([d for _, d, _ in figures.nats_kills])}, back up in "
        f"{seconds_summary([u for _, _, u in figures.nats_kills])}; every pgcapture process "
        f"healthy again {seconds_summary(figures.nats_healthy)} after the kill"
    )
    print("  (the time until healthy includes the process kills that fell in between)")
    print("\nfinal lag and counts:")
    for name, value in figures.lag.items():
        print(f"  {name}: {value}")
    print()
    for name, ok, problems in figures.checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
        for problem in problems[:20]:
            print(f"      {problem}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=600.0,
        help="workload and faults, e.g. 90s, 10m (default 10m)",
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument(
        "--max-value",
        type=parse_size,
        default=parse_size("2MB"),
        help="largest value written to table big (default 2MB)",
    )
    parser.add_argument("--workers", type=int, default=2, help="workload connections")
    parser.add_argument("--rate", type=float, default=40.0, help="transactions/s, all workers")
    parser.add_argument(
        "--ddl-share",
        type=float,
        default=0.03,
        help="share of worker 0's transactions that are DDL",
    )
    parser.add_argument(
        "--kill-every",
        type=parse_duration,
        default=3.0,
        help="mean time between SIGKILLs of a process (default 3s)",
    )
    parser.add_argument(
        "--pg-every",
        type=parse_duration,
        default=60.0,
        help="mean time between PostgreSQL restarts (default 60s)",
    )
    parser.add_argument(
        "--nats-every",
        type=parse_duration,
        default=60.0,
        help="mean time between NATS node kills (default 60s)",
    )
    parser.add_argument(
        "--dump-every",
        type=parse_duration,
        default=10.0,
        help="mean time between dumps scheduled (default 10s)",
    )
    parser.add_argument(
        "--restart-delay",
        type=parse_duration,
        default=1.0,
        help="before a process that exited by itself starts again (default 1s)",
    )
    parser.add_argument(
        "--catch-up",
        type=parse_duration,
        default=120.0,
        help="longest wait for everything to catch up at the end (default 120s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the directory and its logs")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    return args


def main() -> None:
    args = parse_args()
    # Ctrl-C and SIGTERM end the run through the cleanup below (also when started in the
    # background, where the shell has SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="pgcapture-chaos-"))
    os.chmod(workdir, 0o755)  # the clusters' directories belong to the server's user
    servers = Servers(workdir)
    sup = Supervisor(args.restart_delay)
    figures = Figures()
    passed = interrupted = False
    try:
        servers.start()
        passed = asyncio.run(soak(args, servers, sup, figures))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping everything", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        sup.stop_all()
        servers.destroy()
        (workdir / "timeline.txt").write_text("".join(f"{line}\n" for line in TIMELINE))
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(args, figures, sup)
    verdict = "INTERRUPTED" if interrupted else "PASS" if passed else "FAIL"
    print(f"\n{verdict} (seed {args.seed})")
    sys.exit(130 if interrupted else 0 if passed else 1)


if __name__ == "__main__":
    main()
