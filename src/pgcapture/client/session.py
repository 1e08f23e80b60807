"""One stream's life: read deliveries, build events, run handlers, send acknowledgements.

A ``Session`` reads the stream in a task of its own, so the gateway's next batch is waiting
while this one is handled; the gateway's window of unacknowledged messages bounds what is
buffered. Handlers run through the ``KeyedScheduler``; settlements go to the ``AckTracker``
and out in ranges as soon as everything received is settled, at the latest ``ack_interval``
seconds after a settlement.

Ending: ``stop()`` (graceful) takes no new change, lets running handlers finish, sends their
acknowledgements, half-closes the stream and waits (``close_grace``) for the gateway to end
it; changes received and not handled are not acknowledged, so the gateway delivers them again.
A failed stream ends the same way, except that acknowledgements can no longer be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Final

from pgcapture.client.acks import AckTracker
from pgcapture.client.build import EventBuilder
from pgcapture.client.change import Change, Ticket, Truncate
from pgcapture.client.errors import ChangeDecodeError, GatewayUnavailable, TypeLookupError
from pgcapture.client.gateway import Delivery, GatewayStream
from pgcapture.client.ordering import KeyedScheduler, ordering_of
from pgcapture.client.routing import (
    ConsumerStats,
    DecodeErrorCallback,
    DecodePolicy,
    Handler,
    Routes,
)
from pgcapture.client.typeinfo import TypeResolver
from pgcapture.errors import PgCaptureError
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.client")


_MAX_REASON: Final = 2000
_WAKE: Final = "wake"


class Abandoned(Exception):
    """Raised into a handler's wait when its event will not be settled (iteration closed)."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    concurrency: int
    decode_errors: DecodePolicy
    on_decode_error: DecodeErrorCallback
    ack_interval: float
    close_grace: float


