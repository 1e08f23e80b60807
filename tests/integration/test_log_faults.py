"""Faults during a randomized workload: the stream still holds every committed change exactly
once, in commit order, byte-identical to an uninterrupted reading of the slot.

The workload runs several clients at once: small transactions on two tables (one under
REPLICA IDENTITY FULL, with TOASTed values), large inserts, TRUNCATEs and DDL. Then the fault:
``capture`` killed with SIGKILL at random moments, nats-server restarted, PostgreSQL restarted,
a node of a three-node JetStream cluster killed. The random seed is in every failure message.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time

import nats as natslib
import psycopg
import pytest
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

from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.nats import LocalNatsCluster

pytestmark = pytest.mark.integration

SETUP = (
    "CREATE TABLE a (id int PRIMARY KEY, v text, n int)",
    "CREATE TABLE b (id int PRIMARY KEY, v text)",
    "ALTER TABLE b REPLICA IDENTITY FULL",
    "CREATE TABLE c (id bigserial PRIMARY KEY, payload text)",
    "CREATE TABLE done (id int)",
)


class Workload:
    """Concurrent random transactions for ``seconds``; survives a server restart."""

    def __init__(self, dsn: str, seed: int, seconds: float, clients: int = 3) -> None:
        self.dsn = dsn
        self.seed = seed
        self.deadline = time.monotonic() + seconds
        self.clients = clients
        self.commits = 0
        self.failed = 0

    async def run(self) -> None:
        await run_sql(self.dsn, *SETUP)
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))
        await self._retrying(lambda conn: conn.execute("INSERT INTO done VALUES (1)"))

    async def _retrying(self, action: object) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                    await action(c)  # type: ignore[operator]
                    return
            except psycopg.OperationalError:
                await asyncio.sleep(0.2)

    async def _client(self, client: int) -> None:
        rng = random.Random(self.seed * 31 + client)
        while time.monotonic() < self.deadline:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
                    while time.monotonic() < self.deadline:
                        await self._transaction(conn, rng, client)
                        await asyncio.sleep(rng.uniform(0, 0.01))
            except psycopg.OperationalError:
                self.failed += 1  # the server went away: the open transaction did not commit
                await asyncio.sleep(0.2)

    async def _transaction(
        self, conn: psycopg.AsyncConnection[object], rng: random.Random, client: int
    ) -> None:
        base = client * 100_000
        kind = rng.random()
        async with conn.transaction():
            if kind < 0.70:
                for _ in range(rng.randint(1, 5)):
                    await self._row_change(conn, rng, base)
            elif kind < 0.76:
                n = rng.randint(200, 3000)
                await conn.execute(
                    "INSERT INTO c (payload) SELECT md5(g::text) FROM generate_series(1, %s) g",
                    (n,),
                )
            elif kind < 0.85:
                await conn.execute("TRUNCATE c")
            elif kind < 0.90 and client == 0:
                column = f"x{rng.randrange(1_000_000)}"
                await conn.execute(f"ALTER TABLE a ADD COLUMN {column} int DEFAULT 7")
                await conn.execute(f"ALTER TABLE a DROP COLUMN {column}")
            else:
                await conn.execute(
                    "INSERT INTO b VALUES (%s, repeat(md5(random()::text), 400)) "
                    "ON CONFLICT (id) DO UPDATE SET v = excluded.v",
                    (base + rng.randrange(50),),
                )
        self.commits += 1

    async def _row_change(
        self, conn: psycopg.AsyncConnection[object], rng: random.Random, base: int
    ) -> None:
        key = base + rng.randrange(300)
        op = rng.random()
        if op < 0.5:
            await conn.execute(
                "INSERT INTO a VALUES (%s, md5(random()::text), %s) "
                "ON CONFLICT (id) DO UPDATE SET n = a.n + 1",
                (key, rng.randrange(1000)),
            )
        elif op < 0.8:
            await conn.execute("UPDATE b SET v = v || 'u' WHERE id = %s", (base + key % 50,))
            await conn.execute("UPDATE a SET v = NULL, n = n * 2 WHERE id = %s", (key,))
        else:
            await conn.execute("DELETE FROM a WHERE id = %s", (key,))
            await conn.execute("DELETE FROM b WHERE id = %s", (base + key % 50,))


async def start_capture(dsn: str, url: str, name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "capture", "--dsn", dsn, "--nats", url,
        "--source", name, "--lock-wait", "20", "--log-format", "text",
        "--set", f"sources.{name}.lock.ttl=1",
        "--set", f"sources.{name}.status_interval=0.2",
        "--set", f"sources.{name}.batch.max_records=200",
        "--set", f"sources.{name}.batch.max_bytes=64KiB",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def until_capturing(proc: asyncio.subprocess.Process, log: list[str]) -> asyncio.Task[None]:
    """Read the process's log until it says it is capturing; the task returned reads the rest."""
    assert proc.stderr is not None
    stderr = proc.stderr
    mine: list[str] = []

    async def lines() -> None:
        while line := await stderr.readline():
            log.append(line.decode())

    async with asyncio.timeout(30):
        while not any("capturing source" in line for line in mine):
            line = await stderr.readline()
            if not line:
                raise AssertionError("capture exited early:\n" + "".join(mine))
            mine.append(line.decode())
    log.extend(mine)
    return asyncio.create_task(lines())


