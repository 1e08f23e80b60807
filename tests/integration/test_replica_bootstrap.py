"""Bootstrapping a replica: the recorded position is exactly where the replica's data was cut.

Each test runs a workload of one-row transactions (``INSERT INTO t VALUES (i)``, plus an update
of ``items``) while the copy is made, so that transactions commit right around the cut. The
replica then holds ids 1..k, and the stream must say the same thing: the transactions whose
commit LSN is at or below the position are exactly those of ids 1..k, and the first one after it
is id k+1. ``replicate`` then brings the replica level with the source, DDL included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from log_helpers import capturing, make_config, run_sql, stream_records, wait_for_slot

from pgcapture.config import Config, SourceConfig
from pgcapture.errors import ConfigError, PermissionDenied
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.lsn import LSN
from pgcapture.proto import pb
from pgcapture.replica.bootstrap import BootstrapError, bootstrap_physical, bootstrap_snapshot
from pgcapture.replica.service import replicate
from pgcapture.replica.store import Position, read_position

pytestmark = pytest.mark.integration
_sources = itertools.count(1)

SCHEMA = (
    "CREATE TABLE t (id int PRIMARY KEY)",
    "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, note text)",
    "INSERT INTO items SELECT g, 0, 'item ' || g FROM generate_series(1, 50) g",
)

# Changes after the cut that the replica gets from the stream only: DDL and a row that uses it.
AFTER = (
    "ALTER TABLE items ADD COLUMN extra int DEFAULT 7",
    "INSERT INTO items (id, n, note, extra) VALUES (1000, 1, 'after', 8)",
)


def source_name() -> str:
    return f"boot{next(_sources)}"


class Workload:
    """Transaction i inserts id i into t and bumps one row of items, one commit each."""

    def __init__(self, dsn: str, limit: int = 50_000) -> None:
        self.dsn = dsn
        self.limit = limit
        self.count = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            while not self._stop.is_set() and self.count < self.limit:
                i = self.count + 1
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (%s)", (i,))
                    await conn.execute("UPDATE items SET n = n + 1 WHERE id = %s", (i % 50 + 1,))
                self.count = i

    async def reached(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while self.count < count:
                assert self._task is not None
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"the workload ended at {self.count}, before {count}")
                await asyncio.sleep(0.01)

    async def stop(self) -> int:
        """Stop after the current transaction; returns the last id committed."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        return self.count


@contextlib.asynccontextmanager
async def workload(dsn: str) -> AsyncIterator[Workload]:
    work = Workload(dsn)
    work.start()
    try:
        yield work
    finally:
        await work.stop()


def _int4(field: pb.Field) -> int:
    kind = field.WhichOneof("value")
    if kind == "binary":
        return int.from_bytes(field.binary, "big", signed=True)
    return int(field.text)


async def stream_inserts(url: str, stream: str, last: int, timeout: float = 60) -> dict[int, int]:
    """id -> commit LSN of the transaction that inserted it into t, once the stream holds ids
    1..``last``."""
    async with asyncio.timeout(timeout):
        while True:
            inserts: dict[int, int] = {}
            with contextlib.suppress(Exception):
                for record in await stream_records(url, stream):
                    message = pb.Message.FromString(record.message)
                    if message.WhichOneof("type") != "change" or message.change.table != "t":
                        continue
                    (field,) = (f for f in message.change.new if f.name == "id")
                    inserts[_int4(field)] = record.lsn
            if last in inserts:
                assert set(inserts) == set(range(1, last + 1)), "the stream misses transactions"
                return inserts
            await asyncio.sleep(0.2)


