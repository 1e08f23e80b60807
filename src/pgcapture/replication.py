"""An asyncio logical replication stream over libpq (psycopg's low-level ``pq`` layer).

psycopg 3 has no replication API, but its connection runs replication commands with the simple
query protocol and, since 3.3, returns from ``START_REPLICATION`` with the connection in
CopyBoth mode. From there this module speaks the streaming replication sub-protocol itself
(PostgreSQL docs, "Streaming Replication Protocol"): it reads XLogData ('w') and Primary
keepalive ('k') messages and sends Standby status updates ('r').

The contract with the caller (DESIGN.md, contract 2):

* ``confirm(lsn)`` says "everything up to ``lsn`` is durable downstream". Only that position is
  ever reported to the server as flushed; it never goes backwards.
* A keepalive that asks for a reply is answered at once; a status update is also sent every
  ``status_interval`` seconds and once more on ``close()``.
* On an idle database the slot still advances: a keepalive's WAL position is reported as flushed
  when nothing received is still unconfirmed ("nothing in flight"). A logical walsender's
  keepalive carries the position up to which it has decoded and sent, so every transaction that
  committed before it has been delivered already.
* An error the server ends the stream with is raised once the messages it sent before it have
  been returned: a caller that reads the stream again knows exactly what it already has.
* The walsender runs with an empty ``search_path``: values sent in text that name database
  objects (``regclass``, ``regtype``, ...) are schema-qualified unless in ``pg_catalog``.

psycopg registers its own reader on the connection's socket while it executes a command, and
removes it afterwards; ours is registered only once ``START_REPLICATION`` has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from typing import Any, Final

import psycopg
from psycopg import pq

from pgcapture.errors import (
    ConnectionLost,
    NoBinaryOutput,
    PermissionDenied,
    ProtocolError,
    SlotInUse,
    SlotLost,
    SourceError,
)
from pgcapture.lsn import LSN, format_lsn

_DATA_START: Final = struct.Struct(">Q")  # XLogData: data start (then WAL end, send time)
_KEEPALIVE: Final = struct.Struct(">QqB")  # WAL end, send time, reply requested
_STATUS: Final = struct.Struct(">cQQQqB")
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
_XLOGDATA: Final = ord("w")
_PRIMARY_KEEPALIVE: Final = ord("k")
# getTypeBinaryOutputInfo() in lsyscache.c, raised with SQLSTATE 42883 (undefined_function)
_NO_BINARY_OUTPUT: Final = re.compile(r"no binary output function available for type (.+)")


def pg_now_us() -> int:
    """Microseconds since 2000-01-01 UTC, the protocol's clock."""
    return time.time_ns() // 1000 - _PG_EPOCH_US


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ReplicationStream:
    """A ``replication=database`` connection streaming one logical slot."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], status_interval: float = 10.0) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._status_interval = status_interval
        self._readable = asyncio.Event()
        self._streaming = False
        self._confirmed = 0  # what the caller made durable
        self._received = 0  # highest data start received
        self._unconfirmed = False  # data received since the last confirm covering it
        self._last_status = 0.0
        self._reader_fd = -1  # the socket our reader is registered on, -1 when none
        self._failure: Exception | None = None  # the stream's end, raised by the next read

    @classmethod
    async def connect(cls, dsn: str, status_interval: float = 10.0) -> ReplicationStream:
        try:
            conn = await psycopg.AsyncConnection.connect(
                dsn, replication="database", autocommit=True
            )
        except psycopg.OperationalError as exc:
            raise _translate_connect_error(exc) from exc
        return cls(conn, status_interval)

    async def create_slot(self, slot: str, temporary: bool = False) -> LSN:
        """Create a pgoutput slot on this connection; returns its consistent point."""
        return (await self._create_slot(slot, temporary, "NOEXPORT_SNAPSHOT"))[0]

    async def export_snapshot(self, slot: str) -> tuple[LSN, str]:
        """Create a temporary pgoutput slot that exports its snapshot: the consistent point and
        the snapshot's name, usable (``SET TRANSACTION SNAPSHOT``, ``pg_dump --snapshot``) until
        this connection runs another command or closes, which also drops the slot."""
        lsn, name = await self._create_slot(slot, True, "(SNAPSHOT 'export')")
        if not name:
            raise ProtocolError("CREATE_REPLICATION_SLOT exported no snapshot")
        return lsn, name

    async def _create_slot(self, slot: str, temporary: bool, options: str) -> tuple[LSN, str]:
        temp = " TEMPORARY" if temporary else ""
        sql = f"CREATE_REPLICATION_SLOT {quote_ident(slot)}{temp} LOGICAL pgoutput {options}"
        try:
            cur = await self._conn.execute(sql)
        except psycopg.Error as exc:
            raise _translate_stream_error(exc, slot) from exc
        row = await cur.fetchone()
        if row is None:
            raise ProtocolError("CREATE_REPLICATION_SLOT returned no row")
        return LSN.parse(row[1]), str(row[2] or "")

    async def start(
        self, slot: str, start_lsn: int, options: dict[str, str], confirmed: int | None = None
    ) -> None:
        """``START_REPLICATION``; data for transactions committed before the slot's confirmed
        position (or ``start_lsn`` if later) is not sent again by the server.

        ``confirmed``: what the caller has made durable, when that is less than ``start_lsn``
        (it read the WAL up to ``start_lsn`` on another connection and has not stored all of
        it yet). Only ``confirmed`` is then reported as flushed, and everything up to
        ``start_lsn`` counts as received and unconfirmed, so no keepalive moves the slot past
        it (contract 2).
        """
        opts = ", ".join(f"{quote_ident(k)} {quote_literal(v)}" for k, v in options.items())
        try:
            # Text values of types that name objects (regclass, regtype, ...) come from their
            # output functions in the walsender: with no schema on the path, every name
            # outside pg_catalog is schema-qualified, as pg_dump writes them.
            await self._conn.execute("SET search_path = ''")
        except psycopg.Error as exc:
            raise _translate_stream_error(exc, slot) from exc
        sql = f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {format_lsn(start_lsn)} ({opts})"
        try:
            await self._conn.execute(sql)
        except psycopg.Error as exc:
            raise _translate_stream_error(exc, slot) from exc
        if self._pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            raise ProtocolError("START_REPLICATION did not switch the connection to CopyBoth")
        floor = start_lsn if confirmed is None else min(confirmed, start_lsn)
        self._confirmed = max(self._confirmed, floor)
        self._note_received(start_lsn)
        self._streaming = True
        self._last_status = time.monotonic()
        self._reader_fd = self._pgconn.socket
        asyncio.get_running_loop().add_reader(self._reader_fd, self._readable.set)

    @property
    def confirmed(self) -> int:
        """The position reported as flushed: what was confirmed, or an idle slot's position."""
        return self._confirmed

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` is durable downstream. Never moves backwards."""
        if lsn > self._confirmed:
            self._confirmed = lsn
        if self._confirmed >= self._received:
            self._unconfirmed = False

    async def read(self, max_messages: int = 4096) -> list[bytes]:
        """Wait for and return the output plugin's messages available now (at least one): the
        payloads of XLogData messages, in order.

        Keepalives are handled here; status updates go out when due while waiting.
        """
        if self._failure is not None:
            raise self._failure
        out: list[bytes] = []
        while True:
            self._readable.clear()  # before reading, so that no wake-up is missed
            self._consume()
            self._drain(out, max_messages)
            if out:
                break
            await self._maybe_send_status()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait_time()):
                    await self._readable.wait()
        if self._failure is None:  # else the stream has ended: nothing to report to
            await self._maybe_send_status()
        return out

    def _consume(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise ConnectionLost(f"replication connection lost: {exc}") from exc

    def _drain(self, out: list[bytes], limit: int) -> None:
        """Append the payloads of the XLogData messages libpq holds now (up to ``limit``)."""
        get = self._pgconn.get_copy_data
        start_of = _DATA_START.unpack_from
        append = out.append
        highest = 0
        while len(out) < limit:
            nbytes, data = get(1)
            if nbytes == 0:
                break
            if nbytes < 0:
                self._failure = self._end_of_stream()
                if out:
                    break  # what came before the end first; the next read raises
                raise self._failure
            kind = data[0]
            if kind == _XLOGDATA:
                append(bytes(data[25:]))
                (start,) = start_of(data, 1)
                if start > highest:
                    highest = start
            elif kind == _PRIMARY_KEEPALIVE:
                self._note_received(highest)
                self._keepalive(bytes(data))
            else:
                raise ProtocolError(f"unexpected replication message type {chr(kind)!r}")
        self._note_received(highest)

    def _note_received(self, start: int) -> None:
        """Data up to ``start`` was received: it is in flight until confirmed."""
        if start > self._received:
            self._received = start
        if start > self._confirmed:
            self._unconfirmed = True

    def _keepalive(self, data: bytes) -> None:
        wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
        if not self._unconfirmed and wal_end > self._confirmed:
            # Idle: everything received is durable, so the server's sent position is safe.
            self._confirmed = wal_end
            self._received = max(self._received, wal_end)
        if reply:
            self._send_status()

    def _end_of_stream(self) -> Exception:
        """The error that ends the stream (the server's, translated)."""
        self._streaming = False
        self._remove_reader()
        res = self._pgconn.get_result()
        if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
            return _translate_stream_error(psycopg.errors.error_from_result(res), None)
        return ConnectionLost(f"replication stream ended by the server: {self._error_message()}")

    def _error_message(self) -> str:
        msg = self._pgconn.get_error_message().strip()
        return msg or "no message"

    def _wait_time(self) -> float:
        return max(0.05, self._status_interval - (time.monotonic() - self._last_status))

    async def _maybe_send_status(self) -> None:
        if time.monotonic() - self._last_status >= self._status_interval:
            self._send_status()
        await self._flush()

    def _send_status(self) -> None:
        flushed = self._confirmed
        written = max(self._received, flushed)
        msg = _STATUS.pack(b"r", written, flushed, flushed, pg_now_us(), 0)
        queued = self._pgconn.put_copy_data(msg)
        if queued == 0:  # nonblocking libpq with a full buffer: push it out and try again
            self._pgconn.flush()
            queued = self._pgconn.put_copy_data(msg)
        if queued != 1:
            raise ConnectionLost(f"cannot send status update: {self._error_message()}")
        self._last_status = time.monotonic()

    async def _flush(self) -> None:
        while self._pgconn.flush() == 1:
            writable = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_writer(self._pgconn.socket, writable.set)
            try:
                await writable.wait()
            finally:
                loop.remove_writer(self._pgconn.socket)

    def _remove_reader(self) -> None:
        # Always before the socket closes: a stale registration would capture whatever file
        # gets the same descriptor number next.
        if self._reader_fd >= 0:
            asyncio.get_running_loop().remove_reader(self._reader_fd)
            self._reader_fd = -1

    async def close(self) -> None:
        """Report the confirmed position one last time, end the stream and disconnect."""
        self._remove_reader()
        if self._streaming:
            self._streaming = False
            try:
                self._send_status()
                self._pgconn.put_copy_end()
                await self._flush()
            except (ConnectionLost, psycopg.Error, OSError):
                pass
        await self._conn.close()


def _translate_connect_error(exc: psycopg.OperationalError) -> Exception:
    text = str(exc)
    if "must be superuser or replication role" in text or "permission denied to start WAL" in text:
        return PermissionDenied(
            f"{text.strip()}; grant it with ALTER ROLE <role> REPLICATION (or use a superuser)"
        )
    if "no pg_hba.conf entry for replication" in text:
        return PermissionDenied(
            f"{text.strip()}; add a `host replication <role> <address> <method>` line to "
            "pg_hba.conf and reload"
        )
    return ConnectionLost(f"cannot open a replication connection: {text.strip()}")


def _slot_invalidated(exc: psycopg.Error) -> bool:
    """PostgreSQL refuses to read an invalidated slot (55000, object not in prerequisite
    state): "cannot read from logical replication slot" (14, 15) or "can no longer get
    changes from replication slot" (16+), with a detail saying it has been invalidated."""
    if getattr(exc, "sqlstate", None) != "55000":
        return False
    detail = getattr(exc.diag, "message_detail", None) or ""
    return "invalidated" in detail or "can no longer get changes" in str(exc)


def _translate_stream_error(exc: psycopg.Error, slot: str | None) -> Exception:
    text = str(exc).strip()
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "55006" or "is active for PID" in text:
        return SlotInUse(
            f"{text}; another process is reading slot {slot!r}: stop it, or use another slot"
        )
    if "wal_level" in text:
        return SourceError(f"{text}; set wal_level=logical and restart the server")
    primary = (getattr(exc.diag, "message_primary", None) or "").strip()
    if sqlstate == "42883" and (found := _NO_BINARY_OUTPUT.fullmatch(primary)):
        return NoBinaryOutput(
            f"{text}; a value of type {found[1]} (in an array, a composite or a range) cannot "
            "be sent in binary, so the transaction must be read with pgoutput's binary option "
            "off",
            found[1],
        )
    if _slot_invalidated(exc):
        detail = (getattr(exc.diag, "message_detail", None) or "").strip()
        name = slot or "NAME"
        return SlotLost(
            f"{text}{f' ({detail})' if detail else ''}: the server removed WAL that slot "
            f"{name!r} still needed (it fell behind max_slot_wal_keep_size), so changes since "
            f"its position can no longer be read; drop the slot (SELECT "
            f"pg_drop_replication_slot('{name}')), start capture again to create a new one, "
            "then bootstrap the replicas again (`pgcapture bootstrap`) and re-dump the "
            "consumers' tables (`pgcapture dump schedule`); docs/operations.md has the steps"
        )
    if isinstance(exc, psycopg.OperationalError):
        return ConnectionLost(f"replication connection failed: {text}")
    if sqlstate == "XX000":
        # an internal error of the server's decoding (e.g. "unexpected duplicate for tablespace
        # 0, relfilenode N", seen once under a DDL-heavy workload): decoding again from the
        # slot's position is exact, so it is retried, with a warning each time
        return ConnectionLost(f"the server's logical decoding failed: {text}; retrying")
    return SourceError(text)
