"""Rows larger than a NATS message (1 MiB by default) flow everywhere: values of 2 MB, 30 MB and
200 MB go from the slot into the stream (as fragments), to the replica, to a consumer of the
client library, and through a dump; a capture killed in the middle of writing a record's
fragments completes it after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import nats as natslib
import psycopg
import pytest
from dump_helpers import dump_config, running, schedule, start_from_scratch, wait_for_dump
from log_helpers import make_config, run_sql, stream_records, wait_for_slot

from pgcapture.capture.retry import run_capture
from pgcapture.client import Change, Consumer
from pgcapture.errors import ConnectionLost
from pgcapture.local import LocalNats
from pgcapture.log.batch import Batch
from pgcapture.log.reader import parse_fragment, read_batches, whole_record
from pgcapture.log.stream import HEADER_PART
from pgcapture.log.writer import StreamWriter
from pgcapture.proto import pb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MB = 1_000_000
# id -> (column, bytes): text made of md5 digits, bytea of random-looking bytes
ROWS = {1: ("body", 2 * MB), 2: ("blob", 30 * MB), 3: ("body", 200 * MB)}


def _value_sql(column: str, size: int, salt: int) -> str:
    text = f"repeat(md5('{salt}'), {size // 32})"
    return text if column == "body" else f"decode({text}, 'hex') || decode({text}, 'hex')"


async def _digests(dsn: str) -> dict[int, tuple[int, str, int, str, int]]:
    """Per row: version, then length and md5 of body and of blob (the values are never read)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id, version, length(body), md5(body), length(blob), md5(blob) FROM big"
        )
        return {row[0]: tuple(row[1:]) for row in await cur.fetchall()}  # type: ignore[misc]


async def _versions(dsn: str) -> dict[int, int]:
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("SELECT id, version FROM big")
            return dict(await cur.fetchall())  # type: ignore[arg-type]
    except psycopg.errors.UndefinedTable:
        return {}


def _digest(value: Any) -> tuple[int | None, str | None]:
    if value is None:
        return None, None
    data = value.encode() if isinstance(value, str) else bytes(value)
    return len(data), hashlib.md5(data).hexdigest()


async def test_rows_of_many_megabytes_reach_the_stream_the_replica_consumers_and_dumps(
    dsn: str, replica_dsn: str, nats: LocalNats, dbname: str
) -> None:
    config = dump_config(
        dsn,
        replica_dsn,
        nats.url,
        f"big_{dbname}",
        {"max_bytes": 1 << 20},
        lock_ttl=60,
        app={"start": "beginning"},
    )
    await start_from_scratch(config)
    await run_sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, version int, body text, blob bytea)")
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        for key, (column, size) in ROWS.items():
            value = _value_sql(column, size, key)
            await run_sql(
                dsn, f"INSERT INTO big (id, version, {column}) VALUES ({key}, 1, {value})"
            )
        # a large value updated inside a transaction with small rows around it
        await run_sql(
            dsn,
            "BEGIN; INSERT INTO big (id, version, body) VALUES (4, 1, 'small');"
            f" UPDATE big SET version = 2, body = {_value_sql('body', 2 * MB, 9)} WHERE id = 1;"
            " INSERT INTO big (id, version, body) VALUES (5, 1, 'small'); COMMIT",
        )
        expected = await _digests(dsn)

        versions = {k: v[0] for k, v in expected.items()}
        async with asyncio.timeout(400):
            while await _versions(replica_dsn) != versions:
                await asyncio.sleep(0.5)
        assert await _digests(replica_dsn) == expected

        seen: dict[int, tuple[int, Any, Any]] = {}
        dumped: dict[int, tuple[Any, Any]] = {}
        dumps: list[str] = []
        consumer = Consumer(services.gateway, "app", table_regex="^big$")

        async def consume() -> None:
            async for event in consumer:
                assert isinstance(event, Change)
                assert event.new is not None
                row = event.new
                body, blob = _digest(row.get("body")), _digest(row.get("blob"))
                if event.checkpoint.lsn == 0:
                    dumped[row["id"]] = (body, blob)
                else:
                    seen[row["id"]] = (row["version"], body, blob)
                event.ack()
                if len(seen) == len(expected) and not dumps:
                    dumps.append(await schedule(config, "app", "public.big"))

        async with consumer:
            task = asyncio.create_task(consume())
            try:
                async with asyncio.timeout(400):
                    while len(dumped) < len(expected) and not task.done():
                        await asyncio.sleep(0.2)
                    if task.done():
                        task.result()
                    # the consumer stays connected until the chunk is acknowledged
                    await wait_for_dump(config, "app", dumps[0])
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def as_seen(v: tuple[Any, ...]) -> tuple[int, Any, Any]:
        return v[0], (v[1], v[2]), (v[3], v[4])

    assert seen == {k: as_seen(v) for k, v in expected.items()}
    assert dumped == {k: as_seen(v)[1:] for k, v in expected.items()}

    # the stream holds the large records in fragments of at most max_payload
    nc = await natslib.connect(nats.url)
    try:
        js = nc.jetstream()
        source = config.source(next(iter(config.sources)))
        info = await js.stream_info(source.stream_name)
        fragments, biggest = 0, 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(source.stream_name, seq=seq)
            biggest = max(biggest, len(msg.data or b""))
            fragments += HEADER_PART in (msg.headers or {})
        values = sum(size for _, size in ROWS.values()) + 2 * MB  # and the update of row 1
        assert fragments >= values // nc.max_payload  # in messages of at most max_payload
        assert biggest <= nc.max_payload
        records = [r async for b in read_batches(js, source.stream_name) for r in b.records]
        sizes = sorted(len(r.message) for r in records if r.seq)
        assert sizes[-1] > 200 * MB
    finally:
        await nc.close()


