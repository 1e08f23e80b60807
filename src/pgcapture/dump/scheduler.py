"""The scheduling half of ``pgcapture controller`` (docs/dumps.md): which client gets which
chunk, when, and what its acknowledgement does.

A ``Scheduler`` keeps the clients of each URI (one per ``PullDumpInfo`` stream). A client gets
ONE chunk of a running dump of its URI at a time, by dump creation and chunk order, once the
dump's cool-down has passed since its previous acknowledgement and the chunk's backoff after a
requeue (``min(2 s · 2^(attempts−1), max_backoff)``) is over. Handing out is a compare-and-set
claim in the bucket (``store.py``) naming this controller's instance and the client, valid until
``now + claim_ttl`` and renewed every ``claim_ttl / 3``; an expired claim may be taken by any
controller, and an instance restarted under the same name takes its own claims back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from pgcapture.config import ControllerConfig
from pgcapture.dump.store import UNREACHABLE, Chunk, ChunkRecord, Dump, DumpStore
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.controller")

REQUEUE_BACKOFF: Final = 2.0  # seconds before a requeued chunk's second attempt, doubling (Go)
POLL: Final = 0.1  # an idle client looks for a ready chunk at least this often
RETRIES: Final = 5  # compare-and-set attempts before giving up on a busy record


class ControllerMetrics:
    """Counters per URI (a registry of its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ns, uri = "pgcapture_controller", ["uri"]
        self.clients = Gauge(f"{ns}_clients", "PullDumpInfo streams attached", uri, registry=r)
        self.handed_out = Counter(f"{ns}_chunks_handed_out", "Chunks handed out", uri, registry=r)
        self.done = Counter(f"{ns}_chunks_done", "Chunks acknowledged done", uri, registry=r)
        self.requeued = Counter(
            f"{ns}_chunks_requeued",
            "Chunks returned to pending (requeued, disconnected)",
            uri,
            registry=r,
        )
        self.rows = Counter(f"{ns}_rows", "Rows the acknowledged chunks delivered", uri, registry=r)


def requeue_delay(attempts: int, maximum: float) -> float:
    """The wait before attempt ``attempts + 1`` of a chunk requeued ``attempts`` times."""
    return min(REQUEUE_BACKOFF * 2.0 ** min(max(attempts - 1, 0), 30), maximum)


@dataclass(eq=False)
class Client:
    """One ``PullDumpInfo`` stream."""

    uri: str
    key_chunks: bool
    peer: str
    token: str  # written into the claims of its chunks
    acks: asyncio.Queue[pb.DumpInfoRequest | None] = field(default_factory=asyncio.Queue)
    acked: dict[str, float] = field(default_factory=dict)  # dump id -> monotonic time
    held: Chunk | None = None
    closed: bool = False


class Scheduler:
    """Hands out chunks of the store's running dumps to clients, through claims."""

    def __init__(
        self,
        store: DumpStore,
        instance: str,
        settings: ControllerConfig,
        metrics: ControllerMetrics,
    ) -> None:
        self.store = store
        self.instance = instance
        self.settings = settings
        self.metrics = metrics
        self.closing = False
        self._process = f"{instance}/{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._held: dict[str, Client] = {}  # chunk key -> client holding it
        self._claiming: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._warned = 0.0

    async def start(self) -> None:
        """Take back the claims of this instance's previous run, then renew ours."""

        def ours(r: ChunkRecord) -> bool:
            return r.state == "claimed" and r.owner == self.instance

        mine = [c for c in self.store.chunks() if ours(c.record)]
        for chunk in mine:
            await self._update(chunk, ours, _released(None))
        if mine:
            log.info(
                "took back %d chunks claimed by a previous run of %s", len(mine), self.instance
            )
        self._renewer = asyncio.create_task(self._renew_forever())

    async def close(self) -> None:
        self.closing = True
        self.store.notify()
        if self._renewer is not None:
            self._renewer.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)

    def attach(self, uri: str, key_chunks: bool, peer: str) -> Client:
        client = Client(uri, key_chunks, peer, f"{self._process}#{next(self._ids)}")
        self.metrics.clients.labels(uri=uri).inc()
        log.info("uri %s: dump client %s attached", uri, peer)
        return client

    def detach(self, client: Client) -> None:
        """The stream ended: its chunk in flight returns to pending at once."""
        client.closed = True
        self.metrics.clients.labels(uri=client.uri).dec()
        if client.held is not None:
            self._spawn(self._return(client, "client disconnected"))
        log.info("uri %s: dump client %s detached", client.uri, client.peer)

    # -- handing out --------------------------------------------------------------------

    async def next_chunk(self, client: Client) -> Chunk | None:
        """The next chunk claimed for ``client``; None once it or the controller closes."""
        while not (client.closed or self.closing):
            try:
                chunk = await asyncio.shield(self._claim_next(client))
            except UNREACHABLE as exc:
                self._warn(f"cannot claim chunks, the dump bucket is out of reach: {exc!r}")
                chunk = None
            if chunk is not None:
                return chunk
            await self.store.wait_changed(POLL)
        return None

    async def _claim_next(self, client: Client) -> Chunk | None:
        now, since = time.time(), time.monotonic()
        for dump in self.store.dumps_of(client.uri):
            if not self._may_take(client, dump, since):
                continue
            for chunk in dump.open_chunks():
                if chunk.key in self._claiming or not chunk.record.available(
                    now, client.key_chunks
                ):
                    continue
                if await self._claim(client, chunk, now):
                    return client.held
        return None

    def _may_take(self, client: Client, dump: Dump, since: float) -> bool:
        record = dump.record
        if record.state != "running" or (record.keys_only and not client.key_chunks):
            return False
        last = client.acked.get(record.id)
        return last is None or since - last >= record.cool_down

    async def _claim(self, client: Client, chunk: Chunk, now: float) -> bool:
        claim = {
            "state": "claimed",
            "owner": self.instance,
            "claim": client.token,
            "client": client.peer,
            "expires": now + self.settings.claim_ttl,
        }
        self._claiming.add(chunk.key)
        try:
            record = chunk.record.model_copy(update={**claim, "updated": now})
            if not await self.store.swap(chunk.key, record, chunk.revision):
                return False
        finally:
            self._claiming.discard(chunk.key)
        client.held = self.store.chunk(record.dump, record.n)
        self._held[chunk.key] = client
        self.metrics.handed_out.labels(uri=client.uri).inc()
        if client.closed:  # the stream ended while claiming
            self._spawn(self._return(client, "client disconnected"))
        return True

    # -- acknowledgements -----------------------------------------------------------------

    async def acknowledge(self, client: Client, request: pb.DumpInfoRequest) -> None:
        """Record the client's verdict on its chunk in flight."""
        held, client.held = client.held, None
        if held is None:
            log.debug("uri %s: %s acknowledged no chunk; ignored", client.uri, client.peer)
            return
        self._held.pop(held.key, None)
        client.acked[held.record.dump] = time.monotonic()
        reason, rows = request.requeue_reason, request.rows
        try:
            if not reason:
                ok = await self._update(held, lambda r: r.state != "done", _finished(rows))
            else:
                ok = await self._update(held, _claimed_by(client), _requeued(reason, self.settings))
        except UNREACHABLE as exc:
            log.warning(
                "uri %s: acknowledgement of %s lost (its claim will expire): %r",
                client.uri,
                held.key,
                exc,
            )
            return
        if ok:
            self._count(client.uri, reason, rows)

    def _count(self, uri: str, reason: str, rows: int) -> None:
        if reason:
            self.metrics.requeued.labels(uri=uri).inc()
        else:
            self.metrics.done.labels(uri=uri).inc()
            self.metrics.rows.labels(uri=uri).inc(rows)

    async def _return(self, client: Client, reason: str) -> None:
        held, client.held = client.held, None
        if held is None:
            return
        self._held.pop(held.key, None)
        with contextlib.suppress(*UNREACHABLE):
            if await self._update(held, _claimed_by(client), _released(reason)):
                self.metrics.requeued.labels(uri=client.uri).inc()

    async def _update(
        self,
        chunk: Chunk,
        applies: Callable[[ChunkRecord], bool],
        change: Callable[[ChunkRecord], dict[str, Any]],
    ) -> bool:
        """Compare-and-set ``change`` on the chunk while ``applies`` to its latest record."""
        for _ in range(RETRIES):
            latest = self.store.chunk(chunk.record.dump, chunk.record.n)
            if latest is None or not applies(latest.record):
                return False
            update = {**change(latest.record), "updated": time.time()}
            if await self.store.swap(
                latest.key, latest.record.model_copy(update=update), latest.revision
            ):
                return True
        return False

    # -- claims ---------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_ttl / 3)
            for client in list(self._held.values()):
                await self._renew(client)

    async def _renew(self, client: Client) -> None:
        held = client.held
        if held is None:
            return
        expires = {"expires": time.time() + self.settings.claim_ttl}
        try:
            ok = await self._update(held, _claimed_by(client), lambda r: expires)
        except UNREACHABLE as exc:
            self._warn(f"cannot renew claims, the dump bucket is out of reach: {exc!r}")
            return
        if not ok and client.held is held:
            self._held.pop(held.key, None)
            log.warning(
                "uri %s: the claim of %s by %s expired and was taken over",
                client.uri,
                held.key,
                client.peer,
            )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn(self, message: str) -> None:
        if time.monotonic() - self._warned > 10:
            self._warned = time.monotonic()
            log.warning(message)


