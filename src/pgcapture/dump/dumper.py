"""Reading one dump chunk on a logical replica (DESIGN.md, contract 6; docs/dumps.md).

``read_chunk`` runs on a connection to the replica, never the source, in ONE transaction,
``REPEATABLE READ READ ONLY``, so the replica's position and the rows are one snapshot:

1. ``pgcapture.sources`` gives the position of the source: every source transaction that
   committed at or before it is applied. No row, or a position before the consumer's
   ``min_lsn``, is a retryable refusal (``NoPosition``, ``ReplicaBehind``): the consumer must
   never receive a row older than what it has already seen.
2. The replica's catalog gives the columns: attnum order, dropped and generated columns left
   out (pgoutput sends neither), ``key`` on the replica-identity columns exactly as pgoutput
   flags them (and so capture): primary key under REPLICA IDENTITY DEFAULT, the index's key
   columns under USING INDEX, every column under FULL, none under NOTHING. A type without a
   binary send function, or one holding such a type at any depth (``aclitem[]``, a domain over
   it, a composite with an ``aclitem`` attribute, an array of that: binary COPY fails on them),
   is selected as text and sent as ``Field.text`` with the column's own OID, as capture does.
3. ``COPY (SELECT ... WHERE ctid >= '(begin,0)' AND ctid <= '(end,65535)') TO STDOUT (FORMAT
   binary)``: a Tid Range Scan on PostgreSQL 14+; a chunk ending at ``LAST_PAGE`` has no upper
   bound (it reads whatever the table holds past ``begin``). A chunk with ``keys`` instead
   selects the rows whose key columns equal one of the JSON objects.

Rows stream from COPY in batches of at most ``batch_rows`` rows or about ``batch_bytes`` bytes
of serialized ``Change`` messages (``copyrows.CopyChanges``); a chunk is never held in memory
whole. Errors are ``DumpError`` subclasses whose ``reason`` names them for metrics; the gRPC
service (``agent.py``) turns each into its status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import psycopg
from psycopg import pq, sql
from psycopg.generators import fetch_many
from psycopg.pq.abc import PGconn

from pgcapture.dump.chunks import LAST_PAGE, describe
from pgcapture.dump.copyrows import Column, CopyChanges
from pgcapture.errors import PgCaptureError
from pgcapture.lsn import LSN
from pgcapture.proto import pb
from pgcapture.typewalk import held_types


class DumpError(PgCaptureError):
    """A chunk that cannot be read now; ``reason`` labels it in metrics."""

    reason: ClassVar[str] = "failed"


class NoPosition(DumpError):
    """The replica has no applied position for the source (retryable)."""

    reason = "no_position"


class ReplicaBehind(DumpError):
    """The replica has not applied the consumer's position yet (retryable)."""

    reason = "behind"


class ReplicaUnavailable(DumpError):
    """The replica cannot be reached, or the connection broke (retryable)."""

    reason = "unavailable"


class TableMissing(DumpError):
    """The chunk's table does not exist on the replica."""

    reason = "missing_table"


class BadChunk(DumpError):
    """The request cannot name a chunk: empty table, keys that are not JSON objects..."""

    reason = "bad_request"


@dataclass(frozen=True, slots=True)
class BatchLimits:
    rows: int = 1000
    bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table's columns as a chunk selects them, and its replica identity."""

    columns: list[Column]
    identity: str  # pg_class.relreplident: d, i, f or n


_POSITION_SQL: Final = "SELECT lsn::text FROM pgcapture.sources WHERE id = %s"
_COLUMNS_SQL: Final = f"""
SELECT c.relreplident, a.attname, a.atttypid::int, t.typlen > 0, coalesce(x.text, false),
       CASE c.relreplident
           WHEN 'f' THEN true
           WHEN 'n' THEN false
           ELSE EXISTS (
               SELECT FROM pg_index i, generate_series(0, i.indnkeyatts - 1) k
               WHERE i.indrelid = c.oid AND i.indkey[k] = a.attnum AND i.indimmediate
                 AND CASE c.relreplident
                         WHEN 'd' THEN i.indisprimary AND (i.indisvalid OR c.relkind = 'p')
                         ELSE i.indisreplident END)
       END
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
LEFT JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN LATERAL (  -- whether the type, or one it holds at any depth, has no binary send
    WITH RECURSIVE {held_types("(VALUES (a.atttypid)) AS x(r)")}
    SELECT bool_or(u.typsend::oid = 0) AS text FROM held AS h JOIN pg_type AS u ON u.oid = h.typ
) AS x ON true
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
"""


