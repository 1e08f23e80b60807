"""The capture service: a source's slot into its JetStream stream (DESIGN.md, contracts 1 and 2).

A ``CaptureSession`` lives as long as its connections. It connects to NATS, makes sure of the
stream, takes the source's single-writer lease, reads the stream's tail and opens the slot
(which starts at its ``confirmed_flush_lsn``, never at the server's WAL end). Then four tasks:

* the reader appends ``SlotReader.read()`` results to a bounded buffer; when publishing falls
  behind the buffer fills, the reader stops reading, and the walsender waits: memory stays
  bounded whatever the transaction size;
* the publisher drops every record at or before the tail's checkpoint (already stored: a
  transaction cut by a crash is completed, not repeated; a record of which only some fragments
  are stored is written again whole), cuts the rest into batches (records larger than a message
  into fragments) and
  publishes them; a partial batch goes out at once when nothing is in flight, else after
  ``linger`` (low latency at low rates, full batches at high rates);
* the confirmer takes acknowledged batches in publish order and confirms the slot up to their
  highest Commit ``end_lsn``, so the slot never moves past what JetStream stored;
* the lease is refreshed; losing it ends the session at once.

Any failure ends the session (``retry.run_capture`` starts the next one). On ``stop`` the
session publishes what it has, waits for the acknowledgements, confirms, and releases the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS

from pgcapture.capture.changes import Record
from pgcapture.capture.reader import SlotReader, TextFallback
from pgcapture.checkpoint import Checkpoint
from pgcapture.config import NatsConfig, SourceConfig
from pgcapture.errors import ConnectionLost
from pgcapture.log.batch import Batch, Batcher
from pgcapture.log.client import connect_nats
from pgcapture.log.lease import Lease
from pgcapture.log.stream import StreamSettings, Tail, ensure_stream, read_tail
from pgcapture.log.writer import StreamWriter
from pgcapture.ops.http import ServiceStatus

log = logging.getLogger("pgcapture.capture")
BUFFER_RECORDS = 16384  # records read and not yet batched before the reader waits


class LogWriter(Protocol):
    """What the session needs of a writer (``StreamWriter`` or a wrapper around it)."""

    @property
    def in_flight(self) -> int: ...

    async def publish(self, batch: Batch) -> None: ...

    async def acked(self) -> Batch: ...

    async def drained(self) -> None: ...


WriterWrapper = Callable[[StreamWriter], LogWriter]


def stream_settings(source: SourceConfig) -> StreamSettings:
    s = source.stream
    return StreamSettings(
        name=source.stream_name,
        subject=source.subject,
        replicas=s.replicas,
        storage=s.storage,
        max_age=s.max_age,
        max_bytes=s.max_bytes,
        duplicate_window=s.duplicate_window,
    )


class CaptureSession:
    """One connection lifetime of capture for one source."""

    def __init__(
        self,
        source: SourceConfig,
        nats_cfg: NatsConfig,
        owner: str,
        wrap: WriterWrapper | None = None,
        status: ServiceStatus | None = None,
        on_text_fallback: Callable[[TextFallback], None] | None = None,
    ) -> None:
        self.source = source
        self.nats_cfg = nats_cfg
        self.owner = owner
        self.wrap = wrap
        self.status = status or ServiceStatus()
        self.on_text_fallback = on_text_fallback
        self.settings = stream_settings(source)
        self.acked_batches = 0
        self._lost = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Capture until ``stop`` is set (then return) or something fails (then raise)."""
        nc = await connect_nats(self.nats_cfg, on_lost=self._lost.set)
        try:
            js = nc.jetstream(timeout=max(5.0, self.nats_cfg.connect_timeout))
            await ensure_stream(js, self.settings)
            lease = Lease(
                js, self.nats_cfg.lock_bucket, self.source.name, self.owner,
                ttl=self.source.lock.ttl, replicas=self.source.stream.replicas,
            )  # fmt: skip
            if not await lease.acquire(self.source.lock.wait, stop):
                return  # stopped while waiting for another process's lease
            keeper = asyncio.ensure_future(lease.keep())  # from now on, even while connecting
            try:
                await self._with_lease(nc, lease, keeper, stop)
            finally:
                await _finish(keeper)
            await lease.release()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _with_lease(
        self, nc: NATS, lease: Lease, keeper: asyncio.Future[None], stop: asyncio.Event
    ) -> None:
        tail = await read_tail(lease.js, self.settings.name)
        publish = self.source.publish
        writer = StreamWriter(
            nc, self.settings, tail, publish.max_in_flight, publish.max_in_flight_bytes,
            publish.ack_timeout,
        )  # fmt: skip
        reader = SlotReader(
            self.source.dsn, self.source.slot_name, self.source.publication,
            self.source.tables, status_interval=self.source.status_interval,
            on_text_fallback=self.on_text_fallback,
        )  # fmt: skip
        await reader.open()
        self.status.set("running")
        log.info(
            "capturing source %s from slot %s at %s into stream %s after %s",
            self.source.name, reader.slot, Checkpoint(reader.start_lsn).lsn_text,
            self.settings.name, tail.checkpoint or "nothing (empty stream)",
            extra={"source": self.source.name, "stream_seq": tail.seq},
        )  # fmt: skip
        try:
            await writer.start()
            wrapped: LogWriter = self.wrap(writer) if self.wrap else writer
            await self._pump(reader, wrapped, writer, tail, keeper, stop)
        finally:
            await writer.close()
            await reader.close()

    async def _pump(
        self,
        reader: SlotReader,
        writer: LogWriter,
        core: StreamWriter,
        tail: Tail,
        keeper: asyncio.Future[None],
        stop: asyncio.Event,
    ) -> None:
        buffer = _Buffer(BUFFER_RECORDS)
        # The reader task lives outside the task group: it must be stopped (and awaited) before
        # the final batch is flushed, while the group's helpers keep confirming acks.
        read = asyncio.ensure_future(_read(reader, buffer))
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(_failure_of(read)),
                    tg.create_task(self._confirm(reader, writer)),
                    tg.create_task(_failure_of(keeper)),
                    tg.create_task(self._watch_connection(core)),
                ]
                publisher = _Publisher(self.source, writer, reader, tail, core.max_batch_bytes)
                await publisher.run(buffer, stop)
                await _finish(read)  # what it read but we did not publish is read again later
                final = publisher.batcher.flush()
                if final is not None:
                    await writer.publish(final)
                await writer.drained()
                for task in helpers:
                    task.cancel()
        finally:
            await _finish(read)

    async def _confirm(self, reader: SlotReader, writer: LogWriter) -> None:
        while True:
            batch = await writer.acked()
            self.acked_batches += 1
            if batch.commit_end:
                reader.confirm(batch.commit_end)

    async def _watch_connection(self, writer: StreamWriter) -> None:
        await self._lost.wait()
        exc = ConnectionLost("the connection to NATS was lost")
        writer.fail(exc)
        raise exc


