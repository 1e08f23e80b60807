"""Helpers for the tests of capture into JetStream (imported by plain name, as pytest puts this
folder on ``sys.path``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import nats as natslib
import psycopg

from pgcapture.capture.changes import Record
from pgcapture.capture.reader import SlotReader
from pgcapture.capture.retry import run_capture
from pgcapture.config import Config, SourceConfig, validate_config
from pgcapture.log.reader import read_records
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.proto import pb


def make_config(dsn: str, url: str | list[str], name: str, **source: object) -> Config:
    data = {
        "nats": {"url": url},
        "sources": {
            name: {
                "dsn": dsn, "status_interval": 0.2, "lock": {"ttl": 1, "wait": 10},
                "batch": {"max_records": 50, "max_bytes": 16384},
                "publish": {"ack_timeout": 3}, **source,
            }
        },
    }  # fmt: skip
    return validate_config(data)


async def prepare_slots(dsn: str, source: SourceConfig) -> None:
    """Create capture's slot and the reference slot ``<slot>_ref`` on the same publication."""
    for slot in (source.slot_name, source.slot_name + "_ref"):
        reader = SlotReader(dsn, slot, publication=source.slot_name)
        await reader.open()
        await reader.close()


async def reference(dsn: str, source: SourceConfig, timeout: float = 60) -> list[Record]:
    """Records of the reference slot up to the Commit of the transaction that writes ``done``."""
    reader = SlotReader(dsn, source.slot_name + "_ref", publication=source.slot_name)
    await reader.open()
    out: list[Record] = []
    done = False
    try:
        async with asyncio.timeout(timeout):
            while True:
                for record in await reader.read():
                    out.append(Record(record.lsn, record.seq, record.message))
                    if done and record.is_commit:
                        return out
                    if not done and record.seq and not record.is_commit:
                        change = pb.Message.FromString(record.message).change
                        done = change.table == "done"
    finally:
        await reader.close()


async def wait_for_stream(js_url: str | list[str], stream: str, last: Record) -> None:
    nc = await natslib.connect(js_url)
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(natslib.errors.Error):
                    tail = await read_tail(nc.jetstream(), stream)
                    if tail.checkpoint == last.checkpoint:
                        return
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def stream_records(url: str | list[str], stream: str) -> list[Record]:
    nc = await natslib.connect(url)
    try:
        return await read_records(nc.jetstream(), stream)
    finally:
        await nc.close()


def assert_same_log(stored: list[Record], expected: list[Record]) -> None:
    """The stream from the reference's first record on equals the reference, byte for byte."""
    start = expected[0].checkpoint
    tail = [r for r in stored if r.checkpoint >= start]
    assert len({r.checkpoint for r in stored}) == len(stored), "a checkpoint is stored twice"
    assert len(tail) == len(expected)
    assert tail == expected


@contextlib.asynccontextmanager
async def capturing(config: Config, name: str) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_capture(config.source(name), config.nats, stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def run_sql(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


WORKLOAD = (
    "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)",
    "CREATE TABLE done (id int)",
    "INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 3000) g",
    "UPDATE items SET price = price + 1 WHERE id % 7 = 0",
    "DELETE FROM items WHERE id % 11 = 0",
    "ALTER TABLE items ADD COLUMN tags text[]",
    "INSERT INTO items VALUES (5000, repeat('x', 40000), 1, '{a,b}')",
    "TRUNCATE items",
    "INSERT INTO done VALUES (1)",
)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def poll(check: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.1)


async def wait_for_slot(dsn: str, slot: str, timeout: float = 30) -> None:
    """Until capture's slot exists and is consistent."""
    async with asyncio.timeout(timeout):
        while True:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute(
                    "SELECT confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (slot,),
                )
                row = await cur.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.05)


async def current_lsn(dsn: str) -> LSN:
    """The server's current WAL position."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
    assert row is not None
    return LSN.parse(row[0])
