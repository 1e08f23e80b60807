"""Values that name database objects (issue 14): ``regclass``, ``regtype`` and the other reg*
types hold OIDs, and OIDs of user objects differ on a replica.

Capture reads a transaction that changes a table with such a column (or an array, a domain or
a composite of one) again with pgoutput's ``binary`` off: the walsender then writes each value
as the object's schema-qualified name, under the catalog as it was when the row was written,
and the replica's input functions find the same object by that name. Other transactions stay
in binary.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import psycopg
import pytest
from log_helpers import current_lsn, http_get, make_config, run_sql, stream_records
from slot_helpers import Captured, collect, fields, user_changes
from test_replica_apply import _wait_for, replicating

from pgcapture.capture.reader import SlotReader, TextFallback
from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port
from pgcapture.ops.service import serve_capture
from pgcapture.proto import pb
from pgcapture.replica.store import set_position

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Both sides get this schema; the replica makes other objects first, so its OIDs differ.
SCHEMA = (
    "CREATE SCHEMA app",
    "CREATE TABLE app.target (id int)",
    "CREATE TYPE app.mood AS ENUM ('sad', 'ok')",
    "CREATE DOMAIN app.rel AS regclass",
    "CREATE TYPE app.box AS (n int)",
    "CREATE TYPE app.pair AS (r regclass, n int)",
    "CREATE TABLE plain (id int PRIMARY KEY, v text)",
    "CREATE TABLE names (id int PRIMARY KEY, c regclass, t regtype, cs regclass[], d app.rel,"
    " p app.pair)",
    "CREATE TABLE boxes (id int PRIMARY KEY, b app.box)",
)
REPLICA_FIRST = (
    "CREATE TABLE shift1 (id int)",
    "CREATE TYPE shift2 AS ENUM ('x')",
    "CREATE TABLE shift3 (id int)",
)

# Written before capture reads anything: each value is read after the rename committed.
WORKLOAD = (
    "INSERT INTO plain VALUES (1, 'alone')",
    # a row naming a table made in its own transaction, after a binary row of another table
    "BEGIN; INSERT INTO plain VALUES (2, 'before'); CREATE TABLE app.fresh (id int);"
    " INSERT INTO names VALUES (1, 'app.fresh', 'app.mood', '{app.target,app.fresh,pg_class}',"
    "  'app.target', ROW('app.fresh', 1));"
    " INSERT INTO plain VALUES (3, 'after'); COMMIT",
    "INSERT INTO names VALUES (2, 'app.target', 'app.mood[]', NULL, 'app.fresh', NULL),"
    " (3, 'pg_class', 'integer', '{}', NULL, ROW(NULL, 2))",
    # renamed after the rows were written: they name it by its old name, the replica follows
    "ALTER TABLE app.target RENAME TO renamed",
    "UPDATE names SET t = 'app.mood', cs = cs || 'app.renamed'::regclass WHERE id = 1",
    "INSERT INTO boxes VALUES (1, ROW(1))",
    "INSERT INTO plain VALUES (4, 'last')",
)


async def as_text(dsn: str, table: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            f"SELECT whole::text FROM {table} AS whole ORDER BY 1"  # type: ignore[arg-type]
        )
        return await cur.fetchall()


def _formats(change: pb.Change) -> set[str]:
    return {str(f.WhichOneof("value")) for f in change.new if f.WhichOneof("value")}


def _transactions(captured: list[Captured]) -> list[list[Captured]]:
    out: list[list[Captured]] = []
    for c in captured:
        if c.kind == "begin":
            out.append([])
        out[-1].append(c)
    return out


async def test_values_naming_objects_arrive_as_names_as_they_were_written(
    dsn: str, slot_name: str
) -> None:
    await run_sql(dsn, *SCHEMA)
    reader = SlotReader(dsn, slot_name, status_interval=0.5)
    await reader.open()  # the slot, before the workload
    await reader.close()
    await run_sql(dsn, *WORKLOAD)
    fallbacks: list[TextFallback] = []
    reader = SlotReader(dsn, slot_name, status_interval=0.5, on_text_fallback=fallbacks.append)
    await reader.open()
    try:
        captured = await collect(reader, len(WORKLOAD))
    finally:
        await reader.close()

    txs = _transactions(captured)
    assert len(txs) == len(WORKLOAD)
    # plain's own transactions and boxes: binary
    for tx in (txs[0], txs[5], txs[6]):
        (change,) = user_changes(tx)
        assert _formats(change) == {"binary"}, change.table
    # the mixed transaction: plain's first row was returned in binary before the names row
    # came; from there on, text
    mixed = user_changes(txs[1])
    assert [(c.table, _formats(c)) for c in mixed] == [
        ("plain", {"binary"}), ("names", {"text"}), ("plain", {"text"}),
    ]  # fmt: skip
    assert [c.record.seq for c in txs[1]] == list(range(len(txs[1])))
    row1 = fields(mixed[1].new)
    assert row1["c"].text == "app.fresh"
    assert row1["t"].text == "app.mood"
    assert row1["cs"].text == "{app.target,app.fresh,pg_class}"
    assert row1["d"].text == "app.target"
    assert row1["p"].text == "(app.fresh,1)"
    # written before the rename, read after it: the name it had then
    row2, row3 = (fields(c.new) for c in user_changes(txs[2]))
    assert row2["c"].text == "app.target"
    assert row2["t"].text == "app.mood[]"
    assert row2["d"].text == "app.fresh"
    assert (row3["c"].text, row3["t"].text, row3["cs"].text) == ("pg_class", "integer", "{}")
    (updated,) = user_changes(txs[4])
    # the same OIDs, now under the new name
    assert fields(updated.new)["cs"].text == "{app.renamed,app.fresh,pg_class,app.renamed}"
    assert [(f.lsn, f.type_name, f.reason) for f in fallbacks] == [
        (tx[0].record.lsn, "regclass", "its values name database objects")
        for tx in (txs[1], txs[2], txs[4])
    ]


async def test_the_replica_names_the_same_objects(
    dsn: str, replica_dsn: str, nats: LocalNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pgcapture.capture")
    await run_sql(dsn, *SCHEMA)
    await run_sql(replica_dsn, *REPLICA_FIRST, *SCHEMA)
    port = free_port()
    config = make_config(dsn, nats.url, "app")
    config = config.model_copy(update={"metrics": config.metrics.model_copy(
        update={"listen": f"127.0.0.1:{port}"}
    )})  # fmt: skip
    source = config.source("app")
    reader = SlotReader(dsn, source.slot_name, publication=source.slot_name)
    await reader.open()  # the slot, before the workload
    await reader.close()
    start = await current_lsn(dsn)
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        await set_position(conn, "app", start, "test")
    await run_sql(dsn, *WORKLOAD)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_capture(config, source, stop))
    try:
        async with replicating(config, replica_dsn) as applying:
            await _wait_for(replica_dsn, "plain", 4, applying)
            # a composite type gains a reg* attribute while a column uses it (and capture
            # already knows the table): no Relation message says so, the DDL row does
            await run_sql(
                dsn,
                "ALTER TYPE app.box ADD ATTRIBUTE r regclass",
                "INSERT INTO boxes VALUES (2, ROW(2, 'app.renamed'))",
                "INSERT INTO plain VALUES (5, 'done')",
            )
            await _wait_for(replica_dsn, "plain", 5, applying)
        body = (await http_get(port, "/metrics"))[1].decode()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    for table in ("names", "boxes", "plain"):
        assert await as_text(replica_dsn, table) == await as_text(dsn, table), table
    rows = await as_text(replica_dsn, "names")
    assert rows[0][0].startswith("(1,app.fresh,app.mood,")
    assert "app.renamed" in rows[1][0]  # the row named app.target; the replica saw the rename
    async with await psycopg.AsyncConnection.connect(replica_dsn) as conn:
        cur = await conn.execute(
            "SELECT c = 'app.renamed'::regclass, (p).r = 'app.fresh'::regclass FROM names"
            " WHERE id IN (1, 2) ORDER BY id"
        )
        assert await cur.fetchall() == [(False, True), (True, None)]

    stored = [
        pb.Message.FromString(r.message).change
        for r in await stream_records(nats.url, source.stream_name)
        if r.seq and not r.is_commit and r.lsn > start  # the stream may hold earlier tests'
    ]
    plain = [_formats(c) for c in stored if c.table == "plain"]
    assert plain == [{"binary"}, {"binary"}, {"text"}, {"binary"}, {"binary"}]
    boxes = [_formats(c) for c in stored if c.table == "boxes"]
    assert boxes == [{"binary"}, {"text"}]
    logged = [r for r in caplog.records if "went through in text format" in r.getMessage()]
    assert {r.type for r in logged} == {"regclass"}  # type: ignore[attr-defined]
    assert len({r.lsn for r in logged}) == 4  # type: ignore[attr-defined]
    line = f'pgcapture_capture_text_fallbacks_total{{source="app",type="regclass"}} {len(logged)}.0'
    assert line in body.splitlines(), [x for x in body.splitlines() if "fallbacks_total" in x]


async def test_a_name_the_replica_does_not_have_stops_replicate(
    dsn: str, replica_dsn: str, nats: LocalNats
) -> None:
    await run_sql(dsn, *SCHEMA)
    await run_sql(replica_dsn, *REPLICA_FIRST, *SCHEMA, "ALTER TABLE app.target RENAME TO other")
    config = make_config(dsn, nats.url, "app")
    source = config.source("app")
    reader = SlotReader(dsn, source.slot_name, publication=source.slot_name)
    await reader.open()
    await reader.close()
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        await set_position(conn, "app", await current_lsn(dsn), "test")
    await run_sql(dsn, "INSERT INTO names (id, c) VALUES (1, 'app.target')")
    stop = asyncio.Event()
    task = asyncio.create_task(serve_capture(config, source, stop))
    try:
        async with replicating(config, replica_dsn) as applying:
            with pytest.raises(Exception, match=re.escape('relation "app.target" does not exist')):
                await _wait_for(replica_dsn, "names", 1, applying)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert await as_text(replica_dsn, "names") == []
