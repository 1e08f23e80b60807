"""``pgcapture dumper`` as a service: the Go project's ``pgcapture.Agent`` gRPC service, serving
dump chunks read on a source's logical replica (``dumper.py``).

* ``StreamDumpBatched`` (an addition): ``AgentDumpRequest`` -> a stream of ``DumpRows``, each
  with the replica position the chunk was read at (``lsn``) and up to ``[dumper] batch_rows``
  serialized changes. The first message goes out even for an empty chunk, so the caller always
  learns the position.
* ``StreamDump`` (the Go project's): the same rows, one ``Change`` per message.
* ``Configure`` and ``Dump`` answer UNIMPLEMENTED: the agent's remote configuration has no
  counterpart here, and a whole chunk in one message does not scale.

Responses are written as bytes already encoded (``copyrows``), never rebuilt as protobuf
objects. Refusals carry status codes a caller can act on: UNAVAILABLE (retry later) when the
replica is behind the consumer, has no position for the source, or is out of reach; NOT_FOUND
for a table the replica does not have (the gateway treats that chunk as empty, as the Go
project does); INVALID_ARGUMENT for a request that names no chunk; INTERNAL otherwise. Every
request reads on a connection of its own, so requests run concurrently.

Beside it: the standard health service (``grpc.health.v1.Health``), server reflection, and
with ``[metrics] listen`` the ``/metrics`` and ``/healthz`` endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Histogram

from pgcapture.config import Config, SourceConfig
from pgcapture.dump.chunks import describe
from pgcapture.dump.dumper import (
    BadChunk,
    BatchLimits,
    Chunk,
    Dumper,
    DumpError,
    NoPosition,
    ReplicaBehind,
    ReplicaUnavailable,
    TableMissing,
)
from pgcapture.errors import ConfigError, PgCaptureError
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.ops.serving import bind
from pgcapture.proto import pb
from pgcapture.wire import field_varint, varint

log = logging.getLogger("pgcapture.dumper")

SERVICE: Final = pb.DESCRIPTOR.services_by_name["Agent"].full_name
STOP_GRACE: Final = 5.0
_TAG_CHANGES: Final = b"\x12"  # DumpRows.changes = 2, length-delimited
_CODES: Final[dict[type[PgCaptureError], grpc.StatusCode]] = {
    NoPosition: grpc.StatusCode.UNAVAILABLE,
    ReplicaBehind: grpc.StatusCode.UNAVAILABLE,
    ReplicaUnavailable: grpc.StatusCode.UNAVAILABLE,
    TableMissing: grpc.StatusCode.NOT_FOUND,
    BadChunk: grpc.StatusCode.INVALID_ARGUMENT,
}


def encode_rows(lsn: int, changes: list[bytes]) -> bytes:
    """``DumpRows{lsn, changes}`` as protobuf's serialization of it."""
    parts = [field_varint(1, lsn)]
    for change in changes:
        parts += (_TAG_CHANGES, varint(len(change)), change)
    return b"".join(parts)


