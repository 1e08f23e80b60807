"""Dump throughput: rows/s a ``pgcapture dumper`` delivers, against reading the same table with
a plain binary COPY.

A throw-away PostgreSQL cluster (Unix socket, fsync off) stands in for the logical replica: its
database holds ``pgcapture.sources`` with a position for source ``bench``, a narrow table
(bigint id, int, ~20-byte text, timestamptz) and a wide one (30 columns of mixed types). For
each table and each repeat, in the same run:

- ``copy`` (the reference): ``COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)`` read
  completely with psycopg (``AsyncCopy`` iteration) on the replica, rows counted;
- ``dumper``: the whole table cut into chunks the way the controller cuts them (page ranges of
  about ``--chunk-rows`` rows by the table's statistics, the last one open-ended), read one
  after the other through ``pgcapture.Agent/StreamDumpBatched`` of a ``python -m pgcapture
  dumper`` process by a client in this process that parses every ``DumpRows`` and counts its
  changes;
- ``gateway``: what a consumer gets: a dump of the table scheduled on a ``pgcapture
  controller`` process (``ScheduleDump``, chunks of ``--chunk-rows``), delivered by a
  ``pgcapture gateway`` process (reading the chunks from the dumper) to one ``CaptureBatched``
  client in this process that acknowledges every batch; timed from the schedule to the last
  row received. A nats-server holds the URI's (empty) stream and the controller's bucket.

Printed: medians of the repeats in rows/s, the ratio to ``copy``, and the CPU seconds the
dumper, gateway and controller processes and this process (the client) used. Each
measurement is one function of ``MEASUREMENTS``.

    uv run python bench/dump.py
    uv run python bench/dump.py --quick
    uv run python bench/dump.py --only narrow --repeat 5 --chunk-rows 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import nats as natslib
import psycopg
from nats.js import api
from procstat import process_cpu

from pgcapture.dump.chunks import LAST_PAGE
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.proto import pb, pb_grpc
from pgcapture.replica.store import SCHEMA_SQL

SOURCE: Final = "bench"
CHANNEL_OPTIONS: Final = [("grpc.max_receive_message_length", 64 << 20)]
NARROW: Final = (
    "CREATE TABLE narrow (id bigint PRIMARY KEY, n int, s text, at timestamptz)",
    "INSERT INTO narrow SELECT g, g % 1000, substr(md5(g::text), 1, 16 + g % 9), "
    "now() - g * interval '1 second' FROM generate_series(1, {rows}) g",
)
_WIDE_KINDS: Final = (
    ("int", "g % 100000"),
    ("bigint", "g * 7919"),
    ("text", "'name-' || g"),
    ("numeric(12,2)", "(g % 100000) / 100.0"),
    ("timestamptz", "now() - g * interval '1 minute'"),
    ("boolean", "g % 2 = 0"),
    ("double precision", "g / 3.0"),
    ("uuid", "md5(g::text)::uuid"),
    ("date", "date '2020-01-01' + g % 2000"),
    ("varchar(32)", "substr(md5((g * 3)::text), 1, 12 + g % 20)"),
)
WIDE_COLUMNS: Final = 29  # besides id


def wide_statements() -> tuple[str, str]:
    cols = [(f"c{i:02d}", *_WIDE_KINDS[i % len(_WIDE_KINDS)]) for i in range(WIDE_COLUMNS)]
    create = ", ".join(f"{name} {kind}" for name, kind, _ in cols)
    values = ", ".join(expr for _, _, expr in cols)
    return (
        f"CREATE TABLE wide (id bigint PRIMARY KEY, {create})",
        f"INSERT INTO wide SELECT g, {values} FROM generate_series(1, {{rows}}) g",
    )


@dataclass
class Table:
    name: str
    statements: tuple[str, str]
    rows: int


@dataclass
class Env:
    """The replica cluster, the dumper process serving it and the chunks of each table."""

    pg: LocalPostgres
    workdir: Path
    chunk_rows: int
    address: str = ""
    dumper_pid: int = 0
    nats_url: str = ""
    gateway: str = ""
    controller: str = ""
    service_pids: tuple[int, ...] = ()  # controller and gateway
    chunks: dict[str, list[pb.DumpInfoResponse]] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.pg.dsn("bench")


@dataclass
class Run:
    rows: int
    seconds: float
    dumper_cpu: float = 0.0  # CPU seconds of the dumper process
    client_cpu: float = 0.0  # of this process (the client)
    gateway_cpu: float = 0.0  # of the gateway process
    controller_cpu: float = 0.0  # of the controller process

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


# --- the measurements ---------------------------------------------------------------------------


async def measure_copy(env: Env, table: Table) -> Run:
    """The reference: the whole table through binary COPY, read with psycopg."""
    statement = f"COPY (SELECT * FROM {table.name}) TO STDOUT (FORMAT binary)"
    async with await psycopg.AsyncConnection.connect(env.dsn) as conn:
        own = time.process_time()
        started = time.perf_counter()
        blocks = 0
        async with conn.cursor() as cur, cur.copy(statement) as copy:
            async for _ in copy:
                blocks += 1
        seconds = time.perf_counter() - started
    return Run(blocks - 1, seconds, client_cpu=time.process_time() - own)  # a row per message


async def measure_dumper(env: Env, table: Table) -> Run:
    """The table's chunks, one after the other, through ``StreamDumpBatched``."""
    chunks = env.chunks[table.name]
    async with grpc.aio.insecure_channel(env.address, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        stub = pb_grpc.AgentStub(channel)
        cpu, own = process_cpu(env.dumper_pid), time.process_time()
        started = time.perf_counter()
        rows = 0
        for info in chunks:
            async for message in stub.StreamDumpBatched(pb.AgentDumpRequest(info=info)):
                rows += len(message.changes)
        seconds = time.perf_counter() - started
        dumper_cpu = process_cpu(env.dumper_pid) - cpu
    return Run(rows, seconds, dumper_cpu, time.process_time() - own)


async def measure_gateway(env: Env, table: Table) -> Run:
    """A dump scheduled on the controller, received by one consumer through the gateway."""
    params = pb.CaptureRequest(init=pb.CaptureInit(uri="bench"))
    async with (
        grpc.aio.insecure_channel(env.gateway, options=CHANNEL_OPTIONS) as gateway,
        grpc.aio.insecure_channel(env.controller) as controller,
    ):
        await asyncio.wait_for(gateway.channel_ready(), 60)
        stream = pb_grpc.DBLogGatewayStub(gateway).CaptureBatched()
        await stream.write(params)
        cpu = [process_cpu(pid) for pid in (env.dumper_pid, *env.service_pids)]
        own = time.process_time()
        started = time.perf_counter()
        control = pb_grpc.DBLogControllerStub(controller)
        dump = await control.ScheduleDump(
            pb.ScheduleDumpRequest(uri="bench", tables=[f"public.{table.name}"])
        )
        rows = 0
        async for batch in stream:
            n = len(batch.messages)
            rows += n
            last = batch.first_id + n - 1
            ack = pb.CaptureAckRange(first_id=batch.first_id, last_id=last)
            await stream.write(pb.CaptureRequest(ack_range=ack))
            if rows >= table.rows:
                break
        seconds = time.perf_counter() - started
        # The last acknowledgements reach the gateway, the chunks are done: then the stream
        # may end (a chunk whose rows are not all acknowledged would be dumped again).
        ref = pb.ListDumpsRequest(uri="bench", id=dump.id, include_finished=True)
        while True:
            if (await control.ListDumps(ref)).dumps[0].state == "done":
                break
            await asyncio.sleep(0.05)
        stream.cancel()
        dumper, controller_cpu, gateway_cpu = (
            process_cpu(pid) - before
            for pid, before in zip((env.dumper_pid, *env.service_pids), cpu, strict=True)
        )
    return Run(rows, seconds, dumper, time.process_time() - own, gateway_cpu, controller_cpu)


MEASUREMENTS: Final[dict[str, Callable[[Env, Table], Awaitable[Run]]]] = {
    "copy": measure_copy,
    "dumper": measure_dumper,
    "gateway": measure_gateway,
}
REFERENCE: Final = "copy"


# --- setting up ---------------------------------------------------------------------------------


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def load(env: Env, table: Table) -> None:
    started = time.perf_counter()
    create, insert = table.statements
    sql(env.dsn, create, insert.format(rows=table.rows), f"VACUUM ANALYZE {table.name}")
    env.chunks[table.name] = cut_chunks(env.dsn, table.name, env.chunk_rows)
    print(
        f"{table.name}: {table.rows:,} rows loaded in {time.perf_counter() - started:.1f} s, "
        f"{len(env.chunks[table.name])} chunks",
        flush=True,
    )


def cut_chunks(dsn: str, table: str, chunk_rows: int) -> list[pb.DumpInfoResponse]:
    """Page ranges of about ``chunk_rows`` rows by the table's statistics; the last one runs
    to the end of the table (``LAST_PAGE``), as the controller cuts them."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT relpages, reltuples FROM pg_class WHERE relname = %s", (table,)
        ).fetchone()
    assert row is not None
    pages, tuples = int(row[0]), max(float(row[1]), 1.0)
    step = max(1, round(pages * chunk_rows / tuples))
    out = [
        pb.DumpInfoResponse(schema="public", table=table, page_begin=b, page_end=b + step - 1)
        for b in range(0, pages, step)
    ]
    out[-1].page_end = LAST_PAGE
    return out


def start_services(env: Env, chunk_rows: int) -> list[subprocess.Popen[bytes]]:
    """The dumper, the controller and the gateway, each its own process, on one config file."""
    q = json.dumps  # a JSON string is a TOML basic string
    dumper, controller, gateway = (f"127.0.0.1:{free_port()}" for _ in range(3))
    config = env.workdir / "pgcapture.toml"
    config.write_text(
        f'[nats]\nurl = {q(env.nats_url)}\n[log]\nlevel = "warning"\n'
        f"[sources.{SOURCE}]\ndsn = {q(env.dsn)}\n[sources.{SOURCE}.replica]\ndsn = {q(env.dsn)}\n"
        f"[dumper]\nlisten = {q(dumper)}\nsource = {q(SOURCE)}\n"
        f"[controller]\nlisten = {q(controller)}\nchunk_rows = {chunk_rows}\n"
        f"[gateway]\nlisten = {q(gateway)}\ncontroller = {q(controller)}\n"
        "[gateway.tls]\ndisabled = true\n[gateway.auth]\ndisabled = true\n"
        f"[gateway.uris.bench]\nsource = {q(SOURCE)}\ndumper = {q(dumper)}\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-m", "pgcapture", command, "--config", str(config)])
        for command in ("dumper", "controller", "gateway")
    ]
    env.address, env.controller, env.gateway = dumper, controller, gateway
    env.dumper_pid = procs[0].pid
    env.service_pids = (procs[1].pid, procs[2].pid)
    return procs


async def make_stream(url: str) -> None:
    """The source's stream, empty: the URI reads it, dumps never enter it."""
    nc = await natslib.connect(url)
    try:
        await nc.jetstream().add_stream(
            api.StreamConfig(name=f"PGCAPTURE_{SOURCE.upper()}", subjects=[f"pgcapture.{SOURCE}"])
        )
    finally:
        await nc.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- running and reporting ----------------------------------------------------------------------


async def warm_up(env: Env, table: Table) -> None:
    """The table into the caches, the dumper's connection and plan caches filled."""
    await measure_copy(env, table)
    async with grpc.aio.insecure_channel(env.address, options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        request = pb.AgentDumpRequest(info=env.chunks[table.name][0])
        async for _ in pb_grpc.AgentStub(channel).StreamDumpBatched(request):
            pass


async def run_all(env: Env, tables: list[Table], repeat: int) -> dict[tuple[str, str], list[Run]]:
    results: dict[tuple[str, str], list[Run]] = {}
    for table in tables:
        await warm_up(env, table)
        for i in range(repeat):
            for name, measure in MEASUREMENTS.items():
                run = await measure(env, table)
                if run.rows != table.rows:
                    raise SystemExit(
                        f"{name} read {run.rows:,} rows of {table.name}, not {table.rows:,}"
                    )
                results.setdefault((table.name, name), []).append(run)
                print(f"  {table.name} #{i + 1} {name}: {run.rate:,.0f} rows/s", flush=True)
    return results


def report(results: dict[tuple[str, str], list[Run]], tables: list[Table], repeat: int) -> None:
    print(f"\nmedians of {repeat} runs (rows/s, ratio to {REFERENCE}, CPU seconds)\n")
    print(
        "| table | rows | measurement | rows/s | ratio | dumper CPU s | gateway CPU s "
        "| controller CPU s | client CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for table in tables:
        reference = statistics.median(r.rate for r in results[(table.name, REFERENCE)])
        for name in MEASUREMENTS:
            runs = results[(table.name, name)]
            rate = statistics.median(r.rate for r in runs)
            cpu = statistics.median(r.dumper_cpu for r in runs)
            client = statistics.median(r.client_cpu for r in runs)
            gateway = statistics.median(r.gateway_cpu for r in runs)
            controller = statistics.median(r.controller_cpu for r in runs)
            print(
                f"| {table.name} | {table.rows:,} | {name} | {rate:,.0f} | {rate / reference:.2f} "
                f"| {cpu:.2f} | {gateway:.2f} | {controller:.2f} | {client:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--narrow-rows", type=int, default=1_000_000)
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="narrow,wide", help="comma-separated tables")
    parser.add_argument("--quick", action="store_true", help="small tables, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.narrow_rows, args.wide_rows, args.repeat = 50_000, 10_000, 1
    tables = [
        t
        for t in (
            Table("narrow", NARROW, args.narrow_rows),
            Table("wide", wide_statements(), args.wide_rows),
        )
        if t.name in args.only.split(",")
    ]
    print(
        f"{os.cpu_count()} CPUs; PostgreSQL, nats-server, the dumper, the controller, the "
        "gateway and this client share them",
        flush=True,
    )
    settings = {"shared_buffers": "512MB", "max_wal_size": "8GB"}
    with (
        LocalPostgres.create(settings=settings) as pg,
        LocalNats() as nats,
        tempfile.TemporaryDirectory(prefix="bench-dump-") as workdir,
    ):
        sql(pg.dsn(), "CREATE DATABASE bench")
        env = Env(pg, Path(workdir), args.chunk_rows, nats_url=nats.url)
        asyncio.run(make_stream(nats.url))
        sql(
            env.dsn,
            SCHEMA_SQL,
            f"INSERT INTO pgcapture.sources (id, lsn, origin) VALUES ('{SOURCE}', '0/0', 'bench')",
        )
        for table in tables:
            load(env, table)
        procs = start_services(env, args.chunk_rows)
        try:
            results = asyncio.run(run_all(env, tables, args.repeat))
        finally:
            for proc in reversed(procs):
                stop(proc)
    report(results, tables, args.repeat)


if __name__ == "__main__":
    main()
