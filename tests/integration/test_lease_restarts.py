"""Crash restarts need no operator: a leased process started again right after ``kill -9`` takes
over its dead predecessor's lease (or waits for it) by default, and never writes beside a live
one (issue 14).

* capture, SIGKILLed again and again under a write workload and started again at once with no
  lock flag: the stream holds every change exactly once and in order;
* a second capture started while the first runs waits (naming it) and writes nothing; it takes
  over once the first is killed, and a third takes over from it after a clean stop;
* replicate, SIGKILLed and started again at once, also while its server process is stuck on a
  lock (it outlives its client): the new one waits for the old backend, then converges;
* a gateway serving an ordered URI, SIGKILLed and started again: it serves the URI again at
  once, not after the lease's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats as natslib
import psycopg
import pytest
from gateway_helpers import captured, gateway_config
from log_helpers import (
    assert_same_log,
    capturing,
    make_config,
    prepare_slots,
    reference,
    run_sql,
    stream_records,
    wait_for_stream,
)
from replica_workload import assert_same_tables, wait_for_marker
from test_replica_convergence import (
    Proc,
    advisory_holder,
    ended,
    replica_lsn,
    replicate_args,
    report_logs,
    start_from_scratch,
    stopping,
)
from test_replica_convergence import wait_for_stream as wait_for_stream_made

from pgcapture.backoff import Backoff
from pgcapture.client import Change, Consumer, Row
from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port
from pgcapture.replica.store import LOCK_KEYS

pytestmark = pytest.mark.integration

KILLS = 8
"""SIGKILLs of capture in the restart test."""
REPLICATE_KILLS = 3
"""SIGKILLs of replicate at random moments, before the two with a server session left behind."""
START = 40.0
"""Seconds a process may take to start on a loaded machine. A restart that is quicker than the
dead holder's lease (which expires 10 to 15 s after the kill) takes it over and logs that it
did; a slower one finds the lease expired, which is as good for the stream."""


def capture_args(dsn: str, url: str, name: str) -> tuple[str, ...]:
    """``pgcapture capture`` with nothing about the lease: its defaults are under test."""
    return ("capture", "--dsn", dsn, "--nats", url, "--source", name, "--log-format", "text")


@contextlib.asynccontextmanager
async def writing(
    dsn: str, seed: int, clients: int = 3, pause: float = 0.01
) -> AsyncIterator[None]:
    """Small transactions on ``t`` from several clients until the block ends, then a row in
    ``done`` (the marker ``reference`` reads up to)."""
    await run_sql(
        dsn,
        "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, n int, v text)",
        "CREATE TABLE IF NOT EXISTS done (token text PRIMARY KEY)",
    )
    stop = asyncio.Event()

    async def client(number: int) -> None:
        rng = random.Random(seed * 31 + number)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                key = number * 1000 + rng.randrange(200)
                async with conn.transaction():
                    if rng.random() < 0.7:
                        await conn.execute(
                            "INSERT INTO t VALUES (%s, 1, md5(random()::text)) "
                            "ON CONFLICT (id) DO UPDATE SET n = t.n + 1, v = excluded.v",
                            (key,),
                        )
                    else:
                        await conn.execute("DELETE FROM t WHERE id = %s", (key,))
                    if rng.random() < 0.05:
                        await conn.execute(
                            "INSERT INTO t SELECT g, 0, repeat('x', 3000) FROM "
                            "generate_series(%s, %s) g ON CONFLICT (id) DO NOTHING",
                            (100_000 + number * 10_000, 100_000 + number * 10_000 + 500),
                        )
                await asyncio.sleep(rng.uniform(0, pause))

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await run_sql(dsn, f"INSERT INTO done VALUES ('{seed}')")


@pytest.mark.timeout(300)
async def test_capture_restarted_at_once_after_kill_9_loses_and_doubles_nothing(
    dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"restart{seed}"
    source = make_config(dsn, nats.url, name).source(name)
    await prepare_slots(dsn, source)
    log = tmp_path / "capture.log"
    procs: list[Proc] = []
    try:
        async with stopping(procs), asyncio.timeout(280):
            async with writing(dsn, seed):
                for kill in range(KILLS):
                    proc = await Proc(log, *capture_args(dsn, nats.url, name)).start()
                    procs.append(proc)
                    await proc.wait_for("capturing source", START, after=kill)
                    await asyncio.sleep(rng.uniform(0.05, 1.0))
                    await proc.kill()
            final = await Proc(log, *capture_args(dsn, nats.url, name)).start()
            procs.append(final)
            await final.wait_for("capturing source", START, after=KILLS)
            expected = await reference(dsn, source)
            await wait_for_stream(nats.url, source.stream_name, expected[-1])
            assert await final.kill(signal.SIGTERM) == 0
        text = log.read_text()
        assert "took over lease" in text, text[-5000:]
        assert "Traceback" not in text, text[-5000:]
        assert_same_log(await stream_records(nats.url, source.stream_name), expected)
    except BaseException as exc:
        exc.add_note(f"seed {seed}")
        raise


async def lease_holder(url: str, key: str) -> bytes:
    nc = await natslib.connect(url)
    try:
        entry = await (await nc.jetstream().key_value("pgcapture_locks")).get(key)
        return entry.value or b""
    finally:
        await nc.close()


@pytest.mark.timeout(300)
async def test_a_second_live_capture_waits_and_writes_nothing(
    dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    name = f"second{seed}"
    source = make_config(dsn, nats.url, name).source(name)
    await prepare_slots(dsn, source)
    logs = [tmp_path / f"capture-{n}.log" for n in "abc"]
    args = capture_args(dsn, nats.url, name)
    procs: list[Proc] = []
    try:
        async with stopping(procs), asyncio.timeout(280):
            async with writing(dsn, seed):
                first = await Proc(logs[0], *args).start()
                procs.append(first)
                await first.wait_for("capturing source", START)
                second = await Proc(logs[1], *args).start()
                procs.append(second)
                assert first.proc is not None
                await second.wait_for(f"is held by pid {first.proc.pid} ", START)
                await asyncio.sleep(3)  # changes keep coming; the second one still waits
                assert second.returncode is None, second.text()
                assert "capturing source" not in second.text()
                assert f'"pid":{first.proc.pid},' in (await lease_holder(nats.url, name)).decode()

                await first.kill()  # the second one proves it dead and takes over at once
                await second.wait_for("capturing source", START)
                assert "took over lease" in second.text()  # it waited, so before the TTL ran out

                third = await Proc(logs[2], *args).start()
                procs.append(third)
                assert second.proc is not None
                await third.wait_for(f"is held by pid {second.proc.pid} ", START)
                assert await second.kill(signal.SIGTERM) == 0  # releases the lease
                await third.wait_for("capturing source", START)
                assert "took over lease" not in third.text()
            expected = await reference(dsn, source)
            await wait_for_stream(nats.url, source.stream_name, expected[-1])
            assert await third.kill(signal.SIGTERM) == 0
        assert_same_log(await stream_records(nats.url, source.stream_name), expected)
    except BaseException as exc:
        exc.add_note(f"seed {seed}\n" + report_logs(*logs))
        raise


async def stuck_replicate_backend(replica_dsn: str) -> int:
    """The pid of replicate's server process once it waits for a lock the test holds."""
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        async with asyncio.timeout(30):
            while True:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = "
                    "'pgcapture replicate' AND wait_event_type = 'Lock'"
                )
                row = await cur.fetchone()
                if row:
                    return int(row[0])
                await asyncio.sleep(0.05)


