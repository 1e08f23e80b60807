"""Helpers for the gateway tests (imported by plain name, as pytest puts this folder on
``sys.path``): a gateway running in-process, and a client written from the .proto alone that
sends exactly what the Go project's Python client (``PGCaptureClient``) sends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import nats as natslib
from google.protobuf.struct_pb2 import Struct
from log_helpers import capturing, wait_for_slot

from pgcapture.config import Config, validate_config
from pgcapture.gateway.server import serve_gateway
from pgcapture.proto import pb, pb_grpc


def gateway_config(dsn: str, nats_url: str, source: str, **uris: dict[str, Any]) -> Config:
    """One source, URIs over it, a gateway on a free port without TLS or tokens."""
    data = {
        "nats": {"url": nats_url},
        "sources": {
            source: {
                "dsn": dsn, "status_interval": 0.2, "lock": {"ttl": 1, "wait": 10},
                "batch": {"max_records": 50, "max_bytes": 16384, "linger": 0.002},
            }
        },
        "gateway": {
            "listen": "127.0.0.1:0",
            "tls": {"disabled": True},
            "auth": {"disabled": True},
            "uris": {name: {"source": source, **settings} for name, settings in uris.items()},
        },
    }  # fmt: skip
    return validate_config(data)


@contextlib.asynccontextmanager
async def serving(
    serve: Callable[..., Awaitable[None]], config: Config, **kwargs: Any
) -> AsyncIterator[str]:
    """``serve(config, stop, ready=..., **kwargs)`` (the gateway, controller or dumper) in
    this process until the block ends; yields the address it bound."""
    stop = asyncio.Event()
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, ready=bound.set_result, **kwargs))
    try:
        done, _ = await asyncio.wait({task, bound}, timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        yield bound.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def running_gateway(config: Config, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[str]:
    """A gateway serving ``config`` in this process; yields its address."""
    return serving(serve_gateway, config, **kwargs)


@contextlib.asynccontextmanager
async def captured(config: Config, name: str) -> AsyncIterator[asyncio.Event]:
    """Capture running for source ``name``, its slot created (so nothing after is missed)."""
    async with capturing(config, name) as stop:
        await wait_for_slot(config.source(name).dsn, config.source(name).slot_name)
        yield stop


class GoStyleClient:
    """The Go project's Python client, message for message: ``init`` with the URI and the
    keyword parameters as a Struct, then for each ``CaptureMessage`` the handler and an
    ``ack`` echoing the whole checkpoint, with ``requeue_reason = str(error)`` when the
    handler raised."""

    def __init__(self, grpc_addr: str, uri: str, **kwargs: Any) -> None:
        params = Struct()
        params.update(kwargs)
        self._grpc_addr = grpc_addr
        self._init = pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=params))

    async def capture(self, handler: Callable[[dict[str, Any]], None]) -> None:
        async with grpc.aio.insecure_channel(self._grpc_addr) as channel:
            stub = pb_grpc.DBLogGatewayStub(channel)
            stream = stub.Capture()
            await stream.write(self._init)
            async for msg in stream:
                ack = pb.CaptureAck(checkpoint=msg.checkpoint)
                try:
                    handler(
                        {
                            "checkpoint": msg.checkpoint,
                            "change": {
                                "op": msg.change.op,
                                "schema": msg.change.schema,
                                "table": msg.change.table,
                                "new": list(msg.change.new),
                                "old": list(msg.change.old),
                            },
                        }
                    )
                except Exception as e:
                    ack.requeue_reason = str(e)
                await stream.write(pb.CaptureRequest(ack=ack))


class BatchedClient:
    """A raw ``CaptureBatched`` client: ``decide(message)`` returns "" to acknowledge a change
    or a requeue reason; every handled message is kept in ``handled`` with its verdict."""

    def __init__(
        self,
        address: str,
        uri: str,
        decide: Callable[[pb.CaptureMessage], str] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        **parameters: Any,
    ) -> None:
        params = Struct()
        params.update(parameters)
        self.address = address
        self.init = pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=params))
        self.decide = decide or (lambda m: "")
        self.metadata = metadata
        self.handled: list[tuple[pb.CaptureMessage, str]] = []

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stream = pb_grpc.DBLogGatewayStub(channel).CaptureBatched(metadata=self.metadata)
            await stream.write(self.init)
            async for batch in stream:
                acks: list[pb.CaptureRequest] = []
                for i, message in enumerate(batch.messages):
                    verdict = self.decide(message)
                    self.handled.append((message, verdict))
                    ident = batch.first_id + i
                    last = acks[-1].ack_range if acks else None
                    if (
                        last is not None
                        and last.requeue_reason == verdict
                        and last.last_id + 1 == ident
                    ):
                        last.last_id = ident
                    else:
                        acks.append(
                            pb.CaptureRequest(
                                ack_range=pb.CaptureAckRange(
                                    first_id=ident, last_id=ident, requeue_reason=verdict
                                )
                            )
                        )
                for ack in acks:
                    await stream.write(ack)


def row_values(fields: Any) -> dict[str, bytes | str | None]:
    out: dict[str, bytes | str | None] = {}
    for f in fields:
        kind = f.WhichOneof("value")
        out[f.name] = None if kind is None else getattr(f, kind)
    return out


def int_of(value: bytes | str | None) -> int:
    assert isinstance(value, bytes)
    return int.from_bytes(value, "big", signed=True)


async def wait_until(check: Callable[[], bool], seconds: float = 30, what: str = "") -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.05)


def gateway_file(path: Path, nats_url: str, source: str, dsn: str, port: int, **uri: Any) -> Path:
    """A configuration file for ``pgcapture gateway`` with URI ``app`` on ``source``."""
    settings = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in uri.items())
    path.write_text(
        f'[nats]\nurl = "{nats_url}"\n[sources.{source}]\ndsn = {dsn!r}\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\n'
        "[gateway.tls]\ndisabled = true\n[gateway.auth]\ndisabled = true\n"
        f'[gateway.uris.app]\nsource = "{source}"\n{settings}'
    )
    return path


def gateway_process(config_file: Path) -> subprocess.Popen[bytes]:
    """``pgcapture gateway`` as its own process (stop it with SIGTERM or SIGKILL)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pgcapture", "gateway", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PGCAPTURE_LOG__LEVEL": "warning"},
    )


async def consumer_state(url: str, stream: str, consumer: str) -> Any:
    nc = await natslib.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, consumer)
    finally:
        await nc.close()