async def replica_ids(dsn: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id FROM t ORDER BY id")
        return [row[0] for row in await cur.fetchall()]


def assert_exact(position: Position, ids: list[int], inserts: dict[int, int], last: int) -> int:
    """The replica's ids are 1..k, exactly the transactions at or below the position; the
    stream's first transaction after the position is k+1. Returns k."""
    k = len(ids)
    assert ids == list(range(1, k + 1)), "the copy is not a prefix of the source's history"
    assert 0 < k < last, f"the cut ({k}) is not inside the workload (1..{last})"
    assert {i for i, lsn in inserts.items() if lsn <= position.lsn} == set(range(1, k + 1))
    first_after = min((lsn, i) for i, lsn in inserts.items() if lsn > position.lsn)
    assert first_after[1] == k + 1
    return k


async def table_rows(dsn: str) -> dict[str, list[str]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname "
            "NOT IN ('pg_catalog', 'information_schema', 'pgcapture') ORDER BY 1"
        )
        tables = [row[0] for row in await cur.fetchall()]
        out = {}
        for table in tables:
            cur = await conn.execute(f"SELECT r::text FROM {table} r ORDER BY 1")
            out[table] = [row[0] for row in await cur.fetchall()]
        return out


async def assert_converges(
    config: Config, source: SourceConfig, replica_dsn: str, timeout: float = 60
) -> None:
    """``replicate`` from the bootstrapped position makes every table equal to the source's."""
    expected = await table_rows(source.dsn)
    assert expected, "nothing to compare"
    stop = asyncio.Event()
    task = asyncio.create_task(replicate(config, source, replica_dsn, stop))
    try:
        async with asyncio.timeout(timeout):
            while (got := await table_rows(replica_dsn)) != expected:
                if task.done():
                    task.result()
                    raise AssertionError("replicate ended before the replica converged")
                await asyncio.sleep(0.2)
    except TimeoutError:
        diff = {k for k in expected if got.get(k) != expected[k]}
        raise AssertionError(f"the replica did not converge; tables differing: {diff}") from None
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert got == expected


# ---------------------------------------------------------------------------------------------
# From a physical copy


@pytest.fixture
def clusters() -> Iterator[list[LocalPostgres]]:
    """Clusters made by a test; all destroyed afterwards."""
    made: list[LocalPostgres] = []
    try:
        yield made
    finally:
        for cluster in reversed(made):
            cluster.destroy()


async def new_primary(
    clusters: list[LocalPostgres], own_system_identifier: bool = False
) -> tuple[LocalPostgres, str]:
    primary = LocalPostgres.create(own_system_identifier=own_system_identifier)
    clusters.append(primary)
    await asyncio.to_thread(primary.start)
    await run_sql(primary.dsn(), "CREATE DATABASE app")
    dsn = primary.dsn("app")
    await run_sql(dsn, *SCHEMA)
    return primary, dsn


async def make_standby(
    clusters: list[LocalPostgres], primary: LocalPostgres, start: bool = True
) -> LocalPostgres:
    standby = await asyncio.to_thread(LocalPostgres.standby_of, primary)
    clusters.append(standby)
    if start:
        await asyncio.to_thread(standby.start)
    return standby


async def test_physical_copy_promoted_under_load(
    clusters: list[LocalPostgres], pg: LocalPostgres, nats: LocalNats
) -> None:
    # A cluster of its own initdb: the session's clusters share the template's identifier.
    primary, dsn = await new_primary(clusters, own_system_identifier=True)
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    async with capturing(config, name):
        await wait_for_slot(dsn, source.slot_name)
        async with workload(dsn) as work:
            await work.reached(100)
            standby = await make_standby(clusters, primary)
            replica = standby.dsn("app")
            with pytest.raises(BootstrapError, match=r"still in recovery.*pg_promote\(\)"):
                await bootstrap_physical(replica, name)
            await work.reached(work.count + 200)  # the standby streams meanwhile
            await asyncio.to_thread(standby.promote)
            await work.reached(work.count + 100)
            last = await work.stop()
        await run_sql(dsn, *AFTER)
        inserts = await stream_inserts(nats.url, source.stream_name, last)
    position = await bootstrap_physical(replica, name, source_dsn=dsn)
    switch = LSN(position.lsn + 1)
    assert position.origin == f"physical copy, timeline 2 switch point {switch}"
    assert_exact(position, await replica_ids(replica), inserts, last)

    # Once recorded, a position is only replaced on purpose.
    with pytest.raises(ConfigError, match="already has a position"):
        await bootstrap_physical(replica, name)
    assert (await bootstrap_physical(replica, name, replace=True)).lsn == position.lsn

    # A copy checked against another cluster or another database, and a role that cannot
    # read pg_wal.
    with pytest.raises(BootstrapError, match="not a physical copy of the source"):
        await bootstrap_physical(replica, source_name(), source_dsn=pg.dsn())
    with pytest.raises(BootstrapError, match="is not the copy of source database 'postgres'"):
        await bootstrap_physical(replica, source_name(), source_dsn=primary.dsn())
    await run_sql(replica, "CREATE ROLE reader LOGIN")
    with pytest.raises(PermissionDenied, match="GRANT pg_read_server_files TO"):
        await bootstrap_physical(standby.dsn("app", user="reader"), source_name())

    await assert_converges(config, source, replica)


async def test_physical_copy_stopped_right_before_a_commit(
    clusters: list[LocalPostgres], nats: LocalNats
) -> None:
    """A copy whose recovery stopped exactly at the start of a transaction's commit record
    (recovery_target_lsn, not inclusive): its switch point S is that commit's LSN. The
    transaction is not in the copy and must come from the stream; the one before it is in the
    copy. Position S - 1 says exactly that (S would skip the transaction)."""
    primary, dsn = await new_primary(clusters)
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    async with capturing(config, name):
        await wait_for_slot(dsn, source.slot_name)
        async with workload(dsn) as work:
            await work.reached(100)
            standby = await make_standby(clusters, primary, start=False)
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
                row = await cur.fetchone()
                assert row is not None
                after_backup = LSN.parse(row[0])
            await work.reached(work.count + 300)
            last = await work.stop()
        await run_sql(dsn, *AFTER)
        inserts = await stream_inserts(nats.url, source.stream_name, last)
    # A commit record that does not start a WAL page: the record before it ends where it starts.
    candidates = sorted(
        (lsn, i) for i, lsn in inserts.items() if lsn > after_backup and lsn % 8192 > 64
    )
    target, target_id = candidates[len(candidates) // 2]
    standby.add_settings(
        {
            "recovery_target_lsn": str(LSN(target)),
            "recovery_target_inclusive": "off",
            "recovery_target_action": "promote",
        }
    )
    await asyncio.to_thread(standby.start)
    replica = standby.dsn("app")
    async with asyncio.timeout(60):
        while True:
            async with await psycopg.AsyncConnection.connect(replica) as conn:
                cur = await conn.execute("SELECT pg_is_in_recovery()")
                row = await cur.fetchone()
            if row is not None and not row[0]:
                break
            await asyncio.sleep(0.05)

    position = await bootstrap_physical(replica, name, source_dsn=dsn)
    assert position.lsn == target - 1
    ids = await replica_ids(replica)
    assert ids == list(range(1, target_id))
    assert_exact(position, ids, inserts, last)
    await assert_converges(config, source, replica)


async def test_physical_refuses_a_cluster_that_never_left_timeline_1(dsn: str) -> None:
    with pytest.raises(BootstrapError, match=r"timeline 1.*pg_ctl promote"):
        await bootstrap_physical(dsn, source_name())


# ---------------------------------------------------------------------------------------------
# From a snapshot into an empty database


@pytest.fixture
def replica_db(pg: LocalPostgres, dbname: str) -> Iterator[str]:
    """An empty database on the session cluster for the replica."""
    name = f"{dbname}_replica"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_snapshot_under_load(dsn: str, replica_db: str, nats: LocalNats) -> None:
    await run_sql(dsn, *SCHEMA)
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    async with capturing(config, name):
        await wait_for_slot(dsn, source.slot_name)
        async with workload(dsn) as work:
            await work.reached(200)
            position = await bootstrap_snapshot(source, replica_db)
            await work.reached(work.count + 200)
            last = await work.stop()
        await run_sql(dsn, *AFTER)
        inserts = await stream_inserts(nats.url, source.stream_name, last)
    assert position.origin == f"snapshot at {LSN(position.lsn + 1)}"
    assert_exact(position, await replica_ids(replica_db), inserts, last)
    async with await psycopg.AsyncConnection.connect(replica_db) as conn:
        assert await read_position(conn, name) == position
        # pgcapture's own objects stay on the source: no DDL capture, no publication.
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pg_event_trigger), (SELECT count(*) FROM "
            "pg_publication), to_regclass('pgcapture.ddl_logs') IS NULL"
        )
        assert await cur.fetchone() == (0, 0, True)
        # The temporary slot went away with the bootstrap.
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgcapture_bootstrap%'"
        )
        assert await cur.fetchone() == (0,)
    await assert_converges(config, source, replica_db)


