"""``async for event in consumer``: events handed to a loop one at a time.

The consumer's session runs a "handler" (``Sink.handle``) that passes the event to the loop
and waits until the loop asks for the next one; the session then acknowledges the event
unless the loop settled it (``event.requeue(reason)`` / ``event.ack()``). When the loop is
left, the event it was given last is neither acknowledged nor requeued by the library: the
stream closes with it unacknowledged and the gateway delivers it again. Call ``event.ack()``
before ``break`` if it was handled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pgcapture.client.change import Change, Truncate
from pgcapture.client.session import Abandoned

Event = Change[Any] | Truncate


@dataclass(frozen=True, slots=True)
class End:
    """The consumer stopped: ``error`` is why, ``None`` for a stop."""

    error: BaseException | None


class Sink:
    """The meeting point of the session (``handle``) and the loop (``Iterator``)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Event, asyncio.Future[None]] | End] = asyncio.Queue()
        self._waiting: set[asyncio.Future[None]] = set()
        self._abandoned = False

    async def handle(self, event: Event) -> None:
        if self._abandoned:
            raise Abandoned()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(done)
        try:
            self.queue.put_nowait((event, done))
            await done
        finally:
            self._waiting.discard(done)

    def abandon(self) -> None:
        """The loop will not ask for more: release the session without settling."""
        self._abandoned = True
        for done in list(self._waiting):
            if not done.done():
                done.set_exception(Abandoned())

    def end(self, error: BaseException | None) -> None:
        self.queue.put_nowait(End(error))


class Iterator(AsyncIterator[Event]):
    """Yields events; moving to the next one releases (and so acknowledges) the previous."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._current: asyncio.Future[None] | None = None
        self._end: End | None = None

    def __aiter__(self) -> Iterator:
        return self

    async def __anext__(self) -> Event:
        if self._current is not None:
            if not self._current.done():
                self._current.set_result(None)
            self._current = None
        if self._end is None:
            item = await self._sink.queue.get()
            if not isinstance(item, End):
                event, self._current = item
                return event
            self._end = item
        if self._end.error is not None:
            raise self._end.error
        raise StopAsyncIteration
