"""Helpers for the end-to-end dump tests (imported by plain name, as pytest puts this folder on
``sys.path``): the whole system in this process (capture, replicate, dumper, controller, gateway)
over a source database and a replica database, and a consumer that keeps the state it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
from gateway_helpers import int_of, row_values
from google.protobuf.struct_pb2 import Struct
from log_helpers import capturing, wait_for_slot

from pgcapture.capture.reader import SlotReader
from pgcapture.config import Config, validate_config
from pgcapture.dump.agent import serve_dumper
from pgcapture.dump.controller import serve_controller
from pgcapture.gateway.server import serve_gateway
from pgcapture.local.nats import free_port
from pgcapture.proto import pb, pb_grpc
from pgcapture.replica.service import replicate
from pgcapture.replica.store import set_position


def dump_config(
    dsn: str,
    replica_dsn: str,
    nats_url: str,
    name: str,
    batch: dict[str, Any] | None = None,
    lock_ttl: int = 1,
    **uris: dict[str, Any],
) -> Config:
    """Source ``name`` (its own stream) with its replica, a dumper and a controller (bucket
    ``dumps_<name>``) on free ports, a gateway serving ``uris`` (each with the dumper);
    ``batch`` overrides the source's batch settings."""
    dumper, controller = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    data = {
        "nats": {"url": nats_url},
        "sources": {
            name: {
                "dsn": dsn, "status_interval": 0.2, "lock": {"ttl": lock_ttl, "wait": 10},
                "batch": {"max_records": 50, "max_bytes": 16384, "linger": 0.002, **(batch or {})},
                "replica": {"dsn": replica_dsn, "max_delay": 0.05},
            }
        },
        "gateway": {
            "listen": "127.0.0.1:0",
            "controller": controller,
            "dump_wait": 10,
            "tls": {"disabled": True},
            "auth": {"disabled": True},
            "uris": {
                uri: {"source": name, "dumper": dumper, **settings}
                for uri, settings in uris.items()
            },
        },
        "controller": {"listen": controller, "bucket": f"dumps_{name}", "claim_ttl": 2},
        "dumper": {"listen": dumper, "source": name, "batch_rows": 200},
    }  # fmt: skip
    return validate_config(data)


def the_source(config: Config) -> str:
    return next(iter(config.sources))


async def start_from_scratch(config: Config) -> None:
    """The slot first, so the stream holds the whole history; the empty replica at 0/0."""
    source = config.source(the_source(config))
    reader = SlotReader(source.dsn, source.slot_name)
    await reader.open()
    await reader.close()
    async with await psycopg.AsyncConnection.connect(source.replica.dsn, autocommit=True) as conn:
        await set_position(conn, source.name, 0, "an empty source, captured from its start")


