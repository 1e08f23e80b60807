"""Which captured DDL statements a replica runs, and how (docs/replica.md, "DDL").

A ``pgcapture.ddl_logs`` row (docs/ddl.md) arrives as an insert in the transaction that ran the
statement, in order with that transaction's data changes. ``decide`` turns it into a ``Ddl``:
the exact captured text to run, under the ``search_path`` the statement ran with, or a reason to
skip it. The rules:

* A statement of the client's query string that is only the start of one of the string's
  statements, as PostgreSQL's parser (pglast) cuts it, is replayed whole: a capture before
  issue 14 cut ``CREATE RULE ... DO (a; b)`` at its inner semicolon.
* ``exact = false`` rows are never run: the text may hold statements that did not run on the
  source. Replication stops with ``DdlNotReplayable`` naming the row; after applying its effect
  by hand, the operator lets replication go on with ``--skip-ddl ID``.
* Skipped: REFRESH MATERIALIZED VIEW (materialized views are not replicated; refreshing them
  would lock them and recompute from the replica), CREATE/ALTER/DROP PUBLICATION and
  SUBSCRIPTION (replication settings of the source, not schema), statements whose objects all
  live in the ``pgcapture`` schema, and rows listed in ``--skip-ddl``.
* ``CONCURRENTLY`` is dropped from CREATE INDEX, DROP INDEX and ALTER TABLE ... DETACH
  PARTITION: the statement then runs inside the apply transaction, atomically with the replica
  position, instead of needing a transaction of its own (the replica has no writers to keep
  going meanwhile); ``DETACH PARTITION ... FINALIZE`` is then skipped.
* CREATE TABLE AS and SELECT INTO arrive as the CREATE TABLE they made on the source
  (``activity.effect``, docs/ddl.md), and their rows follow in the stream. A row logged as
  written (an older capture, or a query whose columns the source could not take) creates and
  fills the table from the replica's own data; when the source's rows for the new table follow
  in the same transaction, they replace those (``creates``).
* DROP TABLE (without IF EXISTS) carries the tables it names and its IF EXISTS form
  (``drops``): when the only tables of it missing on the replica are listed in
  ``--create-missing`` (a skipped statement created them and no change of theirs came), the
  replica runs the IF EXISTS form.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from pgcapture.capture.ddl import statement_spans
from pgcapture.errors import ReplicaError
from pgcapture.proto import pb

_I32 = struct.Struct(">i")
_SKIP_NODES: Final = (
    "RefreshMatViewStmt",
    "CreatePublicationStmt",
    "AlterPublicationStmt",
    "CreateSubscriptionStmt",
    "AlterSubscriptionStmt",
    "DropSubscriptionStmt",
)


class DdlNotReplayable(ReplicaError):
    """A captured DDL statement cannot be run automatically; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Ddl:
    """One captured statement, decided: ``sql`` to run (None: skipped for ``skip``)."""

    id: int
    query: str | None
    sql: str | None
    search_path: str | None
    skip: str | None = None
    settings: str | None = None  # the source session's settings, a JSON object
    creates: tuple[str | None, str] | None = None  # CTAS / SELECT INTO target (schema, name)
    # DROP TABLE without IF EXISTS: the tables it names, and the statement with IF EXISTS (run
    # when the only tables missing on the replica are listed in --create-missing)
    drops: tuple[tuple[str | None, str], ...] = ()
    drop_if_exists: str | None = None

    def describe(self) -> str:
        text = " ".join((self.query or "").split())
        return f"DDL row {self.id} ({text[:200]}{'...' if len(text) > 200 else ''})"


def ddl_row(change: pb.Change) -> tuple[int, str | None, dict[str, Any]]:
    """``(id, query, activity)`` of a ``pgcapture.ddl_logs`` insert (binary or text values)."""
    values = {f.name: f for f in change.new}
    try:
        field = values["id"]
        # text when capture read the transaction with binary off (docs/operations.md)
        ident = (
            int(field.text) if field.WhichOneof("value") == "text" else _I32.unpack(field.binary)[0]
        )
    except (KeyError, ValueError, struct.error):
        raise ReplicaError(
            "a pgcapture.ddl_logs row without a readable id reached the replica; the source's "
            "DDL capture is not pgcapture's (reinstall it with pgcapture capture)"
        ) from None
    query_field = values.get("query")
    query = _text(query_field) if query_field is not None else None
    activity: dict[str, Any] = {}
    found = values.get("activity")
    raw = _text(found) if found is not None else None
    if raw:
        if found is not None and found.WhichOneof("value") == "binary":
            raw = raw[1:]  # jsonb's binary format: a version byte, then the text
        try:
            activity = json.loads(raw)
        except ValueError:
            activity = {}
    return ident, query, activity


def _text(field: pb.Field) -> str | None:
    kind = field.WhichOneof("value")
    if kind == "binary":
        return field.binary.decode("utf-8", "replace")
    if kind == "text":
        return field.text
    return None


