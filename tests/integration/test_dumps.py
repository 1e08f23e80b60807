"""Dumps end to end: capture, replicate, dumper, controller and gateway over a real source, a
real replica and a real nats-server, with consumers that apply what they receive.

The replica is a second database of the session's cluster; the source database logs every
statement, so a test can check that nothing of a dump ran there.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psycopg
import pytest
from dump_helpers import (
    Consumer,
    Materialized,
    controller_stub,
    dump_config,
    dump_status,
    key_writer,
    running,
    schedule,
    source_statements,
    start_from_scratch,
    table_rows,
    wait_equal,
    wait_for_dump,
)
from gateway_helpers import wait_until
from google.protobuf.duration_pb2 import Duration
from log_helpers import run_sql

from pgcapture.config import Config
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.proto import pb

pytestmark = pytest.mark.integration

KEYS = 3000


@pytest.fixture
async def source_dsn(pg: LocalPostgres, dbname: str) -> str:
    """The source database, logging every statement from now on."""
    await run_sql(pg.dsn(), f"ALTER DATABASE \"{dbname}\" SET log_statement = 'all'")
    return pg.dsn(dbname)


ITEMS = (
    "CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL, payload text)",
    "CREATE TABLE items_versions (id int PRIMARY KEY, version int NOT NULL)",
    f"INSERT INTO items SELECT g, 1, md5(g::text) FROM generate_series(1, {KEYS}) g",
)


async def replica_has(replica: str, table: str, rows: int, seconds: float = 60) -> None:
    async with asyncio.timeout(seconds):
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(replica) as conn:
                    cur = await conn.execute(f"SELECT count(*) FROM {table}")
                    row = await cur.fetchone()
                    if row is not None and row[0] >= rows:
                        return
            except psycopg.errors.UndefinedTable:
                pass
            await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_a_dump_of_a_table_written_concurrently_converges_without_time_travel(
    pg: LocalPostgres,
    dbname: str,
    source_dsn: str,
    replica_dsn: str,
    nats: LocalNats,
    ordered: bool,
) -> None:
    config = dump_config(
        source_dsn,
        replica_dsn,
        nats.url,
        f"src_{dbname}",
        app={"ordered": ordered, "requeue_delay": 0.1, "requeue_max_delay": 0.5},
    )
    await start_from_scratch(config)
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        await run_sql(source_dsn, *ITEMS)
        await replica_has(replica_dsn, "items", KEYS)
        # The URI starts now: the rows inserted so far reach it only through the dump.
        state = Materialized(requeue=0.05 if ordered else 0.0, requeue_dump_rows=2)
        consumer = Consumer(services.gateway, "app", state).start()
        stop = asyncio.Event()
        writer = asyncio.create_task(
            key_writer(source_dsn, "items", KEYS, stop, random.Random(11))()
        )
        try:
            await asyncio.sleep(0.5)
            dump = await schedule(config, "app", "public.items", chunk_pages=4)
            status = await wait_for_dump(config, "app", dump)
            await asyncio.sleep(0.5)  # writes after the dump too
            stop.set()
            writes = await writer
            await wait_equal(source_dsn, "items", state)
        finally:
            stop.set()
            await consumer.stop()
    assert not state.backwards, state.backwards[:10]
    assert writes > 100
    assert status.chunks_done == status.chunks_total > 5
    # Every row the writer did not touch reached the consumer only through the dump.
    assert state.dump_rows.get("items", 0) >= KEYS - writes
    assert 0 < status.rows <= state.dump_rows["items"]  # rows of requeued chunks come again
    dumped = source_statements(pg.log_file.read_text(errors="replace"), dbname, "ctid", "copy")
    assert not dumped, f"the source received dump statements: {dumped[:5]}"


@pytest.mark.timeout(180)
async def test_a_lagging_replica_holds_chunks_back_until_it_catches_up(
    source_dsn: str, replica_dsn: str, nats: LocalNats, dbname: str
) -> None:
    config = dump_config(source_dsn, replica_dsn, nats.url, f"src_{dbname}", app={})
    await start_from_scratch(config)
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        await run_sql(source_dsn, *ITEMS)
        await replica_has(replica_dsn, "items", KEYS)
        state = Materialized()
        consumer = Consumer(services.gateway, "app", state).start()
        try:
            await asyncio.sleep(1.0)  # the URI's consumer exists: it reads from here on
            await services.stop("replicate")  # the replica stays behind from now on
            await run_sql(source_dsn, "UPDATE items SET version = version + 1 WHERE id <= 100")
            await wait_until(lambda: state.stream_changes >= 100, 30)
            dump = await schedule(config, "app", "public.items", chunk_pages=8)
            await asyncio.sleep(5)
            status = await dump_status(config, "app", dump)
            assert not state.dump_rows, "a chunk read on a replica behind the consumer was sent"
            assert status.chunks_done == 0
            assert "catches up" in status.last_error, status
            await services.start("replicate")
            await wait_for_dump(config, "app", dump, seconds=120)
            await wait_equal(source_dsn, "items", state)
        finally:
            await consumer.stop()
    assert not state.backwards, state.backwards[:10]
    assert state.dump_rows["items"] >= KEYS


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_restarted_gateway_holds_chunks_back_while_the_replica_is_behind_what_was_sent(
    source_dsn: str, replica_dsn: str, nats: LocalNats, dbname: str, ordered: bool
) -> None:
    """The consumer was sent (and acknowledged) changes past the replica's position by one
    gateway; a new gateway must not hand it rows read on that replica."""
    config = dump_config(
        source_dsn, replica_dsn, nats.url, f"src_{dbname}", app={"ordered": ordered}
    )
    await start_from_scratch(config)
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        await run_sql(source_dsn, *ITEMS)
        await replica_has(replica_dsn, "items", KEYS)
        state = Materialized()
        consumer = Consumer(services.gateway, "app", state).start()
        try:
            await asyncio.sleep(1.0)
            await services.stop("replicate")  # the replica stays behind from now on
            await run_sql(source_dsn, "UPDATE items SET version = version + 1 WHERE id <= 100")
            await wait_until(lambda: state.stream_changes >= 100, 30)
            await asyncio.sleep(1.0)  # acknowledged
            await consumer.stop()
            await services.stop("gateway")
            await services.start("gateway")
            consumer = Consumer(services.gateway, "app", state).start()
            dump = await schedule(config, "app", "public.items", chunk_pages=8)
            await asyncio.sleep(5)
            assert not state.dump_rows, "a chunk read on a replica behind the consumer was sent"
            await services.start("replicate")
            await wait_for_dump(config, "app", dump, seconds=120)
            await wait_equal(source_dsn, "items", state)
        finally:
            await consumer.stop()
    assert not state.backwards, state.backwards[:10]
    assert state.dump_rows["items"] >= KEYS


@pytest.mark.timeout(180)
async def test_two_uris_dumping_at_once_do_not_see_each_others_rows(
    source_dsn: str, replica_dsn: str, nats: LocalNats, dbname: str
) -> None:
    config = dump_config(source_dsn, replica_dsn, nats.url, f"src_{dbname}", a={}, b={})
    await start_from_scratch(config)
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        await run_sql(
            source_dsn,
            *ITEMS,
            "CREATE TABLE others (id int PRIMARY KEY, version int NOT NULL, payload text)",
            "INSERT INTO others SELECT g, 1, 'other' FROM generate_series(1, 500) g",
        )
        await replica_has(replica_dsn, "others", 500)
        states = {"a": Materialized(), "b": Materialized()}
        consumers = [Consumer(services.gateway, uri, s).start() for uri, s in states.items()]
        try:
            await asyncio.sleep(1.0)
            dumps = await asyncio.gather(
                schedule(config, "a", "public.items"), schedule(config, "b", "public.others")
            )
            await asyncio.gather(
                wait_for_dump(config, "a", dumps[0]), wait_for_dump(config, "b", dumps[1])
            )
            await wait_equal(source_dsn, "items", states["a"])
            await wait_equal(source_dsn, "others", states["b"])
        finally:
            for consumer in consumers:
                await consumer.stop()
    assert set(states["a"].dump_rows) == {"items"}
    assert set(states["b"].dump_rows) == {"others"}
    assert not any(key[0] == "others" for key in states["a"].rows)
    assert not any(key[0] == "items" for key in states["b"].rows)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("killed", ["controller", "dumper"])
async def test_a_service_killed_mid_dump_and_restarted_lets_the_dump_finish(
    source_dsn: str, replica_dsn: str, nats: LocalNats, dbname: str, tmp_path: Path, killed: str
) -> None:
    """The controller or the dumper, as a process of its own, SIGKILLed mid-dump: after a
    restart every chunk is done and the consumer holds every row."""
    name = f"src_{dbname}"
    config = dump_config(source_dsn, replica_dsn, nats.url, name, app={})
    c, d = config.controller, config.dumper
    toml = tmp_path / "pgcapture.toml"
    toml.write_text(
        f'[nats]\nurl = "{nats.url}"\n'
        f'[sources.{name}]\ndsn = "{source_dsn}"\n'
        f'[sources.{name}.replica]\ndsn = "{replica_dsn}"\n'
        f'[gateway.uris.app]\nsource = "{name}"\n'
        f'[controller]\nlisten = "{c.listen}"\nbucket = "{c.bucket}"\nclaim_ttl = 2\n'
        f'[dumper]\nlisten = "{d.listen}"\nsource = "{name}"\nbatch_rows = 50\n'
    )
    command = [sys.executable, "-m", "pgcapture", killed, "--config", str(toml)]
    log = (tmp_path / f"{killed}.log").open("ab")
    env = {**os.environ, "PGCAPTURE_LOG__LEVEL": "info"}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, stdout=log, stderr=log, env=env)

    others = "dumper" if killed == "controller" else "controller"
    await start_from_scratch(config)
    process = start()
    try:
        async with running(config, "replicate", "gateway") as services:
            await services.start(others)
            await run_sql(source_dsn, *ITEMS)
            await replica_has(replica_dsn, "items", KEYS)
            state = Materialized()
            consumer = Consumer(services.gateway, "app", state).start()
            try:
                await asyncio.sleep(1.0)
                dump = await _schedule_when_up(config, "app", "public.items")
                status = await dump_status(config, "app", dump)
                assert status.chunks_total >= 20
                async with asyncio.timeout(60):
                    while (await dump_status(config, "app", dump)).chunks_done < 5:
                        await asyncio.sleep(0.05)
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                killed_at = state.dump_rows.get("items", 0)
                assert killed_at < KEYS, f"the dump ended before the {killed} was killed"
                process = start()
                status = await wait_for_dump(config, "app", dump, seconds=120)
                await wait_equal(source_dsn, "items", state)
            finally:
                await consumer.stop()
    finally:
        process.kill()
        process.wait(10)
        log.close()
    assert status.chunks_done == status.chunks_total
    assert set(state.rows) == set((await table_rows(source_dsn, "items")).keys())


async def _schedule_when_up(config: Config, uri: str, table: str) -> str:
    """Schedule once the controller process answers: one page per chunk, a cool-down between
    chunks, so the dump lasts long enough to be interrupted."""
    request = pb.ScheduleDumpRequest(
        uri=uri, tables=[table], chunk_pages=1, cool_down=Duration(nanos=50_000_000)
    )
    async with asyncio.timeout(30):
        while True:
            channel, stub = controller_stub(config)
            try:
                async with channel:
                    return (await stub.ScheduleDump(request)).id
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_rows_by_key_and_a_table_without_a_key_are_dumped(
    source_dsn: str, replica_dsn: str, nats: LocalNats, dbname: str
) -> None:
    config = dump_config(source_dsn, replica_dsn, nats.url, f"src_{dbname}", app={})
    await start_from_scratch(config)
    async with running(config, "replicate", "dumper", "controller", "gateway") as services:
        await run_sql(
            source_dsn,
            *ITEMS,
            "CREATE TABLE events (id int, version int, payload text)",  # no key at all
            "INSERT INTO events SELECT g % 50, 1, 'same' FROM generate_series(1, 200) g",
        )
        await replica_has(replica_dsn, "events", 200)
        await replica_has(replica_dsn, "items", KEYS)
        state = Materialized()
        seen: list[pb.CaptureMessage] = []
        decide = state.decide

        def keep(message: pb.CaptureMessage) -> str:
            seen.append(message)
            return decide(message)

        state.decide = keep  # type: ignore[method-assign]
        consumer = Consumer(services.gateway, "app", state).start()
        try:
            await asyncio.sleep(1.0)
            channel, stub = controller_stub(config)
            async with channel:
                keyed = await stub.ScheduleDump(
                    pb.ScheduleDumpRequest(
                        uri="app", tables=["public.items"], keys=['{"id": 7}', '{"id": 2999}']
                    )
                )
                keyless = await stub.ScheduleDump(
                    pb.ScheduleDumpRequest(uri="app", tables=["public.events"])
                )
            await wait_for_dump(config, "app", keyed.id)
            await wait_for_dump(config, "app", keyless.id)
        finally:
            await consumer.stop()
    dumped = [m for m in seen if m.checkpoint.lsn == 0]
    items = sorted(
        int.from_bytes(m.change.new[0].binary, "big") for m in dumped if m.change.table == "items"
    )
    assert items == [7, 2999]
    events = [m for m in dumped if m.change.table == "events"]
    assert len(events) == 200  # every row, equal ones included
    assert not any(f.key for m in events for f in m.change.new)
    assert [m.checkpoint.data for m in dumped].count(b"\x01") == 2  # one last row per chunk
