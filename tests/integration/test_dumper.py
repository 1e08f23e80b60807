"""The dumper against a real PostgreSQL standing in for a logical replica: chunk contents,
page ranges, key chunks, refusals, streaming, the ``pgcapture.Agent`` service over gRPC, and
``pgcapture dumper`` as a process.

Each test's database gets ``pgcapture.sources`` (the replica's own table) with a position for
source ``src``; the rows a chunk returns are compared with what the same database returns for
a binary-format SELECT, and the key flags with what capture sends for the same rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from log_helpers import http_get
from psycopg import pq, sql
from slot_helpers import collect, user_changes

from pgcapture.capture.reader import SlotReader
from pgcapture.config import Config, validate_config
from pgcapture.dump.agent import serve_dumper
from pgcapture.dump.chunks import LAST_PAGE
from pgcapture.dump.dumper import (
    BadChunk,
    BatchLimits,
    Dumper,
    NoPosition,
    ReplicaBehind,
    ReplicaUnavailable,
    TableMissing,
    read_table,
    select_statement,
)
from pgcapture.local import LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.lsn import LSN
from pgcapture.proto import pb, pb_grpc
from pgcapture.replica.store import SCHEMA_SQL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SOURCE = "src"
POSITION = LSN.parse("5/3000060")
BLOCK = "(ctid::text::point)[0]::bigint"  # the heap page of a row


@pytest.fixture
def replica(dsn: str) -> str:
    """The test database as a replica of source ``src`` at ``POSITION``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(
            "INSERT INTO pgcapture.sources (id, lsn, origin) VALUES (%s, %s, 'test')",
            (SOURCE, str(POSITION)),
        )
    return dsn


