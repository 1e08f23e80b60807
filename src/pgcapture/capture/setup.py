"""Preparing a source database for capture: checks, DDL capture, publication and slot.

Everything here runs on an ordinary connection, is idempotent, and fails with one message that
names what is wrong and how to fix it (DESIGN.md, contract 8) before anything is changed:
server version and ``wal_level`` first, then the role's privileges, then the tables asked for.

The publication carries ``pgcapture.ddl_logs`` in every case, so DDL flows in order with the
data. Without a table list it is ``FOR ALL TABLES``; with one, it is kept equal to that list
(plus ``ddl_logs``) with ``ALTER PUBLICATION ... SET TABLE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg import sql

from pgcapture.capture.ddl import ensure_ddl_capture
from pgcapture.errors import ConfigError, PermissionDenied, SlotInUse, UnsupportedServer
from pgcapture.lsn import LSN

MIN_SERVER_VERSION: Final = 140000  # binary values in pgoutput
DDL_TABLE: Final = ("pgcapture", "ddl_logs")

AsyncConn = psycopg.AsyncConnection[Any]


def server_problem(version_num: int, version: str, wal_level: str) -> str | None:
    """Why this server cannot be captured from, or None."""
    if version_num < MIN_SERVER_VERSION:
        return (
            f"PostgreSQL {version} is not supported; pgcapture needs PostgreSQL 14 or newer "
            "(for binary values in logical replication)"
        )
    if wal_level != "logical":
        return (
            f'wal_level is "{wal_level}"; logical replication needs wal_level=logical '
            "(ALTER SYSTEM SET wal_level = logical; then restart the server)"
        )
    return None


async def check_server(conn: AsyncConn) -> None:
    cur = await conn.execute(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version'), "
        "current_setting('wal_level')"
    )
    row = await cur.fetchone()
    assert row is not None
    problem = server_problem(*row)
    if problem:
        raise UnsupportedServer(problem)


async def check_role(conn: AsyncConn) -> None:
    cur = await conn.execute(
        "SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    )
    row = await cur.fetchone()
    if row is None:
        return
    user, superuser, replication = row
    if not (superuser or replication):
        raise PermissionDenied(
            f'role "{user}" lacks the REPLICATION privilege needed to read a replication slot; '
            f'grant it with ALTER ROLE "{user}" REPLICATION'
        )


async def resolve_tables(conn: AsyncConn, names: Sequence[str]) -> list[tuple[str, str]]:
    """Resolve ``--tables`` entries as PostgreSQL would (search_path, quoting) to
    (schema, table); a name that does not resolve to a table is an error."""
    out: list[tuple[str, str]] = []
    for name in names:
        try:
            cur = await conn.execute(
                "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
                (name,),
            )
            row = await cur.fetchone()
        except psycopg.errors.InvalidName as exc:
            raise ConfigError(f"table name {name!r} in --tables is not valid: {exc}") from exc
        if row is None or row[2] not in ("r", "p"):
            raise ConfigError(
                f"table {name!r} in --tables does not exist in this database; "
                "create it first or fix the name (schema.table, quoted if mixed case)"
            )
        out.append((row[0], row[1]))
    return out


async def ensure_publication(
    conn: AsyncConn, name: str, tables: list[tuple[str, str]] | None
) -> None:
    """Create the publication, or bring an existing one in line with ``tables``."""
    cur = await conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (name,))
    row = await cur.fetchone()
    wanted_all = tables is None
    pub = sql.Identifier(name)
    try:
        # One transaction: a failure never leaves the source without its publication.
        async with conn.transaction():
            if row is not None and row[0] != wanted_all:
                await conn.execute(sql.SQL("DROP PUBLICATION {}").format(pub))
                row = None
            if tables is None:
                if row is None:
                    await conn.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(pub))
            elif row is None:
                await conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(pub, _table_list(tables))
                )
            elif set(await _published(conn, name)) != _with_ddl(tables):
                await conn.execute(
                    sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(pub, _table_list(tables))
                )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PermissionDenied(
            f"cannot create or change publication {name!r}: {exc}; {_publication_fix(wanted_all)}"
        ) from exc


def _publication_fix(all_tables: bool) -> str:
    if all_tables:
        return "FOR ALL TABLES needs a superuser; list the tables with --tables instead"
    return (
        "publishing a table needs ownership of it, pgcapture.ddl_logs included: run this "
        "setup once as a superuser (later runs with the same slot and tables need no such "
        "privilege), or make the capture role own the listed tables and pgcapture.ddl_logs"
    )


def _with_ddl(tables: list[tuple[str, str]]) -> set[tuple[str, str]]:
    return {*tables, DDL_TABLE}


def _table_list(tables: list[tuple[str, str]]) -> sql.Composed:
    """The listed tables and pgcapture.ddl_logs, quoted, for FOR TABLE / SET TABLE."""
    return sql.SQL(", ").join(sql.Identifier(*t) for t in sorted(_with_ddl(tables)))


async def _published(conn: AsyncConn, name: str) -> list[tuple[str, str]]:
    cur = await conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication p "
        "JOIN pg_publication_rel pr ON pr.prpubid = p.oid "
        "JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pubname = %s",
        (name,),
    )
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def slot_position(conn: AsyncConn, slot: str) -> LSN | None:
    """The confirmed position of an existing slot (None if there is none); a slot of another
    database or plugin, or one in use, is an error."""
    cur = await conn.execute(
        "SELECT plugin, database, active_pid, confirmed_flush_lsn::text, current_database() "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    plugin, database, pid, confirmed, current = row
    if plugin != "pgoutput" or database != current:
        raise ConfigError(
            f"replication slot {slot!r} exists but is a {plugin or 'physical'} slot of database "
            f"{database!r}; pgcapture needs a pgoutput slot of {current!r}: choose another "
            "--slot name"
        )
    if pid is not None:
        raise SlotInUse(
            f"replication slot {slot!r} is active for PID {pid}; another process is reading it: "
            "stop it, or use another slot"
        )
    return LSN.parse(confirmed) if confirmed else None


async def create_slot(conn: AsyncConn, slot: str) -> LSN:
    try:
        cur = await conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PermissionDenied(
            f"cannot create replication slot {slot!r}: {exc}; grant REPLICATION to the role"
        ) from exc
    row = await cur.fetchone()
    assert row is not None
    return LSN.parse(row[0])


async def prepare_source(
    conn: AsyncConn,
    slot: str,
    publication: str,
    tables: Sequence[str] | None,
    create: bool = True,
) -> LSN | None:
    """Check the server, install DDL capture if it is missing or outdated, ensure the
    publication and (unless ``create`` is false, for temporary slots) the slot; returns the
    slot's confirmed position, None when there is no slot. ``conn`` must be in autocommit
    mode."""
    await check_server(conn)
    await check_role(conn)
    resolved = await resolve_tables(conn, tables) if tables else None
    await ensure_ddl_capture(conn)
    await ensure_publication(conn, publication, resolved)
    position = await slot_position(conn, slot)
    if position is None and create:
        position = await create_slot(conn, slot)
    return position
