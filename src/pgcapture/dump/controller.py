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
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS

from pgcapture.config import Config, ControllerConfig
from pgcapture.dump.plan import DumpRefused, plan_dump
from pgcapture.dump.scheduler import RETRIES, Client, ControllerMetrics, Scheduler
from pgcapture.dump.store import (
    UNREACHABLE,
    ChunkRecord,
    Dump,
    DumpRecord,
    DumpStore,
    UriRecord,
    new_dump_id,
)
from pgcapture.log.client import connect_until_stopped
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.ops.serving import bind
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.controller")

SERVICE: Final = "pgcapture.DBLogController"
FIRST_REQUEST_TIMEOUT: Final = 30.0
STOP_GRACE: Final = 2.0  # seconds for chunks in flight to be acknowledged when stopping
_Code = grpc.StatusCode


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
                f"no dump {dump_id!r}{where}; list the dumps with `pgcapture dump status --all`",
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
        for _ in range(RETRIES):
            dump = self.store.dumps[dump_id]
            update = change(dump)
            if update is None:
                return dump
            record = dump.record.model_copy(update={**update, "updated": time.time()})
            if await self.store.swap(dump.key, record, dump.revision):
                return self.store.dumps[dump_id]
        raise DumpRefused(_Code.ABORTED, f"dump {dump_id} keeps changing concurrently; retry")


_STEPS: Final = {  # action -> {state it applies to: new state (None: already there)}
    "paused": {"running": "paused", "paused": None},
    "resumed": {"paused": "running", "running": None},
    "stopped": {"running": "stopped", "paused": "stopped", "stopped": None},
}


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
        address = bind(server, config.controller.listen, "controller.listen", "0.0.0.0:10002")
        instance = instance or f"{socket.gethostname()}:{address.rpartition(':')[2]}"
        nc = await connect_until_stopped(
            config.nats,
            stop,
            lambda: status.set(
                "retrying", ConnectionError("lost the NATS connection; reconnecting")
            ),
            lambda: status.set("running"),
        )
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
    store = DumpStore(nc.jetstream(), settings.bucket, settings.replicas)
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