def sql_run(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def request(
    table: str,
    begin: int = 0,
    end: int = LAST_PAGE,
    keys: list[str] | None = None,
    min_lsn: int = 0,
    schema: str = "public",
) -> pb.AgentDumpRequest:
    info = pb.DumpInfoResponse(
        schema=schema, table=table, page_begin=begin, page_end=end, keys=keys or []
    )
    return pb.AgentDumpRequest(min_lsn=min_lsn, info=info)


async def dump(
    dsn: str, req: pb.AgentDumpRequest, limits: BatchLimits | None = None
) -> tuple[LSN, list[pb.Change], list[list[bytes]]]:
    """A chunk's position, its changes, and its batches as read."""
    dumper = Dumper(dsn, SOURCE, limits or BatchLimits())
    try:
        async with dumper.read(req) as chunk:
            batches = [batch async for batch in chunk.batches()]
        changes = [pb.Change.FromString(c) for batch in batches for c in batch]
        return chunk.lsn, changes, batches
    finally:
        await dumper.close()


def ids(changes: list[pb.Change]) -> list[int]:
    return [int.from_bytes(c.new[0].binary, "big", signed=True) for c in changes]


def where_ids(dsn: str, where: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM t WHERE {where} ORDER BY ctid")]


# --- rows and columns -------------------------------------------------------------------------

TYPES = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (x int, y text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE typed (
    id bigint PRIMARY KEY, n numeric, t text, b bytea, ts timestamptz, j jsonb, ints int[],
    texts text[], m mood, moods mood[], p pair, d posint, f float8, u uuid, r int4range,
    ip inet, bits varbit, iv interval);
INSERT INTO typed VALUES
    (1, 123456789012345678901234567890.000001, 'héllo ✓', '\\x00ff10', '2024-01-01 12:34:56+02',
     '{"a": [1, 2], "b": null}', '{1,NULL,3}', ARRAY['a', NULL, 'c d'], 'happy', '{ok,happy}',
     ROW(1, 'one'), 42, 'NaN', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '[1,10)', '10.0.0.1/8',
     B'101', '1 year 2 mons 3 days 04:05:06.7'),
    (2, 'NaN', '', '', 'infinity', '[]', '{}', '{}', 'sad', '{}', ROW(NULL, NULL), 1, 0, NULL,
     'empty', '::1', B'', '-1 day'),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL);
"""


async def test_rows_are_the_replicas_binary_values_with_the_column_oids(replica: str) -> None:
    sql_run(replica, TYPES)
    lsn, changes, _ = await dump(replica, request("typed"))
    assert lsn == POSITION
    with psycopg.connect(replica) as conn:
        res = conn.pgconn.exec_params(
            b"SELECT * FROM typed ORDER BY id", [], result_format=pq.Format.BINARY
        )
        oids = [
            r[0]
            for r in conn.execute(
                "SELECT atttypid::int FROM pg_attribute WHERE attrelid = 'typed'::regclass "
                "AND attnum > 0 ORDER BY attnum"
            )
        ]
    names = [res.fname(i).decode() for i in range(res.nfields)]
    assert sorted(ids(changes)) == [1, 2, 3]
    for change in sorted(changes, key=lambda c: c.new[0].binary):
        row = ids([change])[0] - 1
        assert (change.op, change.schema, change.table) == (pb.Change.UPDATE, "public", "typed")
        assert not change.old
        assert [f.name for f in change.new] == names
        assert [f.oid for f in change.new] == oids  # the domain's own OID, as pgoutput sends
        for col, field in enumerate(change.new):
            value = res.get_value(row, col)
            if value is None:
                assert field.WhichOneof("value") is None, field.name
            else:
                assert field.WhichOneof("value") == "binary", field.name
                assert field.binary == value, field.name


IDENTITIES = """
CREATE TABLE by_pk (a int, b text, c int, g int GENERATED ALWAYS AS (a * 2) STORED,
                    PRIMARY KEY (b, a) INCLUDE (c));
CREATE TABLE by_index (a int NOT NULL, b text NOT NULL, c int);
CREATE UNIQUE INDEX by_index_ab ON by_index (b, a);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_ab;
CREATE TABLE by_full (a int PRIMARY KEY, b text);
ALTER TABLE by_full REPLICA IDENTITY FULL;
CREATE TABLE by_nothing (a int PRIMARY KEY, b text);
ALTER TABLE by_nothing REPLICA IDENTITY NOTHING;
CREATE TABLE no_key (a int, b text);
CREATE TABLE dropped (a int PRIMARY KEY, gone text, b text);
ALTER TABLE dropped DROP COLUMN gone;
"""
IDENTITY_TABLES = ["by_pk", "by_index", "by_full", "by_nothing", "no_key", "dropped"]


async def captured_rows(reader: SlotReader, tables: list[str]) -> dict[str, pb.Change]:
    """The first change capture sends for each of ``tables``."""
    out: dict[str, pb.Change] = {}
    async with asyncio.timeout(30):
        while not set(tables) <= out.keys():
            for change in user_changes(await collect(reader, 1)):
                out.setdefault(change.table, change)
    return out


async def test_key_flags_and_values_are_what_capture_sends(dsn: str, reader: SlotReader) -> None:
    sql_run(
        dsn,
        SCHEMA_SQL,
        f"INSERT INTO pgcapture.sources VALUES ('{SOURCE}', '0/0', 0, NULL, NULL, 't')",
    )
    sql_run(dsn, IDENTITIES)
    sql_run(dsn, *(f"INSERT INTO {t} (a, b) VALUES (7, 'seven')" for t in IDENTITY_TABLES))
    captured = await captured_rows(reader, IDENTITY_TABLES)
    for table in IDENTITY_TABLES:
        _, changes, _ = await dump(dsn, request(table))
        assert len(changes) == 1
        got, want = changes[0].new, captured[table].new
        assert [(f.name, f.oid, f.key) for f in got] == [(f.name, f.oid, f.key) for f in want]
        assert [f.binary for f in got] == [f.binary for f in want]
    keys = {t: [f.name for f in captured[t].new if f.key] for t in IDENTITY_TABLES}
    assert keys == {
        "by_pk": ["a", "b"], "by_index": ["a", "b"], "by_full": ["a", "b"],
        "by_nothing": [], "no_key": [], "dropped": ["a"],
    }  # fmt: skip


async def test_generated_columns_are_left_out(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, x int, doubled int GENERATED ALWAYS AS (x * 2) "
        "STORED, y text)",
        "INSERT INTO t (id, x, y) VALUES (1, 21, 'a')",
    )
    _, changes, _ = await dump(replica, request("t"))
    assert [f.name for f in changes[0].new] == ["id", "x", "y"]


async def test_a_type_without_binary_send_goes_as_text_with_its_own_oid(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, acl aclitem, acls aclitem[], n int)",
        "INSERT INTO t VALUES (1, 'postgres=arwdDxt/postgres', "
        "'{=r/postgres,postgres=r/postgres}', 5), (2, NULL, NULL, NULL)",
    )
    _, changes, _ = await dump(replica, request("t"))
    acl, acls, n = changes[0].new[1:]
    assert (acl.oid, acl.WhichOneof("value"), acl.text) == (
        1033,
        "text",
        "postgres=arwdDxt/postgres",
    )
    assert (acls.oid, acls.text) == (1034, "{=r/postgres,postgres=r/postgres}")
    assert (n.WhichOneof("value"), n.binary) == ("binary", b"\x00\x00\x00\x05")
    assert [f.WhichOneof("value") for f in changes[1].new[1:]] == [None, None, None]


async def test_types_holding_one_without_binary_send_go_as_text(replica: str) -> None:
    sql_run(
        replica,
        "CREATE DOMAIN acls AS aclitem[]",
        "CREATE TYPE grant_pair AS (who text, what aclitem)",
        "CREATE TABLE t (id bigint PRIMARY KEY, d acls, p grant_pair, ps grant_pair[], n int)",
        "INSERT INTO t VALUES (1, '{=r/postgres}', ROW('x', '=w/postgres'), "
        "ARRAY[ROW('y', NULL)::grant_pair], 5)",
    )
    _, changes, _ = await dump(replica, request("t"))
    d, p, ps, n = changes[0].new[1:]
    assert (d.WhichOneof("value"), d.text) == ("text", "{=r/postgres}")
    assert (p.WhichOneof("value"), p.text) == ("text", "(x,=w/postgres)")
    assert (ps.WhichOneof("value"), ps.text) == ("text", '{"(y,)"}')
    assert n.WhichOneof("value") == "binary"


# --- page ranges and keys ---------------------------------------------------------------------

PAGED = (
    "CREATE TABLE t (id bigint PRIMARY KEY, pad char(300) NOT NULL DEFAULT 'x')",
    "INSERT INTO t (id) SELECT g FROM generate_series(1, 1000) g",
    "DELETE FROM t WHERE id % 7 = 0",
    "VACUUM t",
)


@pytest.mark.parametrize(
    ("begin", "end"), [(0, 0), (3, 7), (10, LAST_PAGE), (0, LAST_PAGE), (35, 35), (500, 900)]
)
async def test_page_ranges_return_exactly_the_rows_on_those_pages(
    replica: str, begin: int, end: int
) -> None:
    sql_run(replica, *PAGED)
    _, changes, _ = await dump(replica, request("t", begin, end))
    upper = f"AND {BLOCK} <= {end}" if end != LAST_PAGE else ""
    assert ids(changes) == where_ids(replica, f"{BLOCK} >= {begin} {upper}")


async def test_chunks_of_a_whole_table_return_every_row_once(replica: str) -> None:
    sql_run(replica, *PAGED)
    with psycopg.connect(replica) as conn:
        row = conn.execute("SELECT relpages FROM pg_class WHERE relname = 't'").fetchone()
    assert row is not None
    assert row[0] > 20
    sql_run(replica, "INSERT INTO t (id) SELECT g FROM generate_series(1001, 1300) g")  # grows
    chunks = [(b, b + 3) for b in range(0, row[0] - 4, 4)]
    chunks.append((chunks[-1][1] + 1, LAST_PAGE))
    seen: list[int] = []
    for begin, end in chunks:
        seen += ids((await dump(replica, request("t", begin, end)))[1])
    assert sorted(seen) == sorted(where_ids(replica, "true")) == sorted(set(seen))
    assert len(seen) == 1000 - 1000 // 7 + 300


async def test_page_chunks_are_read_with_a_tid_range_scan(replica: str) -> None:
    sql_run(replica, *PAGED)
    async with await psycopg.AsyncConnection.connect(replica) as conn:
        for begin, end in ((2, 5), (30, LAST_PAGE)):
            info = request("t", begin, end).info
            select = select_statement(info, await read_table(conn, info), [])
            cur = await conn.execute(sql.SQL("EXPLAIN ") + select)
            plan = "\n".join(r[0] for r in await cur.fetchall())
            assert "Tid Range Scan on t" in plan, plan


KEYED = (
    "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
    "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g",
    "CREATE TABLE pairs (region text, n int, v text, PRIMARY KEY (region, n))",
    "INSERT INTO pairs SELECT r, g, r || g FROM unnest(ARRAY['eu', 'us']) r, "
    "generate_series(1, 5) g",
    "CREATE TABLE full_rows (a int, b text)",
    "ALTER TABLE full_rows REPLICA IDENTITY FULL",
    "INSERT INTO full_rows VALUES (1, 'x'), (2, 'y'), (3, 'z')",
    "CREATE TABLE no_key (a int, b text)",
)


async def test_key_chunks_select_rows_by_single_and_composite_keys(replica: str) -> None:
    sql_run(replica, *KEYED)
    keys = ['{"id": 3}', '{"id": 77}', '{"id": 1000}', '{"id": 3}']
    _, changes, _ = await dump(replica, request("t", 9, 9, keys))  # pages ignored
    assert sorted(ids(changes)) == [3, 77]
    keys = ['{"region": "us", "n": 2}', '{"n": 5, "region": "eu"}', '{"region": "eu", "n": 9}']
    _, changes, _ = await dump(replica, request("pairs", keys=keys))
    assert sorted(c.new[2].binary for c in changes) == [b"eu5", b"us2"]
    _, changes, _ = await dump(replica, request("full_rows", keys=['{"b": "y"}']))
    assert [c.new[0].binary for c in changes] == [b"\x00\x00\x00\x02"]


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ("t", "id = 3", "not a JSON object"),
        ("t", "[3]", "not a JSON object"),
        ("t", "{}", "not a JSON object"),
        ("pairs", '{"region": "eu"}', "is not made of them"),
        ("t", '{"id": 3, "v": "v3"}', "is not made of them"),
        ("t", '{"ident": 3}', "names unknown columns"),
        ("full_rows", '{"c": 3}', "names unknown columns"),
        ("no_key", '{"a": 1}', "has no key on the replica"),
        ("t", '{"id": "three"}', "do not fit the key columns"),
    ],
)
async def test_bad_keys_are_refused(replica: str, table: str, key: str, problem: str) -> None:
    sql_run(replica, *KEYED)
    with pytest.raises(BadChunk, match=problem):
        await dump(replica, request(table, keys=[key]))


# --- refusals and errors ----------------------------------------------------------------------


async def test_a_replica_behind_the_consumer_refuses_naming_both_positions(replica: str) -> None:
    sql_run(replica, "CREATE TABLE t (id bigint PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    with pytest.raises(ReplicaBehind) as info:
        await dump(replica, request("t", min_lsn=POSITION + 1))
    assert str(info.value) == (
        "the replica has applied source 'src' up to 5/3000060, the consumer is at 5/3000061; "
        "the chunk is retried once the replica catches up"
    )
    lsn, changes, _ = await dump(replica, request("t", min_lsn=POSITION))
    assert (lsn, len(changes)) == (POSITION, 1)


async def test_a_replica_without_a_position_refuses(dsn: str) -> None:
    sql_run(dsn, "CREATE TABLE t (id bigint PRIMARY KEY)")
    with pytest.raises(NoPosition, match="no position for source 'src': bootstrap it or start"):
        await dump(dsn, request("t"))  # no pgcapture.sources at all
    sql_run(
        dsn, SCHEMA_SQL, "INSERT INTO pgcapture.sources VALUES ('other', '1/0', 0, NULL, NULL, 't')"
    )
    with pytest.raises(NoPosition, match="no position for source 'src'"):
        await dump(dsn, request("t"))


@pytest.mark.parametrize("table", ["absent", "a_view"])
async def test_a_missing_table_is_reported_as_such(replica: str, table: str) -> None:
    sql_run(replica, "CREATE VIEW a_view AS SELECT 1 AS id")
    with pytest.raises(TableMissing, match=f"table public.{table} does not exist on the replica"):
        await dump(replica, request(table))


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        (pb.DumpInfoResponse(schema="public"), "names no table"),
        (pb.DumpInfoResponse(table="t"), "names no schema"),
        (pb.DumpInfoResponse(schema="public", table="t", page_begin=5, page_end=4), "after"),
    ],
)
async def test_a_request_without_a_chunk_is_refused(
    replica: str, info: pb.DumpInfoResponse, problem: str
) -> None:
    with pytest.raises(BadChunk, match=problem):
        await dump(replica, pb.AgentDumpRequest(info=info))


# --- streaming and snapshots ------------------------------------------------------------------


async def test_a_big_chunk_streams_in_many_batches_within_the_limits(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, repeat('x', g % 97) FROM generate_series(1, 200000) g",
    )
    limits = BatchLimits(rows=1000, bytes=64 << 10)
    dumper = Dumper(replica, SOURCE, limits)
    sizes: list[tuple[int, int]] = []
    try:
        async with dumper.read(request("t")) as chunk:
            async for batch in chunk.batches():
                if not sizes:  # the COPY is still running: rows are streamed, not collected
                    assert await copy_running(replica)
                sizes.append((len(batch), sum(map(len, batch))))
                biggest = max(map(len, batch))
                assert len(batch) <= limits.rows
                assert sizes[-1][1] - biggest < limits.bytes
    finally:
        await dumper.close()
    assert sum(n for n, _ in sizes) == chunk.rows == 200_000
    assert len(sizes) > 200


async def copy_running(dsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'COPY%'"
        )
        row = await cur.fetchone()
    return row is not None and row[0] == 1


async def test_a_chunk_is_one_repeatable_read_read_only_transaction(
    replica: str, pg: LocalPostgres, dbname: str
) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY)",
        f"ALTER DATABASE {dbname} SET log_statement = 'all'",
    )
    await dump(replica, request("t"))
    log = [line for line in pg.log_file.read_text().splitlines() if f"@{dbname} " in line]
    found = (re.search(r"LOG:  (?:statement|execute [^:]*): (.*)", line) for line in log)
    statements = [m[1] for m in found if m]
    begin = statements.index("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    assert statements[begin + 1].startswith("SELECT lsn::text FROM pgcapture.sources")
    assert statements[begin + 3].startswith('COPY (SELECT "id" FROM "public"."t" WHERE ctid')
    assert statements[begin + 4] == "COMMIT"


async def test_position_and_rows_are_read_in_one_snapshot(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'old' FROM generate_series(1, 20000) g",
    )
    dumper = Dumper(replica, SOURCE, BatchLimits(rows=100))
    seen: list[bytes] = []
    try:
        async with dumper.read(request("t")) as chunk:
            async for batch in chunk.batches():
                if not seen:  # a replicate transaction commits meanwhile
                    sql_run(
                        replica,
                        "BEGIN; UPDATE t SET v = 'new'; INSERT INTO t VALUES (20001, 'new'); "
                        "UPDATE pgcapture.sources SET lsn = '6/0'; COMMIT",
                    )
                seen += (pb.Change.FromString(c).new[1].binary for c in batch)
    finally:
        await dumper.close()
    assert chunk.lsn == POSITION
    assert len(seen) == 20000
    assert set(seen) == {b"old"}


async def test_a_slow_consumer_costs_no_cpu_while_rows_wait_on_the_socket(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 50000) g",
    )
    dumper = Dumper(replica, SOURCE, BatchLimits(rows=100))
    try:
        async with dumper.read(request("t")) as chunk:
            async for _ in chunk.batches():
                cpu = time.process_time()
                await asyncio.sleep(1.0)  # the replica keeps sending meanwhile
                assert time.process_time() - cpu < 0.3
                break
    finally:
        await dumper.close()


async def test_leaving_a_chunk_early_cancels_its_copy_and_frees_the_connection(
    replica: str,
) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY)",
        "INSERT INTO t SELECT generate_series(1, 50000)",
    )
    dumper = Dumper(replica, SOURCE, BatchLimits(rows=10), connections=1)
    try:
        async with dumper.read(request("t")) as chunk:
            async for _ in chunk.batches():
                break
        _, changes, _ = await dump(replica, request("t", 0, 0))
        async with dumper.read(request("t", 0, 0)) as again:  # the same, reused connection
            assert sum([len(b) async for b in again.batches()]) == len(changes)
    finally:
        await dumper.close()


async def test_a_connection_lost_mid_chunk_is_unavailable_and_replaced(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g",
    )
    dumper = Dumper(replica, SOURCE, BatchLimits(rows=100), connections=1)

    async def read_while_terminated() -> None:
        async with dumper.read(request("t")) as chunk:
            async for _ in chunk.batches():
                sql_run(
                    replica,
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE query LIKE 'COPY%' AND pid <> pg_backend_pid()",
                )

    try:
        with pytest.raises(ReplicaUnavailable, match="pages 0-end on the replica failed: "):
            await read_while_terminated()
        _, changes, _ = await dump(replica, request("t", 0, 0))
        async with dumper.read(request("t", 0, 0)) as again:
            assert sum([len(b) async for b in again.batches()]) == len(changes) > 0
    finally:
        await dumper.close()


# --- the gRPC service -------------------------------------------------------------------------


def dumper_config(replica_dsn: str, metrics: str = "", **dumper: Any) -> Config:
    return validate_config(
        {
            "sources": {SOURCE: {"dsn": "host=/nonexistent", "replica": {"dsn": replica_dsn}}},
            "dumper": {"listen": "127.0.0.1:0", **dumper},
            "metrics": {"listen": metrics},
        }
    )


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[grpc.aio.Channel]:
    """``serve_dumper`` in this process, and a channel connected to it."""
    stop = asyncio.Event()
    address: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_dumper(config, stop, ready=address.set_result))
    try:
        done, _ = await asyncio.wait({task, address}, timeout=20, return_when="FIRST_COMPLETED")
        assert address in done, task.exception() if task.done() else "not ready in 20 s"
        async with grpc.aio.insecure_channel(address.result()) as channel:
            yield channel
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_agent_streams_rows_batched_and_one_per_message(replica: str) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2500) g",
    )
    async with serving(dumper_config(replica, batch_rows=1000)) as channel:
        stub = pb_grpc.AgentStub(channel)
        batched = [m async for m in stub.StreamDumpBatched(request("t"))]
        single = [m async for m in stub.StreamDump(request("t"))]
        empty = [m async for m in stub.StreamDumpBatched(request("t", 5000, 5001))]
        none = [m async for m in stub.StreamDump(request("t", 5000, 5001))]
    assert [len(m.changes) for m in batched] == [1000, 1000, 500]
    assert {m.lsn for m in batched} == {POSITION}
    assert [pb.Change.FromString(c) for m in batched for c in m.changes] == single
    assert sorted(ids(single)) == list(range(1, 2501))
    assert [(m.lsn, len(m.changes)) for m in empty] == [(POSITION, 0)]
    assert none == []


async def expect_status(call: Any) -> grpc.aio.AioRpcError:
    """The error that ends ``call`` (a unary or a streaming call)."""

    async def finish() -> None:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await finish()
    return info.value


async def test_agent_answers_refusals_with_status_codes_and_counts_them(replica: str) -> None:
    sql_run(replica, "CREATE TABLE t (id bigint PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    port = free_port()
    cases = [
        (request("t", min_lsn=POSITION + 1), grpc.StatusCode.UNAVAILABLE, "applied source 'src'"),
        (request("absent"), grpc.StatusCode.NOT_FOUND, "public.absent does not exist"),
        (request(""), grpc.StatusCode.INVALID_ARGUMENT, "names no table"),
        (request("t", keys=["nope"]), grpc.StatusCode.INVALID_ARGUMENT, "not a JSON object"),
    ]
    async with serving(dumper_config(replica, metrics=f"127.0.0.1:{port}")) as channel:
        stub = pb_grpc.AgentStub(channel)
        for method in (stub.StreamDumpBatched, stub.StreamDump):
            for req, code, text in cases:
                error = await expect_status(method(req))
                assert (error.code(), text in str(error.details())) == (code, True)
        for call in (stub.Configure(pb.AgentConfigRequest()), stub.Dump(request("t"))):
            error = await expect_status(call)
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "StreamDumpBatched" in str(error.details())
        sql_run(replica, f"DELETE FROM pgcapture.sources WHERE id = '{SOURCE}'")
        error = await expect_status(stub.StreamDumpBatched(request("t")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        status, body = await http_get(port, "/metrics")
    assert status == 200
    for line in (
        'pgcapture_dumper_refusals_total{reason="behind"} 2.0',
        'pgcapture_dumper_refusals_total{reason="missing_table"} 2.0',
        'pgcapture_dumper_refusals_total{reason="bad_request"} 4.0',
        'pgcapture_dumper_refusals_total{reason="no_position"} 1.0',
    ):
        assert line in body.decode()


async def test_agent_counts_chunks_and_rows_and_reports_health(replica: str) -> None:
    sql_run(replica, "CREATE TABLE t (id bigint PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
    port = free_port()
    async with serving(dumper_config(replica, metrics=f"127.0.0.1:{port}")) as channel:
        stub = pb_grpc.AgentStub(channel)
        assert len([m async for m in stub.StreamDumpBatched(request("t"))]) == 1
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pgcapture.Agent"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        _, metrics = await http_get(port, "/metrics")
        status, healthz = await http_get(port, "/healthz")
    assert 'pgcapture_dumper_chunks_total{method="StreamDumpBatched"} 1.0' in metrics.decode()
    assert 'pgcapture_dumper_rows_total{method="StreamDumpBatched"} 2.0' in metrics.decode()
    assert status == 200
    assert json.loads(healthz)["source"] == SOURCE


async def test_agent_serves_concurrent_requests_and_replaces_closed_connections(
    replica: str,
) -> None:
    sql_run(
        replica,
        "CREATE TABLE t (id bigint PRIMARY KEY)",
        "INSERT INTO t SELECT generate_series(1, 30000)",
    )
    async with serving(dumper_config(replica)) as channel:
        stub = pb_grpc.AgentStub(channel)

        async def rows() -> int:
            return sum([len(m.changes) async for m in stub.StreamDumpBatched(request("t"))])

        assert await asyncio.gather(*(rows() for _ in range(6))) == [30000] * 6
        with psycopg.connect(replica, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            ).fetchone()
        assert killed is not None
        assert killed[0] >= 2
        assert await asyncio.gather(*(rows() for _ in range(3))) == [30000] * 3


async def test_agent_answers_unavailable_while_the_replica_is_out_of_reach() -> None:
    unreachable = f"host=127.0.0.1 port={free_port()} dbname=x connect_timeout=2"
    async with serving(dumper_config(unreachable)) as channel:
        stub = pb_grpc.AgentStub(channel)
        error = await expect_status(stub.StreamDumpBatched(request("t")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect to the replica" in str(error.details())


# --- the command ------------------------------------------------------------------------------


def write_config(path: Path, replica_dsn: str) -> Path:
    q = json.dumps
    path.write_text(
        f"[sources.{SOURCE}]\ndsn = {q('host=/nonexistent')}\n"
        f"[sources.{SOURCE}.replica]\ndsn = {q(replica_dsn)}\n"
        '[log]\nformat = "text"\n'
    )
    return path


async def test_dumper_command_serves_until_sigterm(replica: str, tmp_path: Path) -> None:
    sql_run(replica, "CREATE TABLE t (id bigint PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
    config = write_config(tmp_path / "pgcapture.toml", replica)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "dumper", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--source", SOURCE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.AgentStub(channel)
            rows = [m async for m in stub.StreamDumpBatched(request("t"))]
        assert [len(m.changes) for m in rows] == [2]
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err
    assert b"dumper serving pgcapture.Agent on 127.0.0.1:" in err


def test_dumper_command_without_a_replica_dsn_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "pgcapture.toml", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pgcapture", "dumper", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "sources.src.replica.dsn: required by the dumper but not set" in proc.stderr
