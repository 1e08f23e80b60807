"""DDL that only makes sense in its session, and DDL holding semicolons, reach a replica (issue 14).

A source session runs, as one client would, statements the replica cannot run as written:
CREATE TABLE AS EXECUTE of a prepared statement, CREATE TABLE AS and SELECT INTO reading a
temporary table or a volatile function, EXECUTE of a prepared SELECT INTO, WITH NO DATA; and
statements whose text holds semicolons (a rule with several actions, BEGIN ATOMIC bodies), some
sent as one multi-statement query string. Each new table then takes inserts and updates, one is
dropped. Capture and replicate follow from an empty replica; the replica must equal the source
table by table and in ``pg_dump --schema-only``, without ``--skip-ddl``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess

import psycopg
import pytest
from log_helpers import make_config
from replica_workload import assert_same_tables, wait_for_marker
from test_replica_convergence import start_from_scratch, wait_for_stream

from pgcapture.capture.retry import run_capture
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.replica.service import replicate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SESSION = (
    'CREATE TABLE base (id int PRIMARY KEY, v text COLLATE "C", n numeric(8,2))',
    "INSERT INTO base SELECT g, 'v' || g, g / 3.0 FROM generate_series(1, 20) AS g",
    # statements holding semicolons, in one query string with rows in between
    "CREATE TABLE ruled (a int PRIMARY KEY); CREATE TABLE ruled_log (a int, note text);"
    "INSERT INTO base VALUES (21, ';', 0);"
    "create rule r as on insert to ruled do also "
    "(insert into ruled_log values (new.a, 'x;y'); ; insert into ruled_log values (new.a, $$;$$));"
    "create function f(x int) returns int language sql begin atomic "
    "select case when x > 0 then 1 else 2 end end; end;"
    "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC insert into ruled_log values (f(1), "
    "E'a\\';'); END; INSERT INTO ruled VALUES (1); CALL p()",
    "ALTER TABLE ruled_log REPLICA IDENTITY FULL",
    # session-bound: temporary tables, prepared statements, volatile functions
    'CREATE TEMP TABLE tmp (a int, b text COLLATE "C", c varchar(5))',
    "INSERT INTO tmp SELECT g, 't' || g, 'c' FROM generate_series(1, 5) AS g",
    "PREPARE ps (int) AS SELECT id, v, n, $1 AS k FROM base WHERE id <= $1",
    "CREATE TABLE from_exec AS EXECUTE ps(7)",
    "ALTER TABLE from_exec ADD PRIMARY KEY (id)",
    "UPDATE from_exec SET v = 'changed' WHERE id = 3",
    "INSERT INTO from_exec VALUES (100, 'new', 1.5, 0)",
    "CREATE TABLE from_temp AS SELECT a, b, c, random() AS r FROM tmp",
    "ALTER TABLE from_temp REPLICA IDENTITY FULL",
    "UPDATE from_temp SET b = 'u' WHERE a = 2",
    "SELECT a, b INTO into_temp FROM tmp WHERE a > 2",
    "ALTER TABLE into_temp ADD PRIMARY KEY (a)",
    "INSERT INTO into_temp VALUES (50, 'x')",
    "UPDATE into_temp SET b = 'y' WHERE a = 3",
    "CREATE TABLE no_data (x, y) AS SELECT a, c FROM tmp WITH NO DATA",
    "INSERT INTO no_data VALUES (1, 'z')",
    "PREPARE pinto AS SELECT v, n INTO from_prepared_into FROM base WHERE id < 4",
    "EXECUTE pinto",
    "INSERT INTO from_prepared_into VALUES ('w', 2)",
    "CREATE TABLE then_dropped AS EXECUTE ps(2)",
    "INSERT INTO then_dropped VALUES (9, 'x', 1, 1)",
    "DROP TABLE then_dropped",
    "CREATE TABLE after_drop AS SELECT * FROM tmp",
    "CREATE TABLE done (token text PRIMARY KEY)",
    "INSERT INTO done VALUES ('session')",
)


def schema_dump(pg: LocalPostgres, dsn: str) -> str:
    """``pg_dump --schema-only`` without ownership, grants, pgcapture's own objects, event
    triggers and publications, and without pg_dump's comments and blank lines."""
    out = subprocess.run(
        [str(pg.bin_dir / "pg_dump"), "--schema-only", "--no-owner", "--no-privileges",
         "--no-publications", "--exclude-schema=pgcapture", "-d", dsn],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    blocks = [b for b in re.split(r"\n(?=CREATE |ALTER |COMMENT |SET |SELECT )", out)]
    kept = [b for b in blocks if not b.startswith("CREATE EVENT TRIGGER")]
    lines = "\n".join(kept).splitlines()
    return "\n".join(x for x in lines if x.strip() and not x.startswith(("--", "\\")))


@pytest.mark.timeout(180)
async def test_session_bound_and_multi_part_ddl_converge_without_skipping(
    pg: LocalPostgres, dsn: str, replica_dsn: str, nats: LocalNats
) -> None:
    name = f"session{os.getpid()}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await start_from_scratch(dsn, source, replica_dsn)
    stop = asyncio.Event()
    capture = asyncio.create_task(run_capture(source, config.nats, stop))
    try:
        await wait_for_stream(nats.url, source.stream_name)
        applier = asyncio.create_task(replicate(config, source, replica_dsn, stop))

        def alive() -> str | None:
            if not applier.done():
                return None
            return repr(applier.exception()) if not applier.cancelled() else "cancelled"

        try:
            async with asyncio.timeout(90):
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    for stmt in SESSION:  # one session: its temp tables and prepared statements
                        await conn.execute(stmt)
                await wait_for_marker(replica_dsn, "session", 60, alive)
        finally:
            stop.set()
            await asyncio.wait_for(applier, 30)
    finally:
        stop.set()
        await asyncio.wait_for(capture, 30)
    await assert_same_tables(dsn, replica_dsn)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE NOT (activity ->> 'exact')::boolean), "
            "count(*) FILTER (WHERE (activity ->> 'effect')::boolean) FROM pgcapture.ddl_logs"
        )
        assert await cur.fetchone() == (0, 7)  # the seven CREATE TABLE AS / SELECT INTO
    assert schema_dump(pg, replica_dsn) == schema_dump(pg, dsn)
