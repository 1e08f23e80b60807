"""Types without a binary send function (issue 14, item 2): ``aclitem`` and what contains it.

pgoutput's ``binary`` option makes the walsender fail on an array or a composite whose element
has no binary output function (``aclitem[]``, as in ``CREATE TABLE t AS SELECT * FROM
pg_class``). Capture reads that transaction again with ``binary`` off, so its values arrive as
``Field.text``, and goes back to binary for the next one; the replica and the client library
take the text values.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import re
import signal
import sys
from typing import Any

import nats as natslib
import psycopg
import pytest
from gateway_helpers import captured, gateway_config, running_gateway
from log_helpers import (
    assert_same_log,
    current_lsn,
    http_get,
    make_config,
    prepare_slots,
    reference,
    run_sql,
    stream_records,
    wait_for_slot,
    wait_for_stream,
)
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.enum import EnumInfo, register_enum
from slot_helpers import Captured, collect, fields, user_changes
from test_replica_apply import _wait_for, assert_converged, replicating

from pgcapture.capture.changes import Record
from pgcapture.capture.reader import SlotReader, TextFallback
from pgcapture.client import Change, Consumer, Op, RawValue, Row, ValueFormat
from pgcapture.errors import NoBinaryOutput
from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.ops.service import serve_capture
from pgcapture.proto import pb
from pgcapture.replica.store import set_position

pytestmark = pytest.mark.integration

ACL_SETUP = (
    "CREATE DOMAIN acl AS aclitem",
    "CREATE DOMAIN acl2 AS acl",
    "CREATE TYPE grant_pair AS (who text, what aclitem)",
)


def _transactions(captured: list[Captured]) -> list[list[Captured]]:
    out: list[list[Captured]] = []
    for c in captured:
        if c.kind == "begin":
            out.append([])
        out[-1].append(c)
    return out


def _formats(change: pb.Change) -> set[str]:
    return {str(f.WhichOneof("value")) for f in change.new if f.WhichOneof("value")}


async def test_a_transaction_without_binary_output_arrives_as_text_then_binary_again(
    dsn: str, slot_name: str
) -> None:
    fallbacks: list[TextFallback] = []
    reader = SlotReader(dsn, slot_name, status_interval=0.5, on_text_fallback=fallbacks.append)
    await reader.open()
    try:
        await run_sql(dsn, *ACL_SETUP, "CREATE TABLE plain (id int PRIMARY KEY, v text)")
        await run_sql(
            dsn,
            "BEGIN; INSERT INTO plain VALUES (1, 'before');"
            " CREATE TABLE cls AS SELECT oid, relname, relacl FROM pg_class"
            "  WHERE relacl IS NOT NULL ORDER BY oid;"
            " INSERT INTO plain VALUES (2, 'after'); COMMIT",
            "CREATE TABLE grants (id int PRIMARY KEY, one acl, many aclitem[], pair grant_pair)",
            "INSERT INTO grants VALUES (1, 'postgres=r/postgres', "
            "  '{postgres=arw/postgres,=r/postgres}', ROW('x', 'postgres=w/postgres'))",
            "UPDATE grants SET many = '{=w/postgres}' WHERE id = 1",
            "INSERT INTO plain VALUES (3, 'later')",
        )
        # setup (DDL), plain, the CTAS transaction, grants (DDL, insert, update), plain
        captured = await collect(reader, len(ACL_SETUP) + 6)
    finally:
        await reader.close()

    txs = _transactions(captured)[len(ACL_SETUP) + 1 :]
    assert len(txs) == 5
    ctas = txs[0]
    rows = [c.message.change for c in ctas if c.kind == "change"]
    cls = [r for r in rows if r.table == "cls"]
    assert cls, "the CTAS rows are in the stream"
    for change in cls:
        relacl = fields(change.new)["relacl"]
        assert relacl.WhichOneof("value") == "text"
        assert relacl.text.startswith("{")
    # the first insert into plain was sent in binary before the walsender failed; the rest of
    # the transaction, from the failing row on, came in text
    plain = [r for r in rows if r.table == "plain"]
    assert [_formats(r) for r in plain] == [{"binary"}, {"text"}]
    seqs = [c.record.seq for c in ctas]
    assert seqs == list(range(len(ctas)))  # nothing doubled or skipped across the switch

    insert, update = (c.message.change for c in txs[2] + txs[3] if c.kind == "change")
    assert insert.table == update.table == "grants"
    got = fields(insert.new)
    assert got["many"].text == "{postgres=arw/postgres,=r/postgres}"
    assert got["one"].text == "postgres=r/postgres"
    assert got["pair"].text == "(x,postgres=w/postgres)"
    assert fields(update.new)["many"].text == "{=w/postgres}"

    # back to binary for the next transaction
    (later,) = user_changes(txs[4])
    assert _formats(later) == {"binary"}
    assert [f.lsn for f in fallbacks] == [
        txs[0][0].record.lsn,
        txs[2][0].record.lsn,
        txs[3][0].record.lsn,
    ]
    assert all(f.type_name == "aclitem" for f in fallbacks)


async def test_a_temporary_slot_names_the_type_and_the_fix(dsn: str, slot_name: str) -> None:
    reader = SlotReader(dsn, slot_name, temporary=True, status_interval=0.5)
    await reader.open()
    try:
        await run_sql(
            dsn, "CREATE TABLE cls AS SELECT relacl FROM pg_class WHERE relacl IS NOT NULL"
        )
        with pytest.raises(NoBinaryOutput, match=r"type aclitem.*use a permanent slot") as err:
            await collect(reader, 2, timeout=20)
        assert err.value.type_name == "aclitem"
    finally:
        await reader.close()


# The source's schema; the replica gets the same (other OIDs for the user types, see below).
SCHEMA = (
    *ACL_SETUP,
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TABLE plain (id int PRIMARY KEY, v text)",
    "CREATE TABLE grants (id int PRIMARY KEY, one acl, many aclitem[], pair grant_pair, "
    "moods mood[], n int, two acl2)",
    "CREATE TABLE loose (many aclitem[], note text, m mood)",
    "ALTER TABLE loose REPLICA IDENTITY FULL",
)

# (statement, whether the walsender fails on it in binary: one text fallback each)
WORKLOAD: tuple[tuple[str, bool], ...] = (
    ("BEGIN; INSERT INTO plain VALUES (1, 'before'); CREATE TABLE cls AS SELECT * FROM pg_class;"
     " INSERT INTO plain VALUES (2, 'after'); COMMIT", True),
    ("ALTER TABLE cls ADD PRIMARY KEY (oid)", False),
    ("UPDATE cls SET relacl = '{=r/postgres}' WHERE relname = 'pg_type'", True),
    ("DELETE FROM cls WHERE relname = 'pg_proc'", False),  # the old key is the oid alone
    ("INSERT INTO grants VALUES (1, 'postgres=r/postgres', '{postgres=arw/postgres,=r/postgres}',"
     " ROW('x', 'postgres=w/postgres'), '{happy,happy,sad}', 1, '=r/postgres')", True),
    # binary rows of the same table: a NULL needs no send function, a domain over aclitem
    # itself is sent as text even in binary mode
    ("INSERT INTO grants VALUES (2, NULL, NULL, NULL, '{ok,sad,happy}', 2, NULL),"
     " (3, '=r/postgres', NULL, NULL, NULL, 3, '=w/postgres')", False),
    ("UPDATE grants SET many = '{=w/postgres}', n = n + 10 WHERE id = 1", True),
    ("UPDATE grants SET n = n + 1", True),  # rows 2 and 3 in text too, this time
    ("UPDATE grants SET n = 0, moods = '{sad,sad,happy}' WHERE id = 2", False),
    ("INSERT INTO loose VALUES ('{=r/postgres}', 'a', 'ok'), (NULL, 'b', 'sad'),"
     " ('{=r/postgres}', 'a', 'ok')", True),
    ("UPDATE loose SET note = 'c' WHERE ctid = (SELECT min(ctid) FROM loose WHERE note = 'a')",
     True),  # found on the replica by the whole old row, in text
    ("DELETE FROM loose WHERE note = 'b'", False),
    ("DELETE FROM grants WHERE id = 3", False),
    ("INSERT INTO plain VALUES (3, 'later')", False),
)  # fmt: skip


async def test_text_values_apply_on_the_replica_and_are_counted(
    dsn: str, replica_dsn: str, nats: LocalNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pgcapture.capture")
    await run_sql(dsn, *SCHEMA)
    await run_sql(replica_dsn, "CREATE TYPE filler AS ENUM ('x')", "CREATE TYPE filler2 AS (a int)")
    await run_sql(replica_dsn, *SCHEMA)
    port = free_port()
    config = make_config(dsn, nats.url, "app")
    config = config.model_copy(update={"metrics": config.metrics.model_copy(
        update={"listen": f"127.0.0.1:{port}"}
    )})  # fmt: skip
    source = config.source("app")
    stop = asyncio.Event()
    task = asyncio.create_task(serve_capture(config, source, stop))
    try:
        await wait_for_slot(dsn, source.slot_name)
        async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
            await set_position(conn, "app", await current_lsn(dsn), "test")
        async with replicating(config, replica_dsn) as applying:
            for statement, _ in WORKLOAD:
                await run_sql(dsn, statement)
            await _wait_for(replica_dsn, "plain", 3, applying)
        body = (await http_get(port, "/metrics"))[1].decode()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    await assert_converged(dsn, replica_dsn)
    async with await psycopg.AsyncConnection.connect(replica_dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM cls WHERE relacl IS NOT NULL")
        assert ((await cur.fetchone()) or [0])[0] > 10  # pg_class's own ACLs, from the source
    # one fallback per transaction that needs it, each logged with its commit LSN (a session
    # restarted by a fault in between reads a transaction again, and counts it again)
    logged = [r for r in caplog.records if "went through in text format" in r.getMessage()]
    assert len({r.lsn for r in logged}) == sum(fails for _, fails in WORKLOAD)
    line = f'pgcapture_capture_text_fallbacks_total{{source="app",type="aclitem"}} {len(logged)}.0'
    assert line in body.splitlines(), [x for x in body.splitlines() if "fallbacks_total" in x]

    stored = [
        pb.Message.FromString(r.message).change
        for r in await stream_records(nats.url, source.stream_name)
        if r.seq and not r.is_commit
    ]
    last = [c for c in stored if c.table == "plain"][-1]
    assert fields(last.new)["v"].WhichOneof("value") == "binary"  # binary again after
    rows = [c for c in stored if c.table == "grants"]
    assert len(rows) == 9
    assert [_formats(c) for c in rows[:4]] == [{"text"}, {"binary"}, {"binary", "text"}, {"text"}]
    # UPDATE grants SET n = n + 1: from row 1 (aclitem[] set) on, the rows came in text
    bumped = {fields(c.new)["id"].WhichOneof("value"): c for c in rows[4:7]}
    assert fields(bumped["text"].new)["many"].text == "{=w/postgres}"
    assert _formats(rows[7]) == {"binary"}


def _plain(value: Any) -> Any:
    """Comparable form: a value psycopg has no loader for as its text (psycopg gives ``str``
    for it in a text-format result, the library a ``RawValue``), enums by label."""
    if isinstance(value, RawValue):
        return value.as_text()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


async def test_the_client_library_decodes_text_values_as_psycopg_selects_them(
    dsn: str, nats: LocalNats
) -> None:
    await run_sql(dsn, *SCHEMA)
    config = gateway_config(dsn, nats.url, "acl", app={"start": "beginning"})
    state: dict[str, dict[Any, Row]] = {"grants": {}, "cls": {}}
    async with captured(config, "acl"), running_gateway(config) as address:
        for statement, _ in WORKLOAD:
            await run_sql(dsn, statement)
        consumer = Consumer(address, "app", table_regex="^(grants|cls|plain)$", dsn=dsn)
        async with asyncio.timeout(60), consumer:
            async for event in consumer:
                assert isinstance(event, Change)
                event.ack()
                if event.table == "plain":
                    if event.new is not None and event.new["id"] == 3:
                        break
                    continue
                rows = state[event.table]
                image = event.new if event.new is not None else event.old
                assert image is not None
                key = image["oid" if event.table == "cls" else "id"]
                if event.op is Op.DELETE:
                    del rows[key]
                else:
                    assert event.new is not None
                    rows[key] = event.new
    with psycopg.connect(dsn) as conn:
        register_enum(EnumInfo.fetch(conn, "mood"), conn)  # type: ignore[arg-type]
        register_composite(CompositeInfo.fetch(conn, "grant_pair"), conn)  # type: ignore[arg-type]
        for table, key in (("grants", "id"), ("cls", "oid")):
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY {key}")  # type: ignore[arg-type]
            names = [d.name for d in cur.description or ()]
            expected = {r[names.index(key)]: dict(zip(names, r, strict=True)) for r in cur}
            got = state[table]
            assert sorted(got) == sorted(expected), table
            # rows sent in binary before the walsender failed: a type psycopg has no loader
            # for (xid) is a binary RawValue, compared with a binary SELECT's bytes
            raw = {
                (k, n): got[k][n].data
                for k in got for n in names
                if isinstance(got[k][n], RawValue) and got[k][n].format is ValueFormat.BINARY
            }  # fmt: skip
            for k, n in raw:
                cur = conn.execute(
                    f"SELECT {n} FROM {table} WHERE {key} = %s",  # type: ignore[arg-type]
                    (k,), binary=True,
                )  # fmt: skip
                assert raw[(k, n)] == (cur.fetchone() or [None])[0], (table, k, n)
            for k, row in expected.items():
                assert {n: _plain(got[k][n]) for n in names if (k, n) not in raw} == {
                    n: _plain(v) for n, v in row.items() if (k, n) not in raw
                }, (table, k)
    assert isinstance(state["grants"][1]["many"], list)
    assert len(state["cls"]) > 100


async def _start_capture(dsn: str, url: str, name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "capture", "--dsn", dsn, "--nats", url,
        "--source", name, "--lock-wait", "20", "--log-format", "text", "--log-level", "info",
        "--set", f"sources.{name}.lock.ttl=1",
        "--set", f"sources.{name}.status_interval=0.2",
        "--set", f"sources.{name}.batch.max_records=50",
        "--set", f"sources.{name}.publish.max_in_flight=1",  # slow enough to be cut
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _drain(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    """Keep reading the process's log to its end: a full pipe would block its writes (logging
    is synchronous), and with them the whole process."""
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        lines.append(line.decode())


async def _log_until(
    proc: asyncio.subprocess.Process, lines: list[str], pattern: re.Pattern[str]
) -> re.Match[str]:
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("capture exited:\n" + "".join(lines))
            lines.append(line)
            if found := pattern.search(line):
                return found


async def test_a_capture_killed_during_the_fallback_resumes_exactly_once(
    dsn: str, nats: LocalNats
) -> None:
    name = "cut"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    await run_sql(
        dsn, "CREATE TABLE plain (id int PRIMARY KEY, v text)", "CREATE TABLE done (id int)"
    )
    lines: list[str] = []
    proc = await _start_capture(dsn, nats.url, name)
    try:
        await _log_until(proc, lines, re.compile("capturing source"))
        await run_sql(
            dsn,
            "BEGIN; INSERT INTO plain SELECT g, 'binary' FROM generate_series(1, 500) g;"
            " CREATE TABLE big AS SELECT g AS id, '{=r/postgres,postgres=arw/postgres}'::aclitem[]"
            "  AS acl, md5(g::text) AS filler FROM generate_series(1, 30000) g; COMMIT",
            "INSERT INTO plain VALUES (0, 'after')",
            "INSERT INTO done VALUES (1)",
        )
        found = await _log_until(proc, lines, re.compile(r"committing at ([0-9A-F]+/[0-9A-F]+)"))
        commit = LSN.parse(found[1])
        nc = await natslib.connect(nats.url)
        try:
            async with asyncio.timeout(60):
                while True:  # until the stream holds part of the transaction read in text
                    tail = await read_tail(nc.jetstream(), source.stream_name)
                    at = tail.checkpoint
                    if at is not None and at.lsn == commit and at.seq > 1000:
                        break
                    await asyncio.sleep(0.02)
        finally:
            await nc.close()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        stored_at_kill = tail.checkpoint.seq
        proc = await _start_capture(dsn, nats.url, name)
        await _log_until(proc, lines, re.compile("capturing source"))
        expected = await reference(dsn, source)
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
        await _log_until(proc, lines, re.compile("went through in text format"))
    finally:
        draining = asyncio.create_task(_drain(proc, lines))
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await asyncio.wait_for(draining, 5)
    stored = await stream_records(nats.url, source.stream_name)
    assert_same_log(stored, expected)
    in_text = [r for r in stored if r.lsn == commit and r.seq and not r.is_commit]
    assert len(in_text) > 30_000
    assert stored_at_kill < len(in_text)  # the kill came inside the transaction
    changes = [pb.Message.FromString(r.message).change for r in in_text]
    formats = {
        table: [_formats(c) for c in changes if c.table == table] for table in ("plain", "big")
    }
    # plain's rows were sent before the walsender failed, the rest in text
    assert formats["plain"] == [{"binary"}] * 500
    assert formats["big"] == [{"text"}] * 30_000
    skipped = [line for line in lines if "already in the stream" in line]
    assert skipped, "the second run did not resume inside the transaction"


async def _confirming_reference(dsn: str, slot: str) -> list[Record]:
    """``log_helpers.reference``, confirming each transaction as it goes: a fallback restarts
    decoding at the slot's position, which must move for long workloads."""
    reader = SlotReader(dsn, slot + "_ref", publication=slot, status_interval=0.2)
    await reader.open()
    out: list[Record] = []
    done = False
    try:
        async with asyncio.timeout(90):
            while True:
                for record in await reader.read():
                    out.append(Record(record.lsn, record.seq, record.message))
                    if record.is_commit:
                        reader.confirm(record.end_lsn)
                        if done:
                            return out
                    elif record.seq and not done:
                        done = pb.Message.FromString(record.message).change.table == "done"
    finally:
        await reader.close()