async def test_snapshot_refuses_without_a_consistent_capture_slot(
    dsn: str, replica_db: str, nats: LocalNats
) -> None:
    await run_sql(dsn, *SCHEMA)
    name = source_name()
    source = make_config(dsn, nats.url, name).source(name)
    with pytest.raises(BootstrapError, match=f"start `pgcapture capture --source {name}` first"):
        await bootstrap_snapshot(source, replica_db)
    async with await psycopg.AsyncConnection.connect(replica_db) as conn:
        cur = await conn.execute("SELECT to_regclass('public.t')")
        assert await cur.fetchone() == (None,)


async def test_snapshot_refuses_a_database_that_is_not_empty(
    dsn: str, replica_db: str, nats: LocalNats
) -> None:
    await run_sql(replica_db, "CREATE TABLE local_data (x int)")
    name = source_name()
    source = make_config(dsn, nats.url, name).source(name)
    with pytest.raises(BootstrapError, match=r"is not empty \(it holds public.local_data\)"):
        await bootstrap_snapshot(source, replica_db)


async def test_snapshot_reports_a_failing_pg_dump(
    pg: LocalPostgres, dsn: str, dbname: str, replica_db: str, nats: LocalNats
) -> None:
    """A source role that may replicate but not read the tables: pg_dump's own message comes
    out, the replica gets nothing and no temporary slot is left behind."""
    role = f"dumper_{dbname}"
    await run_sql(dsn, *SCHEMA, f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        name = source_name()
        config = make_config(dsn, nats.url, name)
        async with capturing(config, name):
            await wait_for_slot(dsn, config.source(name).slot_name)
        source = make_config(pg.dsn(dbname, user=role), nats.url, name).source(name)
        with pytest.raises(
            BootstrapError, match=r"pg_dump of the source failed.*permission denied"
        ):
            await bootstrap_snapshot(source, replica_db)
        async with await psycopg.AsyncConnection.connect(replica_db) as conn:
            cur = await conn.execute(
                "SELECT to_regclass('public.t'), to_regclass('pgcapture.sources')"
            )
            assert await cur.fetchone() == (None, None)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_replication_slots "
                "WHERE slot_name LIKE 'pgcapture_bootstrap%'"
            )
            assert await cur.fetchone() == (0,)
    finally:
        await run_sql(dsn, f"DROP ROLE {role}")


