"""The one-command local demo behind ``pgcapture quickstart``: every part of pgcapture running
together on this machine, against throw-away servers.

``Demo.run`` starts a source and a replica PostgreSQL cluster (from the machine's PostgreSQL
server programs) and a nats-server, then capture, replicate, the dumper, the controller and the
gateway, in this process, configured as a deployment would be (one ``Config``). It creates a
table with rows, connects a consumer (``pgcapture.client``) to the URI ``demo`` (which starts at
the stream's end, so those rows are not in what it receives), runs a workload with DDL whose
changes the consumer prints as they arrive, and dumps the table to the consumer with a progress
display. It checks what happened — the replica equals the source, the consumer received every
change and the dump — prints a summary and stops everything, leaving nothing running and
nothing on disk. ``follow`` keeps it all running (and printing) until ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import nats as natslib
import nats.js.errors
import psycopg

from pgcapture.capture.reader import SlotReader
from pgcapture.capture.retry import run_capture
from pgcapture.client import Change, Consumer, Truncate, to_json
from pgcapture.config import Config, validate_config
from pgcapture.dump.agent import serve_dumper
from pgcapture.dump.controller import serve_controller
from pgcapture.errors import PgCaptureError
from pgcapture.gateway.server import serve_gateway
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.nats import free_port
from pgcapture.proto import pb, pb_grpc
from pgcapture.replica.service import replicate
from pgcapture.replica.store import set_position

SOURCE: Final = "app"
URI: Final = "demo"  # the demo's own consumer
YOURS: Final = "mine"  # for the user's consumer (``--info``): every change from the start
ROWS: Final = 2000  # rows of the demo table before the consumer starts: they come by the dump
SHOWN_DUMP_ROWS: Final = 3  # dump rows printed one by one; the others are counted
SETUP: Final = (
    "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2), "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    f"INSERT INTO items (id, name, price) SELECT g, 'item ' || g, g / 10.0 "
    f"FROM generate_series(1, {ROWS}) g",
)
WORKLOAD: Final = (
    "UPDATE items SET price = price + 1, updated_at = now() WHERE id = 1",
    "ALTER TABLE items ADD COLUMN tags text[] NOT NULL DEFAULT '{}'",
    f"INSERT INTO items (id, name, price, tags) VALUES ({ROWS + 1}, 'fig', 2.50, "
    "'{sweet,dried}')",
    "DELETE FROM items WHERE id = 2",
    "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "item bigint NOT NULL, qty int NOT NULL)",
    "INSERT INTO orders (item, qty) VALUES (1, 3), (3, 1)",
    "TRUNCATE orders",
)
TABLES: Final = ("items", "orders")

Poll = Callable[[], Awaitable[Sequence[pb.DumpStatus]]]
Watch = Callable[[Poll], Awaitable[None]]


class QuickstartError(PgCaptureError):
    """The demo did not do what it shows (a part failed, or a result differs)."""


@dataclass
class Endpoints:
    """Where everything listens, for a user's own consumer or psql (``--info``)."""

    source_dsn: str
    replica_dsn: str
    nats_url: str
    gateway: str
    controller: str
    dumper: str
    uri: str = YOURS

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass
class Seen:
    """What the demo's consumer received."""

    changes: int = 0
    dump_rows: int = 0
    truncates: int = 0
    printed_dump_rows: int = 0