def _parse_keys(info: pb.DumpInfoResponse) -> list[dict[str, Any]]:
    keys = []
    for text in info.keys:
        try:
            key = json.loads(text)
        except ValueError:
            key = None
        if not isinstance(key, dict) or not key:
            raise BadChunk(
                f"key {text!r} of {describe(info)} is not a JSON object of key columns, e.g. "
                '{"id": 42}'
            )
        keys.append(key)
    return keys


def check_chunk(info: pb.DumpInfoResponse) -> list[dict[str, Any]]:
    """Refuse a request that names no chunk; the parsed keys of a key chunk."""
    if not info.table or not info.schema:
        raise BadChunk(
            f"the chunk names no {'table' if not info.table else 'schema'} "
            f"(schema {info.schema!r}, table {info.table!r}); set both in DumpInfoResponse"
        )
    if not info.keys and info.page_begin > info.page_end:
        raise BadChunk(f"{describe(info)}: page_begin is after page_end")
    return _parse_keys(info)


async def _position(conn: psycopg.AsyncConnection[Any], source: str, min_lsn: int) -> LSN:
    try:
        cur = await conn.execute(_POSITION_SQL, (source,))
    except psycopg.errors.UndefinedTable:
        row = None
    else:
        row = await cur.fetchone()
    if row is None:
        raise NoPosition(
            f"the replica has no position for source {source!r}: bootstrap it or start "
            "replicate (pgcapture.sources holds no row for it)"
        )
    lsn = LSN.parse(row[0])
    if lsn < min_lsn:
        raise ReplicaBehind(
            f"the replica has applied source {source!r} up to {lsn}, the consumer is at "
            f"{LSN(min_lsn)}; the chunk is retried once the replica catches up"
        )
    return lsn


async def read_table(conn: psycopg.AsyncConnection[Any], info: pb.DumpInfoResponse) -> TableInfo:
    """The chunk's table as the replica's catalog describes it (``TableMissing`` if absent)."""
    cur = await conn.execute(_COLUMNS_SQL, (info.schema, info.table))
    rows = await cur.fetchall()
    if not rows:
        raise TableMissing(f"table {info.schema}.{info.table} does not exist on the replica")
    columns = [
        Column(name, oid, key=key, text=text, fixed=fixed and not text)
        for _, name, oid, fixed, text, key in rows
        if name is not None  # a table without columns
    ]
    return TableInfo(columns, rows[0][0])


def _key_columns(
    table: TableInfo, info: pb.DumpInfoResponse, keys: list[dict[str, Any]]
) -> list[str]:
    """The columns a key chunk matches on: the replica identity's, or under REPLICA IDENTITY
    FULL (every column is the identity) those the objects name. Every object names them all."""
    names = [c.name for c in table.columns]
    key = [c.name for c in table.columns if c.key] if table.identity != "f" else list(keys[0])
    if not key:
        raise BadChunk(
            f"{describe(info)}: the table has no key on the replica (no primary key, or "
            "REPLICA IDENTITY NOTHING), so rows cannot be chosen by key; dump its pages instead"
        )
    for obj in keys:
        unknown = [k for k in obj if k not in names]
        if unknown or sorted(obj) != sorted(key):
            what = f"names unknown columns {unknown}" if unknown else "is not made of them"
            raise BadChunk(
                f"{describe(info)}: the key columns are ({', '.join(key)}) and key "
                f"{json.dumps(obj)} {what}; each key is a JSON object of exactly those columns"
            )
    return key