class DumperMetrics:
    """Chunks, rows and refusals (a registry of its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ns = "pgcapture_dumper"
        self.chunks = Counter(f"{ns}_chunks", "Chunks read to the end", ["method"], registry=r)
        self.rows = Counter(f"{ns}_rows", "Rows sent", ["method"], registry=r)
        self.refusals = Counter(
            f"{ns}_refusals", "Requests refused or failed, by reason", ["reason"], registry=r
        )
        self.seconds = Histogram(
            f"{ns}_chunk_seconds", "Time to read and send a chunk", ["method"], registry=r
        )


class AgentService:
    """The ``pgcapture.Agent`` methods over one ``Dumper``."""

    def __init__(self, dumper: Dumper, metrics: DumperMetrics) -> None:
        self._dumper = dumper
        self._metrics = metrics
        self.last_error = ""

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        def stream(batched: bool) -> grpc.RpcMethodHandler:
            async def behaviour(request: pb.AgentDumpRequest, context: Any) -> None:
                await self._serve(request, context, batched)

            return grpc.unary_stream_rpc_method_handler(
                behaviour, request_deserializer=pb.AgentDumpRequest.FromString
            )  # no response serializer: responses are written as encoded bytes

        def unimplemented(deserializer: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                _unimplemented, request_deserializer=deserializer
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamDumpBatched": stream(True),
                "StreamDump": stream(False),
                "Configure": unimplemented(pb.AgentConfigRequest.FromString),
                "Dump": unimplemented(pb.AgentDumpRequest.FromString),
            },
        )

    async def _serve(self, request: pb.AgentDumpRequest, context: Any, batched: bool) -> None:
        method = "StreamDumpBatched" if batched else "StreamDump"
        started = time.monotonic()
        try:
            async with self._dumper.read(request) as chunk:
                await (_send_batched(chunk, context) if batched else _send_each(chunk, context))
        except PgCaptureError as exc:  # DumpError, or ProtocolError from unreadable COPY data
            await self._refuse(request, context, exc)
            return
        self.last_error = ""
        m = self._metrics
        m.chunks.labels(method).inc()
        m.rows.labels(method).inc(chunk.rows)
        m.seconds.labels(method).observe(time.monotonic() - started)
        log.debug(
            "%s: %s, %d rows at %s", method, describe(request.info), chunk.rows, chunk.lsn,
            extra={"rows": chunk.rows, "lsn": str(chunk.lsn)},
        )  # fmt: skip

    async def _refuse(
        self, request: pb.AgentDumpRequest, context: Any, exc: PgCaptureError
    ) -> None:
        code = _CODES.get(type(exc), grpc.StatusCode.INTERNAL)
        self._metrics.refusals.labels(getattr(exc, "reason", DumpError.reason)).inc()
        if isinstance(exc, ReplicaUnavailable) or code == grpc.StatusCode.INTERNAL:
            self.last_error = str(exc)
            log.warning("%s: %s", describe(request.info), exc)
        else:
            log.info("%s refused: %s", describe(request.info), exc)
        await context.abort(code, str(exc))


async def _send_batched(chunk: Chunk, context: Any) -> None:
    sent = False
    async for batch in chunk.batches():
        await context.write(encode_rows(chunk.lsn, batch))
        sent = True
    if not sent:
        await context.write(encode_rows(chunk.lsn, []))


async def _send_each(chunk: Chunk, context: Any) -> None:
    async for batch in chunk.batches():
        for change in batch:
            await context.write(change)


async def _unimplemented(request: Any, context: Any) -> None:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "this agent only serves dumps: call pgcapture.Agent/StreamDumpBatched (or StreamDump)",
    )


def replica_source(config: Config) -> SourceConfig:
    """The source ``[dumper] source`` names (or the only one configured), with a replica DSN."""
    name = config.dumper.source
    if not name:
        if len(config.sources) != 1:
            known = ", ".join(sorted(config.sources)) or "none"
            raise ConfigError(
                f"dumper.source is not set and the configuration has {len(config.sources)} "
                f"sources ({known}); set [dumper] source = NAME or pass --source NAME"
            )
        name = next(iter(config.sources))
    source = config.source(name, need_dsn=False)
    if not source.replica.dsn:
        raise ConfigError(
            f"invalid configuration: sources.{name}.replica.dsn: required by the dumper but not "
            f'set; add dsn = "..." (the logical replica to read) to [sources.{name}.replica]'
        )
    return source


async def _start_server(
    listen: str, service: AgentService
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, str]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    try:
        server.add_generic_rpc_handlers((service.rpc_handler(),))
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = bind(server, listen, "dumper.listen", "127.0.0.1:10003")
        await server.start()
        for name in ("", SERVICE):
            await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(None)
        raise
    return server, servicer, address


async def _probe(dumper: Dumper) -> None:
    """Log what the replica says at start; a replica out of reach is not fatal (requests get
    UNAVAILABLE until it is back)."""
    try:
        lsn = await dumper.position()
    except DumpError as exc:
        log.warning("dumper: %s", exc)
    else:
        log.info("dumper: the replica has applied source %s up to %s", dumper.source, lsn)


async def serve_dumper(
    config: Config, stop: asyncio.Event, *, ready: Callable[[str], None] | None = None
) -> None:
    """Serve ``pgcapture.Agent`` on ``[dumper] listen`` until ``stop``, reading chunks on the
    replica of ``[dumper] source``; ``ready`` is called with the bound address once callers
    can connect. Metrics and health on ``[metrics] listen`` when set."""
    source = replica_source(config)
    settings = config.dumper
    dumper = Dumper(
        source.replica.dsn, source.name, BatchLimits(settings.batch_rows, settings.batch_bytes)
    )
    metrics = DumperMetrics()
    service = AgentService(dumper, metrics)
    status = ServiceStatus()
    ops = OpsServer(
        metrics.registry,
        lambda: status.health(source=source.name, replica_error=service.last_error or None),
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(dumper.close)
        if config.metrics.listen:
            await ops.start(config.metrics.listen)
            stack.push_async_callback(ops.close)
        server, servicer, address = await _start_server(settings.listen, service)
        stack.push_async_callback(_stop, server, servicer)
        probe = asyncio.ensure_future(_probe(dumper))  # a replica out of reach delays nothing
        stack.push_async_callback(_cancel, probe)
        status.set("running")
        log.info("dumper serving %s on %s for source %s", SERVICE, address, source.name)
        if ready is not None:
            ready(address)
        await stop.wait()
        status.set("stopped")
        log.info("dumper stopping")


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stop(server: grpc.aio.Server, servicer: health.aio.HealthServicer) -> None:
    await servicer.enter_graceful_shutdown()
    await server.stop(STOP_GRACE)
