"""DDL capture in plain SQL: what the event triggers log, checked on a real PostgreSQL 15."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcapture.capture.ddl import install_ddl_capture, split_statements
from pgcapture.errors import PermissionDenied

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Row:
    query: str
    tag: str
    activity: dict[str, Any]


@pytest.fixture
async def source(dsn: str) -> str:
    """A database with DDL capture installed twice (installing again changes nothing)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await install_ddl_capture(conn)
        await install_ddl_capture(conn)
    return dsn


@pytest.fixture
async def session(source: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One autocommit connection: each execute() is one client message (one query string)."""
    async with await psycopg.AsyncConnection.connect(source, autocommit=True) as conn:
        yield conn


async def run(conn: psycopg.AsyncConnection[Any], *query_strings: str) -> None:
    for query in query_strings:
        await conn.execute(query)


async def logged(conn: psycopg.AsyncConnection[Any], after: int = 0) -> list[Row]:
    cur = await conn.execute(
        "SELECT query, tags, activity FROM pgcapture.ddl_logs WHERE id > %s ORDER BY id", (after,)
    )
    return [Row(query, tags[0], activity) for query, tags, activity in await cur.fetchall()]


async def last_id(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT coalesce(max(id), 0) FROM pgcapture.ddl_logs")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def queries(rows: list[Row]) -> list[str]:
    return [r.query for r in rows]


# --- installation ---------------------------------------------------------------------------


async def test_install_creates_the_go_compatible_log_table_and_logs_nothing_itself(
    session: psycopg.AsyncConnection[Any],
) -> None:
    cur = await session.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'pgcapture' AND table_name = 'ddl_logs' ORDER BY ordinal_position"
    )
    assert await cur.fetchall() == [
        ("id", "integer"),
        ("query", "text"),
        ("tags", "ARRAY"),
        ("activity", "jsonb"),
    ]
    cur = await session.execute("SELECT evtname, evtevent FROM pg_event_trigger ORDER BY 1")
    assert await cur.fetchall() == [
        ("pgcapture_ddl_command_end", "ddl_command_end"),
        ("pgcapture_ddl_command_start", "ddl_command_start"),
        ("pgcapture_sql_drop", "sql_drop"),
    ]
    assert await logged(session) == []


async def test_install_without_the_right_to_create_event_triggers_is_permission_denied(
    dsn: str, dbname: str
) -> None:
    role = f"plain_{dbname}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        try:
            await admin.execute(f"GRANT CREATE ON DATABASE {dbname} TO {role}")
            async with await psycopg.AsyncConnection.connect(dsn + f" user={role}") as conn:
                with pytest.raises(PermissionDenied, match="superuser") as caught:
                    await install_ddl_capture(conn)
            assert "event trigger" in str(caught.value)
            await admin.execute(f"REVOKE CREATE ON DATABASE {dbname} FROM {role}")
            async with await psycopg.AsyncConnection.connect(dsn + f" user={role}") as conn:
                with pytest.raises(PermissionDenied, match="GRANT CREATE ON DATABASE"):
                    await install_ddl_capture(conn)
        finally:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE {role}")


# --- what is logged -------------------------------------------------------------------------


async def test_table_and_index_ddl_is_logged_with_its_exact_statement(
    session: psycopg.AsyncConnection[Any], dbname: str
) -> None:
    statements = [
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "ALTER TABLE t ADD COLUMN w int",
        "CREATE INDEX t_v ON t (v)",
        "ALTER TABLE t RENAME COLUMN w TO w2",
        "DROP TABLE t",
    ]
    await run(session, *statements)
    rows = await logged(session)
    assert queries(rows) == statements
    assert [r.tag for r in rows] == [
        "CREATE TABLE",
        "ALTER TABLE",
        "CREATE INDEX",
        "ALTER TABLE",
        "DROP TABLE",
    ]
    activity = rows[0].activity
    assert {"datname", "usename", "application_name", "client_addr", "backend_start"} <= set(
        activity
    )
    assert activity["datname"] == dbname
    assert activity["xact_start"] is not None
    assert activity["top_level_query"] == statements[0]
    assert (activity["nested"], activity["exact"], activity["phase"]) == (False, True, "end")
    assert {"object_type": "table", "schema_name": "public", "object_identity": "public.t"} in (
        activity["objects"]
    )
    assert "rewritten" not in activity


async def test_each_ddl_of_a_multi_statement_string_gets_its_own_statement(
    session: psycopg.AsyncConnection[Any],
) -> None:
    query = (
        "create table a(id int primary key, v text); insert into a values (1, 'x;y'); "
        "alter table a add column w int; -- why\ncomment on table a is 'it''s; fine';"
        'select 1 as "b;c"; create index on a (v)'
    )
    await run(session, query)
    rows = await logged(session)
    assert queries(rows) == [
        "create table a(id int primary key, v text)",
        "alter table a add column w int",
        "comment on table a is 'it''s; fine'",
        "create index on a (v)",
    ]
    assert all(r.activity["top_level_query"] == query and r.activity["exact"] for r in rows)


async def test_a_create_table_as_in_a_prepared_transaction_is_logged_by_its_effect(
    session: psycopg.AsyncConnection[Any],
) -> None:
    """Logging a CREATE TABLE AS by its effect touches no temporary object, so its transaction
    can still be prepared (two-phase commit); with a temporary table read it never could."""
    await run(
        session,
        "BEGIN",
        "CREATE TABLE made AS SELECT g AS id, g::text AS label FROM generate_series(1, 3) g",
        "PREPARE TRANSACTION 'made_by_ctas'",
        "COMMIT PREPARED 'made_by_ctas'",
    )
    rows = await logged(session)
    assert queries(rows) == ["CREATE TABLE made (id integer, label text)"]
    assert rows[0].activity["effect"] is True
    cur = await session.execute("SELECT count(*) FROM made")
    assert await cur.fetchone() == (3,)


async def test_statements_holding_semicolons_are_logged_whole(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # sent as one simple-query string, without psql: the server's grammar decides what a
    # statement is (rule actions in parentheses, BEGIN ATOMIC bodies with CASE ... END and
    # END as a column label, nested comments, E'' strings continued on the next line)
    statements = [
        "create table t (a int, b text)",
        "create rule r as on insert to t do instead (delete from t; ; delete from t)",
        "create function f(x int) returns int language sql begin atomic "
        "select case when x > 0 then 1 else 2 end end; select t.end from (select 3 as end) t; "
        "end",
        "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC insert into t values (1, 'a;b'); END",
        "comment on table t is /* a; /* b; */ c; */ E'x\\';'\n'\\';'",
        'create view v as select $q$;$q$ as "s;"',
    ]
    query = "; insert into t values (0, ';');\n".join(statements) + ";"
    await run(session, query)
    rows = await logged(session)
    assert queries(rows) == statements
    assert all(r.activity["exact"] for r in rows)


async def test_strings_are_split_by_the_sessions_standard_conforming_strings(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # with the setting off, a backslash escapes the quote in a plain string literal
    await run(
        session,
        "SET standard_conforming_strings = off",
        "create table s1 (a text default 'x\\';y'); create table s2 (a int)",
    )
    assert queries(await logged(session)) == [
        "create table s1 (a text default 'x\\';y')",
        "create table s2 (a int)",
    ]


async def test_statements_rolled_back_inside_one_string_still_count(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(
        session,
        "begin; create table r1(a int); rollback; create table r2(a int); commit; "
        "begin; savepoint s; create table r3(a int); rollback to savepoint s; "
        "create table r4(a int); commit",
    )
    assert queries(await logged(session)) == ["create table r2(a int)", "create table r4(a int)"]


async def test_concurrent_sessions_keep_their_own_statement_positions(source: str) -> None:
    async def script(name: str) -> str:
        query = "; ".join(f"create table {name}{i} (a int); insert into {name}{i} values (1)"
                          for i in range(30))  # fmt: skip
        async with await psycopg.AsyncConnection.connect(source, autocommit=True) as conn:
            await conn.execute(query)
        return name

    await asyncio.gather(script("left"), script("right"))
    async with await psycopg.AsyncConnection.connect(source) as conn:
        rows = await logged(conn)
    for name in ("left", "right"):
        mine = [r for r in rows if r.query.startswith(f"create table {name}")]
        assert [r.query for r in mine] == [f"create table {name}{i} (a int)" for i in range(30)]
        assert all(r.activity["exact"] for r in mine)


async def test_ddl_in_a_do_block_is_logged_as_the_inner_statement(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # the literal holds a quote, a newline and text that looks like the next context line
    await run(
        session,
        "DO $$ BEGIN CREATE TABLE c (z int); "
        "EXECUTE format('CREATE TABLE %I (q text DEFAULT %L)', 'd', "
        "E'x\"\\nPL/pgSQL function f() line 1 at SQL statement'); "
        "EXECUTE 'CREATE TABLE m1 (a int); CREATE TABLE m2 (a int)'; END $$",
    )
    rows = await logged(session)
    assert queries(rows) == [
        "CREATE TABLE c (z int)",
        "CREATE TABLE d (q text DEFAULT 'x\"\nPL/pgSQL function f() line 1 at SQL statement')",
        "CREATE TABLE m1 (a int)",
        "CREATE TABLE m2 (a int)",
    ]
    assert all(r.activity["nested"] and r.activity["exact"] for r in rows)


async def test_ddl_in_a_plpgsql_function_is_logged_as_the_inner_statement(
    session: psycopg.AsyncConnection[Any],
) -> None:
    create = (
        "CREATE FUNCTION mk() RETURNS void LANGUAGE plpgsql AS "
        "$$ BEGIN CREATE TABLE in_fn (y int); END $$"
    )
    await run(session, create, "SELECT mk()")
    rows = await logged(session)
    assert queries(rows) == [create, "CREATE TABLE in_fn (y int)"]
    assert [r.activity["nested"] for r in rows] == [False, True]


async def test_ddl_in_a_sql_function_is_logged_as_its_statement_of_the_body(
    session: psycopg.AsyncConnection[Any],
) -> None:
    create = (
        "CREATE FUNCTION mk_sql() RETURNS void LANGUAGE sql AS "
        "$$ SELECT 1; CREATE TABLE in_sql (x int) $$"
    )
    await run(session, create, "SELECT mk_sql()")
    rows = await logged(session)
    assert queries(rows) == [create, "CREATE TABLE in_sql (x int)"]
    assert rows[1].activity["nested"]
    assert rows[1].activity["exact"]


async def test_create_table_as_and_select_into_are_logged_at_command_start(
    session: psycopg.AsyncConnection[Any],
) -> None:
    statements = [
        "CREATE TABLE c1 AS SELECT 1 AS a",
        "SELECT 2 AS b INTO c2",
        "WITH q AS (SELECT 3 AS c) SELECT * INTO c3 FROM q",
        "CREATE MATERIALIZED VIEW c4 AS SELECT 4 AS d",
    ]
    await run(session, *statements)
    rows = await logged(session)
    assert queries(rows) == [
        "CREATE TABLE c1 (a integer)",
        "CREATE TABLE c2 (b integer)",
        "CREATE TABLE c3 (c integer)",
        statements[3],  # a materialized view keeps its defining query
    ]
    assert [r.activity.get("statement") for r in rows] == [*statements[:3], None]
    assert [(r.tag, r.activity["phase"]) for r in rows] == [
        ("CREATE TABLE AS", "start"),
        ("SELECT INTO", "start"),
        ("SELECT INTO", "start"),
        ("CREATE MATERIALIZED VIEW", "end"),
    ]


async def test_the_ctas_row_precedes_the_new_tables_rows_in_the_wal(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await session.execute("SELECT pg_create_logical_replication_slot('ddl_order', 'test_decoding')")
    await session.execute("CREATE TABLE c1 AS SELECT g FROM generate_series(1, 3) AS g")
    cur = await session.execute(
        "SELECT data FROM pg_logical_slot_get_changes('ddl_order', NULL, NULL) "
        "WHERE data LIKE 'table %'"
    )
    tables = [data.split(":")[0] for (data,) in await cur.fetchall()]
    assert tables == ["table pgcapture.ddl_logs"] + ["table public.c1"] * 3


async def test_ddl_that_fails_inside_an_exception_block_is_not_logged(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(
        session,
        "CREATE TABLE dup (a int)",
        "DO $$ BEGIN BEGIN CREATE TABLE dup (a int); EXCEPTION WHEN duplicate_table THEN END; "
        "CREATE TABLE after_failure (a int); END $$",
    )
    assert queries(await logged(session)) == [
        "CREATE TABLE dup (a int)",
        "CREATE TABLE after_failure (a int)",
    ]


async def test_create_table_as_is_logged_as_the_table_it_makes(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # the query may read what only this session has: its columns are what the server made
    await run(
        session,
        'CREATE TEMP TABLE tmp (a int, b text COLLATE "C", c numeric(10,2), d varchar(5)[])',
        "CREATE TYPE mood AS ENUM ('ok')",
        "PREPARE p (int, mood) AS SELECT $1 + 1 AS a, $2 AS m, now() AS t, 'x'::varchar(3) AS v",
        "CREATE TABLE from_exec AS EXECUTE p(1, 'ok')",
        "CREATE UNLOGGED TABLE IF NOT EXISTS from_temp (x, y) USING heap "
        "WITH (fillfactor = 50) AS SELECT * FROM tmp WITH NO DATA",
        "SELECT random() AS r, b INTO public.into_temp FROM tmp",
        "PREPARE pi (int) AS SELECT $1 AS a, b INTO from_prepared FROM tmp",
        "EXECUTE pi(3)",
        "PREPARE pt AS SELECT 1 AS a INTO TEMP from_prepared_temp",
        "EXECUTE pt",
    )
    rows = [r for r in await logged(session) if r.tag in ("CREATE TABLE AS", "SELECT INTO")]
    assert [(r.query, r.activity["statement"]) for r in rows] == [
        (
            "CREATE TABLE from_exec (a integer, m public.mood, t timestamp with time zone, "
            "v character varying(3))",
            "CREATE TABLE from_exec AS EXECUTE p(1, 'ok')",
        ),
        (
            "CREATE UNLOGGED TABLE IF NOT EXISTS from_temp (x integer, "
            'y text COLLATE pg_catalog."C", c numeric(10,2), d character varying(5)[]) '
            "USING heap WITH (fillfactor = 50)",
            "CREATE UNLOGGED TABLE IF NOT EXISTS from_temp (x, y) USING heap "
            "WITH (fillfactor = 50) AS SELECT * FROM tmp WITH NO DATA",
        ),
        (
            'CREATE TABLE public.into_temp (r double precision, b text COLLATE pg_catalog."C")',
            "SELECT random() AS r, b INTO public.into_temp FROM tmp",
        ),
        ('CREATE TABLE from_prepared (a integer, b text COLLATE pg_catalog."C")', "EXECUTE pi(3)"),
    ]
    assert all(r.activity["exact"] and r.activity["effect"] for r in rows)
    # the logged statement makes the very table the source made
    for name in ("from_exec", "from_temp", "into_temp", "from_prepared"):
        made = await _table_shape(session, name)
        query = next(r.query for r in rows if f" {name} " in r.query or f".{name} " in r.query)
        await run(session, f"ALTER TABLE {name} RENAME TO made", query)
        assert await _table_shape(session, name) == made
        await run(session, f"DROP TABLE {name}", f"ALTER TABLE made RENAME TO {name}")


async def test_prepared_statements_are_read_as_they_were_when_executed(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # one query string prepares the same names twice; pg_prepared_statements holds the whole
    # string, and the EXECUTE is judged by the PREPARE before it
    await run(
        session,
        "create table a (x int); prepare pi as select 1 as a into f; execute pi; "
        "prepare q as select 1; execute q; create index on a (x); deallocate pi; "
        "prepare pi as select 2::bigint as b into g; execute pi; "
        "prepare w as select 1 as k; create table w1 as execute w; deallocate w; "
        "prepare w (text) as select $1 || 'x' as t; create table w2 as execute w('y')",
    )
    rows = await logged(session)
    assert [(r.query, r.activity["exact"]) for r in rows] == [
        ("create table a (x int)", True),
        ("CREATE TABLE f (a integer)", True),
        ("create index on a (x)", True),
        ("CREATE TABLE g (b bigint)", True),
        ("create table w1 (k integer)", True),
        ("create table w2 (t text)", True),
    ]


async def _table_shape(conn: psycopg.AsyncConnection[Any], name: str) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT array_agg(format('%%s %%s %%s', attname, format_type(atttypid, atttypmod), "
        "attcollation::regcollation) ORDER BY attnum), min(relpersistence), min(reloptions::text) "
        "FROM pg_attribute JOIN pg_class ON attrelid = pg_class.oid "
        "WHERE attrelid = %s::regclass AND attnum > 0",
        (name,),
    )
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def test_the_users_search_path_is_left_as_it_was(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(session, "CREATE SCHEMA app", "SET search_path = app, public")
    await run(session, "CREATE TABLE in_app (a int)")
    cur = await session.execute("SELECT current_setting('search_path')")
    assert await cur.fetchone() == ("app, public",)
    await run(session, "BEGIN", "SET LOCAL search_path = public", "CREATE TABLE in_public (a int)")
    cur = await session.execute("SELECT current_setting('search_path')")
    assert await cur.fetchone() == ("public",)
    await run(session, "COMMIT")
    cur = await session.execute(
        "SELECT to_regclass('app.in_app') IS NOT NULL, to_regclass('public.in_public') IS NOT NULL"
    )
    assert await cur.fetchone() == (True, True)


async def test_ddl_of_an_unprivileged_role_is_logged_and_it_cannot_tamper_with_the_log(
    session: psycopg.AsyncConnection[Any], source: str, dbname: str
) -> None:
    role = f"user_{dbname}"
    await run(session, f"CREATE ROLE {role} LOGIN", f"GRANT CREATE ON SCHEMA public TO {role}")
    start = await last_id(session)
    try:
        async with await psycopg.AsyncConnection.connect(
            source + f" user={role}", autocommit=True
        ) as conn:
            # forged state claiming an extension script runs: ignored, as it is not signed
            await run(
                conn,
                "SELECT set_config('pgcapture.ddl_state', repeat('0', 64) || jsonb_build_object("
                "'msg', format('%s:%s:%s', pg_backend_pid(), "
                "(extract(epoch FROM statement_timestamp()) * 1000000)::bigint, "
                "md5(current_query())), 'nested', '{}'::jsonb, "
                "'open', jsonb_build_array(jsonb_build_object('tag', 'CREATE EXTENSION')))::text, "
                "false); CREATE TABLE mine (a int)",
            )
            for forbidden in (
                "INSERT INTO pgcapture.ddl_logs (query) VALUES ('DROP TABLE mine')",
                "SELECT * FROM pgcapture.ddl_state_key",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await run(conn, forbidden)
        rows = await logged(session, start)
        assert [(r.query, r.activity["usename"], r.activity["exact"]) for r in rows] == [
            ("CREATE TABLE mine (a int)", role, True)
        ]
    finally:
        await run(session, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


async def test_a_broken_capture_never_fails_the_users_ddl(
    session: psycopg.AsyncConnection[Any],
) -> None:
    # a bug in a helper: the statement is still logged, as the whole string, not exact
    await run(
        session,
        "CREATE OR REPLACE FUNCTION pgcapture.innermost_frame(ctx text, OUT kind text, "
        "OUT body text, OUT fname text, OUT stmt_no int, OUT clean boolean) "
        "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$",
    )
    start = await last_id(session)
    await run(session, "CREATE TABLE still_works (a int); CREATE TABLE too (a int)")
    rows = await logged(session, start)
    assert [(r.tag, r.activity["exact"]) for r in rows] == [
        ("CREATE TABLE", False),
        ("CREATE TABLE", False),
    ]
    assert all("boom" in r.activity["reason"] for r in rows)
    assert rows[0].query == "CREATE TABLE still_works (a int); CREATE TABLE too (a int)"
    # no log table at all: the DDL still succeeds, with a warning
    warnings: list[str] = []
    session.add_notice_handler(lambda diag: warnings.append(diag.message_primary or ""))
    await run(session, "DROP TABLE pgcapture.ddl_logs", "CREATE TABLE unlogged_ddl (a int)")
    cur = await session.execute("SELECT to_regclass('unlogged_ddl')")
    assert await cur.fetchone() == ("unlogged_ddl",)
    assert any(w.startswith("pgcapture did not log DDL statement CREATE TABLE") for w in warnings)


# --- what is not logged ---------------------------------------------------------------------


async def test_ddl_on_temporary_objects_is_not_logged(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(
        session,
        "CREATE TEMP TABLE tt (a int)",
        "CREATE INDEX ON tt (a)",
        "ALTER TABLE tt ADD COLUMN b int",
        "ALTER TABLE tt RENAME TO tt2",
        "COMMENT ON TABLE tt2 IS 'scratch'",
        "CREATE TRIGGER tt_trg BEFORE UPDATE ON tt2 FOR EACH ROW "
        "EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "CREATE FUNCTION pg_temp.tf() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TEMP VIEW tv AS SELECT 1 AS a",
        "CREATE VIEW implicitly_temp AS SELECT * FROM tt2",
        "CREATE TEMP TABLE tc AS SELECT 1 AS a",
        "SELECT 1 AS a INTO TEMP ti",
        "CREATE TABLE pg_temp.tq AS SELECT 1 AS a",
        "CREATE TEMPORARY SEQUENCE ts",
        "ALTER SEQUENCE ts RESTART",
        "DROP TABLE tc",
        "DROP VIEW tv",
        "SET search_path = pg_temp, public",
        "CREATE TABLE tp AS SELECT 1 AS a",
        "CREATE TABLE tp2 (a int)",
        "RESET search_path",
        "create temp table t1(a int); create temp table t2 as select 1; drop table t1, t2",
    )
    assert await logged(session) == []


async def test_dropping_temporary_and_regular_tables_logs_a_drop_of_the_regular_ones(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(
        session,
        "CREATE TABLE reg (a int)",
        "CREATE TEMP TABLE tmp (a int)",
        "CREATE TABLE reg2 (a int)",
        "CREATE VIEW reg2_v AS SELECT * FROM reg2",
        "CREATE TEMP TABLE tmp2 (a int)",
    )
    start = await last_id(session)
    await run(session, "DROP TABLE tmp, reg", "DROP TABLE tmp2, reg2 CASCADE")
    rows = await logged(session, start)
    assert queries(rows) == [
        "DROP TABLE IF EXISTS public.reg",
        "DROP TABLE IF EXISTS public.reg2 CASCADE",
    ]
    assert all(r.activity["rewritten"] and r.activity["exact"] for r in rows)


async def test_concurrent_matview_refresh_logs_only_the_refresh(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(
        session,
        "CREATE TABLE base (id int PRIMARY KEY, v text)",
        "CREATE MATERIALIZED VIEW mv AS SELECT * FROM base",
        "CREATE UNIQUE INDEX mv_id ON mv (id)",
        "INSERT INTO base VALUES (1, 'a')",
    )
    start = await last_id(session)
    await run(session, "REFRESH MATERIALIZED VIEW CONCURRENTLY mv")
    rows = await logged(session, start)
    assert [(r.query, r.tag) for r in rows] == [
        ("REFRESH MATERIALIZED VIEW CONCURRENTLY mv", "REFRESH MATERIALIZED VIEW")
    ]


async def test_create_extension_is_logged_but_not_its_script(
    session: psycopg.AsyncConnection[Any],
) -> None:
    cur = await session.execute(
        "SELECT name FROM pg_available_extensions WHERE name IN ('pg_trgm', 'hstore', 'citext') "
        "ORDER BY name LIMIT 1"
    )
    found = await cur.fetchone()
    if found is None:
        pytest.skip("no contrib extension (pg_trgm, hstore, citext) is installed on the server")
    create = f"CREATE EXTENSION {found[0]}"
    await run(session, create, "CREATE TABLE after_ext (a int)", f"DROP EXTENSION {found[0]}")
    rows = await logged(session)
    assert queries(rows) == [create, "CREATE TABLE after_ext (a int)", f"DROP EXTENSION {found[0]}"]


async def test_extension_created_with_cascade_logs_one_row(
    session: psycopg.AsyncConnection[Any],
) -> None:
    cur = await session.execute(
        "SELECT count(*) FROM pg_available_extensions WHERE name IN ('cube', 'earthdistance')"
    )
    found = await cur.fetchone()
    if found is None or found[0] != 2:
        pytest.skip("contrib extensions cube and earthdistance are not installed on the server")
    await run(session, "CREATE EXTENSION earthdistance CASCADE")
    assert queries(await logged(session)) == ["CREATE EXTENSION earthdistance CASCADE"]


async def test_failing_ddl_logs_nothing_and_fails_with_the_servers_own_error(
    session: psycopg.AsyncConnection[Any],
) -> None:
    await run(session, "CREATE TABLE dup (a int)")
    with pytest.raises(psycopg.errors.DuplicateTable, match='relation "dup" already exists'):
        await run(session, "CREATE TABLE dup (a int)")
    with pytest.raises(psycopg.errors.DuplicateTable):
        await run(session, "create table ok1(a int); create table dup(a int)")
    assert queries(await logged(session)) == ["CREATE TABLE dup (a int)"]


async def test_subscriptions_are_not_logged(session: psycopg.AsyncConnection[Any]) -> None:
    await run(
        session,
        "CREATE SUBSCRIPTION sub CONNECTION 'dbname=nowhere password=secret' PUBLICATION p "
        "WITH (connect = false, slot_name = NONE)",
        "DROP SUBSCRIPTION sub",
    )
    assert await logged(session) == []


# --- the classifier and the splitter against the server -------------------------------------

_PROBE = """
CREATE FUNCTION probe() RETURNS event_trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE NOTICE 'probe fired: %', tg_tag; END $$;
CREATE EVENT TRIGGER a_probe ON ddl_command_start EXECUTE FUNCTION probe();
CREATE FUNCTION trgf() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN new; END $$;
CREATE TABLE t1 (a int, b int);
CREATE TYPE ct1 AS (a int);
CREATE FOREIGN DATA WRAPPER fdw1;
CREATE SERVER srv1 FOREIGN DATA WRAPPER fdw1;
SELECT lo_create(424242);
"""

# Statements that fire event triggers on PostgreSQL 15 ({r} is a throw-away role).
_FIRING = [
    "create table t2 (a int)",
    "create unlogged table t3 (a int)",
    "create temp table t4 (a int)",
    "create global temporary table t5 (a int)",
    "create table t6 as select 1 as a",
    "select 1 as a into t7",
    "with q as (select 1 as a) select * into t8 from q",
    "create or replace view v1 as select 1 as a",
    "create recursive view rv (n) as select 1",
    "create materialized view mv1 as select 1 as a",
    "refresh materialized view mv1",
    "alter materialized view mv1 rename to mv2",
    "create unique index i1 on t1 (a)",
    "alter index i1 rename to i2",
    "alter table t1 add column c int",
    "alter table all in tablespace pg_default set tablespace pg_default",
    "comment on table t1 is 'x'",
    "comment on column t1.a is 'x'",
    "comment on large object 424242 is 'x'",
    "security label on table t1 is 'x'",
    "grant select on t1 to {r}",
    "grant select (a) on t1 to {r}",
    "revoke select on t1 from {r}",
    "grant usage on schema public to {r}",
    "grant all on all tables in schema public to {r}",
    "grant usage on foreign data wrapper fdw1 to {r}",
    "grant select on large object 424242 to {r}",
    "alter default privileges in schema public grant select on tables to {r}",
    "create schema s1 create table st (a int) create view sv as select 1 as a",
    "create schema authorization {r}",
    "create sequence sq1",
    "alter sequence sq1 restart",
    "create type en as enum ('a')",
    "alter type en add value 'b'",
    "create domain dm as int",
    "create cast (ct1 as text) with inout",
    "create function f1() returns int language sql return 1",
    "create or replace function f2() returns int language sql begin atomic select 1; end",
    "create procedure p1() language sql as 'select 1'",
    "alter function f1() rename to f3",
    "alter routine f3() rename to f4",
    "drop function f4()",
    "create constraint trigger ct after insert on t1 deferrable for each row "
    "execute function trgf()",
    "create or replace rule r1 as on update to t1 do instead nothing",
    "create policy pol on t1 using (true)",
    "create statistics stt on a, b from t1",
    "create aggregate ag (int) (sfunc = int4pl, stype = int)",
    'create collation coll from "C"',
    "create text search configuration tsc (copy = simple)",
    "create default conversion cnv for 'UTF8' to 'LATIN1' from utf8_to_iso8859_1",
    "create operator === (leftarg = int, rightarg = int, function = int4eq)",
    "create access method am1 type table handler heap_tableam_handler",
    "create trusted procedural language plx handler plpgsql_call_handler",
    "drop procedural language plx",
    "create transform for int language sql (from sql with function prsd_lextype(internal), "
    "to sql with function int4recv(internal))",
    "create foreign table ft1 (a int) server srv1",
    "import foreign schema x from server srv1 into public",
    "create user mapping for {r} server srv1",
    "alter user mapping for {r} server srv1 options (add user 'x')",
    "drop user mapping for {r} server srv1",
    "alter large object 424242 owner to {r}",
    "create publication pub1 for table t1",
    "drop publication pub1",
    "create subscription sub1 connection 'dbname=nowhere' publication p "
    "with (connect = false, slot_name = none)",
    "alter subscription sub1 rename to sub2",
    "drop subscription sub2",
    "drop owned by {r}",
    "drop table t2",
]

# Statements that fire no event trigger.
_NOT_FIRING = [
    "create role {r}_b",
    "alter role {r}_b nologin",
    "grant {r}_b to {r}",
    "revoke {r}_b from {r}",
    "drop role {r}_b",
    "create user {r}_u",
    "alter user {r}_u nologin",
    "drop user {r}_u",
    "create group {r}_g",
    "drop group {r}_g",
    "alter database {db} set work_mem = '1MB'",
    "comment on database {db} is 'x'",
    "grant create on database {db} to {r}",
    "revoke create on database {db} from {r}",
    "comment on tablespace pg_default is null",
    "grant create on tablespace pg_default to {r}",
    "revoke create on tablespace pg_default from {r}",
    "grant set on parameter work_mem to {r}",
    "revoke set on parameter work_mem from {r}",
    "create event trigger z_et on ddl_command_end execute function probe()",
    "alter event trigger z_et rename to z_et2",
    "comment on event trigger z_et2 is 'x'",
    "drop event trigger z_et2",
    "alter system reset work_mem",
    "reassign owned by {r} to {r}",
    "vacuum t1",
    "analyze t1",
    "truncate t1",
    "reindex table t1",
    "explain analyze create table ex1 as select 1",
    "set work_mem = '2MB'",
    "reset work_mem",
    "discard plans",
    "do $$ begin end $$",
    "call p1()",
    "prepare pq as select 1",
    "execute pq",
    "deallocate pq",
    "select 1",
    "insert into t1 values (1)",
    "with q as (select 1) insert into t1 select 2",
    "select * from t1 where a in (select a from t1)",
]


async def test_the_classifier_agrees_with_the_server(
    session: psycopg.AsyncConnection[Any], dbname: str
) -> None:
    role = f"probe_{dbname}"
    fired: list[str] = []

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if message.startswith("probe fired: "):
            fired.append(message.removeprefix("probe fired: "))

    session.add_notice_handler(on_notice)
    await run(session, _PROBE, f"CREATE ROLE {role}")
    disagreements = []
    try:
        for template in _FIRING + _NOT_FIRING:
            statement = template.format(r=role, db=dbname)
            fired.clear()
            # several fail after firing (no security label provider, no FDW handler)
            with contextlib.suppress(psycopg.Error):
                await session.execute(statement)
            prefix = await _tag_prefix(session, statement)
            fires = template in _FIRING
            seen = [_prefix_of(tag, prefix) for tag in fired]
            if (prefix is not None) != fires or seen != ([prefix] if fires else []):
                disagreements.append((statement, prefix, list(fired)))
    finally:
        await session.execute(f"DROP OWNED BY {role}")
        await session.execute(f"DROP ROLE {role}")
    assert disagreements == []


async def _tag_prefix(conn: psycopg.AsyncConnection[Any], statement: str) -> str | None:
    cur = await conn.execute("SELECT pgcapture.ddl_tag_prefix(%s)", (statement,))
    row = await cur.fetchone()
    return row[0] if row else None


def _prefix_of(tag: str, prefix: str | None) -> str | None:
    """``prefix`` when the server's ``tag`` starts with it (as pgcapture.tag_matches), else tag."""
    if prefix is not None and (tag == prefix or tag.startswith(prefix + " ")):
        return prefix
    return tag


# Statements with the quoting the splitters must get right; none contains its own `;` issue.
_POOL = [
    "select 1",
    "select 'a;b'",
    "select 'it''s; fine'",
    "select E'it\\'s;\\\\'",
    "select $$x;y$$",
    "select $tag$ $$ ; $x$ $tag$",
    'select 1 as "semi;colon""q"',
    "select 1 /* a ; /* nested ; */ b */",
    "select 1 -- trailing ; comment\n",
    "select U&'\\0041;', U&\"a;\"",
    "select B'101', X'1F'",
    "select 'é;ü', \"ß;\"",
    "select 'x'\n'y;'",
    "select a$b$ from (select 1 as a$b$) as s",
    "select 1.5e3, .5, 2",
    "values (1, ';'), (2, $q$;$q$)",
    "create table t (a int default 1, \"b;\" text default ';')",
    "create function f() returns int language sql begin atomic "
    "select case when true then 1 else 2 end; select 3; end",
    "create procedure p() language sql begin atomic insert into t values (1); end",
    "create function g() returns int language plpgsql as $body$ begin return 1; end $body$",
    "with q as (select ';' as s) select * from q",
]
_SEPARATORS = [";", " ;", ";\n", "; /* between; */ ", ";; ", "; -- line;\n", ";\t"]


@pytest.mark.timeout(60)
def test_the_server_splitter_agrees_with_the_parser(source: str) -> None:
    disagreements: list[tuple[str, list[str], list[str]]] = []
    pairs = st.tuples(st.sampled_from(_POOL), st.sampled_from(_SEPARATORS))
    deadline = time.monotonic() + 10  # keeps the test short on a slow machine

    with psycopg.connect(source) as conn:

        @settings(
            max_examples=150, deadline=None, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )  # fmt: skip
        @given(
            head=st.sampled_from(["", " ", "\n-- header;\n", "/* c */ "]),
            body=st.lists(pairs, min_size=1, max_size=6),
            last=st.sampled_from([*_POOL, ""]),
        )
        def check(head: str, body: list[tuple[str, str]], last: str) -> None:
            if time.monotonic() > deadline:
                return
            sql = head + "".join(stmt + sep for stmt, sep in body) + last
            row = conn.execute("SELECT pgcapture.split_statements(%s)", (sql,)).fetchone()
            assert row is not None
            if list(row[0]) != split_statements(sql):
                disagreements.append((sql, split_statements(sql), list(row[0])))

        check()
    assert disagreements == []
