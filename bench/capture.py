"""Capture throughput: rows/s read and decoded from a slot, against pg_recvlogical.

For each workload (narrow rows like pgbench_history, wide rows of 20 mixed columns) the script
writes the rows once, then replays the same WAL several times from copies of one slot
(``pg_copy_logical_replication_slot``): once with ``pg_recvlogical`` writing to /dev/null and
once with pgcapture's ``SlotReader`` (decode + checkpoint + wire encoding of every row), with the
same plugin options, over the same transport. It prints medians and the ratio; the ratio is the
figure to compare across machines.

    uv run python bench/capture.py --rows 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Final

import psycopg

from pgcapture.capture.reader import SlotReader
from pgcapture.local import LocalPostgres
from pgcapture.lsn import LSN

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
    args = parser.parse_args()
    with LocalPostgres.create(settings={"max_wal_size": "8GB", "wal_sender_timeout": "0"}) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        print("| workload | transport | rows | pg_recvlogical rows/s | pgcapture rows/s | ratio |")
        print("|---|---|---|---|---|---|")
        for workload, statements, rows in (
            ("narrow (7 columns)", NARROW, args.rows),
            ("wide (21 columns)", WIDE, args.wide_rows),
        ):
            table = statements[0].split()[2]
            end = asyncio.run(setup_and_write(pg, statements, rows))
            for transport in args.transports.split(","):
                result = measure(pg, workload, table, end, rows, transport, args.repeat)
                print_row(result)
            reset(pg)


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


if __name__ == "__main__":
    main()
