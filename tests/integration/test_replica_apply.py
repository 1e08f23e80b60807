"""`replicate` against a real source, stream and replica: every row shape, DDL, restarts, errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from log_helpers import capturing, current_lsn, http_get, make_config, poll, run_sql, wait_for_slot

from pgcapture.config import Config
from pgcapture.errors import ConfigError
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.replica.ddl import DdlNotReplayable
from pgcapture.replica.pipeline import ApplyFailed
from pgcapture.replica.plans import SchemaMismatch
from pgcapture.replica.service import replicate, serve_replicate
from pgcapture.replica.store import ReplicaBusy, read_position, set_position

pytestmark = pytest.mark.integration
_names = itertools.count(1)

SCHEMA = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE pair AS (m mood, n int)",
    "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, big text, m mood, "
    "ms mood[], p pair, tags text[], doc jsonb, at timestamptz)",
    'CREATE TABLE "Mixed Case" ("Id" int PRIMARY KEY, "Val" text)',
    "CREATE TABLE nokey (a int, b text, j json)",
    "ALTER TABLE nokey REPLICA IDENTITY FULL",
    "CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int, "
    "g int GENERATED ALWAYS AS (v * 2) STORED)",
    "CREATE TABLE parts (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k)",
    "CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM (0) TO (100)",
    "CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM (100) TO (200)",
    "CREATE TABLE uniq (id int PRIMARY KEY, email text UNIQUE)",
    "CREATE TABLE done (id int PRIMARY KEY)",
)

WORKLOAD = (
    "INSERT INTO items SELECT g, 'n' || g, g * 1.5, NULL, 'ok', '{sad,happy}', "
    "ROW('happy', g)::pair, '{a,NULL}', jsonb_build_object('g', g), now() "
    "FROM generate_series(1, 1500) g",
    "UPDATE items SET price = price + 1 WHERE id % 7 = 0",
    "UPDATE items SET big = repeat('x', 100000) WHERE id < 4",
    "UPDATE items SET price = 0 WHERE id < 4",  # big stays: an unchanged TOAST value
    "UPDATE items SET id = id + 10000 WHERE id % 13 = 0",
    "DELETE FROM items WHERE id % 11 = 0",
    "INSERT INTO \"Mixed Case\" VALUES (1, 'a'), (2, 'b'), (3, NULL)",
    'UPDATE "Mixed Case" SET "Val" = \'c\' WHERE "Id" = 1',
    "INSERT INTO nokey VALUES (1, 'a', '{}'), (1, 'a', '{}'), (2, NULL, NULL), (3, 'c', '[1]')",
    "UPDATE nokey SET b = 'z' WHERE ctid = (SELECT min(ctid) FROM nokey WHERE a = 1)",
    "DELETE FROM nokey WHERE b IS NULL",
    "INSERT INTO ident (v) SELECT g FROM generate_series(1, 50) g",
    "UPDATE ident SET v = v + 1 WHERE id < 10",
    "INSERT INTO parts SELECT g, g % 200, 'v' FROM generate_series(1, 400) g",
    "UPDATE parts SET k = k + 100 WHERE k < 50 AND id < 100",
    "INSERT INTO uniq VALUES (1, 'a'), (2, 'b')",
    "BEGIN; UPDATE uniq SET email = 'c' WHERE id = 1; UPDATE uniq SET email = 'a' WHERE id = 2;"
    " COMMIT",
    "ALTER TABLE items ADD COLUMN extra int DEFAULT 7",
    "ALTER TYPE mood ADD VALUE 'ecstatic'",
    "INSERT INTO items (id, name, m, ms) VALUES (50000, 'new', 'ecstatic', '{ecstatic}')",
    "ALTER TABLE items RENAME COLUMN name TO title",
    "ALTER TABLE items ALTER COLUMN extra TYPE bigint",
    "UPDATE items SET extra = 1 WHERE id < 100",
    "CREATE SCHEMA app",
    "SET search_path = app, public; CREATE TABLE inapp (id int PRIMARY KEY, t text)",
    "INSERT INTO app.inapp VALUES (1, 'x')",
    "CREATE TABLE ctas AS SELECT id, title, random() AS r FROM items WHERE id < 50",
    "CREATE INDEX CONCURRENTLY items_title ON items (title)",
    "BEGIN; INSERT INTO items (id) VALUES (60000); ALTER TABLE items DROP COLUMN big; "
    "UPDATE items SET price = 5 WHERE id = 60000; COMMIT",
    'TRUNCATE "Mixed Case", parts',
    "INSERT INTO parts VALUES (1, 150, 'after truncate')",
    "CREATE MATERIALIZED VIEW mv AS SELECT count(*) AS n FROM items",
    "INSERT INTO items (id) VALUES (70000)",
    "REFRESH MATERIALIZED VIEW mv",
    "INSERT INTO done VALUES (1)",
)


@pytest.fixture
def replica(pg: LocalPostgres) -> Iterator[str]:
    name = f"r{next(_names)}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def _start_position(source: str, replica: str) -> None:
    async with await psycopg.AsyncConnection.connect(replica, autocommit=True) as conn:
        await set_position(conn, "app", await current_lsn(source), "test")


@contextlib.asynccontextmanager
async def replicating(
    config: Config, replica: str, **kw: object
) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(replicate(config, config.source("app"), replica, stop, **kw))  # type: ignore[arg-type]
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def _wait_for(
    replica: str, table: str, count: int, task: asyncio.Task[None], timeout: float = 60
) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if task.done():
                task.result()
                raise AssertionError("replicate stopped")
            async with await psycopg.AsyncConnection.connect(replica) as conn:
                cur = await conn.execute(f"SELECT count(*) FROM {table}")  # type: ignore[arg-type]
                row = await cur.fetchone()
            if row and row[0] >= count:
                return
            await asyncio.sleep(0.1)


async def _tables(dsn: str) -> dict[str, list[str]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcapture') "
            "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1"
        )
        names = [r[0] for r in await cur.fetchall()]
        out = {}
        for name in names:
            cur = await conn.execute(f"SELECT t::text FROM {name} AS t")  # type: ignore[arg-type]
            out[name] = sorted(r[0] for r in await cur.fetchall())
        return out


async def assert_converged(source: str, replica: str) -> None:
    src, rep = await _tables(source), await _tables(replica)
    assert list(src) == list(rep)
    for name in src:
        assert src[name] == rep[name], f"table {name} differs"


async def test_every_row_shape_and_ddl_converge(dsn: str, replica: str, nats: LocalNats) -> None:
    await run_sql(dsn, *SCHEMA)
    # other OIDs on the replica for the user-defined types
    await run_sql(replica, "CREATE TYPE filler AS ENUM ('x')", "CREATE TYPE filler2 AS (a int)")
    await run_sql(replica, *SCHEMA)
    config = make_config(dsn, nats.url, "app")
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        async with replicating(config, replica) as task:
            for statement in WORKLOAD:
                await run_sql(dsn, statement)
            await _wait_for(replica, "done", 1, task)
    await assert_converged(dsn, replica)
    async with await psycopg.AsyncConnection.connect(replica) as conn:
        cur = await conn.execute("SELECT 'mood'::regtype::oid")
        rep_oid = (await cur.fetchone() or [0])[0]
        cur = await conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indisvalid")
        assert "items_title" in {r[0] for r in await cur.fetchall()}
        position = await read_position(conn, "app")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT 'mood'::regtype::oid")
        assert (await cur.fetchone() or [0])[0] != rep_oid
    assert position is not None
    assert position.commit_time is not None


async def test_restarts_apply_every_transaction_once(
    dsn: str, replica: str, nats: LocalNats
) -> None:
    schema = ("CREATE TABLE log (n int, t text)", "ALTER TABLE log REPLICA IDENTITY FULL",
              "CREATE TABLE done (id int PRIMARY KEY)")  # fmt: skip
    await run_sql(dsn, *schema)
    await run_sql(replica, *schema)
    config = make_config(dsn, nats.url, "app")
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        for round_ in range(4):
            async with replicating(config, replica) as task:
                for i in range(50):
                    await run_sql(dsn, f"INSERT INTO log VALUES ({round_ * 100 + i}, 'x')")
                await run_sql(dsn, f"INSERT INTO done VALUES ({round_})")
                await _wait_for(replica, "done", round_ + 1, task)
            # changes made while replicate is down are applied by the next one
            await run_sql(dsn, f"UPDATE log SET t = 'y{round_}' WHERE n % 3 = 0")
        async with replicating(config, replica) as task:
            await run_sql(dsn, "INSERT INTO done VALUES (99)")
            await _wait_for(replica, "done", 5, task)
    await assert_converged(dsn, replica)


async def test_errors_name_the_problem(dsn: str, replica: str, nats: LocalNats) -> None:
    await run_sql(
        dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)", "CREATE TABLE missing (a int)"
    )
    await run_sql(replica, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    config = make_config(dsn, nats.url, "app", replica={"lock_wait": 0})
    stop = asyncio.Event()
    with pytest.raises(ConfigError, match=r"no position for source 'app'.*bootstrap"):
        await replicate(config, config.source("app"), replica, stop)
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        async with await psycopg.AsyncConnection.connect(replica, autocommit=True) as conn:
            await set_position(conn, "app", await current_lsn(dsn), "test", replace=True)
            await conn.execute("SELECT pg_advisory_lock(1885823841, 1)")
            with pytest.raises(ReplicaBusy, match="another pgcapture replicate"):
                await replicate(config, config.source("app"), replica, stop)
        await run_sql(dsn, "INSERT INTO missing VALUES (1)")
        with pytest.raises(SchemaMismatch, match=r"public\.missing .*not exist on the replica"):
            await asyncio.wait_for(replicate(config, config.source("app"), replica, stop), 30)
        await run_sql(replica, "CREATE TABLE missing (a int)")
        await run_sql(dsn, "INSERT INTO t VALUES (1, 'a')", "UPDATE t SET v = 'b' WHERE id = 1")
        await run_sql(
            replica, "SET session_replication_role = replica; INSERT INTO t VALUES (1, 'a')"
        )
        # the row is already there: the insert of the same key fails, nothing is applied
        with pytest.raises(ApplyFailed, match="duplicate key"):
            await asyncio.wait_for(replicate(config, config.source("app"), replica, stop), 30)
        await run_sql(replica, "DELETE FROM t")
        async with replicating(config, replica) as task:
            await _wait_for(replica, "t", 1, task)  # the insert and update of row 1, now
            await run_sql(
                replica, "SET session_replication_role = replica; DELETE FROM t WHERE id = 1"
            )
            await run_sql(dsn, "UPDATE t SET v = 'z' WHERE id = 1")
            with pytest.raises(ApplyFailed, match="changed 0 rows on the replica instead of 1"):
                await asyncio.wait_for(task, 30)


async def test_inexact_ddl_stops_until_skipped(dsn: str, replica: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE done (id int PRIMARY KEY)")
    await run_sql(replica, "CREATE TABLE done (id int PRIMARY KEY)")
    config = make_config(dsn, nats.url, "app")
    stop = asyncio.Event()
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        # two LANGUAGE sql functions named mk: the server's context does not say which ran
        await run_sql(
            dsn,
            "CREATE SCHEMA s1; CREATE SCHEMA s2",
            "CREATE FUNCTION s1.mk() RETURNS void LANGUAGE sql AS $$ CREATE TABLE made (a int) $$",
            "CREATE FUNCTION s2.mk() RETURNS void LANGUAGE sql AS $$ CREATE TABLE other (a int) $$",
            "SELECT s1.mk()",
        )
        with pytest.raises(DdlNotReplayable, match=r"--skip-ddl \d+") as err:
            await asyncio.wait_for(replicate(config, config.source("app"), replica, stop), 30)
        ident = int(str(err.value).rsplit(" ", 1)[1])
        await run_sql(replica, "CREATE TABLE made (a int)")  # its rows come in the stream
        await run_sql(dsn, "INSERT INTO made VALUES (2)", "INSERT INTO done VALUES (1)")
        from pgcapture.replica.apply import ApplySettings

        async with replicating(
            config, replica, settings=ApplySettings(skip_ddl=frozenset({ident}))
        ) as task:
            await _wait_for(replica, "done", 1, task)
    await assert_converged(dsn, replica)


async def _inexact_ddl_ids(dsn: str) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id FROM pgcapture.ddl_logs "
            "WHERE NOT coalesce((activity->>'exact')::bool, false)"
        )
        return {r[0] for r in await cur.fetchall()}


async def _ddl_ids(dsn: str, like: str) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id FROM pgcapture.ddl_logs WHERE query LIKE %s", [like])
        return {r[0] for r in await cur.fetchall()}


# two LANGUAGE sql functions named mk whose bodies differ at their CREATE TABLE statements: the
# server's context does not say which ran, so those rows are inexact (the ALTER is exact)
_MAKE_TABLES = (
    "CREATE SCHEMA s1; CREATE SCHEMA s2",
    "CREATE FUNCTION s1.mk() RETURNS void LANGUAGE sql AS $$ "
    "CREATE TABLE t (id int PRIMARY KEY, v varchar(20), n numeric(8, 2), at timestamptz, "
    "tags text[], big text, c char(3), b bit(3)); "
    "CREATE TABLE k (a int, b text); ALTER TABLE k REPLICA IDENTITY FULL; "
    "CREATE TABLE e (a int) $$",
    "CREATE FUNCTION s2.mk() RETURNS void LANGUAGE sql AS $$ "
    "CREATE TABLE x1 (a int); CREATE TABLE x2 (a int); CREATE TABLE x3 (a int); "
    "CREATE TABLE x4 (a int) $$",
    "SELECT s1.mk()",
    "INSERT INTO t SELECT g, 'v' || g, g * 1.25, '2020-01-02 03:04:05+00', '{a,NULL}', NULL, "
    "'ab', B'101' "
    "FROM generate_series(1, 30) g",
    "UPDATE t SET v = 'changed', big = repeat('x', 100000) WHERE id % 3 = 0",
    "UPDATE t SET n = 0 WHERE id % 3 = 0",  # big stays: an unchanged TOAST value
    "UPDATE t SET id = id + 100 WHERE id % 5 = 0",
    "DELETE FROM t WHERE id % 7 = 0",
    "INSERT INTO k VALUES (1, 'a'), (1, 'a'), (2, NULL), (3, 'c')",
    "UPDATE k SET b = 'z' WHERE ctid = (SELECT min(ctid) FROM k WHERE a = 1)",
    "DELETE FROM k WHERE b IS NULL",
)


async def test_missing_table_created_from_its_changes(
    dsn: str, replica: str, nats: LocalNats
) -> None:
    from pgcapture.replica.apply import ApplySettings

    await run_sql(dsn, "CREATE TABLE done (id int PRIMARY KEY)")
    await run_sql(replica, "CREATE TABLE done (id int PRIMARY KEY)")
    config = make_config(dsn, nats.url, "app")
    stop = asyncio.Event()
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        await run_sql(dsn, *_MAKE_TABLES)
        with pytest.raises(DdlNotReplayable, match=r"--skip-ddl \d+"):
            await asyncio.wait_for(replicate(config, config.source("app"), replica, stop), 30)
        skip = frozenset(await _inexact_ddl_ids(dsn))
        assert len(skip) == 3
        # an exact statement on a table the replica lacks: its message names the way on
        with pytest.raises(ApplyFailed, match=r"ALTER TABLE k .*--skip-ddl \d+") as failed:
            await asyncio.wait_for(
                replicate(
                    config, config.source("app"), replica, stop,
                    settings=ApplySettings(skip_ddl=skip),
                ),
                30,
            )  # fmt: skip
        skip |= {int(re.findall(r"--skip-ddl (\d+)", str(failed.value))[0])}
        # skipped, the table's rows stop replicate, naming the fix
        with pytest.raises(SchemaMismatch, match=r"public\.t .*--create-missing public\.t\b"):
            await asyncio.wait_for(
                replicate(
                    config, config.source("app"), replica, stop,
                    settings=ApplySettings(skip_ddl=skip),
                ),
                30,
            )  # fmt: skip
        await run_sql(dsn, "INSERT INTO done VALUES (1)")
        create = frozenset({("public", "t"), ("public", "k"), ("public", "e")})
        settings = ApplySettings(skip_ddl=skip, create_missing=create)
        async with replicating(config, replica, settings=settings) as task:
            await _wait_for(replica, "done", 1, task)
            await run_sql(dsn, "INSERT INTO t (id, v) VALUES (1000, 'later')", "UPDATE k SET a = 9")
            await run_sql(dsn, "INSERT INTO done VALUES (2)")
            await _wait_for(replica, "done", 2, task)
    await run_sql(dsn, "DROP TABLE e")  # never had a row: the replica has none to compare
    await assert_converged(dsn, replica)
    async with await psycopg.AsyncConnection.connect(replica) as conn:
        cur = await conn.execute(
            "SELECT a.attrelid::regclass::text, a.attname, format_type(a.atttypid, a.atttypmod) "
            "FROM pg_attribute a WHERE a.attrelid IN ('t'::regclass, 'k'::regclass) "
            "AND a.attnum > 0 ORDER BY 1, a.attnum"
        )
        assert [tuple(r) for r in await cur.fetchall()] == [
            ("k", "a", "integer"), ("k", "b", "text"),
            ("t", "id", "integer"), ("t", "v", "character varying"), ("t", "n", "numeric"),
            ("t", "at", "timestamp with time zone"), ("t", "tags", "text[]"), ("t", "big", "text"),
            ("t", "c", "bpchar"), ("t", "b", '"bit"'),
        ]  # fmt: skip
        cur = await conn.execute(
            "SELECT indrelid::regclass::text FROM pg_index WHERE indisprimary "
            "AND indrelid IN ('t'::regclass, 'k'::regclass)"
        )
        assert [r[0] for r in await cur.fetchall()] == ["t"]


async def test_missing_table_after_the_source_dropped_it(
    dsn: str, replica: str, nats: LocalNats
) -> None:
    from pgcapture.replica.apply import ApplySettings

    await run_sql(dsn, "CREATE TABLE done (id int PRIMARY KEY)")
    await run_sql(replica, "CREATE TABLE done (id int PRIMARY KEY)")
    config = make_config(dsn, nats.url, "app")
    stop = asyncio.Event()
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        await run_sql(
            dsn,
            "CREATE TYPE mood AS ENUM ('sad', 'ok')",
            "CREATE TABLE u (id int PRIMARY KEY, m mood)",  # skipped below, as if by hand
            "INSERT INTO u VALUES (1, 'ok')",
            *_MAKE_TABLES,
            "TRUNCATE e, k",  # e never had a row: nothing to truncate on the replica
            "DROP TABLE t, k, e",
            "INSERT INTO done VALUES (1)",
        )
        skip = frozenset(
            await _inexact_ddl_ids(dsn)
            | await _ddl_ids(dsn, "ALTER TABLE k %")
            | await _ddl_ids(dsn, "CREATE TABLE u %")
        )

        async def fails(settings: ApplySettings) -> str:
            with pytest.raises(SchemaMismatch) as err:
                await asyncio.wait_for(
                    replicate(config, config.source("app"), replica, stop, settings=settings), 30
                )
            return str(err.value)

        message = await fails(ApplySettings(skip_ddl=skip))
        assert "public.u receives changes but does not exist" in message
        assert "--create-missing public.u " in message
        create = frozenset({("public", "t"), ("public", "k"), ("public", "e"), ("public", "u")})
        settings = ApplySettings(skip_ddl=skip, create_missing=create)
        # a type of the source's own cannot be mapped from the stream
        message = await fails(settings)
        assert re.search(r"public\.u .*column 'm' has type OID \d+ .*by hand", message), message
        await run_sql(replica, "CREATE TABLE u (id int PRIMARY KEY, m mood)")
        # e never had a row: the DROP of the listed table goes on without it
        async with replicating(config, replica, settings=settings) as task:
            await _wait_for(replica, "done", 1, task)
    await assert_converged(dsn, replica)


async def test_metrics_and_health(dsn: str, replica: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE m (id int PRIMARY KEY)")
    await run_sql(replica, "CREATE TABLE m (id int PRIMARY KEY)")
    port = free_port()
    config = make_config(dsn, nats.url, "app", replica={"dsn": replica})
    config = config.model_copy(update={"metrics": config.metrics.model_copy(
        update={"listen": f"127.0.0.1:{port}", "slot_lag_interval": 0.2}
    )})  # fmt: skip
    stop = asyncio.Event()
    async with capturing(config, "app"):
        await wait_for_slot(dsn, config.source("app").slot_name)
        await _start_position(dsn, replica)
        task = asyncio.create_task(serve_replicate(config, config.source("app"), stop))
        try:
            for i in range(20):
                await run_sql(dsn, f"INSERT INTO m VALUES ({i})")
            await _wait_for(replica, "m", 20, task)

            async def caught_up() -> bool:
                body = (await http_get(port, "/metrics"))[1].decode()
                return 'pgcapture_replica_lag_bytes{source="app"} 0.0' in body

            await poll(caught_up)
            status, body = await http_get(port, "/healthz")
            assert status == 200
            assert json.loads(body)["state"] == "running"
            text = (await http_get(port, "/metrics"))[1].decode()
            samples = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("pgcapture")
            )
            assert float(samples['pgcapture_replica_transactions_total{source="app"}']) >= 20
            assert float(samples['pgcapture_replica_changes_total{source="app"}']) >= 20
            assert float(samples['pgcapture_replica_applied_lsn{source="app"}']) > 0
            assert float(samples['pgcapture_replica_lag_seconds{source="app"}']) == 0
            assert "pgcapture_replica_last_commit_timestamp_seconds" in text
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
