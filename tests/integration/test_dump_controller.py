"""The dump controller against real servers: a PostgreSQL database standing in for the logical
replica, nats-server for the bucket, pullers written from the .proto alone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from gateway_helpers import serving
from google.protobuf.duration_pb2 import Duration
from log_helpers import http_get, poll, run_sql

from pgcapture.config import Config, validate_config
from pgcapture.dump.chunks import LAST_PAGE
from pgcapture.dump.controller import serve_controller
from pgcapture.local import LocalNats
from pgcapture.local.nats import free_port
from pgcapture.proto import pb, pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

_buckets = itertools.count(1)
Decide = Callable[[pb.DumpInfoResponse], Awaitable[tuple[str, int]]]

REPLICA_TABLES = (
    "CREATE TABLE items (id int PRIMARY KEY, payload text) WITH (autovacuum_enabled = off)",
    "INSERT INTO items SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g",
    "CREATE TABLE empty (id int PRIMARY KEY)",
    "CREATE TABLE nokey (v text)",
    "INSERT INTO nokey SELECT 'v' || g FROM generate_series(1, 50) g",
    "CREATE TABLE events (id int, k int) PARTITION BY RANGE (id)",
    "CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (0) TO (1000)",
    "CREATE TABLE events_b PARTITION OF events FOR VALUES FROM (1000) TO (2000)",
    "INSERT INTO events SELECT g, g FROM generate_series(0, 1999) g",
    "CREATE VIEW item_names AS SELECT id FROM items",
    "CREATE SCHEMA pgcapture",
    "CREATE TABLE pgcapture.sources (commit bigint)",
)


def controller_settings(nats_url: str, replica: str, **controller: Any) -> dict[str, Any]:
    """Source ``app`` (its replica is ``replica``; the source dsn is never used), URIs
    ``orders``, ``audit`` and ``reports`` on it, ``nohome`` on a source without a replica and
    ``down`` on a replica that does not answer."""
    return {
        "nats": {"url": nats_url},
        "sources": {
            "app": {"dsn": "", "replica": {"dsn": replica}},
            "bare": {"dsn": ""},
            "gone": {"dsn": "", "replica": {"dsn": "host=127.0.0.1 port=1 dbname=x"}},
        },
        "gateway": {
            "uris": {
                "orders": {"source": "app"},
                "audit": {"source": "app"},
                "reports": {"source": "app"},
                "nohome": {"source": "bare"},
                "down": {"source": "gone"},
            }
        },
        "controller": {
            "listen": "127.0.0.1:0",
            "bucket": f"dumps_{os.getpid()}_{next(_buckets)}",
            **controller,
        },
    }


def controller_config(nats_url: str, replica: str, **controller: Any) -> Config:
    return validate_config(controller_settings(nats_url, replica, **controller))


def running_controller(
    config: Config, instance: str | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    return serving(serve_controller, config, instance=instance)


@contextlib.asynccontextmanager
async def stub(address: str) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        yield pb_grpc.DBLogControllerStub(channel)


async def ack_all(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
    return "", 1


@dataclass
class Puller:
    """A ``PullDumpInfo`` client: ``decide`` says the verdict (requeue reason, rows) on each
    chunk; every chunk received is kept with the time, every verdict sent too."""

    address: str
    uri: str = "orders"
    key_chunks: bool = False
    decide: Decide = ack_all
    reconnect: bool = False
    got: list[tuple[float, pb.DumpInfoResponse]] = field(default_factory=list)
    acks: list[tuple[float, pb.DumpInfoResponse, str]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            try:
                await self._pull()
            except grpc.aio.AioRpcError:
                if not self.reconnect:
                    raise
            await asyncio.sleep(0.1)

    async def _pull(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stream = pb_grpc.DBLogControllerStub(channel).PullDumpInfo()
            await stream.write(pb.DumpInfoRequest(uri=self.uri, key_chunks=self.key_chunks))
            async for chunk in stream:
                self.got.append((time.monotonic(), chunk))
                reason, rows = await self.decide(chunk)
                await stream.write(pb.DumpInfoRequest(requeue_reason=reason, rows=rows))
                self.acks.append((time.monotonic(), chunk, reason))


@contextlib.asynccontextmanager
async def pulling(*pullers: Puller) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(p.run()) for p in pullers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def dumps(address: str, **request: Any) -> list[pb.DumpStatus]:
    async with stub(address) as ctl:
        reply = await ctl.ListDumps(pb.ListDumpsRequest(include_finished=True, **request))
    return list(reply.dumps)


async def until_done(address: str, dump_id: str, seconds: float = 30) -> pb.DumpStatus:
    async def done() -> bool:
        return (await dumps(address, id=dump_id))[0].state == "done"

    await poll(done, seconds)
    return (await dumps(address, id=dump_id))[0]


async def refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def table_pages(dsn: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int", (table,)
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def ranges_by_table(chunks: list[pb.DumpInfoResponse]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for c in chunks:
        out.setdefault(f"{c.schema}.{c.table}", []).append((c.page_begin, c.page_end))
    return out


def expected_ranges(pages: int, per_chunk: int) -> list[tuple[int, int]]:
    ranges = [(b, b + per_chunk - 1) for b in range(0, pages, per_chunk)] or [(0, LAST_PAGE)]
    ranges[-1] = (ranges[-1][0], LAST_PAGE)
    return ranges


@pytest.fixture
async def replica(dsn: str) -> str:
    await run_sql(dsn, *REPLICA_TABLES)
    return dsn


async def test_every_table_is_planned_in_open_ended_page_chunks_and_progress_is_reported(
    nats: LocalNats, replica: str
) -> None:
    config = controller_config(nats.url, replica, chunk_pages=8)
    async with running_controller(config) as address:
        async with stub(address) as ctl:
            status = await ctl.ScheduleDump(pb.ScheduleDumpRequest(uri="orders"))
        tables = ["public.empty", "public.events_a", "public.events_b", "public.items"]
        assert list(status.tables) == [*tables, "public.nokey"]
        assert status.state == "running"
        assert status.rows_estimate == 0  # never analyzed
        puller = Puller(address, decide=lambda c: _verdict("", 3))
        async with pulling(puller):
            final = await until_done(address, status.id)
        got = [c for _, c in puller.got]
        assert all(c.dump_id == status.id for c in got)
        assert [f"{c.schema}.{c.table}" for c in got] == sorted(
            f"{c.schema}.{c.table}" for c in got
        )
        by_table = ranges_by_table(got)
        for table in by_table:
            assert by_table[table] == expected_ranges(await table_pages(replica, table), 8)
        assert by_table["public.empty"] == [(0, LAST_PAGE)]
        assert len(by_table["public.items"]) > 3
        assert (final.chunks_total, final.chunks_done, final.chunks_running) == (len(got),) * 2 + (
            0,
        )
        assert final.rows == 3 * len(got)
        assert final.finished.seconds >= final.created.seconds > 0


async def _verdict(reason: str, rows: int) -> tuple[str, int]:
    return reason, rows


async def test_chunk_sizes_come_from_chunk_pages_or_statistics(
    nats: LocalNats, replica: str
) -> None:
    config = controller_config(nats.url, replica, chunk_rows=250)
    async with running_controller(config) as address, stub(address) as ctl:
        fresh = await ctl.ScheduleDump(pb.ScheduleDumpRequest(uri="orders", tables=["items"]))
        await run_sql(replica, "ANALYZE items")
        async with await psycopg.AsyncConnection.connect(replica) as conn:
            cur = await conn.execute(
                "SELECT reltuples / relpages FROM pg_class WHERE oid = 'items'::regclass"
            )
            row = await cur.fetchone()
        assert row is not None
        per_chunk = int(250 / row[0])
        analyzed = await ctl.ScheduleDump(
            pb.ScheduleDumpRequest(uri="audit", tables=["public.items"])
        )
        given = await ctl.ScheduleDump(
            pb.ScheduleDumpRequest(uri="reports", tables=["items"], chunk_pages=5)
        )
        assert analyzed.rows_estimate == 2000
        pages = await table_pages(replica, "items")
        for dump, uri, size in (
            (fresh, "orders", 2),
            (analyzed, "audit", per_chunk),
            (given, "reports", 5),
        ):
            puller = Puller(address, uri=uri)
            async with pulling(puller):
                await until_done(address, dump.id)
            mine = [c for _, c in puller.got if c.dump_id == dump.id]
            assert ranges_by_table(mine) == {"public.items": expected_ranges(pages, size)}


async def test_keys_dump_in_key_chunks_only_to_clients_that_can(
    nats: LocalNats, replica: str
) -> None:
    keys = [f'{{"id": {i}}}' for i in range(1, 2501)]
    config = controller_config(nats.url, replica)
    async with running_controller(config) as address:
        plain, keyed = Puller(address), Puller(address, key_chunks=True)
        async with pulling(plain), stub(address) as ctl:
            status = await ctl.ScheduleDump(
                pb.ScheduleDumpRequest(uri="orders", tables=["public.items"], keys=keys)
            )
            assert (status.chunks_total, status.rows_estimate) == (3, 2500)
            await asyncio.sleep(0.5)
            assert plain.got == []
            async with pulling(keyed):
                await until_done(address, status.id)
        got = [c for _, c in keyed.got]
        assert [len(c.keys) for c in got] == [1000, 1000, 500]
        assert [k for c in got for k in c.keys] == keys
        assert all(
            (c.schema, c.table, c.page_begin, c.page_end) == ("public", "items", 0, 0) for c in got
        )
        assert plain.got == []


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        ({"uri": ""}, "INVALID_ARGUMENT", ["uri is empty"]),
        ({"uri": "nope"}, "NOT_FOUND", ["'nope'", "audit, down, nohome, orders, reports"]),
        ({"tables": ["public.missing"]}, "NOT_FOUND", ["public.missing", "'app'"]),
        ({"tables": ["item_names"]}, "NOT_FOUND", ["public.item_names"]),
        ({"tables": ["a.b.c", ".x"]}, "INVALID_ARGUMENT", ["'.x'", "schema.table"]),
        ({"keys": ['{"id": 1}']}, "INVALID_ARGUMENT", ["exactly one table", "0 tables"]),
        ({"tables": ["items", "empty"], "keys": ['{"id": 1}']}, "INVALID_ARGUMENT", ["2 tables"]),
        ({"tables": ["items"], "keys": ['{"id": 1}', '{"idx": 2}']}, "INVALID_ARGUMENT",
         ['\'{"idx": 2}\'', "lacks key column 'id'", '{"id": ...}']),
        ({"tables": ["items"], "keys": ['{"id": 1, "name": 2}']}, "INVALID_ARGUMENT",
         ["names 'name', which is not a key column"]),
        ({"tables": ["items"], "keys": ["[1]"]}, "INVALID_ARGUMENT", ["'[1]' is not an object"]),
        ({"tables": ["items"], "keys": ['{"id": null}']}, "INVALID_ARGUMENT", ["null"]),
        ({"tables": ["nokey"], "keys": ['{"v": 1}']}, "FAILED_PRECONDITION",
         ["public.nokey", "primary key"]),
        ({"uri": "nohome"}, "FAILED_PRECONDITION", ["sources.bare.replica.dsn is not set"]),
        ({"uri": "down"}, "FAILED_PRECONDITION", ["cannot connect", "sources.gone.replica.dsn"]),
        ({"cool_down": Duration(seconds=-1)}, "INVALID_ARGUMENT", ["negative"]),
    ],
)  # fmt: skip
async def test_schedule_dump_refusals_name_the_problem_and_change_nothing(
    nats: LocalNats, replica: str, request_: dict[str, Any], code: str, words: list[str]
) -> None:
    config = controller_config(nats.url, replica)
    async with running_controller(config) as address, stub(address) as ctl:
        error = await refusal(
            ctl.ScheduleDump(pb.ScheduleDumpRequest(**{"uri": "orders", **request_}))
        )
        assert error.code().name == code
        for word in words:
            assert word in error.details()
        assert error.details()[0].islower()
        assert await dumps(address) == []


async def test_other_refusals(nats: LocalNats, replica: str) -> None:
    config = controller_config(nats.url, replica)
    async with running_controller(config) as address, stub(address) as ctl:
        for uri, code in (("", "INVALID_ARGUMENT"), ("nope", "NOT_FOUND")):
            stream = ctl.PullDumpInfo()
            await stream.write(pb.DumpInfoRequest(uri=uri))
            error = await refusal(stream.read())
            assert error.code().name == code
        error = await refusal(ctl.PauseDump(pb.DumpRef(uri="orders", id="nosuchdump")))
        assert error.code().name == "NOT_FOUND"
        assert "'nosuchdump'" in error.details()
        error = await refusal(ctl.Schedule(pb.ScheduleRequest(uri="orders")))
        assert (error.code().name, "no chunks") == ("INVALID_ARGUMENT", "no chunks")
        bad = pb.DumpInfoResponse(schema="public", table="items", page_begin=5, page_end=1)
        error = await refusal(ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=[bad])))
        assert "dumps[0]" in error.details()
        error = await refusal(ctl.ListDumps(pb.ListDumpsRequest(uri="nope")))
        assert error.code().name == "NOT_FOUND"


def holding(release: asyncio.Event, rows: int = 5) -> Decide:
    """A verdict that waits for ``release``, then acknowledges."""

    async def decide(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        await release.wait()
        return "", rows

    return decide


def permitted(permits: asyncio.Queue[None], rows: int = 5) -> Decide:
    """A verdict that acknowledges a chunk when the test puts a permit."""

    async def decide(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        await permits.get()
        return "", rows

    return decide


async def slowly(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
    await asyncio.sleep(0.1)
    return "", 1


async def test_pause_resume_and_stop(nats: LocalNats, replica: str) -> None:
    config = controller_config(nats.url, replica)
    async with running_controller(config) as address, stub(address) as ctl:
        status = await ctl.ScheduleDump(
            pb.ScheduleDumpRequest(uri="orders", tables=["items"], chunk_pages=4)
        )
        ref = pb.DumpRef(uri="orders", id=status.id)
        permits: asyncio.Queue[None] = asyncio.Queue()
        holder, other = Puller(address, decide=permitted(permits)), Puller(address, decide=slowly)
        async with pulling(holder):
            await poll(lambda: _true(holder.got), 5)
            paused = await ctl.PauseDump(ref)
            assert (paused.state, paused.chunks_running) == ("paused", 1)
            async with pulling(other):
                await asyncio.sleep(0.5)
                permits.put_nowait(None)  # a chunk in flight is still acknowledged while paused
                await poll(lambda: _done_count(address, status.id, 1), 5)
                await asyncio.sleep(0.3)
                assert len(holder.got) == 1
                assert other.got == []
                assert (await ctl.ResumeDump(ref)).state == "running"
                await poll(lambda: _true(len(other.got) >= 2 and len(holder.got) == 2), 5)
                assert (await ctl.StopDump(ref)).state == "stopped"
                await asyncio.sleep(0.5)
                handed = len(holder.got) + len(other.got)
                permits.put_nowait(None)  # the holder's chunk in flight is recorded after the stop
                await poll(lambda: _done_count(address, status.id, handed), 5)
                await asyncio.sleep(0.5)
        assert len(holder.got) + len(other.got) == handed
        final = (await dumps(address, id=status.id))[0]
        assert final.state == "stopped"
        assert (final.chunks_done, final.chunks_running) == (handed, 0)
        assert handed < final.chunks_total
        assert final.rows == 5 * len(holder.acks) + len(other.acks)
        assert final.finished.seconds > 0
        for call in (ctl.ResumeDump, ctl.PauseDump):
            error = await refusal(call(ref))
            assert error.code().name == "FAILED_PRECONDITION"
            assert "stopped" in error.details()
            assert "pgcapture dump schedule" in error.details()
        assert (await ctl.StopDump(ref)).state == "stopped"
        unfinished = await ctl.ListDumps(pb.ListDumpsRequest(uri="orders"))
        assert list(unfinished.dumps) == []


async def _true(value: object) -> bool:
    return bool(value)


async def _done_count(address: str, dump_id: str, count: int) -> bool:
    return (await dumps(address, id=dump_id))[0].chunks_done >= count


def go_chunks(n: int) -> list[pb.DumpInfoResponse]:
    return [
        pb.DumpInfoResponse(schema="public", table="items", page_begin=i, page_end=i)
        for i in range(n)
    ]


async def test_go_schedule_stop_schedule_and_cool_down(nats: LocalNats, replica: str) -> None:
    config = controller_config(nats.url, replica)
    async with running_controller(config) as address, stub(address) as ctl:
        await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(3)))
        error = await refusal(ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(1))))
        assert error.code().name == "ALREADY_EXISTS"
        assert "pgcapture dump stop" in error.details()
        assert "StopSchedule" in error.details()
        await ctl.SetScheduleCoolDown(
            pb.SetScheduleCoolDownRequest(uri="orders", duration=Duration(nanos=600_000_000))
        )
        puller = Puller(address)
        async with pulling(puller):
            await poll(lambda: _true(len(puller.got) == 3), 10)
        status = (await dumps(address))[0]
        assert [c.page_begin for _, c in puller.got] == [0, 1, 2]
        for (acked, _, _), (handed, _) in zip(puller.acks, puller.got[1:], strict=False):
            assert handed - acked >= 0.59
        assert status.state == "done"
        assert status.tables == ["public.items"]
        await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(2)))
        await ctl.StopSchedule(pb.StopScheduleRequest(uri="orders"))
        states = [d.state for d in await dumps(address, uri="orders")]
        assert states == ["done", "stopped"]
        await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(1)))


async def test_requeued_chunk_backs_off_and_a_disconnect_returns_it_at_once(
    nats: LocalNats, replica: str
) -> None:
    config = controller_config(nats.url, replica)
    requeued: set[int] = set()

    async def once(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        if chunk.page_begin == 0 and 0 not in requeued:
            requeued.add(0)
            return "replica behind", 0
        return "", 1

    async with running_controller(config) as address, stub(address) as ctl:
        await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(2)))
        puller = Puller(address, decide=once)
        async with pulling(puller):
            await poll(lambda: _true(len(puller.got) == 3), 10)
        assert [c.page_begin for _, c in puller.got] == [0, 1, 0]
        assert puller.got[1][0] - puller.acks[0][0] < 0.5
        assert puller.got[2][0] - puller.acks[0][0] >= 1.95
        await poll(lambda: _all_done(address), 5)
        status = (await dumps(address))[0]
        assert (status.retries, status.last_error) == (1, "replica behind")

        await ctl.Schedule(pb.ScheduleRequest(uri="audit", dumps=go_chunks(1)))
        leaving = Puller(address, uri="audit", decide=holding(asyncio.Event()))
        staying = Puller(address, uri="audit")
        going = asyncio.create_task(leaving.run())
        await poll(lambda: _true(leaving.got), 5)
        async with pulling(staying):
            await asyncio.sleep(0.3)
            assert staying.got == []
            going.cancel()
            await asyncio.gather(going, return_exceptions=True)
            left = time.monotonic()
            await poll(lambda: _true(staying.got), 5)
        assert staying.got[0][0] - left < 0.5
        status = (await dumps(address, uri="audit"))[0]
        assert (status.retries, status.last_error) == (1, "client disconnected")


async def test_metrics_and_health(nats: LocalNats, replica: str) -> None:
    port = free_port()
    config = validate_config(
        {**controller_settings(nats.url, replica), "metrics": {"listen": f"127.0.0.1:{port}"}}
    )
    async with running_controller(config) as address, stub(address) as ctl:
        await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(3)))
        async with pulling(Puller(address, decide=lambda c: _verdict("", 7))):
            await poll(lambda: _all_done(address), 10)
        status, body = await http_get(port, "/metrics")
        text = body.decode()
        assert status == 200
        assert 'pgcapture_controller_chunks_done_total{uri="orders"} 3.0' in text
        assert 'pgcapture_controller_chunks_handed_out_total{uri="orders"} 3.0' in text
        assert 'pgcapture_controller_rows_total{uri="orders"} 21.0' in text
        status, body = await http_get(port, "/healthz")
        assert status == 200
        assert b'"running"' in body


async def _all_done(address: str) -> bool:
    return all(d.state == "done" for d in await dumps(address))


@dataclass
class ControllerProcess:
    """``pgcapture controller`` as a process of its own."""

    config: Path
    instance: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.config.parent / f"{self.instance}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgcapture", "controller", "--config", str(self.config),
             "--listen", self.address, "--instance", self.instance],
            stdout=log, stderr=log, env={**os.environ, "PGCAPTURE_LOG__LEVEL": "info"},
        )  # fmt: skip
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code


@contextlib.contextmanager
def controller_processes(*controllers: ControllerProcess) -> Iterator[None]:
    try:
        for controller in controllers:
            controller.start()
        yield
    finally:
        codes = [c.stop() for c in controllers]
    assert set(codes) <= {0, None}, "a controller did not stop cleanly on SIGTERM"


def controller_file(tmp_path: Path, nats_url: str, replica: str, claim_ttl: float) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f"[nats]\nurl = {json.dumps(nats_url)}\n"
        '[sources.app]\ndsn = ""\n'
        f"[sources.app.replica]\ndsn = {json.dumps(replica)}\n"
        '[gateway.uris.orders]\nsource = "app"\n'
        f'[controller]\nbucket = "dumps_{os.getpid()}_{next(_buckets)}"\nclaim_ttl = {claim_ttl}\n'
    )
    return path


async def test_controller_killed_with_a_chunk_claimed_resumes_after_restart(
    nats: LocalNats, replica: str, tmp_path: Path
) -> None:
    config = controller_file(tmp_path, nats.url, replica, claim_ttl=30)
    controller = ControllerProcess(config, "ctl-a")
    killed = asyncio.Event()

    async def hold_first(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        if len(holder.got) == 1:
            await killed.wait()
        return "", 1

    holder = Puller(controller.address, decide=hold_first, reconnect=True)
    other = Puller(controller.address, reconnect=True)
    with controller_processes(controller):
        async with stub(controller.address) as ctl:
            await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(6)))
        async with pulling(holder):
            await poll(lambda: _true(holder.got), 15)
            async with pulling(other):
                await poll(lambda: _true(len(other.acks) == 5), 15)
                status = (await dumps(controller.address))[0]
                assert (status.chunks_done, status.chunks_running) == (5, 1)
                controller.stop(signal.SIGKILL)
                killed.set()
                restarted = time.monotonic()
                controller.start()
                final = await until_done(controller.address, status.id, 15)
        assert time.monotonic() - restarted < 15  # its own claim was taken back, not left to expire
    held = holder.got[0][1].page_begin
    handed = [c.page_begin for _, c in holder.got + other.got]
    assert sorted(handed) == sorted([0, 1, 2, 3, 4, 5, held])
    assert (final.chunks_done, final.chunks_total, final.rows) == (6, 6, 6)


async def test_two_controller_processes_on_one_bucket_hand_out_each_chunk_once(
    nats: LocalNats, replica: str, tmp_path: Path
) -> None:
    config = controller_file(tmp_path, nats.url, replica, claim_ttl=10)
    first, second = ControllerProcess(config, "ctl-1"), ControllerProcess(config, "ctl-2")

    async def briefly(chunk: pb.DumpInfoResponse) -> tuple[str, int]:
        await asyncio.sleep(random.uniform(0.005, 0.03))
        return "", 1

    with controller_processes(first, second):
        async with stub(first.address) as ctl, stub(second.address):
            pullers = [Puller(c.address, decide=briefly) for c in (first, second) for _ in range(3)]
            async with pulling(*pullers):
                status = await ctl.ScheduleDump(
                    pb.ScheduleDumpRequest(uri="orders", tables=["items"], chunk_pages=1)
                )
                seen = time.monotonic()
                await poll(lambda: _listed(second.address, status.id), 5)
                assert time.monotonic() - seen < 1.5
                final = await until_done(second.address, status.id, 30)
        handed = Counter(c.page_begin for p in pullers for _, c in p.got)
        assert len(handed) == final.chunks_total == final.chunks_done > 20
        assert set(handed.values()) == {1}
        assert all(len(p.got) == len(p.acks) for p in pullers)
        assert sum(len(p.got) for p in pullers[:3])
        assert sum(len(p.got) for p in pullers[3:])
        assert (await dumps(first.address, id=status.id))[0].rows == final.chunks_total


async def _listed(address: str, dump_id: str) -> bool:
    return any(d.id == dump_id for d in await dumps(address))


async def test_claims_are_renewed_and_a_dead_controllers_claim_expires_for_the_others(
    nats: LocalNats, replica: str, tmp_path: Path
) -> None:
    config = controller_file(tmp_path, nats.url, replica, claim_ttl=1.5)
    dying, living = ControllerProcess(config, "ctl-dying"), ControllerProcess(config, "ctl-living")
    holder = Puller(dying.address, decide=holding(asyncio.Event()))
    taker = Puller(living.address)
    with controller_processes(dying, living):
        async with stub(dying.address) as ctl, stub(living.address):
            await ctl.Schedule(pb.ScheduleRequest(uri="orders", dumps=go_chunks(1)))
            async with pulling(holder):
                await poll(lambda: _true(holder.got), 10)
                async with pulling(taker):
                    await asyncio.sleep(3.5)  # over twice the ttl: renewed, so not taken
                    assert taker.got == []
                    dying.stop(signal.SIGKILL)
                    died = time.monotonic()
                    await poll(lambda: _true(taker.got), 10)
                    await poll(lambda: _all_done(living.address), 5)
        assert 0.5 < taker.got[0][0] - died < 3.0


async def test_controllers_keep_sharing_dumps_across_a_nats_server_restart(replica: str) -> None:
    with LocalNats() as server:
        config = controller_config(server.url, replica)
        async with (
            running_controller(config, instance="one") as one,
            running_controller(config, instance="two") as two,
            stub(one) as ctl,
        ):
            await asyncio.to_thread(server.restart)
            scheduled: list[pb.DumpStatus] = []

            async def schedule() -> bool:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    request = pb.ScheduleDumpRequest(uri="orders", tables=["items"], chunk_pages=16)
                    scheduled.append(await ctl.ScheduleDump(request))
                return bool(scheduled)

            await poll(schedule, 15)
            await poll(lambda: _listed(two, scheduled[0].id), 10)
            async with pulling(Puller(two)):
                final = await until_done(two, scheduled[0].id, 15)
        assert final.chunks_done == final.chunks_total > 1
