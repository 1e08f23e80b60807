"""What a dump request means: the tables it names on the logical replica, cut into chunks.

``plan_dump`` connects (psycopg 3, async) to the logical replica of the URI's source
(``[sources.NAME.replica] dsn``), never to the source database, and turns a request into the
chunks of a dump:

* tables are ``"schema.table"`` or ``"table"`` (schema ``public``); none means every table with
  storage on the replica (``relkind 'r'``, partitions included, partitioned parents left out as
  their partitions hold the rows), outside ``pgcapture``, ``pg_catalog``,
  ``information_schema`` and ``pg_toast*``. A named partitioned table stands for its partitions.
* page-range chunks: the table's pages now (``pg_relation_size / block_size``) are cut into
  runs of ``n`` pages, ``n`` given or computed to hold about ``chunk_rows`` rows from the
  statistics; the last chunk of each table ends at ``LAST_PAGE`` so that rows on pages added
  later are dumped too, and an empty table is one chunk ``[0, LAST_PAGE]``.
* key chunks (one table only): each key a JSON object whose names are exactly the table's key
  columns on the replica (primary key, or REPLICA IDENTITY USING INDEX columns), up to
  ``KEYS_PER_CHUNK`` keys per chunk.

Every refusal is a ``DumpRefused`` with the gRPC status the client receives and a message that
names the problem, the value and the fix (DESIGN.md, contract 8).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
import psycopg

from pgcapture.config import SourceConfig
from pgcapture.dump.chunks import LAST_PAGE
from pgcapture.errors import PgCaptureError
from pgcapture.proto import pb

KEYS_PER_CHUNK: Final = 1000
ASSUMED_ROWS_PER_PAGE: Final = 100  # for a table never analyzed
_SKIPPED_SCHEMAS: Final = ["pgcapture", "pg_catalog", "information_schema"]

_SIZE_COLUMNS: Final = """
SELECT n.nspname, c.relname, pg_relation_size(c.oid) / current_setting('block_size')::bigint,
       c.reltuples, c.relpages"""
_ALL_TABLES_SQL: Final = (
    _SIZE_COLUMNS
    + """
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname <> ALL(%s)
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
ORDER BY n.nspname, c.relname"""
)
_TABLES_SQL: Final = (
    _SIZE_COLUMNS
    + """
FROM unnest(%s::oid[]) WITH ORDINALITY AS o(oid, position)
JOIN pg_class c ON c.oid = o.oid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
ORDER BY o.position"""
)
_LOOKUP_SQL: Final = """
SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""
_LEAVES_SQL: Final = "SELECT relid FROM pg_partition_tree(%s) WHERE isleaf"
# The columns that identify a row in the replicated stream: the REPLICA IDENTITY USING INDEX
# index when there is one, else the primary key (PostgreSQL docs, ALTER TABLE ... REPLICA
# IDENTITY).
_KEY_COLUMNS_SQL: Final = """
SELECT a.attname
FROM pg_class c
JOIN pg_index i ON i.indrelid = c.oid
  AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE c.oid = %s::regclass
ORDER BY k.position
"""