def select_statement(
    info: pb.DumpInfoResponse, table: TableInfo, keys: list[dict[str, Any]]
) -> sql.Composed:
    """The SELECT of a chunk's rows, its columns as ``copyrows`` expects them."""
    columns = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.text else sql.Identifier(c.name)
        for c in table.columns
    )
    name = sql.Identifier(info.schema, info.table)
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(columns, name, _where(info, table, keys))


def _where(
    info: pb.DumpInfoResponse, table: TableInfo, keys: list[dict[str, Any]]
) -> sql.Composable:
    if keys:
        key = sql.SQL(", ").join(map(sql.Identifier, _key_columns(table, info, keys)))
        return sql.SQL(
            "({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, {}::jsonb))"
        ).format(key, key, sql.Identifier(info.schema, info.table), sql.Literal(json.dumps(keys)))
    lower = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({info.page_begin},0)"))
    if info.page_end == LAST_PAGE:
        return lower
    upper = sql.SQL("ctid <= {}::tid").format(sql.Literal(f"({info.page_end},65535)"))
    return sql.SQL("{} AND {}").format(lower, upper)


class Chunk:
    """The rows of one chunk, read at the replica position ``lsn``; ``batches()`` iterates them
    once, inside ``read_chunk``'s block."""

    def __init__(
        self,
        info: pb.DumpInfoResponse,
        lsn: LSN,
        conn: psycopg.AsyncConnection[Any],
        changes: CopyChanges,
        limits: BatchLimits,
    ) -> None:
        self.info = info
        self.lsn = lsn
        self.rows = 0
        self.done = False
        self._conn = conn
        self._changes = changes
        self._limits = limits
        self._batches: AsyncGenerator[list[bytes], None] | None = None

    def batches(self) -> AsyncIterator[list[bytes]]:
        """Serialized ``Change`` messages, in the replica's order, a batch at a time."""
        if self._batches is None:
            self._batches = self._read()
        return self._batches

    async def close(self) -> None:
        if self._batches is not None:
            await self._batches.aclose()

    async def _read(self) -> AsyncGenerator[list[bytes], None]:
        pgconn, limits = self._conn.pgconn, self._limits
        ended = False
        while not ended:
            out: list[bytes] = []
            ended = await _fill(pgconn, self._changes.feed, out, limits)
            self.rows += len(out)
            for at in range(0, len(out), limits.rows):
                yield out[at : at + limits.rows]
        for result in await self._conn.wait(fetch_many(pgconn)):
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.error_from_result(result)
        self._changes.finish()
        self.done = True


async def _fill(
    pgconn: PGconn,
    feed: Callable[[bytes, list[bytes]], int],
    out: list[bytes],
    limits: BatchLimits,
) -> bool:
    """Read COPY data into ``out`` until a batch is full (False) or the COPY ended (True):
    every row libpq holds, then wait for the socket.

    The socket has one reader registration for the whole batch (psycopg's own waits make one
    per wait, which costs more than a wide row), and none while the batch is being sent: a
    readable socket nobody reads would wake the event loop without end.
    """
    get = pgconn.get_copy_data
    readable = asyncio.Event()
    loop = asyncio.get_running_loop()
    fd = pgconn.socket
    loop.add_reader(fd, readable.set)
    try:
        size = 0
        while True:
            readable.clear()  # before draining: data arriving meanwhile sets it again
            nbytes, data = get(1)
            while nbytes > 0:
                size += feed(bytes(data), out)  # slices of bytes join faster than memoryviews
                if len(out) >= limits.rows or size >= limits.bytes:
                    return False
                nbytes, data = get(1)
            if nbytes < 0:
                return True
            await readable.wait()
            pgconn.consume_input()
    finally:
        loop.remove_reader(fd)


class _Abandoned(Exception):
    """The caller left a chunk before its last batch: the COPY is cancelled."""


