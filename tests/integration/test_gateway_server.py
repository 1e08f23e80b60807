"""The gateway's gRPC server: TLS, client certificates, tokens, health, reflection, NATS outages.

Most tests run the server of ``build_server`` with a stand-in ``pgcapture.DBLogGateway``
handler that only authorizes the stream, so TLS and tokens are tested without NATS; the
``serve_gateway`` tests run the whole service against a real nats-server that is stopped and
started again underneath it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from log_helpers import http_get, poll

from pgcapture.config import (
    AuthConfig,
    Config,
    GatewayConfig,
    TlsConfig,
    TokenConfig,
    validate_config,
)
from pgcapture.errors import ConfigError
from pgcapture.gateway.errors import GatewayError
from pgcapture.gateway.security import Authorizer, server_credentials
from pgcapture.gateway.server import GATEWAY_SERVICE, GatewayServer, build_server, serve_gateway
from pgcapture.local.nats import LocalNats, free_port
from pgcapture.log.client import connect_nats
from pgcapture.proto import pb, pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKENS = {
    "orders-reader": TokenConfig(token="s3cret-orders", uris=["orders"]),
    "ops": TokenConfig(token="s3cret-ops", uris=["*"]),
}


@dataclass(frozen=True)
class Certs:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    out = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=pgcapture test CA")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (out / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", "1" if name == "server" else "2", "-days", "2",
                "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
    return Certs(out)


def stand_in(authorizer: Authorizer) -> grpc.GenericRpcHandler:
    """``Capture`` that authorizes the stream's URI and answers with the principal's name."""

    async def capture(requests: AsyncIterator[pb.CaptureRequest], context: Any) -> Any:
        init = (await anext(requests)).init
        try:
            principal = authorizer.authorize(context.invocation_metadata(), init.uri)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)
        yield pb.CaptureMessage(change=pb.Change(schema=init.uri, table=principal))

    handler = grpc.stream_stream_rpc_method_handler(
        capture,
        request_deserializer=pb.CaptureRequest.FromString,
        response_serializer=pb.CaptureMessage.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(GATEWAY_SERVICE, {"Capture": handler})


@asynccontextmanager
async def serving(settings: GatewayConfig) -> AsyncIterator[GatewayServer]:
    authorizer = Authorizer.from_config(settings.auth)
    server = await build_server(settings, [stand_in(authorizer)], server_credentials(settings.tls))
    try:
        await server.server.start()
        yield server
    finally:
        await server.stop(grace=1)


def gateway_settings(tls: TlsConfig | None = None) -> GatewayConfig:
    return GatewayConfig(
        listen="127.0.0.1:0",
        tls=tls or TlsConfig(disabled=True),
        auth=AuthConfig(tokens=TOKENS),
    )


def mtls(certs: Certs) -> TlsConfig:
    return TlsConfig(
        cert=certs.path("server.pem"), key=certs.path("server.key"),
        client_ca=certs.path("ca.pem"),
    )  # fmt: skip


async def capture_as(
    channel: grpc.aio.Channel, uri: str, token: str | None = None
) -> pb.CaptureMessage:
    """One Capture stream for ``uri``; the stand-in's single answer."""
    stub = pb_grpc.DBLogGatewayStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    init = pb.CaptureRequest(init=pb.CaptureInit(uri=uri))
    call = stub.Capture(iter([init]), metadata=metadata, timeout=10)
    messages = [message async for message in call]
    assert len(messages) == 1
    return messages[0]


async def status_code(channel: grpc.aio.Channel, uri: str, token: str | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await capture_as(channel, uri, token)
    code: grpc.StatusCode = err.value.code()
    return code


async def test_mutual_tls_with_the_right_ca_reaches_the_service(certs: Certs) -> None:
    async with serving(gateway_settings(mtls(certs))) as server:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.read("ca.pem"),
            private_key=certs.read("client.key"),
            certificate_chain=certs.read("client.pem"),
        )
        for target in (server.address, server.address.replace("127.0.0.1", "localhost")):
            async with grpc.aio.secure_channel(target, credentials) as channel:
                message = await capture_as(channel, "orders", "s3cret-orders")
                assert message.change.table == "orders-reader"