class DumpRefused(PgCaptureError):
    """A request the controller refuses; ``code`` is the gRPC status the client receives."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TableSize:
    """A table on the replica: its current size in pages and its statistics."""

    schema: str
    name: str
    pages: int
    reltuples: float  # -1 (PostgreSQL 14+) or 0 when never analyzed
    relpages: int

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Plan:
    """The chunks of a dump, in order, with the tables they cover and the rows expected."""

    tables: list[str]
    chunks: list[pb.DumpInfoResponse]
    rows_estimate: int


def parse_table_name(name: str) -> tuple[str, str]:
    """``"schema.table"`` or ``"table"`` (schema ``public``)."""
    schema, dot, table = name.strip().partition(".")
    if not dot:
        schema, table = "public", schema
    if not schema or not table:
        raise DumpRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'table {name!r} is not a table name; write "schema.table" or "table"',
        )
    return schema, table


def pages_per_chunk(table: TableSize, chunk_pages: int, chunk_rows: int) -> int:
    """``chunk_pages`` when set, else enough pages for about ``chunk_rows`` rows."""
    if chunk_pages > 0:
        return chunk_pages
    per_page: float = ASSUMED_ROWS_PER_PAGE
    if table.reltuples > 0 and table.relpages > 0:
        per_page = table.reltuples / table.relpages
    return max(1, int(chunk_rows / per_page))


def page_ranges(pages: int, per_chunk: int) -> list[tuple[int, int]]:
    """``[0, n-1], [n, 2n-1], ...`` over ``pages`` pages, the last one open-ended."""
    ranges = [(begin, begin + per_chunk - 1) for begin in range(0, pages, per_chunk)]
    if not ranges:
        return [(0, LAST_PAGE)]
    ranges[-1] = (ranges[-1][0], LAST_PAGE)
    return ranges


def table_chunks(table: TableSize, per_chunk: int) -> list[pb.DumpInfoResponse]:
    return [
        pb.DumpInfoResponse(schema=table.schema, table=table.name, page_begin=b, page_end=e)
        for b, e in page_ranges(table.pages, per_chunk)
    ]


def check_keys(table: str, columns: Sequence[str], keys: Sequence[str]) -> None:
    """Each key is a JSON object naming exactly ``columns``, none of them null."""
    if not columns:
        raise DumpRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"table {table} has neither a primary key nor a REPLICA IDENTITY USING INDEX on "
            "the replica, so it cannot be dumped by key; dump it whole (no keys) or give it a "
            "primary key",
        )
    wanted = set(columns)
    example = "{" + ", ".join(f'"{c}": ...' for c in columns) + "}"
    for key in keys:
        value = _json_object(key)
        problem = _key_problem(value, columns, wanted) if value is not None else "is not an object"
        if problem:
            raise DumpRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"key {key!r} {problem}; each key of {table} is a JSON object of its key "
                f"columns ({', '.join(columns)}), e.g. {example}",
            )


def _json_object(key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(key)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _key_problem(value: dict[str, Any], columns: Sequence[str], wanted: set[str]) -> str:
    for column in columns:
        if column not in value:
            return f"lacks key column {column!r}"
        if value[column] is None:
            return f"has null for key column {column!r}"
    unknown = sorted(set(value) - wanted)
    return f"names {unknown[0]!r}, which is not a key column" if unknown else ""


def key_chunks(schema: str, table: str, keys: Sequence[str]) -> list[pb.DumpInfoResponse]:
    return [
        pb.DumpInfoResponse(schema=schema, table=table, keys=keys[i : i + KEYS_PER_CHUNK])
        for i in range(0, len(keys), KEYS_PER_CHUNK)
    ]


async def plan_dump(
    source: SourceConfig,
    tables: Sequence[str],
    keys: Sequence[str],
    chunk_pages: int,
    chunk_rows: int,
) -> Plan:
    """The chunks of a dump of ``tables`` (every table when empty) of ``source``'s replica."""
    if keys and len(tables) != 1:
        raise DumpRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"keys select rows of exactly one table, and {len(tables)} tables were given; "
            "name the one table the keys belong to",
        )
    names = [parse_table_name(t) for t in tables]
    async with await _connect_replica(source) as conn:
        sizes = await _table_sizes(conn, source, names)
        if keys:
            return await _key_plan(conn, sizes[0], keys)
    chunks = [
        c for t in sizes for c in table_chunks(t, pages_per_chunk(t, chunk_pages, chunk_rows))
    ]
    estimate = sum(max(int(t.reltuples), 0) for t in sizes)
    return Plan([t.qualified for t in sizes], chunks, estimate)


async def _key_plan(
    conn: psycopg.AsyncConnection[Any], table: TableSize, keys: Sequence[str]
) -> Plan:
    cur = await conn.execute(_KEY_COLUMNS_SQL, (_quoted(table.schema, table.name),))
    columns = [row[0] for row in await cur.fetchall()]
    check_keys(table.qualified, columns, keys)
    return Plan([table.qualified], key_chunks(table.schema, table.name, keys), len(keys))


def _quoted(schema: str, table: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))


async def _connect_replica(source: SourceConfig) -> psycopg.AsyncConnection[Any]:
    key = f"sources.{source.name}.replica.dsn"
    if not source.replica.dsn:
        raise DumpRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{key} is not set; dumps are read from the logical replica of source "
            f"{source.name!r}, never from the source: set {key} to the replica's dsn",
        )
    try:
        return await psycopg.AsyncConnection.connect(
            source.replica.dsn, autocommit=True, connect_timeout=10
        )
    except psycopg.Error as exc:
        raise DumpRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot connect to the replica of source {source.name!r} ({key}): "
            f"{str(exc).strip()}; check {key} and that the replica is up",
        ) from exc


async def _table_sizes(
    conn: psycopg.AsyncConnection[Any], source: SourceConfig, names: list[tuple[str, str]]
) -> list[TableSize]:
    if not names:
        cur = await conn.execute(_ALL_TABLES_SQL, (_SKIPPED_SCHEMAS,))
    else:
        oids: list[int] = []
        for schema, table in names:
            oids.extend(o for o in await _resolve(conn, source, schema, table) if o not in oids)
        cur = await conn.execute(_TABLES_SQL, (oids,))
    sizes = [TableSize(*row) for row in await cur.fetchall()]
    if not sizes:
        raise DumpRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the replica of source {source.name!r} has no table with storage to dump "
            f"(asked for: {', '.join('.'.join(n) for n in names) or 'every table'}); create "
            "the tables there first (pgcapture bootstrap)",
        )
    return sizes


async def _resolve(
    conn: psycopg.AsyncConnection[Any], source: SourceConfig, schema: str, table: str
) -> list[int]:
    """The oids of table ``schema.table``: itself, or a partitioned table's partitions."""
    cur = await conn.execute(_LOOKUP_SQL, (schema, table))
    row = await cur.fetchone()
    if row is None:
        raise DumpRefused(
            grpc.StatusCode.NOT_FOUND,
            f"table {schema}.{table} does not exist on the replica of source {source.name!r}; "
            'check the name (write "schema.table"; the schema defaults to public)',
        )
    oid, kind = row
    if kind == "r":
        return [oid]
    cur = await conn.execute(_LEAVES_SQL, (oid,))
    return [leaf for (leaf,) in await cur.fetchall() if leaf != oid]