class Services:
    """Tasks of the in-process services, each stoppable on its own."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.gateway = ""

    async def start(self, name: str, ready: bool = True) -> None:
        stop = asyncio.Event()
        bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_ready(address: str = "") -> None:
            if not bound.done():
                bound.set_result(address)

        config = self.config
        source = config.source(the_source(config))
        work = {
            "replicate": lambda: replicate(config, source, source.replica.dsn, stop),
            "dumper": lambda: serve_dumper(config, stop, ready=on_ready),
            "controller": lambda: serve_controller(config, stop, ready=on_ready),
            "gateway": lambda: serve_gateway(config, stop, ready=on_ready),
        }[name]
        task = asyncio.create_task(work(), name=name)
        self._tasks[name] = (task, stop)
        if name == "replicate" or not ready:
            return
        done, _ = await asyncio.wait({task, bound}, timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert bound.done(), f"{name} did not start within 30 s"
        if name == "gateway":
            self.gateway = bound.result()

    async def stop(self, name: str) -> None:
        task, stop = self._tasks.pop(name)
        stop.set()
        await asyncio.wait_for(task, 30)

    async def stop_all(self) -> None:
        for name in reversed(list(self._tasks)):
            with contextlib.suppress(Exception):
                await self.stop(name)


@contextlib.asynccontextmanager
async def running(config: Config, *names: str) -> AsyncIterator[Services]:
    """Capture (its slot made) and then ``names`` running; everything stopped at the end."""
    services = Services(config)
    source = config.source(the_source(config))
    async with capturing(config, source.name):
        await wait_for_slot(source.dsn, source.slot_name)
        try:
            for name in names:
                await services.start(name)
            yield services
        finally:
            await services.stop_all()


def controller_stub(config: Config) -> tuple[grpc.aio.Channel, pb_grpc.DBLogControllerStub]:
    channel = grpc.aio.insecure_channel(config.gateway.controller)
    return channel, pb_grpc.DBLogControllerStub(channel)


async def schedule(config: Config, uri: str, *tables: str, chunk_pages: int = 0) -> str:
    channel, stub = controller_stub(config)
    async with channel:
        status = await stub.ScheduleDump(
            pb.ScheduleDumpRequest(uri=uri, tables=list(tables), chunk_pages=chunk_pages)
        )
    return status.id


async def dump_status(config: Config, uri: str, dump: str) -> pb.DumpStatus:
    channel, stub = controller_stub(config)
    async with channel:
        listed = await stub.ListDumps(pb.ListDumpsRequest(uri=uri, id=dump, include_finished=True))
    assert len(listed.dumps) == 1, listed
    return listed.dumps[0]


async def wait_for_dump(config: Config, uri: str, dump: str, seconds: float = 90) -> pb.DumpStatus:
    status = None
    try:
        async with asyncio.timeout(seconds):
            while True:
                try:
                    status = await dump_status(config, uri, dump)
                except grpc.aio.AioRpcError as exc:  # a controller restarting
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.2)
                    continue
                if status.state == "done":
                    return status
                assert status.state in ("running", "paused"), status
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"dump {dump} not done after {seconds}s: {status}") from None


@dataclass
class Materialized:
    """A consumer applying what it receives as upserts and deletes, keyed by ``id``; it keeps
    the ``version`` column it saw per key and every time it went backwards."""

    rows: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    versions: dict[tuple[str, int], int] = field(default_factory=dict)
    backwards: list[str] = field(default_factory=list)
    dump_rows: dict[str, int] = field(default_factory=dict)  # per table
    stream_changes: int = 0
    requeue: float = 0.0  # the share of stream changes requeued (instead of being applied)
    requeue_dump_rows: int = 0  # the first dump rows received are requeued (their chunks too)
    random: random.Random = field(default_factory=lambda: random.Random(7))

    def decide(self, message: pb.CaptureMessage) -> str:
        if not message.HasField("change"):
            return ""
        dumped = message.checkpoint.lsn == 0
        if dumped and self.requeue_dump_rows:
            self.requeue_dump_rows -= 1
            return "dump row requeued by the test"
        if not dumped and self.requeue and self.random.random() < self.requeue:
            return "requeued by the test"
        change = message.change
        table = change.table
        if dumped:
            self.dump_rows[table] = self.dump_rows.get(table, 0) + 1
        else:
            self.stream_changes += 1
        if change.op == pb.Change.DELETE:
            self.rows.pop((table, int_of(row_values(change.old)["id"])), None)
            return ""
        values = row_values(change.new)
        key = (table, int_of(values["id"]))
        version = int_of(values["version"])
        seen = self.versions.get(key)
        if seen is not None and version < seen:
            self.backwards.append(
                f"{key}: version {version} after {seen} (checkpoint lsn "
                f"{message.checkpoint.lsn}, seq {message.checkpoint.seq})"
            )
        self.versions[key] = max(version, seen or 0)
        self.rows[key] = values
        return ""


class Consumer:
    """A CaptureBatched client feeding a ``Materialized`` state."""

    def __init__(self, address: str, uri: str, state: Materialized, **parameters: Any) -> None:
        params = Struct()
        params.update(parameters)
        self.address = address
        self.init = pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=params))
        self.state = state
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Consumer:
        self.task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self.task

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stream = pb_grpc.DBLogGatewayStub(channel).CaptureBatched()
            await stream.write(self.init)
            async for batch in stream:
                for i, message in enumerate(batch.messages):
                    ident = batch.first_id + i
                    reason = self.state.decide(message)
                    await stream.write(
                        pb.CaptureRequest(
                            ack_range=pb.CaptureAckRange(
                                first_id=ident, last_id=ident, requeue_reason=reason
                            )
                        )
                    )


async def table_rows(dsn: str, table: str) -> dict[tuple[str, int], dict[str, Any]]:
    """A table's rows as the consumer holds them (binary values by column name)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = conn.cursor(binary=True)
        await cur.execute(f"SELECT * FROM {table}")
        result = cur.pgresult
        assert result is not None
        names = [d.name for d in cur.description or ()]
        raw = [
            {n: result.get_value(i, j) for j, n in enumerate(names)} for i in range(result.ntuples)
        ]
    name = table.split(".")[-1]
    return {(name, int.from_bytes(r["id"], "big", signed=True)): r for r in raw}