async def has_table(dsn: str, table: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute("SELECT to_regclass(%s)", (table,))).fetchone()
    return row is not None and row[0] is not None


@pytest.mark.timeout(300)
async def test_replicate_restarted_at_once_after_kill_9_converges(
    dsn: str, replica_dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"rep{seed}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await start_from_scratch(dsn, source, replica_dsn)
    args = replicate_args(replica_dsn, nats.url, name)
    procs: list[Proc] = []
    log = tmp_path / "replicate.log"
    try:
        async with capturing(config, name), stopping(procs), asyncio.timeout(280):
            await wait_for_stream_made(nats.url, source.stream_name)
            async with writing(dsn, seed, pause=0.05):  # replicate keeps up
                proc = await Proc(log, *args).start()
                procs.append(proc)
                for kill in range(REPLICATE_KILLS):
                    await proc.wait_for("replicating ", START, after=kill)
                    await asyncio.sleep(rng.uniform(0.05, 1.0))
                    await proc.kill()
                    proc = await Proc(log, *args).start()  # at once
                    procs.append(proc)
                await proc.wait_for("replicating ", START, after=REPLICATE_KILLS)
                async with asyncio.timeout(30):
                    while not await has_table(replica_dsn, "public.t"):
                        await asyncio.sleep(0.1)
                # Its server process waits for a lock of ours when replicate is killed, so it
                # outlives its client; it ends by itself once it notices (it checks its
                # connection), while the table lock is still held, and the next replicate,
                # started at once, goes on.
                async with await psycopg.AsyncConnection.connect(replica_dsn) as blocker:
                    await blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
                    backend = await stuck_replicate_backend(replica_dsn)
                    assert await advisory_holder(replica_dsn) == backend
                    await proc.kill()
                    proc = await Proc(log, *args).start()
                    procs.append(proc)
                    await proc.wait_for("replicating ", START, after=REPLICATE_KILLS + 1)
                    assert await advisory_holder(replica_dsn) != backend
                    await blocker.rollback()
                # A live holder of the lock (this test's session, as a second replicate would):
                # the next replicate waits, naming it, and writes nothing until it is gone.
                async with await psycopg.AsyncConnection.connect(
                    replica_dsn, autocommit=True
                ) as holder:
                    await proc.kill()
                    await holder.execute("SELECT pg_advisory_lock(%s, %s)", LOCK_KEYS)
                    proc = await Proc(log, *args).start()
                    procs.append(proc)
                    await proc.wait_for(f"backend PID {holder.info.backend_pid} ", START)
                    position = await replica_lsn(replica_dsn, name)
                    await asyncio.sleep(2)
                    assert proc.returncode is None, proc.text()[-5000:]
                    assert proc.text().count("replicating ") == REPLICATE_KILLS + 2
                    assert await replica_lsn(replica_dsn, name) == position
                await proc.wait_for("replicating ", START, after=REPLICATE_KILLS + 2)
            await wait_for_marker(replica_dsn, str(seed), 60, ended(proc))
            assert await proc.kill(signal.SIGTERM) == 0
        await assert_same_tables(dsn, replica_dsn, context=f"seed {seed}")
    except BaseException as exc:
        exc.add_note(f"seed {seed}\n" + report_logs(log))
        raise


def ordered_gateway_file(path: Path, nats_url: str, source: str, dsn: str, port: int) -> Path:
    path.write_text(
        f'[nats]\nurl = "{nats_url}"\n[sources.{source}]\ndsn = "{dsn}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\n'
        "[gateway.tls]\ndisabled = true\n[gateway.auth]\ndisabled = true\n"
        f'[gateway.uris.app]\nsource = "{source}"\nstart = "beginning"\nordered = true\n'
    )
    return path


@pytest.mark.timeout(300)
async def test_ordered_uri_gateway_restarted_after_kill_9_serves_at_once(
    dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    config = gateway_config(dsn, nats.url, "ord", app={"start": "beginning", "ordered": True})
    port = free_port()
    config_file = ordered_gateway_file(tmp_path / "pgcapture.toml", nats.url, "ord", dsn, port)
    log = tmp_path / "gateway.log"
    args = ("gateway", "--config", str(config_file), "--log-format", "text")
    seen: list[int] = []
    consumer = Consumer(f"127.0.0.1:{port}", "app", table_regex="^t$", backoff=Backoff(maximum=0.5))

    @consumer.handler(Row)
    async def handle(change: Change[Row]) -> None:
        assert change.new is not None
        seen.append(change.new["id"])

    async def rows(first: int) -> None:
        await run_sql(dsn, f"INSERT INTO t SELECT g FROM generate_series({first}, {first + 99}) g")
        async with asyncio.timeout(START):
            while not set(range(first, first + 100)) <= set(seen):
                await asyncio.sleep(0.02)

    procs: list[Proc] = []
    try:
        async with captured(config, "ord"), stopping(procs), asyncio.timeout(280):
            procs.append(await Proc(log, *args).start())
            task = asyncio.create_task(consumer.run())
            try:
                await rows(0)
                for round_ in range(1, 4):
                    await procs[-1].kill()
                    procs.append(await Proc(log, *args).start())  # at once
                    await rows(round_ * 1000)
            finally:
                consumer.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 20)
            assert await procs[-1].kill(signal.SIGTERM) == 0
        assert set(seen) == {r * 1000 + i for r in range(4) for i in range(100)}
        # Served again because the restarted gateway took the dead one's lease over, not
        # because the lease expired (a restart slower than that would find it free).
        assert "took over lease 'gateway.app'" in log.read_text()
    except BaseException as exc:
        exc.add_note(report_logs(log))
        raise
