"""Following a source's stream from a position: where to start, and every message after it.

``locate`` finds the first stream message that can hold a transaction committed after a
position (an LSN: everything at or below it is already applied), by binary search over the
messages' ``Pgcapture-Last`` headers, and refuses a stream that no longer holds what comes right
after that position (removed by its retention limits).

``Follower`` reads from there with an ephemeral pull consumer (no acknowledgements: the position
lives with the reader, e.g. in the replica) and prefetches a bounded number of messages, so
reading the log overlaps with applying it. It checks what the log promises: messages come in
sequence order without holes, and checkpoints only increase. A record stored in fragments comes
out whole, as one batch, with the last fragment (``Assembler``). Anything unexpected ends the
follower with an error; the caller starts again from its own position.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ConnectionLost, PgCaptureError
from pgcapture.log.reader import Assembler, StoredBatch, bounds
from pgcapture.lsn import format_lsn

_END: Final = object()
# A fetch asks for at most about this many bytes: the NATS server disconnects a client that has
# more than max_pending (64 MB by default) waiting for it, and messages may be as large as the
# server's max_payload (fragments of large records fill them).
_FETCH_BYTES: Final = 8 << 20


class StreamGap(PgCaptureError):
    """The stream no longer holds changes the reader has not applied yet."""


class StreamMissing(PgCaptureError):
    """The source's stream does not exist (yet): capture creates it when it first starts."""


async def _headers(js: JetStreamContext, stream: str, seq: int) -> tuple[Checkpoint, Checkpoint]:
    return bounds((await js.get_msg(stream, seq=seq)).headers, seq)


async def locate(js: JetStreamContext, stream: str, applied: int, hint_seq: int = 0) -> int:
    """The sequence to read ``stream`` from so that nothing committed after LSN ``applied`` is
    missed: the first message whose last record is past it (or the next sequence to come)."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise StreamMissing(
            f"stream {stream!r} does not exist on NATS yet; it is created when `pgcapture "
            "capture` first runs for this source (check the source name and the NATS server)"
        ) from None
    first_seq, last_seq = info.state.first_seq, info.state.last_seq
    # Messages before first_seq were removed by the retention limits. That is only harmless
    # if everything in them was applied: the stream's first record is at or before the
    # position, or the message holding the position's commit (hint_seq) is still stored.
    if info.state.messages == 0:
        if first_seq > 1 and hint_seq < last_seq:
            raise StreamGap(_gap_text(stream, applied, first_seq, None))
        return last_seq + 1
    first, _ = await _headers(js, stream, first_seq)
    if first_seq > 1 and first.lsn > applied and hint_seq < first_seq:
        raise StreamGap(_gap_text(stream, applied, first_seq, first))
    lo, hi = first_seq, last_seq + 1
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            _, last = await _headers(js, stream, mid)
        except nats.js.errors.NotFoundError:
            lo = mid + 1  # removed meanwhile by the retention limits: older than anything kept
            continue
        if last.lsn > applied:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _gap_text(stream: str, applied: int, first_seq: int, first: Checkpoint | None) -> str:
    held = f"starts at {first} (message {first_seq})" if first else "is empty"
    return (
        f"stream {stream!r} {held}, but this reader has applied only up to "
        f"{format_lsn(applied)}: the changes in between were removed by the stream's retention "
        "limits (max_age / max_bytes). Bootstrap the replica again, and give the stream limits "
        "that outlast the longest replica downtime"
    )


class Follower:
    """Stored batches of ``stream`` from ``start_seq`` on, prefetched into a bounded queue."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        start_seq: int,
        fetch: int = 64,
        prefetch: int = 256,
    ) -> None:
        self._js = js
        self._stream = stream
        self._subject = subject
        self._next = start_seq
        self._fetch = fetch
        self._queue: asyncio.Queue[StoredBatch | object] = asyncio.Queue(prefetch)
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._assembler = Assembler()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"follow {self._stream}")

    def ready(self) -> int:
        """How many batches are waiting to be taken."""
        return self._queue.qsize()

    async def get(self, wait: float | None = None) -> StoredBatch | None:
        """The next batch, or None when none came within ``wait`` seconds."""
        if self._queue.empty() and self._error is not None:
            raise self._error
        try:
            async with asyncio.timeout(wait):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if item is _END:
            assert self._error is not None
            raise self._error
        assert isinstance(item, StoredBatch)
        return item

    async def close(self) -> None:
        """Stop the reading task. A cancellation can be swallowed inside nats-py (asyncio's
        wait_for on Python 3.11), so cancel until it is done, and empty the queue meanwhile so
        that a put never blocks it."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            while not self._queue.empty():
                self._queue.get_nowait()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except nats.errors.ConnectionClosedError as exc:
            self._error = ConnectionLost(f"lost the NATS connection: {exc!r}")
        except Exception as exc:  # handed to the reader of the queue
            self._error = exc
        await self._queue.put(_END)

    def _batch(self, largest: int) -> int:
        """How many messages to fetch next, so that a fetch stays within ``_FETCH_BYTES``."""
        return max(1, min(self._fetch, _FETCH_BYTES // max(largest, 1)))

    async def _follow(self) -> None:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self._js.pull_subscribe(self._subject, stream=self._stream, config=config)
        largest = 0  # the largest message of the last fetch
        try:
            while True:
                try:
                    msgs = await sub.fetch(self._batch(largest), timeout=1.0)
                except TimeoutError:  # nats-py raises its own subclass, or asyncio's under load
                    continue
                largest = max(len(msg.data) for msg in msgs) if msgs else largest
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq != self._next:
                        raise StreamGap(
                            f"stream {self._stream!r} delivered message {seq} where "
                            f"{self._next} was expected: messages were removed by the "
                            "stream's retention limits before they were applied"
                        )
                    batch = self._assembler.feed(msg, seq)
                    self._next = seq + 1
                    if batch is not None:
                        await self._queue.put(batch)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