async def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    dsn: str, nats: LocalNats
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"kill{seed}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    workload = Workload(dsn, seed, seconds=10)
    load = asyncio.create_task(workload.run())
    log: list[str] = []
    readers: list[asyncio.Task[None]] = []
    kills = 0
    while not load.done() or kills < 6:
        proc = await start_capture(dsn, nats.url, name)
        readers.append(await until_capturing(proc, log))
        await asyncio.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
    await load
    proc = await start_capture(dsn, nats.url, name)
    try:
        readers.append(await until_capturing(proc, log))
        expected = await reference(dsn, source)
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await asyncio.wait_for(asyncio.gather(*readers), 10)
    stored = await stream_records(nats.url, source.stream_name)
    resumed_mid_way = sum("already in the stream" in line for line in log)
    assert workload.commits > 100, f"seed {seed}"
    assert resumed_mid_way >= 1, f"seed {seed}: no kill came between a store and its confirm"
    assert_same_log(stored, expected)


async def test_nats_server_restart_and_kill_lose_and_double_nothing(dsn: str) -> None:
    seed = random.randrange(1 << 30)
    server = LocalNats()
    server.start()
    try:
        config = make_config(dsn, server.url, "natsrestart")
        source = config.source("natsrestart")
        await prepare_slots(dsn, source)
        workload = Workload(dsn, seed, seconds=7)
        async with capturing(config, "natsrestart"):
            load = asyncio.create_task(workload.run())
            await asyncio.sleep(2)
            await asyncio.to_thread(server.restart)  # SIGTERM
            await asyncio.sleep(2)
            await asyncio.to_thread(server.restart, signal.SIGKILL)
            await load
            expected = await reference(dsn, source)
            await wait_for_stream(server.url, source.stream_name, expected[-1])
        assert_same_log(await stream_records(server.url, source.stream_name), expected)
    finally:
        server.destroy()


async def test_postgres_restarts_lose_and_double_nothing(nats: LocalNats) -> None:
    seed = random.randrange(1 << 30)
    cluster = LocalPostgres.create()
    try:
        await asyncio.to_thread(cluster.start)
        await run_sql(cluster.dsn(), "CREATE DATABASE app")
        dsn = cluster.dsn("app")
        config = make_config(dsn, nats.url, "pgrestart")
        source = config.source("pgrestart")
        await prepare_slots(dsn, source)
        workload = Workload(dsn, seed, seconds=8)
        async with capturing(config, "pgrestart"):
            load = asyncio.create_task(workload.run())
            await asyncio.sleep(2)
            await asyncio.to_thread(cluster.restart)  # fast shutdown
            await asyncio.sleep(2)
            await asyncio.to_thread(cluster.kill)  # immediate shutdown: crash recovery
            await asyncio.to_thread(cluster.start)
            await load
            expected = await reference(dsn, source)
            await wait_for_stream(nats.url, source.stream_name, expected[-1])
        assert workload.failed > 0, f"seed {seed}: the restarts did not interrupt the workload"
        assert_same_log(await stream_records(nats.url, source.stream_name), expected)
    finally:
        await asyncio.to_thread(cluster.destroy)


async def wait_for_jetstream(urls: list[str]) -> None:
    nc = await natslib.connect(urls)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(natslib.errors.Error):
                    await nc.jetstream().account_info()
                    return
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def stream_leader(urls: list[str], stream: str) -> str:
    nc = await natslib.connect(urls)
    try:
        async with asyncio.timeout(20):
            while True:
                info = await nc.jetstream().stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def test_r3_stream_loses_nothing_when_its_leader_is_killed(dsn: str) -> None:
    seed = random.randrange(1 << 30)
    cluster = LocalNatsCluster(3)
    await asyncio.to_thread(cluster.start)
    try:
        urls = cluster.urls
        await wait_for_jetstream(urls)
        config = make_config(dsn, urls, "r3", stream={"replicas": 3})
        source = config.source("r3")
        await prepare_slots(dsn, source)
        workload = Workload(dsn, seed, seconds=6)
        async with capturing(config, "r3"):
            load = asyncio.create_task(workload.run())
            await asyncio.sleep(2.5)
            leader = await stream_leader(urls, source.stream_name)
            victim = next(n for n in cluster.nodes if f"n{cluster.nodes.index(n) + 1}" == leader)
            await asyncio.to_thread(victim.kill)
            await load
            expected = await reference(dsn, source)
            await wait_for_stream(cluster.urls, source.stream_name, expected[-1])
        assert_same_log(await stream_records(cluster.urls, source.stream_name), expected)
    finally:
        await asyncio.to_thread(cluster.destroy)
