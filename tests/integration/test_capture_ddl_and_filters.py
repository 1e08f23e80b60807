"""DDL travels in the stream in order with the data; table lists filter and follow changes."""

from __future__ import annotations

import psycopg
import pytest
from slot_helpers import changes, collect, fields, user_changes

from pgcapture.capture.reader import SlotReader

pytestmark = pytest.mark.integration


def ddl_queries(captured: list) -> list[str]:  # type: ignore[type-arg]
    return [
        fields(c.new)["query"].binary.decode()
        for c in changes(captured)
        if (c.schema, c.table) == ("pgcapture", "ddl_logs")
    ]


async def test_ddl_and_dml_keep_their_order_in_one_transaction(
    dsn: str, reader: SlotReader
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "BEGIN; CREATE TABLE o (id int PRIMARY KEY); INSERT INTO o VALUES (1); "
            "ALTER TABLE o ADD COLUMN v text; INSERT INTO o VALUES (2, 'x'); COMMIT"
        )
    captured = await collect(reader, 1)
    order = [
        ("ddl", fields(c.new)["query"].binary.decode())
        if c.table == "ddl_logs"
        else ("row", [f.name for f in c.new])
        for c in changes(captured)
    ]
    assert order == [
        ("ddl", "CREATE TABLE o (id int PRIMARY KEY)"),
        ("row", ["id"]),
        ("ddl", "ALTER TABLE o ADD COLUMN v text"),
        ("row", ["id", "v"]),
    ]


async def test_ddl_forms_arrive_with_their_exact_statements(dsn: str, reader: SlotReader) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        await conn.execute("CREATE INDEX a_idx ON a (id)")
        await conn.execute("ALTER TABLE a ADD COLUMN b int")
        await conn.execute("DO $$ BEGIN CREATE TABLE in_do (x int); END $$")
        await conn.execute(
            "CREATE FUNCTION mk() RETURNS void LANGUAGE plpgsql AS "
            "$$ BEGIN CREATE TABLE in_fn (y int); END $$"
        )
        await conn.execute("SELECT mk()")
        await conn.execute("DROP TABLE a")
        await conn.execute("CREATE TEMP TABLE scratch (z int)")
    captured = await collect(reader, 7)
    assert ddl_queries(captured) == [
        "CREATE TABLE a (id int PRIMARY KEY)",
        "CREATE INDEX a_idx ON a (id)",
        "ALTER TABLE a ADD COLUMN b int",
        "CREATE TABLE in_do (x int)",
        "CREATE FUNCTION mk() RETURNS void LANGUAGE plpgsql AS "
        "$$ BEGIN CREATE TABLE in_fn (y int); END $$",
        "CREATE TABLE in_fn (y int)",
        "DROP TABLE a",
    ]


async def test_concurrent_matview_refresh_logs_only_the_refresh(
    dsn: str, reader: SlotReader
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE base (id int PRIMARY KEY)")
        await conn.execute("CREATE MATERIALIZED VIEW mv AS SELECT id FROM base")
        await conn.execute("CREATE UNIQUE INDEX mv_id ON mv (id)")
        await conn.execute("INSERT INTO base VALUES (1)")
        await conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv")
    captured = await collect(reader, 5)
    assert ddl_queries(captured)[-1] == "REFRESH MATERIALIZED VIEW CONCURRENTLY mv"
    assert not any("pg_temp" in q for q in ddl_queries(captured))


async def test_table_list_filters_and_follows_changes(dsn: str, slot_name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE TABLE kept (id int PRIMARY KEY); CREATE TABLE "Other" (id int)')
    reader = SlotReader(dsn, slot_name, tables=["kept"], status_interval=0.5)
    await reader.open()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('INSERT INTO kept VALUES (1); INSERT INTO "Other" VALUES (1)')
            conn.execute("INSERT INTO kept VALUES (2)")
        rows = user_changes(await collect(reader, 2))
        assert [c.table for c in rows] == ["kept", "kept"]
    finally:
        await reader.close()
    # A new list: the publication is altered, quoted mixed-case names included.
    reader = SlotReader(dsn, slot_name, tables=['public."Other"'], status_interval=0.5)
    await reader.open()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('INSERT INTO kept VALUES (3); INSERT INTO "Other" VALUES (2)')
        # Two transactions: the ALTER PUBLICATION itself (DDL is captured) and the inserts.
        rows = user_changes(await collect(reader, 2))
        assert [c.table for c in rows] == ["Other"]
        with psycopg.connect(dsn) as conn:
            published = conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
                "ORDER BY 1, 2",
                (slot_name,),
            ).fetchall()
        assert published == [("pgcapture", "ddl_logs"), ("public", "Other")]
    finally:
        await reader.close()