class CutAfterFragments:
    """A writer that ends its session once ``limit`` fragments are stored (the first session
    only), as a crash in the middle of a record would."""

    def __init__(self, core: StreamWriter, state: dict[str, int]) -> None:
        self.core = core
        self.state = state

    @property
    def in_flight(self) -> int:
        return self.core.in_flight

    async def publish(self, batch: Batch) -> None:
        await self.core.publish(batch)
        if batch.is_fragment and not batch.completes_record and self.state["left"] > 0:
            self.state["left"] -= 1
            if not self.state["left"]:
                await self.core.drained()
                raise ConnectionLost("cut by the test after some fragments of a record")

    async def acked(self) -> Batch:
        return await self.core.acked()

    async def drained(self) -> None:
        await self.core.drained()


async def test_capture_cut_in_the_middle_of_a_record_writes_it_again_and_readers_see_it_once(
    dsn: str, nats: LocalNats, dbname: str
) -> None:
    name = f"cut_{dbname}"
    config = make_config(dsn, nats.url, name, batch={"max_bytes": 1 << 20})
    source = config.source(name)
    await run_sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, body text)")
    state = {"left": 7}
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_capture(source, config.nats, stop, wrap=lambda w: CutAfterFragments(w, state))
    )
    try:
        await wait_for_slot(dsn, source.slot_name)
        await run_sql(
            dsn,
            f"INSERT INTO big VALUES (1, {_value_sql('body', 30 * MB, 1)})",
            "INSERT INTO big VALUES (2, 'after')",
        )
        async with asyncio.timeout(120):
            while True:
                records = await stream_records(nats.url, source.stream_name)
                if sum(r.seq == 1 for r in records) == 2:
                    break
                await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert state["left"] == 0  # the cut happened
    nc = await natslib.connect(nats.url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info(source.stream_name)).state.last_seq
        msgs = [await js.get_msg(source.stream_name, seq=seq) for seq in range(1, last + 1)]
        parts = [msg.headers or {} for msg in msgs]
        # a gateway that holds only the last fragment reads the record back from the stream:
        # the run written after the cut, not the cut one
        final = next(
            seq
            for seq, msg in enumerate(msgs, 1)
            if (f := parse_fragment(msg.headers, msg.data or b"", seq)) and f.end == f.total
        )
        fragment = parse_fragment(msgs[final - 1].headers, msgs[final - 1].data or b"", final)
        assert fragment is not None
        read_back = await whole_record(js, source.stream_name, final, fragment)
    finally:
        await nc.close()
    ends = [h[HEADER_PART] for h in parts if HEADER_PART in h]
    assert ends[7] == ends[0]  # seven fragments stored, then the record again from its first
    assert ends[:7] == sorted(set(ends[:7]), key=lambda e: int(e.split("/")[0]))
    assert read_back == next(r for r in records if r.seq == 1 and r.lsn == fragment.lsn)
    changes = [pb.Message.FromString(r.message).change for r in records if r.seq == 1]
    assert [c.new[0].binary for c in changes] == [b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"]
    assert changes[0].new[1].binary == b"".join(
        hashlib.md5(b"1").hexdigest().encode() for _ in range(30 * MB // 32)
    )
