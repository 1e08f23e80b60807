"""Dumps and their chunks in a JetStream key-value bucket, shared by every controller.

The bucket (``[controller] bucket``, file storage, history 1, created when missing) holds JSON
records (readable with ``nats kv get``):

* ``dump.<uri>.<id>``: a ``DumpRecord`` (state running, paused or stopped, tables, chunk count,
  cool-down); a dump is *done* when every chunk is, which is derived, never written.
* ``chunk.<uri>.<id>.<n>``: a ``ChunkRecord``, chunk ``n`` of the dump: pending, claimed (by a
  controller ``owner``, for one of its clients, until ``expires``) or done (with its rows).
* ``uri.<uri>``: a ``UriRecord``, the cool-down ``SetScheduleCoolDown`` gave the URI.

Dump ids are short, unique, KV-safe and sort by creation time. Each controller keeps the whole
bucket in memory, kept current by a KV watch (watched again when it stalls, as after a restart of
the nats-server holding it), and writes through ``swap``: a compare-and-set
(``kv.update`` with the revision it last saw). A write that loses the race refreshes the record
and reports failure, so two controllers never both claim a chunk: whoever writes first owns it.
Chunks of a dump are written before its dump record, so a dump that is visible has its chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from pgcapture.proto import pb

log = logging.getLogger("pgcapture.controller")

_BASE36: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
_WRITE_CONCURRENCY: Final = 128
# NATS, and so the bucket, cannot be reached now; retrying later may work.
UNREACHABLE: Final = (nats.errors.Error, TimeoutError, OSError)
WATCH_CHECK: Final = 1.0  # seconds between checks that the watch keeps up with the bucket


class DumpRecord(BaseModel):
    """``dump.<uri>.<id>``: one dump."""

    id: str
    uri: str
    state: Literal["running", "paused", "stopped"] = "running"
    tables: list[str]
    chunks: int
    rows_estimate: int = 0
    cool_down: float = 0.0
    keys_only: bool = False  # every chunk selects keys: only key-capable clients take it
    created: float
    updated: float


class ChunkRecord(BaseModel):
    """``chunk.<uri>.<id>.<n>``: chunk ``n`` of a dump and who works on it."""

    dump: str
    uri: str
    n: int
    schema_name: str
    table: str
    page_begin: int = 0
    page_end: int = 0
    keys: list[str] = []
    state: Literal["pending", "claimed", "done"] = "pending"
    attempts: int = 0  # requeues asked by clients: the backoff grows with them
    requeues: int = 0  # every return to pending: requeues and disconnected clients
    not_before: float = 0.0
    last_error: str = ""
    failed_at: float = 0.0  # when last_error was recorded
    rows: int = 0
    owner: str = ""  # controller instance holding the claim
    claim: str = ""  # that controller's token for the client holding it
    client: str = ""  # the client, for people
    expires: float = 0.0
    updated: float = 0.0

    def info(self) -> pb.DumpInfoResponse:
        return pb.DumpInfoResponse(
            schema=self.schema_name,
            table=self.table,
            page_begin=self.page_begin,
            page_end=self.page_end,
            keys=self.keys,
            dump_id=self.dump,
        )

    def available(self, now: float, key_chunks: bool) -> bool:
        """May be handed out now, to a client that can (or cannot) dump key chunks."""
        if self.keys and not key_chunks:
            return False
        if self.state == "pending":
            return self.not_before <= now
        return self.state == "claimed" and self.expires <= now


class UriRecord(BaseModel):
    """``uri.<uri>``: settings ``SetScheduleCoolDown`` gave a URI."""

    cool_down: float


@dataclass
class Chunk:
    """A chunk record and the revision it was read at."""

    key: str
    record: ChunkRecord
    revision: int


@dataclass
class Dump:
    """A dump record, its revision and its chunks by number."""

    key: str
    record: DumpRecord
    revision: int
    chunks: dict[int, Chunk] = field(default_factory=dict)
    first_open: int = 0  # every chunk before this one is done

    def open_chunks(self) -> Iterator[Chunk]:
        """Chunks that are not done, in order (safe while the store changes)."""
        while (c := self.chunks.get(self.first_open)) and c.record.state == "done":
            self.first_open += 1
        for n in range(self.first_open, self.record.chunks):
            chunk = self.chunks.get(n)
            if chunk is not None and chunk.record.state != "done":
                yield chunk

    def done(self) -> bool:
        return next(self.open_chunks(), None) is None

    @property
    def state(self) -> str:
        """running, paused, stopped, or done when every chunk is (and it was not stopped)."""
        if self.record.state != "stopped" and self.done():
            return "done"
        return self.record.state

    @property
    def unfinished(self) -> bool:
        return self.state in ("running", "paused")

    def status(self, now: float) -> pb.DumpStatus:
        """Progress as ``ListDumps`` reports it, summed over the chunks."""
        r, chunks = self.record, [c.record for c in list(self.chunks.values())]
        state = self.state
        failed = max(chunks, key=lambda c: c.failed_at, default=None)
        status = pb.DumpStatus(
            id=r.id,
            uri=r.uri,
            state=state,
            tables=r.tables,
            chunks_total=r.chunks,
            chunks_done=sum(c.state == "done" for c in chunks),
            chunks_running=sum(c.state == "claimed" and c.expires > now for c in chunks),
            rows=sum(c.rows for c in chunks),
            rows_estimate=r.rows_estimate,
            retries=sum(c.requeues for c in chunks),
            last_error=failed.last_error if failed is not None else "",
        )
        updated = max((c.updated for c in chunks), default=r.updated)
        status.created.FromNanoseconds(int(r.created * 1e9))
        status.updated.FromNanoseconds(int(max(updated, r.updated) * 1e9))
        if state in ("done", "stopped"):
            status.finished.FromNanoseconds(int((updated if state == "done" else r.updated) * 1e9))
        return status


def new_dump_id(now: float | None = None) -> str:
    """12 characters: creation time in milliseconds (base 36, fixed width) and 3 random ones."""
    millis = int((time.time() if now is None else now) * 1000)
    digits = ""
    for _ in range(9):
        millis, digit = divmod(millis, 36)
        digits = _BASE36[digit] + digits
    return digits + "".join(secrets.choice(_BASE36) for _ in range(3))


def dump_key(uri: str, dump_id: str) -> str:
    return f"dump.{uri}.{dump_id}"


def chunk_key(uri: str, dump_id: str, n: int) -> str:
    return f"chunk.{uri}.{dump_id}.{n}"


class DumpStore:
    """The bucket's records in memory, kept current, with compare-and-set writes."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1) -> None:
        self._js = js
        self.bucket = bucket
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self.dumps: dict[str, Dump] = {}
        self._orphans: dict[str, dict[int, Chunk]] = {}  # chunks read before their dump
        self.uris: dict[str, tuple[UriRecord, int]] = {}
        self._revisions: dict[str, int] = {}
        self._watched = 0  # the newest revision (bucket stream sequence) the watch delivered
        self._follower: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def open(self) -> None:
        """Create the bucket when missing, load it, and follow it from then on."""
        try:
            self._kv = await self._js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self._js.create_key_value(
                bucket=self.bucket, history=1, storage=StorageType.FILE, replicas=self.replicas
            )
        await self._watch()
        self._guard = asyncio.create_task(self._keep_watching())
        log.info("dump bucket %s: %d dumps loaded", self.bucket, len(self.dumps))

    async def close(self) -> None:
        for task in (self._guard, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self) -> None:
        """Read every record (those already known are skipped), then follow the changes."""
        watcher = await self.kv.watchall()
        async for entry in watcher:
            if entry is None:
                break
            self._delivered(entry)
        if self._follower is not None:
            self._follower.cancel()
        self._follower = asyncio.create_task(self._follow(watcher))

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is not None:
                    self._delivered(entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _delivered(self, entry: KeyValue.Entry) -> None:
        self._watched = max(self._watched, entry.revision or 0)
        self._apply(entry.key, entry.value, entry.revision)

    async def _keep_watching(self) -> None:
        """Watch again when the watch stops delivering: its consumer does not survive a
        restart of the nats-server holding it, so the bucket would move on without us."""
        behind, seen = 0, -1  # the bucket's end the watch had not reached, and its position
        while True:
            await asyncio.sleep(WATCH_CHECK)
            try:
                if behind and self._watched == seen and seen < behind:
                    log.warning("dump bucket %s: the watch stalled; watching again", self.bucket)
                    await self._watch()
                last = (await self.kv.status()).stream_info.state.last_seq or 0
            except UNREACHABLE as exc:
                log.debug("dump bucket %s: cannot check the watch: %r", self.bucket, exc)
                continue
            behind, seen = (last if self._watched < last else 0), self._watched

    # -- the in-memory view -------------------------------------------------------------

    async def wait_changed(self, seconds: float) -> None:
        """Until a record changes (or ``notify``), at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def dumps_of(self, uri: str | None = None) -> list[Dump]:
        """Dumps (of ``uri``, or every URI) in creation order."""
        found = (d for d in self.dumps.values() if uri is None or d.record.uri == uri)
        return sorted(found, key=lambda d: d.record.id)

    def chunks(self) -> Iterable[Chunk]:
        return (c for d in list(self.dumps.values()) for c in list(d.chunks.values()))

    def chunk(self, dump_id: str, n: int) -> Chunk | None:
        dump = self.dumps.get(dump_id)
        return dump.chunks.get(n) if dump is not None else None

    def uri_cool_down(self, uri: str) -> float | None:
        found = self.uris.get(uri)
        return None if found is None else found[0].cool_down

    def _apply(self, key: str, value: bytes | None, revision: int | None) -> None:
        """Record ``key``'s value at ``revision`` unless a newer one is known."""
        revision = revision or 0
        if not value or revision <= self._revisions.get(key, 0):
            return
        try:
            self._remember(key, value, revision)
        except ValidationError as exc:
            log.warning(
                "dump bucket %s: record %s is not readable, ignored: %s",
                self.bucket,
                key,
                exc.errors()[0]["msg"],
            )
            return
        self._revisions[key] = revision
        self.notify()

    def _remember(self, key: str, value: bytes, revision: int) -> None:
        kind = key.partition(".")[0]
        if kind == "dump":
            record = DumpRecord.model_validate_json(value)
            known = self.dumps.get(record.id)
            chunks = known.chunks if known else self._orphans.pop(record.id, {})
            self.dumps[record.id] = Dump(key, record, revision, chunks)
        elif kind == "chunk":
            chunk = Chunk(key, ChunkRecord.model_validate_json(value), revision)
            dump = self.dumps.get(chunk.record.dump)
            holder = dump.chunks if dump else self._orphans.setdefault(chunk.record.dump, {})
            holder[chunk.record.n] = chunk
        elif kind == "uri":
            self.uris[key[4:]] = (UriRecord.model_validate_json(value), revision)

    # -- writes ---------------------------------------------------------------------------

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "DumpStore.open() first"
        return self._kv

    async def add_dump(self, record: DumpRecord, chunks: list[ChunkRecord]) -> Dump:
        """Write the chunks, then the dump record that makes them visible."""
        gate = asyncio.Semaphore(_WRITE_CONCURRENCY)

        async def put(chunk: ChunkRecord) -> None:
            key = chunk_key(chunk.uri, chunk.dump, chunk.n)
            data = chunk.model_dump_json().encode()
            async with gate:
                revision = await self.kv.put(key, data)
            self._apply(key, data, revision)

        await asyncio.gather(*(put(c) for c in chunks))
        key = dump_key(record.uri, record.id)
        data = record.model_dump_json().encode()
        self._apply(key, data, await self.kv.create(key, data))
        return self.dumps[record.id]

    async def swap(self, key: str, record: BaseModel, revision: int) -> bool:
        """Write ``record`` if ``key`` is still at ``revision``; otherwise re-read it, False."""
        data = record.model_dump_json().encode()
        try:
            if revision:
                new = await self.kv.update(key, data, last=revision)
            else:
                new = await self.kv.create(key, data)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self.refresh(key)
            return False
        self._apply(key, data, new)
        return True

    async def refresh(self, key: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await self.kv.get(key)
            self._apply(key, entry.value, entry.revision)

    async def set_uri(self, uri: str, record: UriRecord) -> None:
        """A URI's settings: the last write wins."""
        key, data = f"uri.{uri}", record.model_dump_json().encode()
        self._apply(key, data, await self.kv.put(key, data))
