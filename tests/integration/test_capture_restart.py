"""Restarts and shutdowns: nothing lost, the slot never confirmed past what was printed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import signal
import sys
import time

import psycopg
import pytest

from pgcapture.capture.reader import SlotReader
from pgcapture.errors import ConnectionLost
from pgcapture.local import LocalPostgres
from pgcapture.lsn import LSN

pytestmark = pytest.mark.integration


async def _start_tail(dsn: str, slot: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "tail", "--dsn", dsn, "--slot", slot,
        "--status-interval", "0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def _ids(lines: list[dict[str, object]]) -> list[int]:
    out = []
    for line in lines:
        change = line["message"].get("change")  # type: ignore[attr-defined]
        if change and change["table"] == "seqs":
            out.append(int.from_bytes(base64.b64decode(change["new"][0]["binary"])))
    return out


async def _read_lines(
    proc: asyncio.subprocess.Process, until: int | None
) -> list[dict[str, object]]:
    """Lines of ``tail`` output; stops once the row ``until`` was printed, or at EOF."""
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not raw:
            return lines
        lines.append(json.loads(raw))
        if until is not None and until in _ids(lines[-1:]):
            return lines


async def _wait_for_active_slot(dsn: str, slot: str) -> None:
    """Until the slot is read by a process and has reached its consistent point (a slot being
    created shows as active before that, and changes committed meanwhile are not decoded)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(600):
            cur = await conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active "
                "AND confirmed_flush_lsn IS NOT NULL",
                (slot,),
            )
            if await cur.fetchone():
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"slot {slot} did not become active")


async def _slot_lsn(dsn: str, slot: str) -> LSN:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = await cur.fetchone()
        assert row is not None
        return LSN.parse(row[0])


async def test_kill_9_after_confirming_loses_nothing(dsn: str, slot_name: str) -> None:
    total = 300
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE seqs (id int PRIMARY KEY)")
    first = await _start_tail(dsn, slot_name)

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for i in range(1, total + 1):
                await conn.execute("INSERT INTO seqs VALUES (%s)", (i,))
                if i % 20 == 0:
                    await asyncio.sleep(0.01)

    await _wait_for_active_slot(dsn, slot_name)
    writer = asyncio.create_task(write())
    kill_after = random.randint(40, 200)
    first_lines = await _read_lines(first, until=kill_after)
    await asyncio.sleep(0.3)  # a status update reports the confirmed position
    first.kill()
    assert first.stdout is not None
    rest = await first.stdout.read()
    first_lines += [json.loads(line) for line in rest.splitlines()]
    await first.wait()
    await writer

    printed_commits = [
        int(line["message"]["commit"]["endLsn"])  # type: ignore[index]
        for line in first_lines
        if "commit" in line["message"]  # type: ignore[operator]
    ]
    confirmed = await _slot_lsn(dsn, slot_name)
    # Whatever the slot confirmed was printed: nothing after the last printed commit.
    assert confirmed <= max(printed_commits)

    # A row written after the kill: the second run has something new to print in any case.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("INSERT INTO seqs VALUES (%s)", (total + 1,))
    second = await _start_tail(dsn, slot_name)
    second_lines = await _read_lines(second, until=total + 1)
    second.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(second.wait(), 15) == 0

    ids_first, ids_second = _ids(first_lines), _ids(second_lines)
    assert len(ids_first) == len(set(ids_first))
    assert len(ids_second) == len(set(ids_second))
    assert sorted(set(ids_first) | set(ids_second)) == list(range(1, total + 2))
    assert ids_second[0] <= ids_first[-1] + 1  # no gap between the runs


async def test_idle_database_slot_advances(
    pg: LocalPostgres, dsn: str, reader: SlotReader, slot_name: str
) -> None:
    before = await _slot_lsn(dsn, slot_name)
    reading = asyncio.create_task(reader.read())
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as other:
        await other.execute("CREATE TABLE IF NOT EXISTS elsewhere (x int)")
        await other.execute("INSERT INTO elsewhere SELECT generate_series(1, 1000)")
        cur = await other.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        assert row is not None
        target = LSN.parse(row[0])
    deadline = time.monotonic() + 20
    while (await _slot_lsn(dsn, slot_name)) < target and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not reading.done()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    after = await _slot_lsn(dsn, slot_name)
    assert after >= target > before


async def test_fast_shutdown_of_the_source_completes_while_connected() -> None:
    with LocalPostgres.create() as cluster:
        reader = SlotReader(cluster.dsn(), "shutdown", status_interval=1.0)
        await reader.open()

        async def consume() -> None:  # as tail does: confirm each transaction once handled
            while True:
                for record in await reader.read():
                    if record.is_commit:
                        reader.confirm(record.end_lsn)

        consuming = asyncio.create_task(consume())
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await asyncio.to_thread(cluster.stop, "fast")
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"fast shutdown took {elapsed:.1f}s"
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(consuming, 10)
        await reader.close()


async def test_tail_with_a_temporary_slot_leaves_no_slot_behind(dsn: str, slot_name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "tail", "--dsn", dsn, "--slot", slot_name,
        "--temporary", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await _wait_for_active_slot(dsn, slot_name)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = %s", (slot_name,)
        )
        assert await cur.fetchone() == (True,)
        await conn.execute("CREATE TABLE seqs (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO seqs VALUES (1)")
        assert _ids(await _read_lines(proc, until=1)) == [1]
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot_name,)
        )
        assert await cur.fetchone() == (0,)