def _whole_statement(query: str, activity: dict[str, Any]) -> str:
    """The statement of the client's query string that ``query`` starts, as the parser cuts it.

    A capture before issue 14 could cut a statement short at a semicolon inside it (the actions
    of ``CREATE RULE ... DO (a; b)``); such a row is replayed whole. ``query`` itself when it is
    one of the string's statements, when the string does not parse, when the row is not a
    statement of the client's string (nested, rewritten, logged by its effect), or when strings
    took backslash escapes (``standard_conforming_strings`` off, which the parser does not
    follow)."""
    top = activity.get("top_level_query")
    found = activity.get("settings")
    if (
        not isinstance(top, str)
        or activity.get("nested")
        or activity.get("effect")
        or activity.get("rewritten")
        or (isinstance(found, dict) and found.get("standard_conforming_strings") == "off")
    ):
        return query
    spans = _statement_spans(top)
    statements = [top[start:end] for start, end in spans]
    if query in statements:
        return query
    longer = [s for s in statements if s.startswith(query)]
    return longer[0] if len(longer) == 1 else query


@functools.lru_cache(maxsize=4)  # the rows of one migration script share its string
def _statement_spans(sql: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(statement_spans(sql))
    except Exception:  # pglast's ParseError, or a grammar newer than the source's
        return ()


def decide(change: pb.Change, skip_ids: frozenset[int] = frozenset()) -> Ddl:
    ident, query, activity = ddl_row(change)
    search_path = activity.get("search_path")
    path = search_path if isinstance(search_path, str) else None
    found = activity.get("settings")
    settings = (
        json.dumps({k: v for k, v in found.items() if isinstance(v, str)})
        if isinstance(found, dict) and found
        else None
    )

    def skipped(reason: str) -> Ddl:
        return Ddl(ident, query, None, path, reason)

    if query is None or not query.strip():
        return skipped("the row holds no statement")
    if ident in skip_ids:
        return skipped("listed in --skip-ddl")
    if not activity.get("exact", False):
        row = Ddl(ident, query, None, path)
        raise DdlNotReplayable(
            f"{row.describe()} is not known to be exactly the statement that ran on the source "
            f"({activity.get('reason') or 'no reason recorded'}), so it is not replayed. Apply "
            "its effect to the replica by hand (only the schema change: rows it wrote into "
            "published tables follow in the stream), then restart replicate with "
            f"--skip-ddl {ident}"
        )
    objects = activity.get("objects") or []
    if objects and all(
        isinstance(o, dict) and o.get("schema_name") == "pgcapture" for o in objects
    ):
        return skipped("it changes only pgcapture's own objects")
    query = _whole_statement(query, activity)
    # pglast (and its printers) take a quarter of a second to import: only when DDL comes
    from pglast import ast, parse_sql
    from pglast.enums import ObjectType
    from pglast.stream import RawStream

    try:
        statements = parse_sql(query)
    except Exception:  # the server ran it: let the replica's parser judge
        return Ddl(ident, query, query, path, settings=settings)
    if len(statements) != 1:
        return Ddl(ident, query, query, path, settings=settings)
    stmt = statements[0].stmt
    skip_drop = (ObjectType.OBJECT_PUBLICATION, ObjectType.OBJECT_SUBSCRIPTION)
    if type(stmt).__name__ in _SKIP_NODES or (
        isinstance(stmt, ast.DropStmt) and stmt.removeType in skip_drop
    ):
        return skipped(f"{type(stmt).__name__} is not replicated")
    if isinstance(stmt, ast.IndexStmt | ast.DropStmt) and getattr(stmt, "concurrent", False):
        stmt.concurrent = False
        return Ddl(ident, query, RawStream()(stmt), path, settings=settings)
    if isinstance(stmt, ast.AlterTableStmt):
        commands = [c for c in stmt.cmds or () if isinstance(c, ast.AlterTableCmd)]
        kinds = {c.subtype.name for c in commands if c.subtype is not None}
        if kinds == {"AT_DetachPartitionFinalize"}:
            return skipped("the replica detached the partition at once, not concurrently")
        detach = [
            c.def_ for c in commands
            if isinstance(c.def_, ast.PartitionCmd) and c.def_.concurrent
        ]  # fmt: skip
        if detach:
            for cmd in detach:
                cmd.concurrent = False
            return Ddl(ident, query, RawStream()(stmt), path, settings=settings)
    if (
        isinstance(stmt, ast.DropStmt)
        and stmt.removeType == ObjectType.OBJECT_TABLE
        and not stmt.missing_ok
    ):
        drops: list[tuple[str | None, str]] = []
        for parts in stmt.objects or ():
            names = [str(p.sval) for p in parts]
            if len(names) == 1:
                drops.append((None, names[0]))
            elif len(names) == 2:
                drops.append((names[0], names[1]))
            else:  # database.schema.table: left to the replica's judgment
                return Ddl(ident, query, query, path, settings=settings)
        stmt.missing_ok = True
        return Ddl(
            ident, query, query, path, settings=settings,
            drops=tuple(drops), drop_if_exists=RawStream()(stmt),
        )  # fmt: skip
    into = None
    if isinstance(stmt, ast.CreateTableAsStmt) and stmt.objtype == ObjectType.OBJECT_TABLE:
        into = stmt.into
    elif isinstance(stmt, ast.SelectStmt):
        into = stmt.intoClause
    creates = None
    if into is not None and into.rel is not None and into.rel.relname:
        creates = (into.rel.schemaname or None, str(into.rel.relname))
    return Ddl(ident, query, query, path, creates=creates, settings=settings)
