"""Delivering one URI's changes to the client streams attached to it (docs/gateway.md).

A ``Hub`` exists per URI in each gateway process while clients are attached. It reads the URI's
durable JetStream consumer (pull, explicit acknowledgement), so the URI's position lives on the
server and survives gateway restarts, and several gateways share a URI's work the way JetStream
shares a consumer's messages. A stream message holds a batch of records; the hub turns its
changes into ``Item``s, hands each to a client stream (``Session``) that wants its table and
has room, and acknowledges the message to JetStream once every item of it is settled:
acknowledged by a client, skipped (Begin/Commit, a table no client asked for), or moved to the
URI's dead-letter stream. So after a crash, JetStream redelivers exactly the messages whose
acknowledgement had not reached it.

Requeue (a client's non-empty ``requeue_reason``):

* unordered URIs: once the other items of the message are settled, the message is ``nak``ed
  with the URI's delay (doubling with each delivery up to ``requeue_max_delay``); JetStream
  redelivers it (to any gateway), and this hub skips the items already acknowledged;
* ordered URIs: the hub holds the item and sends it again after the delay, and no later change
  of the same row key is sent before it is acknowledged. One gateway at a time reads an
  ordered URI (a lease; the others stand by), it acknowledges messages in stream order only,
  and on taking the URI over it restarts the consumer right after the acknowledged floor, so
  after a crash the changes are replayed in commit order.

An item delivered ``max_deliveries`` times and requeued again goes to the dead-letter stream
(with the reason and the count in its headers), is logged and counted, and is settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import grpc
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ConfigError, SourceError
from pgcapture.gateway.errors import GatewayError
from pgcapture.gateway.injection import DUMP_ORDER, DumpChunk, Watch
from pgcapture.gateway.metrics import GatewayMetrics
from pgcapture.gateway.records import (
    BEGIN,
    CHANGE,
    COMMIT,
    Key,
    capture_message,
    change_keys,
    lsn_field,
    read_head,
)
from pgcapture.gateway.resolver import Route
from pgcapture.log.batch import decode_batch, encode_record
from pgcapture.log.follow import StreamGap, StreamMissing, locate
from pgcapture.log.lease import Lease, new_owner_id
from pgcapture.log.reader import bounds, parse_fragment, whole_record
from pgcapture.log.stream import read_tail
from pgcapture.ops.metrics import commit_time

log = logging.getLogger("pgcapture.gateway")

START_LSN: Final = "pgcapture_start_lsn"  # consumer metadata: records below it are skipped
# Consumer metadata: the highest commit LSN the URI's consumer ever delivered, kept across the
# consumer's re-creation (ordered URIs) so dumps never bring rows older than what clients saw.
DELIVERED_LSN: Final = "pgcapture_delivered_lsn"
_FETCH: Final = 16  # stream messages per fetch
_STREAM_NOT_FOUND: Final = 10059  # JetStream API error code
_LINGER: Final = 5.0  # seconds a hub stays after its last client left


class Batch:
    """One stream message and the settlement of its items."""

    __slots__ = (
        "acked",
        "commit_time",
        "delivered",
        "msg",
        "pending",
        "requeued",
        "seq",
        "settled",
    )

    def __init__(self, msg: Msg, seq: int, delivered: int) -> None:
        self.msg = msg
        self.seq = seq
        self.commit_time = 0.0  # of its first transaction, when known (the lag metric)
        self.delivered = delivered  # JetStream's delivery count of this message
        self.pending = 0
        self.requeued: list[Item] = []
        self.acked: set[int] = set()  # record seqs settled (for a redelivery of this message)
        self.settled = False


@dataclass(eq=False, slots=True)
class Item:
    """One change or truncate record on its way to a client."""

    lsn: int  # 0: a dump row
    seq: int  # a dump row: its dump id
    kind: int
    payload: bytes  # the serialized CaptureMessage
    tables: tuple[tuple[str, str], ...]
    batch: Batch | DumpChunk
    message: bytes  # the stored Message (dead-letter stream); a dump row's Change
    commit_time: float = 0.0  # Unix time of the source commit, when known
    keys: tuple[Key, ...] = ()
    attempts: int = 0  # deliveries by this hub
    locked: bool = False  # ordered: holds its keys and tables until settled
    due: float = 0.0
    reason: str = ""

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.lsn, self.seq)

    def __lt__(self, other: Item) -> bool:
        return (self.due, self.lsn, self.seq) < (other.due, other.lsn, other.seq)


class Session:
    """One client stream of a URI: what it wants, and what it holds."""

    def __init__(
        self, hub: Hub, name: str, regex: re.Pattern[str] | None, batched: bool, window: int
    ) -> None:
        self.hub = hub
        self.name = name
        self.regex = regex
        self.batched = batched
        self.window = window
        self.outbox: deque[Item] = deque()
        self.unacked: dict[Any, Item] = {}  # by delivery id (batched) or (lsn, seq)
        self.wake = asyncio.Event()
        self.error: GatewayError | None = None
        self.closed = False  # the client closed its side: no more acknowledgements
        self.next_id = 1
        self.dump_acks: dict[int, deque[Any]] = {}  # Capture: dump id -> unacked keys, in order
        self._wanted: dict[tuple[int, tuple[tuple[str, str], ...]], bool] = {}

    def wants(self, kind: int, tables: tuple[tuple[str, str], ...]) -> bool:
        """Whether this client asked for a record of ``kind`` on ``tables``."""
        what = (kind, tables)
        wanted = self._wanted.get(what)
        if wanted is None:
            regex = self.regex
            if kind != CHANGE and not self.batched:
                wanted = False  # the compatible Capture method carries changes only
            else:
                wanted = regex is None or any(regex.search(table) for _, table in tables)
            self._wanted[what] = wanted
        return wanted

    def takes(self, item: Item) -> bool:
        if not item.lsn:  # a dump row goes to the stream its chunk is for
            return item.batch.session is self  # type: ignore[union-attr]
        return self.wants(item.kind, item.tables)

    def room(self) -> int:
        return self.window - len(self.unacked) - len(self.outbox)

    def fail(self, error: GatewayError) -> None:
        self.error = error
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def take(self, max_items: int, max_bytes: int) -> list[Item]:
        """Items to send next (marked unacknowledged), at most ``max_items`` / ``max_bytes``."""
        out: list[Item] = []
        size = 0
        while self.outbox and len(out) < max_items and (not out or size < max_bytes):
            item = self.outbox.popleft()
            size += len(item.payload)
            out.append(item)
        if not self.outbox:
            self.wake.clear()
        return out


class Hub:
    """Delivery of one URI's stream in this process (see the module docstring)."""

    def __init__(
        self,
        js: JetStreamContext,
        route: Route,
        metrics: GatewayMetrics,
        lock_bucket: str,
        on_idle: Callable[[Hub], None],
    ) -> None:
        self.js = js
        self.route = route
        self.settings = s = route.settings
        self.ordered = s.ordered
        self.metrics = metrics
        self._lock_bucket = lock_bucket
        self._on_idle = on_idle
        self.sessions: list[Session] = []
        self.backlog: deque[Item] = deque()
        self.retry: list[Item] = []  # ordered: requeued items by due time
        self.held: dict[int, Batch] = {}  # stream seq -> message not yet acknowledged
        self.done: dict[int, set[int]] = {}  # stream seq -> record seqs settled before a nak
        self.owners: dict[Key, Item] = {}  # ordered: row key -> the item it waits for
        self._table_items: Counter[tuple[str, str]] = Counter()  # ordered: unsettled per table
        self._truncating: Counter[tuple[str, str]] = Counter()  # ordered: truncates of it
        self.start_lsn = 0
        self.taken_lsn = 0  # every stream message up to this commit LSN is taken
        # the highest commit LSN a client of the URI may have been sent, by any gateway, when
        # this hub started: a dump row must not be older (known once the hub runs)
        self.delivered_lsn = 0
        # the fragments of one record taken in order: its checkpoint, the pieces, where they end
        self._fragments: tuple[Checkpoint, list[bytes], int] | None = None
        self._taken = asyncio.Event()  # set whenever taken_lsn moves
        self._watches: dict[tuple[str, str], list[Watch]] = {}  # tables being dumped
        self.state = "starting"
        self.last_acked_commit = 0.0
        self._times: dict[int, float] = {}  # commit LSN -> commit time, recent transactions
        self._more = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []  # the hub's loops
        self._pending: set[asyncio.Task[None]] = set()  # acks, naks, dead letters
        self._closing = False
        self._linger: asyncio.TimerHandle | None = None
        metrics_labels = {"uri": route.uri}
        self._delivered = metrics.delivered.labels(**metrics_labels)
        self._acked = metrics.acked.labels(**metrics_labels)
        self._requeued = metrics.requeued.labels(**metrics_labels)
        self._dead = metrics.dead_lettered.labels(**metrics_labels)
        self._skipped = metrics.skipped.labels(**metrics_labels)
        self._in_flight = metrics.in_flight.labels(**metrics_labels)
        self._clients = metrics.clients.labels(**metrics_labels)
        self._lag_seconds = metrics.lag_seconds.labels(**metrics_labels)
        self._lag_messages = metrics.lag_messages.labels(**metrics_labels)
        self._lease: Lease | None = None
        self._dead_letter_ready = False

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"hub {self.route.uri}"),
            asyncio.create_task(self._keep_alive(), name=f"hub {self.route.uri} progress"),
        ]

    async def close(self) -> None:
        """Stop reading; every unsettled message goes back to JetStream at once."""
        self._closing = True
        for session in self.sessions:
            session.fail(_unavailable("the gateway is shutting down; reconnect"))
        for task in self._tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
        if self._pending:  # acknowledgements on their way, dead letters being written
            await asyncio.wait(set(self._pending), timeout=5.0)
        for batch in list(self.held.values()):
            if not batch.settled:
                with contextlib.suppress(Exception):
                    await batch.msg.nak()
        self.held.clear()
        if self._lease is not None:
            await self._lease.release()
        self._in_flight.set(0)

    def attach(
        self, name: str, regex: re.Pattern[str] | None, batched: bool, window: int
    ) -> Session:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        session = Session(self, name, regex, batched, min(window, self.settings.max_unacked))
        self.sessions.append(session)
        self._clients.set(len(self.sessions))
        self._more.set()
        return session

    def detach(self, session: Session) -> None:
        """The client stream ended: whatever it was given and did not acknowledge goes back
        to the backlog, in stream order, for the other clients."""
        if session not in self.sessions:
            return
        self.sessions.remove(session)
        self._clients.set(len(self.sessions))
        returned = list(session.unacked.values()) + list(session.outbox)
        session.unacked.clear()
        session.outbox.clear()
        for item in returned:
            self._unlock(item)
            if isinstance(item.batch, DumpChunk):
                self.drop_chunk(item.batch, "the client stream the chunk was sent on ended")
        returned = [item for item in returned if item.lsn]
        if returned:
            self.backlog = deque(sorted([*returned, *self.backlog], key=_order))
        self._count_in_flight()
        self._dispatch()
        if not self.sessions and not self._closing:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(_LINGER, self._on_idle, self)

    # -- reading the stream -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self.ordered:
                await self._take_over()
            await self._ensure_consumer(recreate=self.ordered)
            sub = await self.js.pull_subscribe_bind(
                self.settings.consumer_name, stream=self.route.stream
            )
            self.state = "running"
            try:
                await self._fetch_loop(sub)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _as_status(exc)
            log.error("uri %s: %s", self.route.uri, error)
            self.state = "failed"
            for session in list(self.sessions):
                session.fail(error)
            self._on_idle(self)

    async def _take_over(self) -> None:
        """Ordered URIs: one reader at a time. Wait for the lease, keep it."""
        self.state = "standby"
        lease = Lease(self.js, self._lock_bucket, f"gateway.{self.route.uri}", new_owner_id())
        while True:
            try:
                await lease.acquire(wait=0.0)
                break
            except SourceError:
                await asyncio.sleep(1.0)
        self._lease = lease
        self._tasks.append(asyncio.create_task(self._keep_lease(lease), name="hub lease"))

    async def _keep_lease(self, lease: Lease) -> None:
        try:
            await lease.keep()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for session in list(self.sessions):
                session.fail(_unavailable(f"lost the ordered-delivery lease of this URI: {exc}"))

    async def _ensure_consumer(self, recreate: bool) -> None:
        stream, name = self.route.stream, self.settings.consumer_name
        try:
            info = await self.js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise StreamMissing(
                    f"stream {stream!r} of URI {self.route.uri!r} does not exist yet; it is "
                    "created when `pgcapture capture` first runs for its source: retry then"
                ) from None
            config = await self._new_consumer_config()
            await self.js.add_consumer(stream, config)
            log.info("uri %s: created consumer %s on %s", self.route.uri, name, stream)
            self.start_lsn = int((config.metadata or {}).get(START_LSN, "0"))
            return
        config = info.config
        self.start_lsn = int((config.metadata or {}).get(START_LSN, "0"))
        delivered = info.delivered.stream_seq if info.delivered else 0
        self.delivered_lsn = max(
            int((config.metadata or {}).get(DELIVERED_LSN, "0")), await self._lsn_of(delivered)
        )
        if recreate:
            config.metadata = {**(config.metadata or {}), DELIVERED_LSN: str(self.delivered_lsn)}
            # Restart delivery right after the acknowledged floor, in stream order: the
            # previous reader acknowledged in order, so everything after it is unsettled.
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            if floor:
                config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = floor + 1
                config.opt_start_time = None
            await self.js.delete_consumer(stream, name)
            await self.js.add_consumer(stream, config)

    async def _lsn_of(self, seq: int) -> int:
        """The last commit LSN in stream message ``seq`` (0 for none, or when the retention
        limits removed it: older than anything a replica could be behind)."""
        if not seq:
            return 0
        try:
            msg = await self.js.get_msg(self.route.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return 0
        return bounds(msg.headers, seq)[1].lsn

    async def _new_consumer_config(self) -> api.ConsumerConfig:
        s, stream = self.settings, self.route.stream
        config = api.ConsumerConfig(
            durable_name=s.consumer_name,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait,
            max_ack_pending=s.max_ack_pending,
            max_deliver=-1,
            filter_subject=self.route.subject,
            description=f"pgcapture gateway URI {self.route.uri}",
        )
        start = s.start
        if start == "beginning":
            config.deliver_policy = api.DeliverPolicy.ALL
        elif start == "new":
            info = await self.js.stream_info(stream)
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = info.state.last_seq + 1
        elif (lsn := s.start_lsn) is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = await locate(self.js, stream, max(lsn - 1, 0))
            config.metadata = {START_LSN: str(int(lsn))}
        else:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = s.start_time
        return config

    async def _fetch_loop(self, sub: Any) -> None:
        while True:
            await self._more.wait()
            if not self._wants_more():
                self._more.clear()
                continue
            room = sum(max(s.room(), 0) for s in self.sessions) - len(self.backlog)
            try:
                msgs = await sub.fetch(max(1, min(_FETCH, room // 500)), timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                self._take(msg, await self._records(msg))
            self._dispatch()

    async def _records(self, msg: Msg) -> list[Record]:
        """The whole records of a stream message. A record stored in fragments belongs to the
        message of its last fragment; the others hold no record and are acknowledged at once.
        Fragments that came to this hub in order are kept until the last one; a record whose
        earlier fragments went elsewhere (a redelivery, another gateway) is read back."""
        seq = msg.metadata.sequence.stream
        fragment = parse_fragment(msg.headers, msg.data, seq)
        if fragment is None:
            self._fragments = None
            return decode_batch(msg.data)
        kept = self._fragments
        if fragment.offset == 0:
            kept = (fragment.checkpoint, [fragment.piece], fragment.end)
        elif kept is not None and (kept[0], kept[2]) == (fragment.checkpoint, fragment.offset):
            kept = (kept[0], [*kept[1], fragment.piece], fragment.end)
        else:
            kept = None  # not the next piece of the record kept: read it back at its end
        self._fragments = kept
        if fragment.end < fragment.total or seq in self.held:
            return []
        self._fragments = None
        if kept is not None:
            return [Record(fragment.lsn, fragment.seq, b"".join(kept[1]))]
        return [await whole_record(self.js, self.route.stream, seq, fragment)]

    def _wants_more(self) -> bool:
        """Fetch while the backlog is smaller than the room the clients have."""
        room = sum(max(s.room(), 0) for s in self.sessions)
        return room > len(self.backlog)

    def _take(self, msg: Msg, decoded: list[Record]) -> None:
        meta = msg.metadata
        seq, delivered = meta.sequence.stream, meta.num_delivered
        if seq in self.held:
            return  # a redelivery of a message this hub still holds (ack_wait ran out)
        batch = Batch(msg, seq, delivered)
        skip = self.done.pop(seq, set())
        batch.acked = skip  # still settled if this delivery is requeued again
        items: list[Item] = []
        times, sessions = self._times, self.sessions
        if decoded and decoded[-1].lsn > self.taken_lsn:
            self.taken_lsn = decoded[-1].lsn
            self._taken.set()
        watches = self._watches
        last_lsn, lsn_part = -1, b""
        for record in decoded:
            lsn, rseq, message = record.lsn, record.seq, record.message
            kind = message[0] if message else 0
            if kind in (BEGIN, COMMIT):
                if lsn not in times:
                    times[lsn] = commit_time(message)
                continue
            if rseq in skip or lsn < self.start_lsn:
                continue
            head = read_head(message)
            if sessions and not any(s.wants(head.kind, head.tables) for s in sessions):
                continue  # a table no attached client asked for (none attached: keep it)
            if lsn != last_lsn:
                last_lsn, lsn_part = lsn, lsn_field(lsn)
            item = Item(
                lsn,
                rseq,
                head.kind,
                capture_message(lsn_part, rseq, message, head),
                head.tables,
                batch,
                message,
                commit_time=times.get(lsn, 0.0),
            )
            if self.ordered and head.kind == CHANGE:
                item.keys = change_keys(message, head.body)
            if watches:
                self._watched(item, head.body, watches)
            items.append(item)
        if len(times) > 4096:
            for lsn in sorted(times)[:2048]:
                del times[lsn]
        self._skipped.inc(len(decoded) - len(items))
        batch.pending = len(items)
        if decoded:
            batch.commit_time = times.get(decoded[0].lsn, 0.0)
        self.held[seq] = batch
        if not items:
            self._settle_batch(batch)
            return
        self.backlog.extend(items)

    def _watched(self, item: Item, body: int, watches: dict[tuple[str, str], list[Watch]]) -> None:
        """Tell the watches of the item's tables (chunks being dumped) about it."""
        for table in item.tables:
            for watch in watches.get(table, ()):
                if item.kind != CHANGE:
                    watch.see_truncate(item.lsn)
                    continue
                if not item.keys:
                    item.keys = change_keys(item.message, body)
                watch.see_change(item.lsn, item.keys, item.message[body:])

    # -- dumps (gateway/injection.py) ---------------------------------------------------

    def watch(self, table: tuple[str, str]) -> Watch:
        watch = Watch(table)
        self._watches.setdefault(table, []).append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.table, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._watches.pop(watch.table, None)

    async def reach(self, lsn: int, within: float) -> bool:
        """Wait until every stream message up to commit ``lsn`` is taken; False on timeout.
        A consumer with nothing pending has passed everything its stream holds."""
        deadline = time.monotonic() + within
        while self.taken_lsn < lsn:
            left = deadline - time.monotonic()
            if left <= 0 or self.state == "failed":
                return False
            if self.state == "running":  # holding the URI's consumer (and lease, if ordered)
                await self._caught_up()
            if self.taken_lsn >= lsn:
                break
            self._taken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._taken.wait(), min(left, 0.5))
        return True

    async def _caught_up(self) -> None:
        """When JetStream has nothing left to deliver to this URI, everything up to the
        stream's last record is passed (the tail is read first: nothing can slip between).
        On an ordered URI, also nothing delivered may be unacknowledged outside this hub: the
        messages a killed predecessor was delivered count as acknowledgement-pending, not
        pending, until their ack_wait runs out and they come again, so older changes are still
        to come and dump rows must wait for them. (On an unordered URI other gateways serve
        the same URI, and changes of one key may reach its clients in any order anyway.)"""
        stream = self.route.stream
        with contextlib.suppress(Exception):
            tail = await read_tail(self.js, stream)
            held = len(self.held)
            info = await self.js.consumer_info(stream, self.settings.consumer_name)
            if (
                not info.num_pending
                and (not self.ordered or (info.num_ack_pending or 0) <= held)
                and tail.checkpoint is not None
                and tail.checkpoint.lsn > self.taken_lsn
            ):
                self.taken_lsn = tail.checkpoint.lsn

    def inject(self, items: list[Item]) -> None:
        """Dump rows join the backlog behind everything taken so far."""
        self.backlog.extend(items)
        self._dispatch()

    def drop_chunk(self, chunk: DumpChunk, reason: str) -> None:
        """The chunk is requeued: its rows not sent yet are withdrawn, its locks released."""
        if chunk.finished:
            return
        chunk.finish(reason)
        mine = [item for item in self.backlog if item.batch is chunk]
        if mine:
            self.backlog = deque(item for item in self.backlog if item.batch is not chunk)
        outbox = chunk.session.outbox
        queued = [item for item in outbox if item.batch is chunk]
        if queued:
            chunk.session.outbox = deque(item for item in outbox if item.batch is not chunk)
        for item in (*mine, *queued):
            self._unlock(item)
        self._dispatch()

    # -- handing items to clients -------------------------------------------------------

    def _dispatch(self) -> None:
        """Give waiting items to clients with room, in order. An ordered URI never sends a
        change while an earlier change of one of its row keys is unsettled, a truncate while
        an earlier change of its tables is, nor a change after an unsettled truncate."""
        now = time.monotonic()
        retry = self.retry
        while retry and retry[0].due <= now and self._send(retry[0]):
            heapq.heappop(retry)
        if self.backlog and self.sessions:
            self._hand_out()
        self._count_in_flight()
        if self._wants_more():
            self._more.set()

    def _hand_out(self) -> None:
        if not self.ordered:
            self._hand_out_unordered()
            return
        blocked: set[Key] = set()  # keys of items kept back in this pass
        held: set[tuple[str, str]] = set()  # tables with an item kept back in this pass
        truncates: set[tuple[str, str]] = set()  # tables with a truncate kept back
        kept: list[Item] = []
        backlog = self.backlog
        while backlog:
            item = backlog.popleft()
            if self._must_wait(item, blocked, held, truncates) or not self._send(item):
                if not any(s.takes(item) for s in self.sessions):
                    self._settle(item)  # nobody attached wants it any more
                    continue
                kept.append(item)
                blocked.update(item.keys)
                held.update(item.tables)
                if item.kind != CHANGE:
                    truncates.update(item.tables)
                if not any(s.room() > 0 for s in self.sessions):
                    break
        backlog.extendleft(reversed(kept))

    def _hand_out_unordered(self) -> None:
        """Runs of the backlog to the client with the most room; an item it does not want
        goes to another client with room, or waits for one."""
        backlog = self.backlog
        sessions = [s for s in self.sessions if s.error is None]
        kept: list[Item] = []
        sent = 0
        while backlog and sessions:
            best = max(sessions, key=Session.room)
            room = best.room()
            if room <= 0:
                break
            outbox, takes = best.outbox, best.takes
            n = 0
            while backlog and n < room:
                item = backlog.popleft()
                if takes(item):
                    outbox.append(item)
                    item.attempts += 1
                    n += 1
                elif self._send(item):
                    sent += 1
                elif any(s.takes(item) for s in sessions):
                    kept.append(item)
                else:
                    self._settle(item)  # nobody attached wants it any more
            if n:
                best.wake.set()
                sent += n
        backlog.extendleft(reversed(kept))
        self._delivered.inc(sent)

    def _must_wait(
        self,
        item: Item,
        blocked: set[Key],
        held: set[tuple[str, str]],
        truncates: set[tuple[str, str]],
    ) -> bool:
        if item.kind != CHANGE:
            return any(t in held or self._table_items[t] for t in item.tables)
        table = item.tables[0]
        if table in truncates or self._truncating[table]:
            return True
        return any(k in blocked or self.owners.get(k, item) is not item for k in item.keys)

    def _send(self, item: Item) -> bool:
        best: Session | None = None
        best_room = 0
        for session in self.sessions:
            room = session.room()
            if room > best_room and session.error is None and session.takes(item):
                best, best_room = session, room
        if best is None:
            return False
        if self.ordered and not item.locked:
            item.locked = True
            for key in item.keys:
                self.owners[key] = item
            for table in item.tables:
                self._table_items[table] += 1
                if item.kind != CHANGE:
                    self._truncating[table] += 1
        item.attempts += 1
        best.outbox.append(item)
        best.wake.set()
        if self.ordered:
            self._delivered.inc()
        return True

    def register(self, session: Session, items: list[Item]) -> int:
        """The delivery ids of ``items`` sent on ``session`` (the first one is returned)."""
        first = session.next_id
        if session.batched:
            for i, item in enumerate(items):
                session.unacked[first + i] = item
            session.next_id += len(items)
        else:
            for item in items:
                if item.lsn:
                    session.unacked[(item.lsn, item.seq)] = item
                    continue
                # Dump rows share their checkpoint (lsn 0, the dump id): they are
                # acknowledged in the order they were sent.
                key = (0, item.seq, session.next_id)
                session.next_id += 1
                session.unacked[key] = item
                session.dump_acks.setdefault(item.seq, deque()).append(key)
        return first

    # -- acknowledgements ---------------------------------------------------------------

    def settle(self, items: list[Item], reason: str) -> None:
        """A client acknowledged ``items`` (``reason`` empty) or requeued them."""
        if reason:
            self._requeued.inc(len(items))
            for item in items:
                self._requeue(item, reason)
        else:
            self._acked.inc(len(items))
            for item in items:
                self._settle(item)
            newest = max(item.commit_time for item in items)
            if newest > self.last_acked_commit:
                self.last_acked_commit = newest
        self._dispatch()

    def _requeue(self, item: Item, reason: str) -> None:
        if isinstance(item.batch, DumpChunk):  # the controller requeues the whole chunk
            self._unlock(item)
            self.drop_chunk(item.batch, reason)
            return
        s = self.settings
        item.reason = reason
        attempts = (
            item.attempts + item.batch.delivered - 1 if self.ordered else item.batch.delivered
        )
        if attempts >= s.max_deliveries:
            self._later(self._dead_letter(item, attempts))
            return
        if self.ordered:
            delay = self._delay(attempts)
            item.due = time.monotonic() + delay
            heapq.heappush(self.retry, item)
            asyncio.get_running_loop().call_later(delay, self._dispatch)
            return
        item.batch.requeued.append(item)
        self._release(item.batch)

    def _delay(self, attempts: int) -> float:
        """The requeue delay after delivery number ``attempts``: doubled per delivery."""
        s = self.settings
        delay: float = s.requeue_delay * 2.0 ** max(attempts - 1, 0)
        return min(delay, s.requeue_max_delay)

    def _settle(self, item: Item) -> None:
        self._unlock(item)
        batch = item.batch
        if isinstance(batch, DumpChunk):
            batch.settled()
            return
        batch.acked.add(item.seq)
        self._release(batch)

    def _release(self, batch: Batch) -> None:
        """One more item of ``batch`` is settled or requeued; when none is left, the message
        is acknowledged, or naked with the delay if some of it was requeued (unordered)."""
        batch.pending -= 1
        if batch.pending:
            return
        if not batch.requeued:
            self._settle_batch(batch)
            return
        requeued = {i.seq for i in batch.requeued}
        self.done[batch.seq] = batch.acked - requeued
        batch.settled = True
        self.held.pop(batch.seq, None)
        self._later(_quietly(batch.msg.nak(delay=self._delay(batch.delivered))))
        while len(self.done) > 10_000:  # redelivered to another gateway: never seen again
            del self.done[next(iter(self.done))]

    def _unlock(self, item: Item) -> None:
        if not item.locked:
            return
        item.locked = False
        for key in item.keys:
            if self.owners.get(key) is item:
                del self.owners[key]
        for table in item.tables:
            self._table_items[table] -= 1
            if item.kind != CHANGE:
                self._truncating[table] -= 1

    def _settle_batch(self, batch: Batch) -> None:
        """Acknowledge a settled message; an ordered URI only in stream order."""
        batch.settled = True
        if not self.ordered:
            self.held.pop(batch.seq, None)
            self._later(_quietly(batch.msg.ack()))
            return
        for seq in list(self.held):
            first = self.held[seq]
            if not first.settled:
                break
            del self.held[seq]
            self._later(_quietly(first.msg.ack()))

    async def _dead_letter(self, item: Item, attempts: int) -> None:
        s = self.settings
        batch = item.batch
        assert isinstance(batch, Batch)  # a dump row is requeued with its chunk, never here
        try:
            await self._ensure_dead_letter_stream()
            headers = {
                "Nats-Msg-Id": f"{self.route.uri}:{item.checkpoint.key()}",
                "Pgcapture-Uri": self.route.uri,
                "Pgcapture-Checkpoint": item.checkpoint.key(),
                "Pgcapture-Stream": self.route.stream,
                "Pgcapture-Stream-Seq": str(batch.seq),
                "Pgcapture-Deliveries": str(attempts),
                "Pgcapture-Reason": " ".join(item.reason.split())[:1024],
            }
            payload = encode_record(item.lsn, item.seq, item.message)
            await self.js.publish(s.dead_letter_subject, payload, headers=headers)
        except Exception as exc:
            # Not settled: the item goes back to the backlog and is tried again later.
            log.error(
                "uri %s: cannot move %s to dead-letter stream %s: %r; it stays pending",
                self.route.uri,
                item.checkpoint,
                s.dead_letter_name,
                exc,
            )
            await asyncio.sleep(s.requeue_delay)
            self._unlock(item)
            self.backlog.appendleft(item)
            self._dispatch()
            return
        self._dead.inc()
        log.warning(
            "uri %s: change %s of %s delivered %d times, last requeued with %r; moved to "
            "dead-letter stream %s",
            self.route.uri,
            item.checkpoint,
            ".".join(item.tables[0]) if item.tables else "?",
            attempts,
            item.reason,
            s.dead_letter_name,
        )
        self._settle(item)
        self._dispatch()

    async def _ensure_dead_letter_stream(self) -> None:
        if self._dead_letter_ready:
            return
        s = self.settings
        try:
            await self.js.stream_info(s.dead_letter_name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(
                api.StreamConfig(
                    name=s.dead_letter_name,
                    subjects=[s.dead_letter_subject],
                    description=f"pgcapture: changes URI {self.route.uri} gave up on",
                    storage=api.StorageType.FILE,
                )
            )
        self._dead_letter_ready = True

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- upkeep -------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Tell JetStream that held messages are still being worked on, and measure the lag."""
        period = max(self.settings.ack_wait / 3, 0.2)
        while True:
            await asyncio.sleep(min(period, 5.0))
            for batch in list(self.held.values()):
                if not batch.settled:
                    await _quietly(batch.msg.in_progress())
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(self.route.stream, self.settings.consumer_name)
                self._lag_messages.set(info.num_pending or 0)
                self._lag_seconds.set(self._lag(info.num_pending))
            self._dispatch()

    def _lag(self, pending: int | None) -> float:
        """Seconds since the commit of the oldest change not acknowledged yet: 0 when every
        change taken is settled and JetStream has nothing more for the URI; while only
        messages not taken yet wait, the time since the newest acknowledged commit."""
        waiting = [b.commit_time for b in self.held.values() if not b.settled and b.commit_time]
        if waiting:
            oldest = min(waiting)
        elif pending and self.last_acked_commit:
            oldest = self.last_acked_commit
        else:
            return 0.0
        return max(0.0, time.time() - oldest)

    def _in_flight_count(self) -> int:
        return sum(len(s.unacked) + len(s.outbox) for s in self.sessions)

    def _count_in_flight(self) -> None:
        self._in_flight.set(self._in_flight_count())

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "ordered": self.ordered,
            "clients": len(self.sessions),
            "in_flight": self._in_flight_count(),
            "backlog": len(self.backlog),
            "requeued": len(self.retry),
            "held_messages": len(self.held),
        }


def _order(item: Item) -> tuple[int, int]:
    """Backlog order: stream order; a dump row right after the position it was read at."""
    if item.lsn:
        return item.lsn, item.seq
    return item.batch.lsn if isinstance(item.batch, DumpChunk) else 0, DUMP_ORDER


def _unavailable(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAVAILABLE, message)


def _as_status(exc: Exception) -> GatewayError:
    """What a client of a hub that failed with ``exc`` is told: a stream that lost changes,
    or a setting the server refuses, needs someone (FAILED_PRECONDITION); anything else, a
    stream not created yet included, may pass (UNAVAILABLE: retry)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StreamGap | ConfigError | nats.js.errors.BadRequestError):
        return GatewayError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    return _unavailable(str(exc) or repr(exc))


async def _quietly(awaitable: Any) -> None:
    """Acknowledgements are best effort: a lost one means a redelivery, never a loss."""
    with contextlib.suppress(Exception):
        await awaitable
