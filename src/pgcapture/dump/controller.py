"""``pgcapture controller``: the dump scheduler, gRPC service ``pgcapture.DBLogController``.

Wire-compatible with the Go project's controller, with persistence and several instances:

* ``PullDumpInfo``: the first request registers a client of a configured URI (``key_chunks``:
  it can dump key chunks). Whenever a running dump of the URI has a chunk ready, the client gets
  ONE chunk; its next request acknowledges it: an empty ``requeue_reason`` marks it done (with
  ``rows``), a reason returns it to pending, not handed out again before
  ``min(2 s · 2^(attempts−1), max_backoff)``. A stream that ends with a chunk in flight returns
  it at once. A client gets the next chunk of a dump no sooner than the dump's cool-down after
  its previous acknowledgement. Dumps go by creation, chunks in order.
* ``Schedule`` / ``StopSchedule`` / ``SetScheduleCoolDown``: the Go semantics (one schedule
  running per URI; ALREADY_EXISTS while one runs or is paused).
* ``ScheduleDump`` / ``ListDumps`` / ``PauseDump`` / ``ResumeDump`` / ``StopDump``: dumps by
  table name, planned on the URI's logical replica (``plan.py``), and their progress.

Everything lives in a JetStream key-value bucket (``store.py``). Handing out a chunk is a
compare-and-set claim naming this controller's ``instance`` and the client, valid until
``now + claim_ttl`` and renewed every ``claim_ttl / 3``; an expired claim may be taken by any
controller, and a restarted instance takes its own previous claims back at once. So controllers
sharing a bucket never hand out one chunk twice while it is claimed, and a restart resumes every
dump where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry, Counter, Gauge

from pgcapture.config import Config, ControllerConfig
from pgcapture.dump.plan import DumpRefused, plan_dump
from pgcapture.dump.store import (
    UNREACHABLE,
    Chunk,
    ChunkRecord,
    Dump,
    DumpRecord,
    DumpStore,
    UriRecord,
    new_dump_id,
)
from pgcapture.errors import ConfigError
from pgcapture.log.client import connect_nats
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.controller")

SERVICE: Final = "pgcapture.DBLogController"
REQUEUE_BACKOFF: Final = 2.0  # seconds before a requeued chunk's second attempt, doubling (Go)
POLL: Final = 0.1  # an idle client looks for a ready chunk at least this often
FIRST_REQUEST_TIMEOUT: Final = 30.0
STOP_GRACE: Final = 2.0  # seconds for chunks in flight to be acknowledged when stopping
_RETRIES: Final = 5  # compare-and-set attempts before giving up on a busy record
_Code = grpc.StatusCode


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
        for _ in range(_RETRIES):
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

_STEPS: Final = {  # action -> {state it applies to: new state (None: already there)}
    "paused": {"running": "paused", "paused": None},
    "resumed": {"paused": "running", "running": None},
    "stopped": {"running": "stopped", "paused": "stopped", "stopped": None},
}


class ControllerService:
    """The methods of ``pgcapture.DBLogController`` over a scheduler and its store."""

    def __init__(self, config: Config, scheduler: Scheduler) -> None:
        self.config = config
        self.settings = config.controller
        self.scheduler = scheduler
        self.store = scheduler.store

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[Callable[[Any], Awaitable[Any]], type[Any]]] = {
            "Schedule": (self.schedule, pb.ScheduleRequest),
            "StopSchedule": (self.stop_schedule, pb.StopScheduleRequest),
            "SetScheduleCoolDown": (self.set_schedule_cool_down, pb.SetScheduleCoolDownRequest),
            "ScheduleDump": (self.schedule_dump, pb.ScheduleDumpRequest),
            "ListDumps": (self.list_dumps, pb.ListDumpsRequest),
            "PauseDump": (functools.partial(self.change_dump, "paused"), pb.DumpRef),
            "ResumeDump": (functools.partial(self.change_dump, "resumed"), pb.DumpRef),
            "StopDump": (functools.partial(self.change_dump, "stopped"), pb.DumpRef),
        }
        methods = {name: _unary(call, kind) for name, (call, kind) in unary.items()}
        methods["PullDumpInfo"] = grpc.stream_stream_rpc_method_handler(
            self.pull_dump_info,
            request_deserializer=pb.DumpInfoRequest.FromString,
            response_serializer=pb.DumpInfoResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _uri(self, uri: str) -> str:
        if not uri:
            raise DumpRefused(_Code.INVALID_ARGUMENT, "the uri is empty; name a consumer URI")
        if uri not in self.config.gateway.uris:
            known = ", ".join(sorted(self.config.gateway.uris)) or "none"
            raise DumpRefused(
                _Code.NOT_FOUND,
                f"unknown URI {uri!r} (configured: {known}); add a [gateway.uris.{uri}] "
                "section to the controller's configuration, or check the URI",
            )
        return uri

    # -- PullDumpInfo ---------------------------------------------------------------------

    async def pull_dump_info(
        self, requests: AsyncIterator[pb.DumpInfoRequest], context: Any
    ) -> None:
        client: Client | None = None
        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(FIRST_REQUEST_TIMEOUT):
                first = await anext(aiter(requests), None)
            if first is None:
                return
            uri = self._uri(first.uri)
            client = self.scheduler.attach(uri, first.key_chunks, context.peer())
            reader = asyncio.create_task(self._read(requests, client))
            await self._serve(context, client)
        except DumpRefused as exc:
            await context.abort(exc.code, exc.message)
        except TimeoutError:
            await context.abort(
                _Code.INVALID_ARGUMENT,
                f"no DumpInfoRequest with the uri within {FIRST_REQUEST_TIMEOUT:.0f}s of opening "
                "the stream; send it first",
            )
        finally:
            if reader is not None:
                reader.cancel()
            if client is not None:
                self.scheduler.detach(client)

    async def _serve(self, context: Any, client: Client) -> None:
        while (chunk := await self.scheduler.next_chunk(client)) is not None:
            await context.write(chunk.record.info())
            request = await client.acks.get()
            if request is None:
                return
            await self.scheduler.acknowledge(client, request)
        if self.scheduler.closing:
            raise DumpRefused(_Code.UNAVAILABLE, "the controller is stopping; reconnect")

    async def _read(self, requests: AsyncIterator[pb.DumpInfoRequest], client: Client) -> None:
        try:
            async for request in requests:
                client.acks.put_nowait(request)
        except Exception as exc:  # the stream failed: the same as ended
            log.debug("uri %s: stream of %s failed: %r", client.uri, client.peer, exc)
        finally:
            client.closed = True
            client.acks.put_nowait(None)
            self.store.notify()

    # -- the Go project's schedule methods ------------------------------------------------

    async def schedule(self, request: pb.ScheduleRequest) -> pb.ScheduleResponse:
        uri = self._uri(request.uri)
        if not request.dumps:
            raise DumpRefused(_Code.INVALID_ARGUMENT, "the schedule has no chunks; give dumps")
        for i, chunk in enumerate(request.dumps):
            _check_chunk(i, chunk)
        for dump in self.store.dumps_of(uri):
            if dump.unfinished:
                raise DumpRefused(
                    _Code.ALREADY_EXISTS,
                    f"uri {uri!r} already has dump {dump.record.id} {dump.state}; stop it "
                    "first (`pgcapture dump stop`, or StopSchedule) and schedule again",
                )
        tables = list(dict.fromkeys(f"{c.schema}.{c.table}" for c in request.dumps))
        cool_down = self.store.uri_cool_down(uri)
        cool_down = self.settings.cool_down if cool_down is None else cool_down
        await self._add(uri, tables, list(request.dumps), 0, cool_down)
        return pb.ScheduleResponse()

    async def stop_schedule(self, request: pb.StopScheduleRequest) -> pb.StopScheduleResponse:
        uri = self._uri(request.uri)
        for dump in self.store.dumps_of(uri):
            if dump.unfinished:
                await self._change(dump.record.id, lambda d: _step(d, "stopped"))
        return pb.StopScheduleResponse()

    async def set_schedule_cool_down(
        self, request: pb.SetScheduleCoolDownRequest
    ) -> pb.SetScheduleCoolDownResponse:
        uri = self._uri(request.uri)
        seconds = request.duration.ToNanoseconds() / 1e9
        if seconds < 0:
            raise DumpRefused(
                _Code.INVALID_ARGUMENT, f"cool-down {seconds}s is negative; give 0 or more"
            )
        await self.store.set_uri(uri, UriRecord(cool_down=seconds))
        for dump in self.store.dumps_of(uri):
            if dump.unfinished:
                await self._change(dump.record.id, lambda d: {"cool_down": seconds})
        return pb.SetScheduleCoolDownResponse()

    # -- additions ------------------------------------------------------------------------

    async def schedule_dump(self, request: pb.ScheduleDumpRequest) -> pb.DumpStatus:
        uri = self._uri(request.uri)
        cool_down = self.settings.cool_down
        if request.HasField("cool_down"):
            cool_down = request.cool_down.ToNanoseconds() / 1e9
            if cool_down < 0:
                raise DumpRefused(
                    _Code.INVALID_ARGUMENT, f"cool_down {cool_down}s is negative; give 0 or more"
                )
        source = self.config.sources[self.config.gateway.uris[uri].source]
        pages = request.chunk_pages or self.settings.chunk_pages
        tables, keys = list(request.tables), list(request.keys)
        plan = await plan_dump(source, tables, keys, pages, self.settings.chunk_rows)
        dump = await self._add(uri, plan.tables, plan.chunks, plan.rows_estimate, cool_down)
        return dump.status(time.time())

    async def list_dumps(self, request: pb.ListDumpsRequest) -> pb.ListDumpsResponse:
        """The dump ``id`` (finished or not), or the unfinished dumps of ``uri`` (every URI
        when empty), with the finished ones too when ``include_finished``."""
        now = time.time()
        if request.id:
            return pb.ListDumpsResponse(dumps=[self._dump(request.uri, request.id).status(now)])
        dumps = self.store.dumps_of(self._uri(request.uri) if request.uri else None)
        found = [d.status(now) for d in dumps if request.include_finished or d.unfinished]
        return pb.ListDumpsResponse(dumps=found)

    async def change_dump(self, action: str, request: pb.DumpRef) -> pb.DumpStatus:
        dump = self._dump(request.uri, request.id)
        changed = await self._change(dump.record.id, lambda d: _step(d, action))
        log.info("uri %s: dump %s %s", changed.record.uri, changed.record.id, action)
        return changed.status(time.time())

    def _dump(self, uri: str, dump_id: str) -> Dump:
        dump = self.store.dumps.get(dump_id)
        if dump is None or (uri and dump.record.uri != uri):
            where = f" of uri {uri!r}" if uri else ""
            raise DumpRefused(
                _Code.NOT_FOUND,
                f"no dump {dump_id!r}{where}; list the dumps with `pgcapture dump list`",
            )
        return dump

    async def _add(
        self,
        uri: str,
        tables: list[str],
        chunks: list[pb.DumpInfoResponse],
        estimate: int,
        cool_down: float,
    ) -> Dump:
        now = time.time()
        dump_id = new_dump_id(now)
        record = DumpRecord(
            id=dump_id,
            uri=uri,
            tables=tables,
            chunks=len(chunks),
            rows_estimate=estimate,
            cool_down=cool_down,
            keys_only=all(c.keys for c in chunks),
            created=now,
            updated=now,
        )
        records = [_chunk_record(uri, dump_id, n, c) for n, c in enumerate(chunks)]
        dump = await self.store.add_dump(record, records)
        log.info(
            "uri %s: dump %s scheduled: %d chunks of %s",
            uri,
            dump_id,
            len(chunks),
            ", ".join(tables),
        )
        return dump

    async def _change(self, dump_id: str, change: Callable[[Dump], dict[str, Any] | None]) -> Dump:
        """Compare-and-set ``change`` on the dump record (None: nothing to write)."""
        for _ in range(_RETRIES):
            dump = self.store.dumps[dump_id]
            update = change(dump)
            if update is None:
                return dump
            record = dump.record.model_copy(update={**update, "updated": time.time()})
            if await self.store.swap(dump.key, record, dump.revision):
                return self.store.dumps[dump_id]
        raise DumpRefused(_Code.ABORTED, f"dump {dump_id} keeps changing concurrently; retry")


def _step(dump: Dump, action: str) -> dict[str, Any] | None:
    state = dump.state
    steps = _STEPS[action]
    if state not in steps:
        fix = "it has finished" if state == "done" else "a stopped dump stays stopped"
        raise DumpRefused(
            _Code.FAILED_PRECONDITION,
            f"dump {dump.record.id} of uri {dump.record.uri!r} is {state} and cannot be "
            f"{action}; {fix}: schedule a new dump (`pgcapture dump schedule`) to read the "
            "tables again",
        )
    new = steps[state]
    return None if new is None else {"state": new}


def _check_chunk(index: int, chunk: pb.DumpInfoResponse) -> None:
    problem = ""
    if not chunk.schema or not chunk.table:
        problem = "names no schema or no table"
    elif not chunk.keys and chunk.page_begin > chunk.page_end:
        problem = f"begins at page {chunk.page_begin}, after its end {chunk.page_end}"
    if problem:
        raise DumpRefused(
            _Code.INVALID_ARGUMENT,
            f"dumps[{index}] ({chunk.schema}.{chunk.table}) {problem}; give schema, table and "
            "page_begin <= page_end",
        )


def _chunk_record(uri: str, dump_id: str, n: int, chunk: pb.DumpInfoResponse) -> ChunkRecord:
    return ChunkRecord(
        dump=dump_id,
        uri=uri,
        n=n,
        schema_name=chunk.schema,
        table=chunk.table,
        page_begin=chunk.page_begin,
        page_end=chunk.page_end,
        keys=list(chunk.keys),
    )


def _unary(call: Callable[[Any], Awaitable[Any]], kind: type[Any]) -> grpc.RpcMethodHandler:
    async def handler(request: Any, context: Any) -> Any:
        try:
            return await call(request)
        except DumpRefused as exc:
            await context.abort(exc.code, exc.message)
        except UNREACHABLE as exc:
            await context.abort(
                _Code.UNAVAILABLE, f"the dump bucket in NATS is out of reach ({exc!r}); retry"
            )

    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=kind.FromString,
        response_serializer=lambda message: message.SerializeToString(),
    )


# -- the server -----------------------------------------------------------------------------


def _bind(server: grpc.aio.Server, listen: str) -> str:
    """Bind ``listen`` (``HOST:PORT``, ``:PORT`` for every interface); the bound address."""
    target = "[::]" + listen if listen.startswith(":") else listen
    try:
        port = server.add_insecure_port(target)
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigError(
            f"cannot listen on {listen!r} for the controller (in use, not a local address, or "
            'not HOST:PORT); choose another controller.listen, e.g. "0.0.0.0:10002", or --listen'
        )
    return f"{target.rpartition(':')[0]}:{port}"


async def _connect(config: Config, status: ServiceStatus, stop: asyncio.Event) -> NATS | None:
    """Connect (waiting as long as it takes for a server); None when ``stop`` comes first."""

    def lost() -> None:
        status.set("retrying", ConnectionError("lost the NATS connection; reconnecting"))

    connecting = asyncio.ensure_future(
        connect_nats(
            config.nats, lost, reconnect_forever=True, on_reconnected=lambda: status.set("running")
        )
    )
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
    return None if connecting.cancelled() else connecting.result()


async def serve_controller(
    config: Config,
    stop: asyncio.Event,
    *,
    ready: Callable[[str], None] | None = None,
    instance: str | None = None,
) -> None:
    """Serve ``pgcapture.DBLogController`` on ``[controller] listen`` until ``stop``.

    ``instance`` names this controller in its claims (default ``<hostname>:<port>``); keep it
    stable across restarts of one deployment and distinct between controllers sharing a
    bucket. ``ready`` is called with the bound address once clients can connect. Metrics and
    health on ``[metrics] listen`` when set.
    """
    if not config.gateway.uris:
        log.warning("no [gateway.uris] configured: every request will fail with NOT_FOUND")
    metrics = ControllerMetrics()
    status = ServiceStatus()
    ops = OpsServer(metrics.registry, status.health)
    async with contextlib.AsyncExitStack() as stack:
        if config.metrics.listen:
            await ops.start(config.metrics.listen)
            stack.push_async_callback(ops.close)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        stack.push_async_callback(server.stop, None)
        address = _bind(server, config.controller.listen)
        instance = instance or f"{socket.gethostname()}:{address.rpartition(':')[2]}"
        nc = await _connect(config, status, stop)
        if nc is None:
            return
        stack.push_async_callback(nc.close)
        scheduler = await _open(stack, nc, instance, config.controller, metrics)
        await _start(server, ControllerService(config, scheduler), stack, scheduler)
        status.set("running")
        log.info(
            "controller %s serving %s on %s (bucket %s)",
            instance,
            SERVICE,
            address,
            config.controller.bucket,
        )
        if ready is not None:
            ready(address)
        await stop.wait()
        status.set("stopped")
        scheduler.closing = True  # no more chunks; those in flight may still be acknowledged


async def _open(
    stack: contextlib.AsyncExitStack,
    nc: NATS,
    instance: str,
    settings: ControllerConfig,
    metrics: ControllerMetrics,
) -> Scheduler:
    store = DumpStore(nc.jetstream(), settings.bucket)
    await store.open()
    stack.push_async_callback(store.close)
    scheduler = Scheduler(store, instance, settings, metrics)
    await scheduler.start()
    stack.push_async_callback(scheduler.close)
    return scheduler


async def _start(
    server: grpc.aio.Server,
    service: ControllerService,
    stack: contextlib.AsyncExitStack,
    scheduler: Scheduler,
) -> None:
    server.add_generic_rpc_handlers((service.rpc_handler(),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()

    async def stop() -> None:
        scheduler.closing = True
        scheduler.store.notify()
        await checks.enter_graceful_shutdown()
        await server.stop(STOP_GRACE)

    stack.push_async_callback(stop)
