"""``pgcapture gateway`` as a service: the gRPC server around ``GatewayService``.

``serve_gateway`` checks the security settings before it connects anything, connects to NATS
with reconnects that never give up, and serves ``pgcapture.DBLogGateway`` beside the standard
health service (``grpc.health.v1.Health``) and server reflection. While NATS is out of reach the
gateway stays up: new streams fail with UNAVAILABLE, the health service answers NOT_SERVING (so
a load balancer sends clients elsewhere) and ``/healthz`` answers 503; everything comes back when
NATS does. ``build_server`` is the gRPC part alone, so it can be run without NATS.

Stopping ends every client stream first (UNAVAILABLE: clients reconnect to another gateway and
resume from their URI's durable position), then the gRPC server, NATS and the HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS

from pgcapture.config import Config, GatewayConfig
from pgcapture.errors import ConnectionLost
from pgcapture.gateway.metrics import GatewayMetrics
from pgcapture.gateway.resolver import ConfigResolver, Resolver
from pgcapture.gateway.security import Authorizer, check_security, server_credentials
from pgcapture.gateway.service import GatewayService
from pgcapture.log.client import connect_until_stopped
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.ops.serving import bind
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.gateway")

GATEWAY_SERVICE: Final = pb.DESCRIPTOR.services_by_name["DBLogGateway"].full_name
STOP_GRACE: Final = 5.0  # seconds for in-flight calls once every stream was told to end
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: GatewayConfig) -> list[tuple[str, Any]]:
    """Channel arguments of the gateway's gRPC server.

    The server pings idle connections so that a dead client (or a NAT that dropped the flow)
    is noticed and its unacknowledged changes are redelivered, and it permits client pings
    every 10 s, so clients may keep long idle streams alive through proxies.
    """
    return [
        ("grpc.max_send_message_length", -1),  # a change is as large as its row
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Two gateways on one port would split clients silently; the second must fail to bind.
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class GatewayServer:
    """A bound (not yet started) gRPC server with its health service."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str  # the bound address: listen with port 0 replaced by the port chosen

    async def set_serving(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", GATEWAY_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def build_server(
    settings: GatewayConfig,
    handlers: Sequence[grpc.GenericRpcHandler],
    credentials: grpc.ServerCredentials | None,
) -> GatewayServer:
    """A gRPC server for ``handlers`` bound to ``settings.listen``, health NOT_SERVING until
    ``set_serving(True)``, with reflection listing the gateway, health and reflection."""
    server = grpc.aio.server(options=server_options(settings))
    try:
        server.add_generic_rpc_handlers(tuple(handlers))
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        names = (GATEWAY_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = bind(server, settings.listen, "gateway.listen", "0.0.0.0:10001", credentials)
        gateway = GatewayServer(server, servicer, address)
        await gateway.set_serving(False)
    except BaseException:
        await server.stop(None)
        raise
    return gateway


class _NatsLink:
    """Follows the NATS connection and tells the service, the health service and ``/healthz``.

    nats-py reports losses and returns through plain callbacks; the health service is async,
    so the callbacks only record the state and one task applies it, in order.
    """

    def __init__(self, status: ServiceStatus) -> None:
        self.status = status
        self.connected = False
        self._changed = asyncio.Event()
        self.service: GatewayService | None = None

    def lost(self) -> None:
        self._flip(False)

    def back(self) -> None:
        self._flip(True)

    def _flip(self, connected: bool) -> None:
        self.connected = connected
        if self.service is not None:
            self.service.set_available(connected)
        if self.status.state != "stopped":
            lost = None if connected else ConnectionLost("lost the NATS connection; reconnecting")
            self.status.set("running" if connected else "retrying", lost)
        self._changed.set()

    async def follow(self, server: GatewayServer) -> None:
        while True:
            await server.set_serving(self.connected)
            await self._changed.wait()
            self._changed.clear()


def _health(
    status: ServiceStatus, link: _NatsLink, service: GatewayService | None
) -> tuple[bool, dict[str, Any]]:
    if service is not None:
        return status.health(**service.health())
    return status.health(nats="connected" if link.connected else "disconnected")


async def serve_gateway(
    config: Config,
    stop: asyncio.Event,
    *,
    resolver: Resolver | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``pgcapture.DBLogGateway`` on ``[gateway] listen`` until ``stop``.

    ``resolver`` defaults to the URIs of ``[gateway.uris]``; ``ready`` is called with the bound
    address once clients can connect. Metrics and health on ``[metrics] listen`` when set.
    """
    settings = config.gateway
    for warning in check_security(settings):
        log.warning(warning)
    credentials = server_credentials(settings.tls)
    authorizer = Authorizer.from_config(settings.auth)
    if resolver is None:
        if not settings.uris:
            log.warning("no [gateway.uris] configured: every stream will fail with NOT_FOUND")
        resolver = ConfigResolver(config)
    metrics = GatewayMetrics()
    status = ServiceStatus()
    link = _NatsLink(status)
    ops = OpsServer(metrics.registry, lambda: _health(status, link, link.service))
    async with contextlib.AsyncExitStack() as stack:
        if config.metrics.listen:
            await ops.start(config.metrics.listen)
            stack.push_async_callback(ops.close)
        nc = await connect_until_stopped(config.nats, stop, link.lost, link.back)
        if nc is None:
            status.set("stopped")
            return
        stack.push_async_callback(_close_nats, nc)
        js = nc.jetstream()
        service = GatewayService(
            js, resolver, authorizer, settings, metrics, lock_bucket=config.nats.lock_bucket
        )
        gateway = await build_server(settings, [service.rpc_handler()], credentials)
        stack.push_async_callback(gateway.stop)
        stack.push_async_callback(service.close)  # runs first: streams end before the server
        link.service = service
        if nc.is_connected:
            link.back()
        else:
            link.lost()
        follower = asyncio.ensure_future(link.follow(gateway))
        stack.push_async_callback(_cancel, follower)
        await gateway.server.start()
        log.info(
            "gateway serving %s on %s (TLS %s, auth %s)", GATEWAY_SERVICE, gateway.address,
            "off" if credentials is None else "on", "off" if authorizer.disabled else "on",
        )  # fmt: skip
        if ready is not None:
            ready(gateway.address)
        await stop.wait()
        status.set("stopped")
        log.info("gateway stopping: ending client streams")
        await gateway.health.enter_graceful_shutdown()  # load balancers look elsewhere first


async def _close_nats(nc: NATS) -> None:
    with contextlib.suppress(Exception):
        await nc.close()


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
