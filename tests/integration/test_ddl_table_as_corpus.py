"""CREATE TABLE AS and SELECT INTO of generated forms are logged as a CREATE TABLE that makes
the very table the server made: same columns, types, type modifiers, collations, persistence,
storage parameters and access method (docs/ddl.md, "CREATE TABLE AS and SELECT INTO")."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcapture.capture.ddl import install_ddl_capture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_SETUP = (
    'CREATE TEMP TABLE tmp (a int, b text COLLATE "C", c numeric(10,2), d varchar(5)[], '
    "e timestamptz)",
    "INSERT INTO tmp VALUES (1, 'x', 1.5, '{a}', now())",
    'CREATE SCHEMA "Odd Schema"',
    "CREATE TYPE public.mood AS ENUM ('ok', 'bad')",
    "PREPARE p0 AS SELECT a, b, 'ok'::public.mood AS m FROM tmp",
    "PREPARE p2 (int, text) AS SELECT $1 + a AS s, $2 || b AS t, $2::varchar(4) AS v FROM tmp",
)

_QUERIES = [
    "SELECT * FROM tmp",
    'SELECT a, b AS "B;x", c * 2 AS c2, d[1] AS d1 FROM tmp WHERE a > 0',
    "SELECT 1 AS one, 'lit' AS s, 'x'::varchar(3) AS v, random() AS r, now() AS t",
    "VALUES (1, 'a' COLLATE \"C\"), (2, 'b')",
    "TABLE tmp",
    "(SELECT a FROM tmp UNION SELECT 2) ",
    "WITH q AS (SELECT a AS x, b FROM tmp) SELECT x, b /* as; */ FROM q",
    "SELECT generate_series(1, 3) AS g, gen_random_uuid() AS u, '{}'::jsonb AS j",
    "SELECT e AT TIME ZONE 'UTC' AS utc, c::numeric(4,1) AS c41, b COLLATE \"POSIX\" AS p FROM tmp",
]
_EXECUTES = ["EXECUTE p0", "EXECUTE p2(1, 'z')", 'execute "p2" (2, $$q$$)']
_NAMES = ["t_new", "public.t_new", '"Odd Schema"."T new"', '"T;new"']


def _ctas() -> st.SearchStrategy[str]:
    return st.builds(
        "CREATE {}TABLE {}{}{}{}{} AS {}{}".format,
        st.sampled_from(["", "UNLOGGED ", "unlogged "]),
        st.sampled_from(["", "IF NOT EXISTS "]),
        st.sampled_from(_NAMES),
        st.sampled_from(["", " (k1)", " (k1, \"K 2\")"]),
        st.sampled_from(["", " USING heap", " WITH (fillfactor = 60)", " WITHOUT OIDS",
                         " TABLESPACE pg_default", " USING heap WITH (autovacuum_enabled = off)"]),
        st.sampled_from(["", " -- c\n", " /* c */"]),
        st.sampled_from(_QUERIES + _EXECUTES),
        st.sampled_from(["", " WITH DATA", " WITH NO DATA", " with no data"]),
    )  # fmt: skip


def _select_into() -> st.SearchStrategy[str]:
    return st.builds(
        "SELECT {}a, b AS bb, {} INTO {}{}{} FROM tmp{}".format,
        st.sampled_from(["", "DISTINCT "]),
        st.sampled_from(["c", "'x'::varchar(2) AS v", "now() AS t"]),
        st.sampled_from(["", "TABLE ", "UNLOGGED ", "UNLOGGED TABLE "]),
        st.sampled_from(_NAMES),
        st.sampled_from(["", " /* c */"]),
        st.sampled_from(["", " WHERE a > 0", " ORDER BY a LIMIT 1"]),
    )


async def _shape(conn: psycopg.AsyncConnection[Any], rel: int) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT array_agg(format('%%s %%s %%s', attname, format_type(atttypid, atttypmod), "
        "attcollation::regcollation) ORDER BY attnum), min(relpersistence), "
        "min(reloptions::text), min(relam::regclass::text) "
        "FROM pg_attribute JOIN pg_class ON attrelid = pg_class.oid "
        "WHERE attrelid = %s AND attnum > 0",
        (rel,),
    )
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.timeout(120)
async def test_generated_create_table_as_forms_log_the_table_they_make(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await install_ddl_capture(conn)
        await conn.commit()
    wrong: list[tuple[str, str | None, str]] = []
    checked = 0
    deadline = time.monotonic() + 40

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for stmt in _SETUP:
            await conn.execute(stmt)

        async def check(statement: str) -> None:
            nonlocal checked
            await conn.execute("BEGIN")
            try:
                before = await conn.execute("SELECT coalesce(max(id), 0) FROM pgcapture.ddl_logs")
                last = (await before.fetchone() or (0,))[0]
                try:
                    await conn.execute(statement)
                except psycopg.Error:
                    return  # e.g. more column names than the query has columns
                cur = await conn.execute(
                    "SELECT query, activity FROM pgcapture.ddl_logs WHERE id > %s", (last,)
                )
                rows = await cur.fetchall()
                cur = await conn.execute(
                    "SELECT c.oid FROM pg_class c WHERE c.relname IN ('t_new', 'T new', 'T;new')"
                )
                made = await _shape(conn, (await cur.fetchone() or (0,))[0])
                if len(rows) != 1 or not rows[0][1].get("effect"):
                    wrong.append((statement, rows[0][0] if rows else None, "not by effect"))
                    return
                await conn.execute("SAVEPOINT s")
                await conn.execute(
                    "DO $$ DECLARE r oid; BEGIN "
                    "SELECT c.oid INTO r FROM pg_class c "
                    "WHERE c.relname IN ('t_new', 'T new', 'T;new'); "
                    "EXECUTE format('ALTER TABLE %s RENAME TO gone', r::regclass); END $$"
                )
                await conn.execute(rows[0][0])
                cur = await conn.execute(
                    "SELECT c.oid FROM pg_class c WHERE c.relname IN ('t_new', 'T new', 'T;new')"
                )
                again = await _shape(conn, (await cur.fetchone() or (0,))[0])
                if again != made:
                    wrong.append((statement, rows[0][0], f"{made} != {again}"))
                checked += 1
            finally:
                await conn.execute("ROLLBACK")

        forms = st.one_of(_ctas(), _select_into())
        examples: list[str] = []

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
        @given(forms)
        def collect(statement: str) -> None:
            examples.append(statement)

        collect()
        for statement in dict.fromkeys(examples):
            if time.monotonic() > deadline:
                break
            await check(statement)
    assert checked >= 50
    assert wrong[:3] == []