async def wait_equal(dsn: str, table: str, state: Materialized, seconds: float = 60) -> None:
    """Until the consumer's rows of ``table`` equal the source's, column for column."""
    name = table.split(".")[-1]
    expected: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        async with asyncio.timeout(seconds):
            while True:
                expected = await table_rows(dsn, table)
                mine = {k: v for k, v in state.rows.items() if k[0] == name}
                if mine == expected:
                    return
                await asyncio.sleep(0.25)
    except TimeoutError:
        mine = {k: v for k, v in state.rows.items() if k[0] == name}
        missing = sorted(k[1] for k in expected.keys() - mine.keys())[:10]
        extra = sorted(k[1] for k in mine.keys() - expected.keys())[:10]
        differ = sorted(k[1] for k in expected.keys() & mine.keys() if expected[k] != mine[k])
        raise AssertionError(
            f"{table}: the consumer differs from the source: {len(expected)} rows expected, "
            f"{len(mine)} held; missing ids {missing}, extra ids {extra}, different {differ[:10]}"
        ) from None


def source_statements(log_text: str, dbname: str, *needles: str) -> list[str]:
    """Lines of the server log of database ``dbname`` holding one of ``needles``."""
    tag = f"@{dbname} "
    return [
        line
        for line in log_text.splitlines()
        if tag in line and any(n.lower() in line.lower() for n in needles)
    ]


def key_writer(
    dsn: str, table: str, keys: int, stop: asyncio.Event, rng: random.Random
) -> Callable[[], Any]:
    """Random inserts, updates (version + 1) and deletes of ``keys`` ids until ``stop``; a
    deleted id comes back with a higher version, so versions only grow per id."""

    async def run() -> int:
        done = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                ident = rng.randrange(1, keys + 1)
                roll = rng.random()
                async with conn.transaction():
                    if roll < 0.6:
                        await conn.execute(
                            f"UPDATE {table} SET version = version + 1, "
                            "payload = md5(random()::text) WHERE id = %s",
                            (ident,),
                        )
                    elif roll < 0.8:
                        await conn.execute(
                            f"WITH gone AS (DELETE FROM {table} WHERE id = %s RETURNING version) "
                            f"INSERT INTO {table}_versions SELECT %s, version FROM gone "
                            "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                            (ident, ident),
                        )
                    else:
                        await conn.execute(
                            f"INSERT INTO {table} SELECT %s, coalesce((SELECT version FROM "
                            f"{table}_versions WHERE id = %s), 0) + 1, 'back' "
                            "ON CONFLICT (id) DO NOTHING",
                            (ident, ident),
                        )
                done += 1
                await asyncio.sleep(0.002)
        return done

    return run
