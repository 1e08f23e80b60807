"""Masking a copy before anyone reads it, and every row that reaches it later.

``[offlinedb.databases.NAME] masks`` maps ``"schema.table.column"`` to a SQL expression over the
table's columns (``"md5(email)"``, ``"NULL"``, ``"left(phone, 3) || '****'"``). ``mask_copy``
runs on a new copy, in one transaction, before the copy accepts any client:

1. for each masked table, ``UPDATE`` every row with the expressions;
2. a ``BEFORE INSERT OR UPDATE`` trigger applying the same expressions to each new row version,
   enabled ``ALWAYS`` so it also fires for ``pgcapture replicate`` (which applies the change log
   under ``session_replication_role = replica``): rows that arrive from the log are masked as
   they are written;
3. the ``scripts`` (any SQL: drop a table, truncate an audit log, revoke privileges), in order.

Any failure rolls everything back and raises ``MaskingFailed`` naming the mask or script; the
copy is then never served.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgcapture.errors import PgCaptureError

SCHEMA = "pgcapture_offlinedb"


class MaskingFailed(PgCaptureError):
    """A mask or a startup script failed on a new copy; the copy is not served."""


def _by_table(masks: dict[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    tables: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for target, expression in masks.items():
        parts = target.split(".")
        if len(parts) != 3 or not all(parts):
            raise MaskingFailed(
                f"mask {target!r}: name a column as schema.table.column (e.g. public.users.email)"
            )
        tables[(parts[0], parts[1])][parts[2]] = expression
    return tables


async def mask_copy(
    conn: psycopg.AsyncConnection[Any], masks: dict[str, str], scripts: list[Path]
) -> None:
    """Mask the copy behind ``conn`` (see the module docstring); all or nothing."""
    tables = _by_table(masks)
    try:
        async with conn.transaction():
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA))
            )
            for (schema, table), columns in tables.items():
                await _mask_table(conn, schema, table, columns)
            for script in scripts:
                await _run_script(conn, script)
    except MaskingFailed:
        raise
    except psycopg.Error as exc:
        raise MaskingFailed(f"masking the copy failed: {_first_line(exc)}") from exc


async def _mask_table(
    conn: psycopg.AsyncConnection[Any], schema: str, table: str, columns: dict[str, str]
) -> None:
    target = sql.Identifier(schema, table)
    what = f"{schema}.{table}"
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = ({})").format(sql.Identifier(c), sql.SQL(e)) for c, e in columns.items()
    )
    try:
        await conn.execute(sql.SQL("UPDATE {} SET {}").format(target, assignments))
    except psycopg.Error as exc:
        raise MaskingFailed(
            f"mask of {what} ({', '.join(f'{c} = {e}' for c, e in columns.items())}) failed: "
            f"{_first_line(exc)}; fix [offlinedb.databases] masks"
        ) from exc
    name = "mask_" + hashlib.sha1(what.encode()).hexdigest()[:16]
    function = sql.Identifier(SCHEMA, name)
    # Each expression reads the new row version's columns by name.
    body = sql.SQL(" ").join(
        sql.SQL("NEW.{} := (SELECT {} FROM (SELECT NEW.*) AS row);").format(
            sql.Identifier(c),
            sql.SQL(e),
        )
        for c, e in columns.items()
    )
    await conn.execute(
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
            function,
            sql.Literal(sql.SQL("BEGIN {} RETURN NEW; END").format(body).as_string(conn)),
        )
    )
    trigger = sql.Identifier("pgcapture_offlinedb_mask")
    await conn.execute(
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} "
            "FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(trigger, target, function)
    )
    await conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(target, trigger))


async def _run_script(conn: psycopg.AsyncConnection[Any], script: Path) -> None:
    try:
        text = await asyncio.to_thread(script.read_text)
    except OSError as exc:
        raise MaskingFailed(f"cannot read masking script {script}: {exc.strerror}") from exc
    try:
        async with conn.transaction():  # a savepoint: the error names the script
            await conn.execute(text)
    except psycopg.Error as exc:
        raise MaskingFailed(
            f"masking script {script.name} failed: {_first_line(exc)}; fix the script"
        ) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