class _Buffer:
    """Records between the reader task and the publisher. Reads are appended to one list, so
    the publisher takes everything read so far at once; ``put`` waits while ``limit`` records
    are held (plus the one read in hand)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._records: list[Record] = []
        self.ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def empty(self) -> bool:
        return not self._records

    async def put(self, records: list[Record]) -> None:
        while len(self._records) >= self.limit:
            self._room.clear()
            await self._room.wait()
        if self._records:
            self._records.extend(records)
        else:
            self._records = records
        self.ready.set()

    def take(self) -> list[Record]:
        records, self._records = self._records, []
        self.ready.clear()
        self._room.set()
        return records


async def _read(reader: SlotReader, buffer: _Buffer) -> None:
    while True:
        await buffer.put(await reader.read())


async def _failure_of(task: asyncio.Future[None]) -> None:
    """Raise what ``task`` raises, without cancelling it when cancelled itself."""
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()


async def _finish(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` and wait until it is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved; a failure was reported through _failure_of


class _Publisher:
    """Records from the buffer into batches and publishes (the session's main loop)."""

    def __init__(
        self,
        source: SourceConfig,
        writer: LogWriter,
        reader: SlotReader,
        tail: Tail,
        max_batch_bytes: int,
    ) -> None:
        self.writer = writer
        self.reader = reader
        stored = tail.checkpoint
        self.skip_to = (stored.lsn, stored.seq) if stored is not None else None
        self.keep_last = tail.partial  # the tail's record is only partly stored: write it again
        self.skipped = 0
        max_bytes = min(source.batch.max_bytes, max_batch_bytes)
        self.batcher = Batcher(source.batch.max_records, max_bytes)
        self.linger = source.batch.linger
        self.oldest = 0.0  # when the oldest record not yet in a batch arrived

    async def run(self, buffer: _Buffer, stop: asyncio.Event) -> None:
        """Until ``stop``; the batcher may still hold records then."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                patience = await self._flush_if_due(buffer)
                records = await _next(buffer, stopping, patience)
                if records is None:
                    return
                if records:
                    await self._add(records)
        finally:
            stopping.cancel()

    async def _flush_if_due(self, buffer: _Buffer) -> float | None:
        """Publish the pending partial batch when it is due; else how long it may wait."""
        if not self.batcher.pending or not buffer.empty():
            return None if not self.batcher.pending else 0.0
        waited = time.monotonic() - self.oldest
        if self.writer.in_flight == 0 or waited >= self.linger:
            batch = self.batcher.flush()
            assert batch is not None
            await self.writer.publish(batch)
            return None
        return self.linger - waited

    async def _add(self, records: list[Record]) -> None:
        if self.skip_to is not None:
            records = self._drop_stored(records)
        before = self.batcher.pending
        batches = self.batcher.extend(records)
        if self.batcher.pending and (before == 0 or batches):
            self.oldest = time.monotonic()
        for batch in batches:
            await self.writer.publish(batch)

    def _drop_stored(self, records: list[Record]) -> list[Record]:
        """Drop what the stream holds already; its commits are durable, so confirm them."""
        assert self.skip_to is not None
        for i, record in enumerate(records):
            at = (record.lsn, record.seq)
            if at > self.skip_to or (self.keep_last and at == self.skip_to):
                if self.skipped:
                    log.info(
                        "skipped %d records already in the stream", self.skipped,
                        extra={"skipped": self.skipped},
                    )  # fmt: skip
                self.skip_to = None
                return records[i:]
            self.skipped += 1
            if record.end_lsn:
                self.reader.confirm(record.end_lsn)
        return []


async def _next(
    buffer: _Buffer, stopping: asyncio.Future[Any], patience: float | None
) -> list[Record] | None:
    """Everything read so far; ``[]`` when ``patience`` ran out first; None on stop."""
    if stopping.done():
        return None
    if not buffer.empty():
        return buffer.take()
    ready = asyncio.ensure_future(buffer.ready.wait())
    try:
        done, _ = await asyncio.wait(
            {ready, stopping}, timeout=patience, return_when="FIRST_COMPLETED"
        )
    finally:
        ready.cancel()
    if stopping in done:
        return None
    return buffer.take()