def _claimed_by(client: Client) -> Callable[[ChunkRecord], bool]:
    return lambda r: r.state == "claimed" and r.claim == client.token


def _finished(rows: int) -> Callable[[ChunkRecord], dict[str, Any]]:
    return lambda r: {"state": "done", "rows": rows, **_UNCLAIMED}


def _requeued(reason: str, settings: ControllerConfig) -> Callable[[ChunkRecord], dict[str, Any]]:
    def change(r: ChunkRecord) -> dict[str, Any]:
        now, attempts = time.time(), r.attempts + 1
        delay = requeue_delay(attempts, settings.max_backoff)
        return {
            "state": "pending",
            "attempts": attempts,
            "requeues": r.requeues + 1,
            "not_before": now + delay,
            "last_error": reason,
            "failed_at": now,
            **_UNCLAIMED,
        }

    return change


def _released(reason: str | None) -> Callable[[ChunkRecord], dict[str, Any]]:
    """Back to pending at once; with a ``reason``, recorded as a requeue."""

    def change(r: ChunkRecord) -> dict[str, Any]:
        failed = {"requeues": r.requeues + 1, "last_error": reason, "failed_at": time.time()}
        return {"state": "pending", "not_before": 0.0, **(failed if reason else {}), **_UNCLAIMED}

    return change


_UNCLAIMED: Final = {"owner": "", "claim": "", "client": "", "expires": 0.0}


# -- the gRPC service -----------------------------------------------------------------------