async def test_client_without_a_certificate_is_refused_when_client_ca_is_set(
    certs: Certs,
) -> None:
    async with serving(gateway_settings(mtls(certs))) as server:
        no_client_cert = grpc.ssl_channel_credentials(root_certificates=certs.read("ca.pem"))
        async with grpc.aio.secure_channel(server.address, no_client_cert) as channel:
            assert await status_code(channel, "orders", "s3cret-orders") == (
                grpc.StatusCode.UNAVAILABLE
            )


async def test_client_that_does_not_trust_the_ca_fails_the_handshake(certs: Certs) -> None:
    tls = TlsConfig(cert=certs.path("server.pem"), key=certs.path("server.key"))
    async with serving(gateway_settings(tls)) as server:
        # The client's own certificate is offered as its only trusted root: not the server's CA.
        wrong_root = grpc.ssl_channel_credentials(root_certificates=certs.read("client.pem"))
        async with grpc.aio.secure_channel(server.address, wrong_root) as channel:
            assert await status_code(channel, "orders", "s3cret-orders") == (
                grpc.StatusCode.UNAVAILABLE
            )
        trusted = grpc.ssl_channel_credentials(root_certificates=certs.read("ca.pem"))
        async with grpc.aio.secure_channel(server.address, trusted) as channel:
            message = await capture_as(channel, "orders", "s3cret-ops")
            assert message.change.table == "ops"


