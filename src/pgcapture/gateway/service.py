"""The gRPC methods of ``pgcapture.DBLogGateway``: ``Capture`` and ``CaptureBatched``.

``Capture`` is the Go project's method, unchanged: the first request is ``init`` (URI and
parameters), then the client acknowledges each ``CaptureMessage`` by echoing its checkpoint,
with a non-empty ``requeue_reason`` to have it redelivered later. ``CaptureBatched`` (an
addition) sends ``CaptureBatch`` messages of many changes with consecutive delivery ids and
takes acknowledgements of id ranges; it also carries truncates. Responses are written as bytes
already encoded by the hub (``records.capture_message``), so no protobuf object is built per
change. Every refusal is a precise status code with a message that names the fix.

Parameters of ``init`` (a ``Struct``): ``TableRegex`` (string: a regular expression searched in
the table name, as in the Go project) and ``MaxUnacked`` (number: a smaller window than the
URI's ``max_unacked``). Unknown parameters are ignored, for compatibility; a known parameter
with a bad value is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from nats.js import JetStreamContext

from pgcapture.config import GatewayConfig
from pgcapture.gateway.dumps import Channels, DumpFeed
from pgcapture.gateway.errors import GatewayError
from pgcapture.gateway.hub import Hub, Item, Session
from pgcapture.gateway.metrics import GatewayMetrics
from pgcapture.gateway.resolver import Resolver, Route
from pgcapture.gateway.security import Authorizer
from pgcapture.proto import pb
from pgcapture.wire import varint

log = logging.getLogger("pgcapture.gateway")

SERVICE: Final = "pgcapture.DBLogGateway"
INIT_TIMEOUT: Final = 30.0
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_STALE = grpc.StatusCode.FAILED_PRECONDITION


class GatewayService:
    """Client streams of every URI this process serves, each attached to its URI's hub."""

    def __init__(
        self,
        js: JetStreamContext,
        resolver: Resolver,
        authorizer: Authorizer,
        settings: GatewayConfig,
        metrics: GatewayMetrics,
        lock_bucket: str = "pgcapture_locks",
    ) -> None:
        self._js = js
        self._resolver = resolver
        self._authorizer = authorizer
        self._settings = settings
        self._metrics = metrics
        self._lock_bucket = lock_bucket
        self._hubs: dict[str, Hub] = {}
        self._available = True
        self._closing: set[asyncio.Task[None]] = set()
        self._channels = Channels()

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        def method(behaviour: Any) -> grpc.RpcMethodHandler:
            return grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=pb.CaptureRequest.FromString
            )  # no response serializer: responses are written as encoded bytes

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Capture": method(functools.partial(self._serve, batched=False)),
                "CaptureBatched": method(functools.partial(self._serve, batched=True)),
            },
        )

    def set_available(self, available: bool) -> None:
        """NATS is reachable (again) or not; while it is not, new streams get UNAVAILABLE."""
        self._available = available

    def health(self) -> dict[str, Any]:
        return {
            "nats": "connected" if self._available else "disconnected",
            "uris": {uri: hub.health() for uri, hub in sorted(self._hubs.items())},
        }

    async def close(self) -> None:
        hubs, self._hubs = list(self._hubs.values()), {}
        await asyncio.gather(*(hub.close() for hub in hubs), return_exceptions=True)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=10.0)
        await self._channels.close()

    # -- streams ------------------------------------------------------------------------

    async def _serve(
        self, requests: AsyncIterator[pb.CaptureRequest], context: Any, batched: bool
    ) -> None:
        uri = ""
        hub: Hub | None = None
        session: Session | None = None
        reader: asyncio.Task[None] | None = None
        feed: asyncio.Task[None] | None = None
        try:
            init = await _first(requests)
            uri = init.uri
            # The token first: a client without one learns nothing, not even which URIs exist.
            principal = self._authorizer.authorize(context.invocation_metadata(), uri)
            route = await self._resolver.resolve(uri)
            regex, window = parameters(init.parameters, route.settings.max_unacked)
            if not self._available:
                raise GatewayError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the gateway has lost its NATS connection and is reconnecting; retry",
                )
            hub = self._hub(route)
            session = hub.attach(f"{principal}@{context.peer()}", regex, batched, window)
            log.info("uri %s: client %s attached", uri, session.name)
            reader = asyncio.create_task(_read_acks(requests, session))
            if self._settings.controller and route.settings.dumper:
                feed = asyncio.create_task(self._feed(hub, session).run(), name=f"dumps {uri}")
            await self._write(context, hub, session)
        except GatewayError as exc:
            self._metrics.errors.labels(uri=uri or "?", code=exc.code.name).inc()
            await context.abort(exc.code, exc.message)
        finally:
            for task in (feed, reader):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if hub is not None and session is not None:
                hub.detach(session)
                log.info("uri %s: client %s detached", uri, session.name)

    async def _write(self, context: Any, hub: Hub, session: Session) -> None:
        s = self._settings
        limit = s.max_batch_records if session.batched else 64
        while True:
            await session.wake.wait()
            if session.error is not None:
                raise session.error
            if session.closed:
                return
            items = session.take(limit, s.max_batch_bytes)
            if not items:
                continue
            first = hub.register(session, items)
            if session.batched:
                await context.write(encode_batch(first, items))
            else:
                for item in items:
                    await context.write(item.payload)

    def _feed(self, hub: Hub, session: Session) -> DumpFeed:
        s = self._settings
        dumper = hub.route.settings.dumper
        return DumpFeed(hub, session, self._channels, s.controller, dumper, s.dump_wait)

    def _hub(self, route: Route) -> Hub:
        hub = self._hubs.get(route.uri)
        if hub is None or hub.state == "failed":
            hub = Hub(self._js, route, self._metrics, self._lock_bucket, self._retire)
            self._hubs[route.uri] = hub
            hub.start()
        return hub

    def _retire(self, hub: Hub) -> None:
        """A hub without clients for a while, or failed: close it."""
        if self._hubs.get(hub.route.uri) is hub and (not hub.sessions or hub.state == "failed"):
            del self._hubs[hub.route.uri]
            task = asyncio.create_task(hub.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


async def _first(requests: AsyncIterator[pb.CaptureRequest]) -> pb.CaptureInit:
    try:
        async with asyncio.timeout(INIT_TIMEOUT):
            request = await anext(requests)
    except StopAsyncIteration:
        raise GatewayError(_INVALID, "the stream ended before its CaptureInit request") from None
    except TimeoutError:
        raise GatewayError(
            _INVALID, f"no CaptureInit request within {INIT_TIMEOUT:.0f}s of opening the stream"
        ) from None
    if request.WhichOneof("type") != "init":
        raise GatewayError(
            _INVALID,
            "the first request should be a CaptureInit message (init with the URI and "
            "parameters), then acknowledgements",
        )
    if not request.init.uri:
        raise GatewayError(_INVALID, "CaptureInit.uri is empty; set the consumer URI")
    return request.init


def parameters(params: Any, max_unacked: int) -> tuple[re.Pattern[str] | None, int]:
    """``TableRegex`` and ``MaxUnacked`` from an init's parameters (a ``Struct``)."""
    fields = params.fields
    regex = None
    if "TableRegex" in fields:
        value = fields["TableRegex"]
        if value.WhichOneof("kind") != "string_value":
            raise GatewayError(
                _INVALID, f"parameter TableRegex must be a string, got {_kind(value)}"
            )
        try:
            regex = re.compile(value.string_value) if value.string_value else None
        except re.error as exc:
            raise GatewayError(
                _INVALID,
                f"parameter TableRegex {value.string_value!r} is not a valid regular "
                f"expression: {exc}",
            ) from None
    window = max_unacked
    if "MaxUnacked" in fields:
        value = fields["MaxUnacked"]
        number = value.number_value if value.WhichOneof("kind") == "number_value" else -1.0
        if number < 1 or number != int(number):
            raise GatewayError(
                _INVALID,
                f"parameter MaxUnacked must be a positive whole number, got {_kind(value)}",
            )
        window = min(int(number), max_unacked)
    return regex, window


def _kind(value: Any) -> str:
    kind = value.WhichOneof("kind")
    shown = getattr(value, kind) if kind in ("string_value", "number_value", "bool_value") else ""
    return f"{kind.removesuffix('_value')} {shown!r}" if shown != "" else str(kind)


async def _read_acks(requests: AsyncIterator[pb.CaptureRequest], session: Session) -> None:
    """Acknowledgements from the client, until it closes its side of the stream."""
    hub = session.hub
    try:
        async for request in requests:
            kind = request.WhichOneof("type")
            if kind == "ack":
                hub.settle(_by_checkpoint(session, request.ack), request.ack.requeue_reason)
            elif kind == "ack_range":
                hub.settle(_by_range(session, request.ack_range), request.ack_range.requeue_reason)
            elif kind == "init":
                raise GatewayError(_INVALID, "CaptureInit sent twice on one stream")
            else:
                raise GatewayError(_INVALID, "an empty CaptureRequest (neither init nor ack)")
    except GatewayError as exc:
        session.fail(exc)
        return
    session.close()


def _by_checkpoint(session: Session, ack: pb.CaptureAck) -> list[Item]:
    if session.batched:
        raise GatewayError(
            _INVALID, "CaptureBatched is acknowledged with ack_range (delivery ids), not ack"
        )
    checkpoint = ack.checkpoint
    if not checkpoint.lsn:  # a dump row: rows of one chunk are acknowledged in order
        sent = session.dump_acks.get(checkpoint.seq)
        item = session.unacked.pop(sent.popleft(), None) if sent else None
        if sent is not None and not sent:
            del session.dump_acks[checkpoint.seq]
    else:
        item = session.unacked.pop((checkpoint.lsn, checkpoint.seq), None)
    if item is None:
        raise GatewayError(
            _STALE,
            f"acknowledgement for checkpoint lsn={checkpoint.lsn} seq={checkpoint.seq}, which "
            "this stream did not deliver or was already acknowledged; acknowledge each "
            "delivered message once, with the checkpoint it came with",
        )
    return [item]


def _by_range(session: Session, ack: pb.CaptureAckRange) -> list[Item]:
    if not session.batched:
        raise GatewayError(
            _INVALID, "ack_range is for CaptureBatched; Capture acknowledges with ack"
        )
    first, last = ack.first_id, ack.last_id
    if not 1 <= first <= last < session.next_id:
        raise GatewayError(
            _INVALID if first == 0 or first > last else _STALE,
            f"ack_range {first}..{last} is not a range of delivery ids sent on this stream "
            f"(sent so far: 1..{session.next_id - 1})",
        )
    unacked = session.unacked
    missing = [i for i in range(first, last + 1) if i not in unacked]
    if missing:
        raise GatewayError(
            _STALE,
            f"ack_range {first}..{last} includes delivery id {missing[0]}, which was already "
            "acknowledged; acknowledge each delivery id once",
        )
    return [unacked.pop(i) for i in range(first, last + 1)]


def encode_batch(first_id: int, items: list[Item]) -> bytes:
    """A serialized ``CaptureBatch`` of already encoded ``CaptureMessage``s."""
    parts = [b"\x08", varint(first_id)]
    for item in items:
        payload = item.payload
        parts += (b"\x12", varint(len(payload)), payload)
    return b"".join(parts)
