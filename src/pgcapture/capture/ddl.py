"""DDL capture with plain SQL: event triggers log every DDL statement into ``pgcapture.ddl_logs``.

Contract (the design is in docs/ddl.md):

* :func:`install_ddl_capture` runs ``ddl.sql`` in one transaction on the source database. It is
  idempotent: running it again replaces the functions and recreates the event triggers, and keeps
  the log table and its rows. Afterwards every DDL statement that changes the database's schema
  inserts one row ``(query, tags, activity)`` into ``pgcapture.ddl_logs`` in the statement's own
  transaction, so the row reaches logical replication in order with the data changes around it.
  ``query`` is the text of that one statement (``activity.exact`` says whether it could be
  determined exactly); statements on temporary objects and those run by an extension's script
  are not logged; ``CREATE EXTENSION`` itself is.
* Installing needs the right to create event triggers (superuser on PostgreSQL 15) and to create
  the ``pgcapture`` schema; a missing privilege raises :class:`~pgcapture.errors.PermissionDenied`
  naming it and the fix.
* :func:`split_statements` splits a query string into statements with PostgreSQL's own parser
  (through pglast). The server-side splitter ``pgcapture.split_statements(text)`` that the
  triggers use returns the same list for valid SQL; replicas can use this one to check a row.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors

from pgcapture.errors import PermissionDenied

# Characters the server's scanner treats as whitespace around statements.
_SQL_SPACE: Final = " \t\n\r\f\v"

_EVENT_TRIGGER_FIX: Final = (
    "connect as a superuser (PostgreSQL 15 lets only superusers create event triggers) or, on a "
    "managed service, as a role allowed to create event triggers (such as rds_superuser)"
)


def ddl_sql() -> bytes:
    """The installation script, as shipped in the package."""
    return resources.files("pgcapture.capture").joinpath("ddl.sql").read_bytes()


def _version() -> str:
    return hashlib.sha256(ddl_sql()).hexdigest()[:16]


def installed_marker() -> str:
    """The comment on schema ``pgcapture`` that says which ``ddl.sql`` is installed."""
    return f"pgcapture ddl capture {_version()}"


async def install_ddl_capture(conn: psycopg.AsyncConnection[Any]) -> None:
    """Install (or reinstall) DDL capture in ``conn``'s database, in one transaction."""
    script = ddl_sql().replace(b"@VERSION@", _version().encode())
    try:
        async with conn.transaction():
            await conn.execute(script)
    except pg_errors.InsufficientPrivilege as exc:
        raise PermissionDenied(_permission_message(conn, exc)) from exc


async def ensure_ddl_capture(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Install DDL capture unless this very version is installed with its triggers enabled, so
    that only installing and upgrading need the privilege to create event triggers. Returns
    whether it installed."""
    cur = await conn.execute(
        "SELECT obj_description(to_regnamespace('pgcapture'), 'pg_namespace'), "
        "(SELECT count(*) FROM pg_event_trigger WHERE evtenabled <> 'D' AND evtname IN "
        " ('pgcapture_ddl_command_start', 'pgcapture_sql_drop', 'pgcapture_ddl_command_end'))"
    )
    row = await cur.fetchone()
    if row is not None and row[0] == installed_marker() and row[1] == 3:
        return False
    await install_ddl_capture(conn)
    return True


def _permission_message(conn: psycopg.AsyncConnection[Any], exc: pg_errors.Error) -> str:
    problem = (exc.diag.message_primary or str(exc)).rstrip(".")
    db, role = conn.info.dbname, conn.info.user
    where = f"cannot install ddl capture in database {db!r} as role {role!r}"
    if "event trigger" in problem:
        fix = _EVENT_TRIGGER_FIX
    elif "for database" in problem:
        fix = (
            f"grant it with `GRANT CREATE ON DATABASE {db} TO {role}` "
            "(the pgcapture schema is created in it), or connect as a superuser"
        )
    elif "for schema" in problem or "must be owner" in problem:
        fix = "connect as the owner of the existing pgcapture schema and objects, or a superuser"
    else:
        fix = "connect as a superuser"
    return f"{where}: {problem.lower()}; {fix}"


def split_statements(sql: str) -> list[str]:
    """The statements of ``sql``, each without its semicolon and surrounding whitespace.

    A statement starts at its first token (comments before it belong to none) and ends before
    its semicolon, or at the end of the string; semicolons inside strings, quoted identifiers,
    comments, dollar quotes, rule actions in parentheses and ``BEGIN ATOMIC ... END`` bodies do
    not split. Raises ``pglast.parser.ParseError`` when ``sql`` does not parse.
    """
    return [sql[start:end] for start, end in statement_spans(sql)]


def statement_spans(sql: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of the statements of ``sql``, as ``split_statements``
    cuts them (``sql[start:end]`` is a statement)."""
    import pglast  # a quarter of a second to import: only when needed

    spans = []
    for raw in pglast.parse_sql(sql):
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(sql)  # 0: up to the end
        spans.append((start, start + len(sql[start:end].rstrip(_SQL_SPACE))))
    return spans