async def test_tokens_are_checked_per_stream() -> None:
    async with (
        serving(gateway_settings()) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        assert await status_code(channel, "orders", None) == grpc.StatusCode.UNAUTHENTICATED
        assert await status_code(channel, "orders", "wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert await status_code(channel, "billing", "s3cret-orders") == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert (await capture_as(channel, "billing", "s3cret-ops")).change.table == "ops"


async def test_permission_denied_names_the_token_the_uri_and_the_fix() -> None:
    async with (
        serving(gateway_settings()) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await capture_as(channel, "billing", "s3cret-orders")
        details = err.value.details() or ""
        assert "'orders-reader'" in details
        assert "'billing'" in details
        assert "gateway.auth.tokens.orders-reader.uris" in details
        assert "s3cret" not in details


async def test_health_answers_not_serving_until_told_then_serving() -> None:
    async with (
        serving(gateway_settings()) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def check(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            response = await health.Check(request, timeout=5)
            status: int = response.status
            return status

        assert await check("") == NOT_SERVING
        assert await check(GATEWAY_SERVICE) == NOT_SERVING
        await server.set_serving(True)
        assert await check("") == SERVING
        assert await check(GATEWAY_SERVICE) == SERVING


async def test_reflection_lists_and_describes_the_gateway() -> None:
    async with (
        serving(gateway_settings()) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=GATEWAY_SERVICE),
        ]
        responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert names == {
            "pgcapture.DBLogGateway",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        files = responses[1].file_descriptor_response.file_descriptor_proto
        assert files, "the gateway's proto file is served"
        assert any(b"DBLogGateway" in f and b"CaptureBatched" in f for f in files)


async def test_a_taken_port_is_a_config_error_naming_listen() -> None:
    async with serving(gateway_settings()) as server:
        taken = gateway_settings().model_copy(update={"listen": server.address})
        with pytest.raises(ConfigError, match=r"cannot listen on .*gateway\.listen"):
            await build_server(taken, [], None)


async def test_messages_up_to_max_message_bytes_pass_both_ways() -> None:
    settings = gateway_settings().model_copy(update={"max_message_bytes": 8 << 20})
    options = [("grpc.max_receive_message_length", 16 << 20)]
    async with (
        serving(settings) as server,
        grpc.aio.insecure_channel(server.address, options=options) as channel,
    ):
        big_uri = "u" * (5 << 20)  # above gRPC's 4 MiB default, below the configured limit
        message = await capture_as(channel, big_uri, "s3cret-ops")
        assert message.change.schema == big_uri
        too_big = "u" * (9 << 20)
        assert await status_code(channel, too_big, "s3cret-ops") == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )


# -- the whole service, against a nats-server that goes away and comes back -------------------


@pytest.fixture
def own_nats() -> Iterator[LocalNats]:
    """A nats-server of this test alone, since the test stops and starts it."""
    with LocalNats() as server:
        yield server


def service_config(nats_url: str, metrics_port: int) -> Config:
    return validate_config(
        {
            "nats": {"url": nats_url, "connect_timeout": 1},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "sources": {"app": {}},
            "gateway": {
                "listen": "127.0.0.1:0",
                "tls": {"disabled": True},
                "auth": {"tokens": {"reader": {"token": "s3cret", "uris": ["orders"]}}},
                "uris": {"orders": {"source": "app"}},
            },
        }
    )


async def health_of(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE), timeout=5
    )
    status: int = response.status
    return status


async def started(task: asyncio.Task[None], bound: asyncio.Future[str]) -> str:
    """The bound address, or the error that ended ``serve_gateway`` before it was ready."""
    await asyncio.wait((task, bound), return_when=asyncio.FIRST_COMPLETED)
    if not bound.done():
        task.result()
        raise AssertionError("serve_gateway returned before it was ready")
    return bound.result()


async def test_gateway_follows_nats_outages_and_stops_cleanly(own_nats: LocalNats) -> None:
    metrics_port = free_port()
    config = service_config(own_nats.url, metrics_port)
    stop = asyncio.Event()
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_gateway(config, stop, ready=bound.set_result))
    try:
        async with asyncio.timeout(60):
            address = await started(task, bound)
            async with grpc.aio.insecure_channel(address) as channel:
                assert await health_of(channel) == SERVING
                code, body = await http_get(metrics_port, "/healthz")
                assert code == 200
                assert json.loads(body)["nats"] == "connected"

                own_nats.port = int(own_nats.url.rsplit(":", 1)[1])  # come back on this port
                own_nats.stop()

                async def not_serving() -> bool:
                    return await health_of(channel) == NOT_SERVING

                await poll(not_serving)
                code, body = await http_get(metrics_port, "/healthz")
                assert code == 503
                assert json.loads(body)["nats"] == "disconnected"
                assert await status_code(channel, "orders", "s3cret") == (
                    grpc.StatusCode.UNAVAILABLE
                )

                own_nats.start()

                async def serving_again() -> bool:
                    return await health_of(channel) == SERVING

                await poll(serving_again)
                code, _ = await http_get(metrics_port, "/healthz")
                assert code == 200
                code, body = await http_get(metrics_port, "/metrics")
                assert code == 200
                assert b"pgcapture_gateway_errors_total" in body
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task  # returns without error: the server, NATS and /metrics are closed
    with pytest.raises(ConnectionRefusedError):
        await http_get(metrics_port, "/healthz")


async def test_gateway_waits_for_nats_at_start_and_stops_while_waiting() -> None:
    metrics_port = free_port()
    config = service_config(f"nats://127.0.0.1:{free_port()}", metrics_port)
    stop = asyncio.Event()
    ready: list[str] = []
    task = asyncio.create_task(serve_gateway(config, stop, ready=ready.append))
    try:

        async def answering() -> bool:
            try:
                code, body = await http_get(metrics_port, "/healthz")
            except OSError:
                return False
            assert code == 503
            assert json.loads(body)["state"] == "connecting"
            return True

        await poll(answering)
        assert not task.done()
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task
    assert ready == []


async def test_reconnect_forever_reports_the_loss_and_the_return(own_nats: LocalNats) -> None:
    config = service_config(own_nats.url, free_port())
    events: list[str] = []
    nc = await connect_nats(
        config.nats,
        lambda: events.append("lost"),
        reconnect_forever=True,
        on_reconnected=lambda: events.append("back"),
    )
    try:
        own_nats.port = int(own_nats.url.rsplit(":", 1)[1])
        own_nats.stop()

        async def lost() -> bool:
            return events == ["lost"]

        await poll(lost)
        await asyncio.sleep(2.5)  # longer than several reconnect attempts: it does not give up
        assert not nc.is_closed
        own_nats.start()

        async def back() -> bool:
            return events == ["lost", "back"]

        await poll(back)
        await nc.flush(timeout=5)
    finally:
        await nc.close()