@contextlib.asynccontextmanager
async def read_chunk(
    conn: psycopg.AsyncConnection[Any],
    source: str,
    request: pb.AgentDumpRequest,
    limits: BatchLimits = BatchLimits(),
) -> AsyncIterator[Chunk]:
    """The chunk ``request.info`` read on the replica behind ``conn`` (idle, autocommit) at a
    position of ``source`` at or after ``request.min_lsn``; the caller iterates
    ``chunk.batches()`` inside the block."""
    info = request.info
    keys = check_chunk(info)
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    await conn.set_read_only(True)
    try:
        async with conn.transaction():
            lsn = await _position(conn, source, request.min_lsn)
            table = await read_table(conn, info)
            statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(
                select_statement(info, table, keys)
            )
            async with conn.cursor() as cur, cur.copy(statement):
                changes = CopyChanges(info.schema, info.table, table.columns)
                chunk = Chunk(info, lsn, conn, changes, limits)
                try:
                    yield chunk
                finally:
                    await chunk.close()
                if not chunk.done:
                    raise _Abandoned
    except _Abandoned:
        pass
    except psycopg.Error as exc:
        raise _translate(exc, info) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _translate(exc: psycopg.Error, info: pb.DumpInfoResponse) -> DumpError:
    first = _first_line(exc)
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return TableMissing(f"table {info.schema}.{info.table} does not exist on the replica")
    if info.keys and isinstance(exc, psycopg.DataError | psycopg.ProgrammingError):
        return BadChunk(f"{describe(info)}: the keys do not fit the key columns: {first}")
    if isinstance(exc, psycopg.OperationalError):
        return ReplicaUnavailable(f"reading {describe(info)} on the replica failed: {first}")
    return DumpError(f"reading {describe(info)} on the replica failed: {first}")


class ReplicaPool:
    """Connections to the replica: made on demand up to ``size``, idle ones reused, broken
    ones dropped. Each ``connection()`` has one to itself."""

    def __init__(self, dsn: str, size: int = 8, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._timeout = connect_timeout
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._slots:
            conn = await self._take()
            try:
                yield conn
            finally:
                await self._give_back(conn)

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if _usable(conn):
                return conn
            await conn.close()
        try:
            return await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
        except psycopg.OperationalError as exc:
            raise ReplicaUnavailable(f"cannot connect to the replica: {_first_line(exc)}") from exc

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._closed and _usable(conn):
            self._idle.append(conn)
        else:
            await conn.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Open, idle, and not closed by the server meanwhile (a readable idle socket holds an
    error or the end of the connection; reading it tells which, without a round trip)."""
    if conn.closed or conn.broken:
        return False
    pgconn = conn.pgconn
    if pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return False
    poller = select.poll()
    try:
        poller.register(pgconn.socket, select.POLLIN)
        # The server's last words (an error) come first; the end of the connection after them.
        for _ in range(3):
            if not poller.poll(0):
                break
            pgconn.consume_input()
    except (OSError, psycopg.Error):
        return False
    return pgconn.status == pq.ConnStatus.OK


class Dumper:
    """Reads chunks of one source on its replica; concurrent reads use separate connections."""

    def __init__(
        self, dsn: str, source: str, limits: BatchLimits = BatchLimits(), connections: int = 8
    ) -> None:
        self.source = source
        self.limits = limits
        self._pool = ReplicaPool(dsn, connections)

    @contextlib.asynccontextmanager
    async def read(self, request: pb.AgentDumpRequest) -> AsyncIterator[Chunk]:
        check_chunk(request.info)  # before taking a connection
        async with (
            self._pool.connection() as conn,
            read_chunk(conn, self.source, request, self.limits) as chunk,
        ):
            yield chunk

    async def position(self) -> LSN:
        """The replica's applied position of the source (``NoPosition`` if none)."""
        async with self._pool.connection() as conn:
            try:
                return await _position(conn, self.source, 0)
            except psycopg.Error as exc:
                raise ReplicaUnavailable(
                    f"cannot read the replica's position: {_first_line(exc)}"
                ) from exc

    async def close(self) -> None:
        await self._pool.close()
