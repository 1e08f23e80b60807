"""The replica's own bookkeeping: where each source's stream has been applied up to.

``pgcapture.sources`` holds one row per source: ``lsn`` says that every source transaction whose
commit LSN is at or below it has been applied, and nothing after it. ``replicate`` moves it with
``pgcapture.advance_source`` inside the same replica transaction as the changes it applied, so the
data and the position commit or vanish together (DESIGN.md, contract 5). The function refuses to
move a position that is not where the caller last saw it, which aborts the whole transaction: a
second writer, or a batch sent after an earlier one failed, can never commit.

A replica gets its first position from a bootstrap (``pgcapture.replica.bootstrap``) or, for a
replica that starts empty alongside a source captured from its very beginning, from
``--from-start`` (position 0/0).

Only one ``replicate`` may write to a replica database: it holds a session advisory lock for as
long as it runs. Another one waits for that lock (naming its holder now and then) and starts
writing only once it has it: a restart right after ``kill -9`` waits for the dead process's
backend to end, which it does as soon as PostgreSQL notices its client is gone. To notice soon,
the session asks for TCP keepalives and, during a statement, a check of the client connection
(``client_connection_check_interval``, PostgreSQL 14+), instead of the operating system's
default of about two hours for a client whose host died (issue 14).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from pgcapture.errors import ConfigError, ReplicaError
from pgcapture.lsn import LSN

log = logging.getLogger("pgcapture.replicate")

# pg_advisory_lock's two-key form: class "pgcapture replicate", object 1.
LOCK_KEYS: Final = (0x70676361, 1)
_REPORT_EVERY: Final = 10.0
"""Seconds between the log lines naming the lock's holder while waiting for it."""
_DIE_WITH_CLIENT: Final = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
"""Server-side keepalives of the session holding the lock: its backend, and so the lock, ends
within about 25 s of its client's host going silent (ignored on Unix-domain sockets)."""

SCHEMA_SQL: Final = """
CREATE SCHEMA IF NOT EXISTS pgcapture;
CREATE TABLE IF NOT EXISTS pgcapture.sources (
    id text PRIMARY KEY,
    lsn pg_lsn NOT NULL,
    stream_seq bigint NOT NULL DEFAULT 0,
    commit_time timestamptz,
    apply_time timestamptz,
    origin text NOT NULL
);
COMMENT ON TABLE pgcapture.sources IS
    'pgcapture replicate: every transaction of source id with commit LSN <= lsn is applied';
CREATE OR REPLACE FUNCTION pgcapture.advance_source(
    source text, expected pg_lsn, new_lsn pg_lsn, new_stream_seq bigint,
    new_commit_time timestamptz)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    UPDATE pgcapture.sources
       SET lsn = new_lsn, stream_seq = new_stream_seq, commit_time = new_commit_time,
           apply_time = clock_timestamp()
     WHERE id = source AND lsn = expected;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgcapture: the replica position of source % is not %', source, expected
            USING HINT = 'another writer moved it, or an earlier batch failed; nothing of this '
                         'batch is applied',
                  ERRCODE = 'serialization_failure';
    END IF;
END
$fn$;
"""


class ReplicaBusy(ReplicaError):
    """Another ``replicate`` process writes to this replica database."""


@dataclass(frozen=True, slots=True)
class Position:
    """A source's applied position on a replica."""

    source: str
    lsn: LSN
    stream_seq: int
    commit_time: datetime | None
    origin: str


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Create ``pgcapture.sources`` and its function when missing (idempotent)."""
    async with conn.transaction():
        await conn.execute(SCHEMA_SQL)


async def take_lock(
    conn: psycopg.AsyncConnection[Any], stop: asyncio.Event, wait: float | None = None
) -> bool:
    """Hold the replica's single-writer lock on this session; False if ``stop`` came first.

    While another session holds it, wait, logging its holder every ``_REPORT_EVERY`` seconds;
    past ``wait`` seconds (None: no bound) ``ReplicaBusy`` names it."""
    await _die_with_client(conn)
    deadline = math.inf if wait is None else time.monotonic() + wait
    reported = -math.inf
    while not stop.is_set():
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", LOCK_KEYS)
        row = await cur.fetchone()
        if row and row[0]:
            return True
        who = await _lock_holder(conn)
        if time.monotonic() >= deadline:
            raise ReplicaBusy(
                f"another pgcapture replicate writes to database {conn.info.dbname!r}: {who} "
                f"holds its lock (waited for {wait or 0:g}s as replica.lock_wait says); run one "
                "replicate per replica database (stop the other one first), or leave "
                "lock_wait unset so that replicate waits for the lock"
            )
        if time.monotonic() - reported >= _REPORT_EVERY:
            reported = time.monotonic()
            log.warning(
                "another pgcapture replicate writes to database %r: %s holds its lock; waiting "
                "for it (a replicate that was killed leaves when its server process notices)",
                conn.info.dbname, who,
            )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()
    return False


async def _die_with_client(conn: psycopg.AsyncConnection[Any]) -> None:
    """Make this session's backend end soon after its client does (see the module docstring)."""
    for name, value in _DIE_WITH_CLIENT.items():
        await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    if conn.info.server_version >= 140000:
        # Refused where the kernel cannot tell (e.g. Windows): keepalives must do there.
        with contextlib.suppress(psycopg.errors.InvalidParameterValue):
            await conn.execute("SET client_connection_check_interval = '2s'")


async def _lock_holder(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute(
        "SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l "
        "JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = %s AND l.objid = %s AND l.granted",
        (LOCK_KEYS[0] & 0xFFFFFFFF, LOCK_KEYS[1]),
    )
    holder = await cur.fetchone()
    if holder is None:
        return "another session"
    return (
        f"backend PID {holder[0]} ({holder[1] or 'no application name'}, "
        f"from {holder[2] or 'a local socket'})"
    )


async def read_position(conn: psycopg.AsyncConnection[Any], source: str) -> Position | None:
    cur = await conn.execute(
        "SELECT lsn::text, stream_seq, commit_time, origin FROM pgcapture.sources WHERE id = %s",
        (source,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return Position(source, LSN.parse(row[0]), row[1], row[2], row[3])


async def set_position(
    conn: psycopg.AsyncConnection[Any],
    source: str,
    lsn: int,
    origin: str,
    replace: bool = False,
) -> Position:
    """Record that the replica holds every transaction of ``source`` committed at or before
    ``lsn`` (a bootstrap's result). An existing position is kept unless ``replace``."""
    await ensure_schema(conn)
    async with conn.transaction():
        current = await read_position(conn, source)
        if current is not None and not replace:
            raise ConfigError(
                f"the replica already has a position for source {source!r}: {current.lsn} "
                f"(from {current.origin}); bootstrapping again would apply changes twice or "
                "skip some. Use a fresh database, or replace the position on purpose"
            )
        await conn.execute(
            "INSERT INTO pgcapture.sources (id, lsn, stream_seq, origin) VALUES (%s, %s, 0, %s) "
            "ON CONFLICT (id) DO UPDATE SET lsn = excluded.lsn, stream_seq = 0, "
            "commit_time = NULL, apply_time = NULL, origin = excluded.origin",
            (source, str(LSN(lsn)), origin),
        )
    position = await read_position(conn, source)
    assert position is not None
    return position