async def test_concurrent_fallbacks_under_sigkill_store_each_record_once(
    dsn: str, nats: LocalNats
) -> None:
    """Concurrent clients, a fifth of whose transactions write aclitem[] after a binary row of
    their own, capture SIGKILLed at random moments: the stream equals an uninterrupted reading
    of the slot, record for record."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"acl{seed}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    await run_sql(
        dsn,
        "CREATE TABLE acls (id int PRIMARY KEY, acl aclitem[], n int)",
        "CREATE TABLE nums (id int PRIMARY KEY, n int)",
        "CREATE TABLE done (id int)",
    )
    deadline = asyncio.get_running_loop().time() + 6

    async def client(c: int) -> None:
        local = random.Random(seed * 7 + c)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            i = 0
            while asyncio.get_running_loop().time() < deadline:
                i += 1
                key = c * 1_000_000 + i
                async with conn.transaction():
                    await conn.execute("INSERT INTO nums VALUES (%s, %s)", (key, i))
                    if local.random() < 0.2:
                        await conn.execute(
                            "INSERT INTO acls VALUES (%s, '{=r/postgres,postgres=w/postgres}', %s)",
                            (key, i),
                        )
                        await conn.execute("UPDATE nums SET n = n + 1 WHERE id = %s", (key,))
                await asyncio.sleep(local.uniform(0, 0.01))

    load = asyncio.gather(*(client(c) for c in range(3)))
    lines: list[str] = []
    kills = 0
    draining: asyncio.Task[None] | None = None
    try:
        while not load.done() or kills < 4:
            proc = await _start_capture(dsn, nats.url, name)
            await _log_until(proc, lines, re.compile("capturing source"))
            draining = asyncio.create_task(_drain(proc, lines))
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await draining
            kills += 1
        await load
        await run_sql(dsn, "INSERT INTO done VALUES (1)")
        proc = await _start_capture(dsn, nats.url, name)
        await _log_until(proc, lines, re.compile("capturing source"))
        draining = asyncio.create_task(_drain(proc, lines))
        started = asyncio.get_running_loop().time()
        expected = await _confirming_reference(dsn, source.slot_name)
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
        caught_up = asyncio.get_running_loop().time() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        if draining is not None:
            await asyncio.wait_for(draining, 5)
    stored = await stream_records(nats.url, source.stream_name)
    assert_same_log(stored, expected)
    assert caught_up < 60, f"seed {seed}: {caught_up:.1f}s to catch up"
    texts = [
        r for r in expected
        if r.seq and not r.is_commit
        and any(f.WhichOneof("value") == "text"
                for f in pb.Message.FromString(r.message).change.new)
    ]  # fmt: skip
    assert len(texts) > 50, f"seed {seed}"
