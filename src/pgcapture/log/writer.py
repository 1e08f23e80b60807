"""Writing a source's batches to its JetStream stream, in order, pipelined (DESIGN.md, contract 2).

Each message's payload is a ``LogBatch``; its headers carry the first and last checkpoint keys
(``Pgcapture-First``, ``Pgcapture-Last``) and ``Nats-Msg-Id`` = the last checkpoint key (the
layout is in ``pgcapture.log.stream`` and docs/protocol.md). A fragment of a large record also
carries ``Pgcapture-Part``, and only the record's last fragment has a ``Nats-Msg-Id``: after a
crash in the middle of a record, its fragments are written again from the first one.

``StreamWriter`` keeps many publishes in flight (bounded in messages and in bytes; ``publish``
waits for room, which is the back-pressure that reaches the slot reader) and hands batches back
from ``acked()`` strictly in publish order, only once JetStream stored them. Every publish
carries ``Nats-Expected-Last-Sequence`` = the stream sequence of the publish before it, so the
stream cannot get a hole: if one message is lost on the way, every later one is refused instead
of stored after the gap, and the session ends with ``ConnectionLost``. The caller then starts
over from ``read_tail`` (the last stored checkpoint), which is exact whatever the batch
boundaries were. The same check turns a second writer into refused publishes, never into
interleaved ones.

Acknowledgements come back on a private inbox and are matched to publishes by sequence. (nats-py's
own ``publish_async`` never resolves its future when the server answers with an error.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Final, NoReturn

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from pgcapture.errors import ConfigError, ConnectionLost, ProtocolError
from pgcapture.log.batch import Batch
from pgcapture.log.stream import (
    HEADER_FIRST,
    HEADER_LAST,
    HEADER_PART,
    StreamSettings,
    Tail,
    part_header,
)

_MSG_ID: Final = api.Header.MSG_ID.value
_EXPECTED_LAST_SEQ: Final = api.Header.EXPECTED_LAST_SEQUENCE.value
_WRONG_LAST_SEQUENCE: Final = 10071


@dataclass(slots=True)
class _InFlight:
    batch: Batch
    seq: int
    sent: float
    ack: asyncio.Future[tuple[dict[str, str] | None, bytes]]


class StreamWriter:
    """Pipelined publishing of batches to one stream, acknowledged in order."""

    def __init__(
        self,
        nc: NATS,
        settings: StreamSettings,
        tail: Tail,
        max_in_flight: int = 256,
        max_in_flight_bytes: int = 32 << 20,
        ack_timeout: float = 10.0,
    ) -> None:
        self._nc = nc
        self.settings = settings
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        self.ack_timeout = ack_timeout
        self._seq = tail.seq  # stream sequence of the last publish
        self._last = tail.checkpoint  # checkpoint of the last record published
        self._open = tail.partial  # _last is a record of which only some fragments are stored
        self._queue: deque[_InFlight] = deque()
        self._acks: dict[int, asyncio.Future[tuple[dict[str, str] | None, bytes]]] = {}
        self._bytes = 0
        self._changed = asyncio.Event()  # an ack, a publish or a failure
        self._failure: BaseException | None = None
        self._inbox = ""
        self._sub: Subscription | None = None

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    @property
    def max_batch_bytes(self) -> int:
        """The largest payload the server takes, less room for the headers."""
        return max(1024, self._nc.max_payload - 1024)

    @property
    def in_flight_bytes(self) -> int:
        return self._bytes

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_ack)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):  # the connection may be gone already
                await sub.unsubscribe()

    def fail(self, exc: BaseException) -> None:
        """Stop: every waiting and later ``publish``/``acked`` raises ``exc``."""
        if self._failure is None:
            self._failure = exc
            self._changed.set()

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        future = self._acks.pop(int(token), None) if token.isdigit() else None
        if future is not None and not future.done():
            future.set_result((msg.headers, msg.data))
            self._changed.set()

    async def _wait_changed(self, at_most: float | None = None) -> None:
        self._changed.clear()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives as the awaited event is set (CPython gh-86296).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await self._changed.wait()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def publish(self, batch: Batch) -> None:
        """Send one batch; waits while the in-flight bounds are reached."""
        self._raise_failure()
        self._check(batch)
        while self._queue and (
            len(self._queue) >= self.max_in_flight
            or self._bytes + len(batch) > self.max_in_flight_bytes
        ):
            await self._wait_changed()
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[tuple[dict[str, str] | None, bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._acks[seq] = future
        self._queue.append(_InFlight(batch, seq, time.monotonic(), future))
        self._bytes += len(batch)
        last = batch.last.key()
        headers = {
            HEADER_FIRST: batch.first.key(),
            HEADER_LAST: last,
            _EXPECTED_LAST_SEQ: str(seq - 1),
        }
        if batch.completes_record:
            headers[_MSG_ID] = last
        if batch.is_fragment:
            headers[HEADER_PART] = part_header(batch.part_end, batch.part_total)
        try:
            await self._nc.publish(
                self.settings.subject, batch.payload, reply=f"{self._inbox}.{seq}", headers=headers
            )
        except (nats.errors.Error, OSError) as exc:
            self._fail_with(f"cannot publish to NATS: {exc!r}")
        self._changed.set()

    def _check(self, batch: Batch) -> None:
        """The log only moves forward (a record's fragments share its checkpoint), and every
        message fits the server."""
        last = self._last
        continues = self._open and batch.first == last  # the record again, after a restart
        if (last is not None and batch.first <= last and not continues) or (
            batch.last < batch.first
        ):
            raise ProtocolError(
                f"batch {batch.first}..{batch.last} does not follow {last}: the log must "
                "only move forward"
            )
        if self._open and not continues:
            raise ProtocolError(
                f"batch {batch.first}..{batch.last} follows an unfinished record at {last}"
            )
        if len(batch) > self.max_batch_bytes:
            raise ConfigError(
                f"a message for {batch.first} is {len(batch)} bytes, more than the NATS "
                f"server's max_payload ({self._nc.max_payload}); lower [sources.NAME.batch] "
                "max_bytes"
            )
        self._last = batch.last
        self._open = not batch.completes_record

    async def acked(self) -> Batch:
        """The next batch JetStream stored, in publish order (waits for it)."""
        while not self._queue:
            await self._wait_changed()
        head = self._queue[0]
        while not head.ack.done():
            remaining = head.sent + self.ack_timeout - time.monotonic()
            if remaining <= 0:
                self._fail_with(
                    f"no acknowledgement from JetStream within {self.ack_timeout:g}s for "
                    f"message {head.seq} of stream {self.settings.name!r}"
                )
            await self._wait_changed(remaining)
        self._check_ack(head, *head.ack.result())
        self._queue.popleft()
        self._bytes -= len(head.batch)
        self._changed.set()
        return head.batch

    def _check_ack(self, entry: _InFlight, headers: dict[str, str] | None, data: bytes) -> None:
        name = self.settings.name
        if headers and headers.get("Status") == "503":
            self._fail_with(
                f"no JetStream stream answered on subject {self.settings.subject!r} (status "
                f"503): stream {name!r} or its leader is unavailable"
            )
        try:
            reply = json.loads(data)
        except ValueError:
            self._fail_with(f"unreadable acknowledgement from JetStream: {data[:200]!r}")
        error = reply.get("error")
        if error:
            hint = (
                ": another writer appended to the stream or a publish was lost; resuming from "
                "the stream's tail"
                if error.get("err_code") == _WRONG_LAST_SEQUENCE
                else ""
            )
            self._fail_with(
                f"stream {name!r} refused message {entry.seq}: {error.get('description')}{hint}"
            )
        if reply.get("duplicate") or reply.get("seq") != entry.seq:
            self._fail_with(
                f"stream {name!r} stored message {entry.seq} as sequence {reply.get('seq')} "
                f"(duplicate={bool(reply.get('duplicate'))}); resuming from the stream's tail"
            )

    def _fail_with(self, message: str) -> NoReturn:
        exc = ConnectionLost(message)
        self.fail(exc)
        raise exc

    async def drained(self) -> None:
        """Wait until every publish was acknowledged (someone must be calling ``acked``)."""
        while self._queue:
            await self._wait_changed()