class Demo:
    """The whole system on throw-away servers (see the module docstring)."""

    def __init__(self, echo: Callable[[str], None], watch: Watch) -> None:
        self.echo = echo
        self._watch = watch  # shows a dump's progress until it ends
        self.seen = Seen()
        self._stops: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def run(
        self, follow: asyncio.Event | None = None, info: Path | None = None
    ) -> dict[str, Any]:
        """The demo; with ``follow``, everything keeps running until that event is set."""
        async with _servers() as (source, replica, nats_server):
            endpoints = Endpoints(
                source.dsn(SOURCE),
                replica.dsn(SOURCE),
                nats_server.url,
                f"127.0.0.1:{free_port()}",
                f"127.0.0.1:{free_port()}",
                f"127.0.0.1:{free_port()}",
            )
            config = demo_config(endpoints)
            try:
                return await self._run(config, endpoints, follow, info)
            finally:
                await self._stop_all()

    async def _run(
        self,
        config: Config,
        endpoints: Endpoints,
        follow: asyncio.Event | None,
        info: Path | None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        await _start_from_scratch(config)
        await self._start_services(config)
        if info is not None:
            endpoints.write(info)
        self.echo(f"source   {endpoints.source_dsn}")
        self.echo(f"replica  {endpoints.replica_dsn}")
        self.echo(f"nats     {endpoints.nats_url}")
        self.echo(
            f"gateway  {endpoints.gateway} (uris {URI!r}: the demo's consumer, {YOURS!r}: "
            f"yours), controller {endpoints.controller}"
        )
        await _sql(endpoints.source_dsn, *SETUP)
        await _wait_for_rows(endpoints.replica_dsn, "items", ROWS)
        self.echo(f"created table items with {ROWS} rows; the replica has them too")
        async with self._consumer(config, endpoints):
            self.echo("running a workload with DDL; the consumer prints what it receives:")
            await _sql(endpoints.source_dsn, *WORKLOAD)
            await self._until(lambda: self.seen.truncates >= 1, "the workload's changes")
            dump = await self._dump(endpoints)
            await self._until(lambda: self.seen.dump_rows >= ROWS - 1, "the dump's rows")
            if follow is not None:
                self.echo("everything keeps running; Ctrl-C stops it")
                await follow.wait()
        await _wait_equal(endpoints.source_dsn, endpoints.replica_dsn)
        return {
            "seconds": round(time.monotonic() - started, 1),
            "changes": self.seen.changes,
            "dump_rows": self.seen.dump_rows,
            "dump_chunks": dump.chunks_total,
            "tables": len(TABLES),
        }

    # -- the parts ------------------------------------------------------------------------

    async def _start_services(self, config: Config) -> None:
        source = config.source(SOURCE)
        await self._start("capture", lambda stop, _: run_capture(source, config.nats, stop))
        await self._start(
            "replicate", lambda stop, _: replicate(config, source, source.replica.dsn, stop)
        )
        for name, serve in (
            ("dumper", serve_dumper),
            ("controller", serve_controller),
            ("gateway", serve_gateway),
        ):
            await self._start(name, _serving(serve, config), wait=True)

    async def _start(
        self,
        name: str,
        work: Callable[[asyncio.Event, Callable[[str], None]], Coroutine[Any, Any, None]],
        wait: bool = False,
    ) -> None:
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def bound(address: str) -> None:
            if not ready.done():
                ready.set_result(address)

        task = asyncio.create_task(work(stop, bound), name=name)
        self._stops.append((task, stop))
        if not wait:
            return
        waiters: set[asyncio.Future[Any]] = {task, ready}
        done, _ = await asyncio.wait(waiters, timeout=60, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        if not ready.done():
            raise QuickstartError(f"{name} did not start within 60 s")

    async def _stop_all(self) -> None:
        for task, stop in reversed(self._stops):
            stop.set()
            try:
                await asyncio.wait_for(task, 30)
            except Exception as exc:  # stopping the rest matters more
                logging.getLogger("pgcapture").warning("%s stopped with %r", task.get_name(), exc)
        self._stops.clear()

    @contextlib.asynccontextmanager
    async def _consumer(self, config: Config, endpoints: Endpoints) -> AsyncIterator[None]:
        consumer = Consumer(endpoints.gateway, URI, dsn=endpoints.source_dsn)
        task = asyncio.create_task(self._print(consumer))
        try:
            await _consumer_exists(config, endpoints.nats_url)
            yield
        finally:
            consumer.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)

    async def _print(self, consumer: Consumer) -> None:
        async with consumer:
            async for event in consumer:
                self._show(event)
                event.ack()

    def _show(self, event: Change[Any] | Truncate) -> None:
        seen = self.seen
        if isinstance(event, Truncate):
            seen.truncates += 1
            names = ", ".join(f"{t.schema}.{t.table}" for t in event.tables)
            self.echo(f"  TRUNCATE {names}")
            return
        if event.checkpoint.lsn == 0:  # a dump row
            seen.dump_rows += 1
            if seen.printed_dump_rows < SHOWN_DUMP_ROWS:
                seen.printed_dump_rows += 1
                self.echo(f"  DUMP     {event.schema}.{event.table} {to_json(event.new)}")
            return
        seen.changes += 1
        if event.is_ddl:
            assert event.new is not None
            self.echo(f"  DDL      {' '.join(str(event.new['query']).split())}")
            return
        row = event.new if event.new is not None else event.key
        self.echo(f"  {event.op.value:<8} {event.schema}.{event.table} {to_json(row)}")

    async def _dump(self, endpoints: Endpoints) -> pb.DumpStatus:
        """Dump the items table to the demo URI, showing its progress until it is done."""
        self.echo("dumping public.items into the consumer's stream (read on the replica):")
        async with asyncio.timeout(120), _controller(endpoints.controller) as stub:
            status = await stub.ScheduleDump(
                pb.ScheduleDumpRequest(uri=URI, tables=["public.items"])
            )
            ref = pb.ListDumpsRequest(uri=URI, id=status.id, include_finished=True)

            async def poll() -> Sequence[pb.DumpStatus]:
                return list((await stub.ListDumps(ref)).dumps)

            await self._watch(poll)
            final = (await poll())[0]
        if final.state != "done":
            raise QuickstartError(f"the dump ended {final.state}: {final.last_error}")
        self.echo(f"dump {final.id}: {final.chunks_done} chunks, {final.rows} rows, done")
        return final

    async def _until(self, check: Callable[[], bool], what: str, seconds: float = 60) -> None:
        try:
            async with asyncio.timeout(seconds):
                while True:
                    if check():
                        return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise QuickstartError(
                f"the consumer did not receive {what} within {seconds:g}s"
            ) from None


def demo_config(endpoints: Endpoints) -> Config:
    """The deployment's configuration, as one TOML file would give it."""
    return validate_config(
        {
            "nats": {"url": endpoints.nats_url},
            "log": {"level": "warning", "format": "text"},
            "sources": {
                SOURCE: {
                    "dsn": endpoints.source_dsn,
                    "status_interval": 1,
                    "lock": {"ttl": 5, "wait": 10},
                    "batch": {"linger": 0.005},
                    "replica": {"dsn": endpoints.replica_dsn, "max_delay": 0.05},
                }
            },
            "gateway": {
                "listen": endpoints.gateway,
                "controller": endpoints.controller,
                "tls": {"disabled": True},
                "auth": {"disabled": True},
                "uris": {
                    URI: {"source": SOURCE, "dumper": endpoints.dumper, "start": "new"},
                    YOURS: {"source": SOURCE, "dumper": endpoints.dumper, "start": "beginning"},
                },
            },
            "controller": {"listen": endpoints.controller, "chunk_rows": 250},
            "dumper": {"listen": endpoints.dumper, "source": SOURCE},
        }
    )


def _serving(
    serve: Callable[..., Coroutine[Any, Any, None]], config: Config
) -> Callable[[asyncio.Event, Callable[[str], None]], Coroutine[Any, Any, None]]:
    return lambda stop, bound: serve(config, stop, ready=bound)


@contextlib.asynccontextmanager
async def _servers() -> AsyncIterator[tuple[LocalPostgres, LocalPostgres, LocalNats]]:
    """A source and a replica cluster with a database ``app`` each, and a nats-server."""
    source, replica, server = LocalPostgres.create(), LocalPostgres.create(), LocalNats()
    try:
        await asyncio.gather(
            asyncio.to_thread(source.start),
            asyncio.to_thread(replica.start),
            asyncio.to_thread(server.start),
        )
        for cluster in (source, replica):
            await _sql(cluster.dsn(), f"CREATE DATABASE {SOURCE}")
        yield source, replica, server
    finally:
        await asyncio.gather(
            asyncio.to_thread(server.destroy),
            asyncio.to_thread(replica.destroy),
            asyncio.to_thread(source.destroy),
        )


async def _start_from_scratch(config: Config) -> None:
    """The slot (and DDL capture) before anything else, so the stream holds the whole history
    and the empty replica applies it from its first transaction (position 0/0)."""
    source = config.source(SOURCE)
    reader = SlotReader(source.dsn, source.slot_name)
    await reader.open()
    await reader.close()
    async with await psycopg.AsyncConnection.connect(source.replica.dsn, autocommit=True) as conn:
        await set_position(conn, SOURCE, 0, "quickstart: an empty source, captured from its start")


@contextlib.asynccontextmanager
async def _controller(address: str) -> AsyncIterator[pb_grpc.DBLogControllerStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.DBLogControllerStub(channel)


async def _consumer_exists(config: Config, url: str) -> None:
    """Until the gateway has created the demo URI's durable consumer (it starts there)."""
    stream, name = config.source(SOURCE).stream_name, config.gateway.uris[URI].consumer_name
    nc = await natslib.connect(url)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.consumer_info(stream, name)
                    return
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _sql(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


async def _count(dsn: str, table: str) -> int:
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
    except psycopg.errors.UndefinedTable:
        return -1
    return int(row[0]) if row else -1


async def _wait_for_rows(dsn: str, table: str, rows: int, seconds: float = 60) -> None:
    try:
        async with asyncio.timeout(seconds):
            while True:
                if await _count(dsn, table) >= rows:
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise QuickstartError(f"the replica did not get the {rows} rows of {table}") from None


async def _digest(dsn: str) -> list[tuple[str, int, str]]:
    """Each demo table's row count and a hash of its rows in key order."""
    out = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for table in TABLES:
            cur = await conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t.id)), '') "
                f"FROM {table} t"
            )
            count, digest = (await cur.fetchone()) or (0, "")
            out.append((table, int(count), str(digest)))
    return out


async def _wait_equal(source: str, replica: str, seconds: float = 60) -> None:
    """Until every demo table of the replica equals the source's."""
    expected: list[tuple[str, int, str]] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                expected = await _digest(source)
                with contextlib.suppress(psycopg.errors.UndefinedTable):
                    if await _digest(replica) == expected:
                        return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise QuickstartError(f"the replica does not equal the source: {expected}") from None
