"""Statements to the replica without waiting for each one: libpq pipeline mode over psycopg's pq.

``Pipeline`` sends extended-protocol commands (prepare, execute a prepared statement, run a
statement with parameters) as fast as the socket takes them, and matches the results that come
back, in order, against what each command expects: a row count for changes, a result kept for
the caller for catalog queries. The first failure (an error from the server, or a change that
touched another number of rows than it had to) is kept with a description of the change that
caused it; ``sync`` waits for everything sent so far and raises it. The caller decides whether
to commit: nothing here commits by itself.

Values are passed as they come from the stream: binary send-format bytes (format 1) or text
(format 0), with the replica's type OIDs, never decoded into Python objects. Output is flushed
while input is read, so a long run of commands never deadlocks on full socket buffers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq

from pgcapture.errors import ConnectionLost, ReplicaError

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_ERROR = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE, pq.ExecStatus.NONFATAL_ERROR)

Values = Sequence[bytes | None]
Context = str | Callable[[], str]


@dataclass(slots=True)
class Expect:
    """What one command must produce: ``rows`` affected (None: any), and whether to keep its
    result for the caller; ``context`` describes the command for error messages."""

    context: Context = ""
    rows: int | None = None
    keep: bool = False
    result: pq.abc.PGresult | None = field(default=None, repr=False)


_SYNC_MARK = Expect("sync")


class ApplyFailed(ReplicaError):
    """The replica refused a command of the current batch (see the message), or a change did
    not touch exactly the rows it had to; the batch must be rolled back."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Pipeline:
    """One replica connection in pipeline mode (non-blocking), for the apply loop only."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self._expect: deque[Expect] = deque()
        self._syncs = 0
        self._failure: ApplyFailed | None = None
        self._prepared: set[bytes] = set()

    def open(self) -> None:
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()

    # ---- sending -------------------------------------------------------------------------

    def is_prepared(self, name: bytes) -> bool:
        return name in self._prepared

    def prepare(self, name: bytes, sql: bytes, types: Sequence[int], context: Context) -> None:
        self._pg.send_prepare(name, sql, types)
        self._expect.append(Expect(context))
        self._prepared.add(name)

    def forget_prepared(self) -> None:
        """After ``DEALLOCATE ALL`` (or a new session): every statement must be prepared again."""
        self._prepared.clear()

    def execute(
        self, name: bytes, values: Values, formats: Sequence[int] | None, expect: Expect
    ) -> None:
        self._pg.send_query_prepared(name, values, formats)
        self._expect.append(expect)

    def query(
        self,
        sql: bytes,
        values: Values | None = None,
        types: Sequence[int] | None = None,
        expect: Expect | None = None,
    ) -> Expect:
        expect = expect or Expect()
        self._pg.send_query_params(sql, values, types)
        self._expect.append(expect)
        return expect

    # ---- waiting -------------------------------------------------------------------------

    async def push(self) -> None:
        """Send what is buffered, reading results meanwhile; returns once libpq holds no output."""
        try:
            while self._pg.flush() == 1:
                self._drain()
                await self._wait(write=True)
                self._pg.consume_input()
            self._drain()
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from None

    async def sync(self) -> None:
        """Wait for the results of everything sent; raise the first failure among them."""
        self._pg.pipeline_sync()
        self._expect.append(_SYNC_MARK)
        self._syncs += 1
        await self.push()
        try:
            while self._syncs:
                self._drain()
                if not self._syncs:
                    break
                await self._wait(write=False)
                self._pg.consume_input()
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def _wait(self, write: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        if write:
            loop.add_writer(self._fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self._fd)
            if write:
                loop.remove_writer(self._fd)

    def _drain(self) -> None:
        """Match every complete result libpq holds against the commands, in order."""
        pg = self._pg
        got = False
        while not pg.is_busy():
            res = pg.get_result()
            if res is None:
                if not got:
                    return
                got = False
                continue
            status = res.status
            if status == _SYNC:
                self._expect.popleft()
                self._syncs -= 1
                continue
            got = True
            expect = self._expect.popleft()
            if status in _OK:
                if expect.keep:
                    expect.result = res
                if expect.rows is not None and self._failure is None:
                    done = res.command_tuples
                    if done != expect.rows:
                        self._failure = ApplyFailed(
                            f"{_describe(expect)} changed {done} rows on the replica instead of "
                            f"{expect.rows}: the replica no longer matches the source (a row "
                            "is missing or was changed outside replication)"
                        )
            elif status == _ABORTED:
                pass
            elif status in _ERROR and self._failure is None:
                message = (res.error_message or b"").decode("utf-8", "replace").strip()
                sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
                self._failure = ApplyFailed(
                    f"the replica refused {_describe(expect)}: {message}",
                    sqlstate.decode() if sqlstate else None,
                )
            elif status not in _ERROR:
                self._failure = self._failure or ApplyFailed(
                    f"unexpected result {pq.ExecStatus(status).name} for {_describe(expect)}"
                )

    def _lost(self, exc: psycopg.OperationalError) -> ConnectionLost:
        message = (self._pg.error_message or b"").decode("utf-8", "replace").strip()
        return ConnectionLost(f"lost the replica connection: {message or exc}")


def _describe(expect: Expect) -> str:
    context = expect.context
    return context() if callable(context) else (context or "a statement")