# ---------------------------------------------------------------------------------------------
# The command


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGCAPTURE_")}
    return subprocess.run(
        [sys.executable, "-m", "pgcapture", "bootstrap", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PGCAPTURE_LOG__LEVEL": "warning"},
    )


def test_cli_snapshot_then_replace_and_errors(dsn: str, replica_db: str) -> None:
    name = source_name()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"s_{name}",))
    args = ["--source", name, "--dsn", replica_db, "--source-dsn", dsn, "--slot", f"s_{name}"]
    try:
        done = run_cli(*args, "--from", "snapshot")
        assert done.returncode == 0, done.stderr
        assert f"source {name}: the replica holds every transaction committed at or" in done.stdout

        # --replace drops and recreates the dump's objects, in one transaction: a replica-only
        # view on t makes that fail, and nothing changes.
        with psycopg.connect(replica_db, autocommit=True) as conn:
            conn.execute("CREATE VIEW local_view AS SELECT id FROM t")
        failed = run_cli(*args, "--from", "snapshot", "--replace")
        assert failed.returncode == 2
        assert "pg_restore into the replica failed (exit status 1)" in failed.stderr
        assert "other objects depend on it" in failed.stderr
        assert "nothing was committed on the replica" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        with psycopg.connect(replica_db, autocommit=True) as conn:
            conn.execute("DROP VIEW local_view")
        replaced = run_cli(*args, "--from", "snapshot", "--replace")
        assert replaced.returncode == 0, replaced.stderr
        with psycopg.connect(replica_db) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (50,)

        unknown = run_cli("--source", name, "--dsn", replica_db, "--from", "snapshot")
        assert unknown.returncode == 2
        assert "--from snapshot needs the source database" in unknown.stderr
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (f"s_{name}",))