class Session:
    """Serves one stream until ``stop()`` or the stream's end; see the module docstring."""

    def __init__(
        self,
        stream: GatewayStream,
        settings: SessionSettings,
        builder: EventBuilder,
        resolver: TypeResolver | None,
        routes: Routes,
        stats: ConsumerStats,
    ) -> None:
        self._stream = stream
        self._settings = settings
        self._builder = builder
        self._resolver = resolver
        self._routes = routes
        self._stats = stats
        self._tracker = AckTracker()
        self._scheduler = KeyedScheduler(settings.concurrency)
        self._queue: asyncio.Queue[list[Delivery] | str] = asyncio.Queue()
        self._settled = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._closing = False
        self._stream_error: PgCaptureError | None = None
        self._fatal: PgCaptureError | None = None
        self.delivered = 0

    def stop(self) -> None:
        self._stopping = True
        self._scheduler.close()
        self._queue.put_nowait(_WAKE)

    @property
    def _halted(self) -> bool:
        return self._stopping or self._stream_error is not None or self._fatal is not None

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        flusher = asyncio.create_task(self._flush_loop())
        try:
            await self._dispatch_loop()
        except BaseException:  # cancelled, or a bug: no graceful ending, nothing more is sent
            self._scheduler.cancel()
            for task in (reader, flusher):
                task.cancel()
            await self._stream.close(0)
            raise
        # Stopping or a dead stream: what has not started is left for redelivery. A decode
        # error under "stop": what was submitted came before it and is handled.
        await self._scheduler.drain(cancel_waiting=self._stopping or bool(self._stream_error))
        # The flusher is asked to finish, not cancelled: cancelling a gRPC write cancels the
        # whole call, and the acknowledgements in flight with it.
        self._closing = True
        self._settled.set()
        self._idle.set()
        await flusher
        if self._stream_error is None:
            await self._flush()
        await self._stream.close(self._settings.close_grace)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        error = self._fatal or self._scheduler.error or self._stream_error
        if error is not None and not (self._stopping and error is self._stream_error):
            raise error

    # -- reading ----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                deliveries = await self._stream.read()
                self.delivered += len(deliveries)
                self._stats.received += len(deliveries)
                self._tracker.delivered(len(deliveries))
                self._idle.clear()
                self._queue.put_nowait(deliveries)
        except PgCaptureError as exc:
            self._failed(exc)
        except Exception as exc:  # whatever else ends reading ends the stream: reconnect
            self._failed(GatewayUnavailable(f"reading the stream failed: {exc!r}", "CLIENT"))

    def _failed(self, exc: PgCaptureError) -> None:
        if self._stream_error is None and not self._stopping:
            self._stream_error = exc
        self._scheduler.close()
        self._queue.put_nowait(_WAKE)

    # -- dispatching ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._halted:
            item = await self._queue.get()
            if isinstance(item, str):
                continue
            lookup = await self._prepare_types(item)
            for delivery_id, message in item:
                if self._halted:
                    return
                await self._dispatch(delivery_id, message, lookup)

    async def _prepare_types(self, batch: list[Delivery]) -> TypeLookupError | None:
        if self._resolver is None:
            return None
        oids: set[int] = set()
        for _, message in batch:
            if self._routes.handler_for(message) is not None:
                oids |= self._builder.oids(message)
        try:
            await self._resolver.prepare(oids)
        except TypeLookupError as exc:
            log.error("%s", exc)
            return exc
        return None

    async def _dispatch(
        self, delivery_id: int, message: pb.CaptureMessage, lookup: TypeLookupError | None
    ) -> None:
        ticket = Ticket(functools.partial(self._settle, delivery_id))
        handler = self._routes.handler_for(message)
        if handler is None:
            self._stats.ignored += 1
            ticket.settle("")
            return
        resolver = self._resolver
        if lookup and resolver and resolver.pending(self._builder.oids(message)):
            ticket.settle(_reason(lookup))  # the catalog was unreachable: try again later
            return
        try:
            event = self._builder.build(message, ticket)
        except ChangeDecodeError as err:
            await self._decode_failed(err, message, ticket)
            return
        keys, tables, barrier = ordering_of(event)
        await self._scheduler.submit(
            keys, tables, barrier, functools.partial(self._handle, handler, event)
        )

    async def _handle(self, handler: Handler, event: Change[Any] | Truncate) -> None:
        try:
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        except Abandoned:
            return
        except Exception as exc:
            where = _describe(event)
            log.warning(
                "handler failed on %s; requeued: %s: %s", where, type(exc).__name__, exc,
                exc_info=exc,
            )  # fmt: skip
            if not event.settled:
                event.requeue(_reason(exc))
            return
        self._stats.handled += 1
        if not event.settled:
            event.ack()

    async def _decode_failed(
        self, err: ChangeDecodeError, message: pb.CaptureMessage, ticket: Ticket
    ) -> None:
        self._stats.decode_errors += 1
        try:
            result = self._settings.on_decode_error(err, message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_decode_error raised while reporting: %s", err)
        policy = self._settings.decode_errors
        if policy == "requeue":
            ticket.settle(_reason(err))
        elif policy == "skip":
            self._stats.skipped += 1
            cp = message.checkpoint
            log.error(
                "skipped (acknowledged, not handled; decode_errors='skip') the change at "
                "lsn %d seq %d: %s",
                cp.lsn,
                cp.seq,
                err,
            )
            ticket.settle("")
        else:
            self._fatal = err

    # -- acknowledging ----------------------------------------------------------------------

    def _settle(self, delivery_id: int, reason: str) -> None:
        self._tracker.settle(delivery_id, reason)
        if reason:
            self._stats.requeued += 1
        else:
            self._stats.acked += 1
        if self._tracker.outstanding == 0:
            self._idle.set()
        self._settled.set()

    async def _flush_loop(self) -> None:
        interval = self._settings.ack_interval
        while not self._closing:
            await self._settled.wait()
            if self._tracker.outstanding and not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._idle.wait()
            self._settled.clear()
            await self._flush()

    async def _flush(self) -> None:
        ranges = self._tracker.take()
        if not ranges or self._stream_error is not None:
            return
        try:
            await self._stream.send(ranges)
        except PgCaptureError as exc:
            self._failed(exc)


def _reason(exc: BaseException) -> str:
    reason = f"{type(exc).__name__}: {exc}"
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _describe(event: Change[Any] | Truncate) -> str:
    cp = event.checkpoint
    if isinstance(event, Truncate):
        return f"truncate of {', '.join(map(str, event.tables))} at {cp}"
    return f"{event.op.value} {event.schema}.{event.table} {dict(event.key)} at {cp}"
