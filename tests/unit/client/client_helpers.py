"""Helpers of the consumer tests: wire messages and an in-process fake gateway.

``FakeGateway`` implements ``CaptureBatched`` and ``Capture`` over scripted messages per URI
the way the real gateway does what the consumer depends on: it delivers every message not
acknowledged yet (again on each new stream), numbers deliveries from 1 per stream, takes
acknowledgements by id range (or by checkpoint for ``Capture``), and refuses double or unknown
acknowledgements. It records what it received so tests can assert on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from pgcapture.proto import pb, pb_grpc

INT4, INT8, TEXT = 23, 20, 25

CheckpointKey = tuple[int, int]


def int4(name: str, value: int | None, key: bool = False) -> pb.Field:
    if value is None:
        return pb.Field(name=name, oid=INT4, key=key)
    return pb.Field(name=name, oid=INT4, binary=struct.pack(">i", value), key=key)


def text(name: str, value: str | None, key: bool = False) -> pb.Field:
    if value is None:
        return pb.Field(name=name, oid=TEXT, key=key)
    return pb.Field(name=name, oid=TEXT, binary=value.encode(), key=key)


def change(
    table: str,
    lsn: int,
    seq: int = 1,
    *,
    op: int = pb.Change.INSERT,
    new: Iterable[pb.Field] = (),
    old: Iterable[pb.Field] = (),
    schema: str = "public",
    data: bytes = b"",
) -> pb.CaptureMessage:
    return pb.CaptureMessage(
        checkpoint=pb.Checkpoint(lsn=lsn, seq=seq, data=data),
        change=pb.Change(op=op, schema=schema, table=table, new=list(new), old=list(old)),
    )


def user_row(lsn: int, user_id: int, name: str, seq: int = 1) -> pb.CaptureMessage:
    return change("users", lsn, seq, new=[int4("id", user_id, key=True), text("name", name)])


def truncate(lsn: int, *tables: str, seq: int = 1) -> pb.CaptureMessage:
    return pb.CaptureMessage(
        checkpoint=pb.Checkpoint(lsn=lsn, seq=seq),
        truncate=pb.Truncate(tables=[pb.Table(schema="public", table=t) for t in tables]),
    )


def raw_value(conn: psycopg.Connection[Any], expr: str, binary: bool = True) -> tuple[int, bytes]:
    """(the type OID pgoutput sends for ``expr``: a domain's own OID; its raw bytes, exactly
    as the server sends them for a SELECT in binary, or text, format)."""
    cur = conn.cursor(binary=binary)
    cur.execute(f"SELECT {expr}")
    assert cur.pgresult is not None
    raw = cur.pgresult.get_value(0, 0)
    assert raw is not None
    row = conn.execute(f"SELECT pg_typeof(v)::oid FROM (SELECT {expr} AS v) s").fetchone()
    assert row is not None
    return int(row[0]), bytes(raw)


def db_field(conn: psycopg.Connection[Any], name: str, expr: str, key: bool = False) -> pb.Field:
    """A wire field holding the binary value of ``expr`` from the database."""
    oid, raw = raw_value(conn, expr)
    return pb.Field(name=name, oid=oid, binary=raw, key=key)


def key_of(message: pb.CaptureMessage) -> CheckpointKey:
    return (message.checkpoint.lsn, message.checkpoint.seq)


@dataclass
class StreamLog:
    """What one stream of the fake received."""

    method: str
    init: pb.CaptureInit
    metadata: dict[str, str]
    acks: list[pb.CaptureRequest] = field(default_factory=list)
    half_closed: bool = False


@dataclass(eq=False)
class _Stream:
    messages: dict[int, pb.CaptureMessage]  # delivery id -> message, unacknowledged
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeGateway(pb_grpc.DBLogGatewayServicer):
    """Scripted ``DBLogGateway``; see the module docstring."""

    def __init__(self, batch_size: int = 100) -> None:
        self.batch_size = batch_size
        self.scripts: dict[str, list[pb.CaptureMessage]] = {}
        self.acked: list[CheckpointKey] = []
        self.requeued: list[tuple[CheckpointKey, str]] = []
        self.violations: list[str] = []
        self.streams: list[StreamLog] = []
        self.refuse: dict[str, tuple[Any, str]] = {}  # uri -> (status code, details)
        self.token: str | None = None
        self.changed = asyncio.Event()
        self._open: set[_Stream] = set()

    def script(self, uri: str, messages: Iterable[pb.CaptureMessage]) -> None:
        self.scripts.setdefault(uri, []).extend(messages)

    def end_streams(self) -> None:
        """End every open stream with an OK status, as a draining gateway does."""
        for stream in self._open:
            stream.closed.set()

    def unacked(self, uri: str) -> list[pb.CaptureMessage]:
        done = set(self.acked)
        return [m for m in self.scripts.get(uri, []) if key_of(m) not in done]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds, re-checked whenever the fake records something."""
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self.changed.wait()

    # -- the service ------------------------------------------------------------------------

    async def CaptureBatched(
        self, request_iterator: AsyncIterator[pb.CaptureRequest], context: Any
    ) -> None:
        await self._serve("CaptureBatched", request_iterator, context)

    async def Capture(
        self, request_iterator: AsyncIterator[pb.CaptureRequest], context: Any
    ) -> None:
        await self._serve("Capture", request_iterator, context)

    async def _serve(
        self, method: str, requests: AsyncIterator[pb.CaptureRequest], context: Any
    ) -> None:
        first = await anext(requests)
        log = StreamLog(method, first.init, dict(context.invocation_metadata()))
        self.streams.append(log)
        self.changed.set()
        uri = first.init.uri
        if uri in self.refuse:
            code, details = self.refuse[uri]
            await context.abort(code, details)
        if self.token is not None and log.metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if uri not in self.scripts:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"uri {uri!r} is not configured")
        pending = self.unacked(uri)
        stream = _Stream(dict(enumerate(pending, start=1)))
        reader = asyncio.create_task(self._read_acks(method, requests, stream, log))
        self._open.add(stream)
        try:
            if method == "CaptureBatched":
                for i in range(0, len(pending), self.batch_size):
                    part = pending[i : i + self.batch_size]
                    await context.write(pb.CaptureBatch(first_id=i + 1, messages=part))
            else:
                for message in pending:
                    await context.write(message)
            await stream.closed.wait()
        finally:
            self._open.discard(stream)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_acks(
        self,
        method: str,
        requests: AsyncIterator[pb.CaptureRequest],
        stream: _Stream,
        log: StreamLog,
    ) -> None:
        async for request in requests:
            log.acks.append(request)
            if method == "CaptureBatched":
                self._settle_range(request, stream)
            else:
                self._settle_checkpoint(request, stream)
            self.changed.set()
        log.half_closed = True
        stream.closed.set()

    def _settle_range(self, request: pb.CaptureRequest, stream: _Stream) -> None:
        if request.WhichOneof("type") != "ack_range":
            self.violations.append(f"CaptureBatched got {request.WhichOneof('type')}")
            return
        r = request.ack_range
        for delivery_id in range(r.first_id, r.last_id + 1):
            message = stream.messages.pop(delivery_id, None)
            if message is None:
                self.violations.append(f"ack of unknown or settled delivery id {delivery_id}")
                continue
            self._record(message, r.requeue_reason)

    def _settle_checkpoint(self, request: pb.CaptureRequest, stream: _Stream) -> None:
        if request.WhichOneof("type") != "ack":
            self.violations.append(f"Capture got {request.WhichOneof('type')}")
            return
        ack = request.ack
        for delivery_id, message in stream.messages.items():
            if message.checkpoint == ack.checkpoint:
                del stream.messages[delivery_id]
                self._record(message, ack.requeue_reason)
                return
        self.violations.append(f"ack of unknown checkpoint {ack.checkpoint}")

    def _record(self, message: pb.CaptureMessage, reason: str) -> None:
        if reason:
            self.requeued.append((key_of(message), reason))
        else:
            self.acked.append(key_of(message))


class GatewayServer:
    """A grpc.aio server running a ``FakeGateway`` on a fixed local port (restartable)."""

    def __init__(self, fake: FakeGateway, credentials: Any = None) -> None:
        self.fake = fake
        self.port = 0
        self._credentials = credentials  # grpc.ssl_server_credentials for TLS
        self._server: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_DBLogGatewayServicer_to_server(self.fake, server)
        address = f"127.0.0.1:{self.port}"
        if self._credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self._credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


def make_certificates(directory: Path) -> None:
    """A CA, and server (127.0.0.1, localhost) and client certificates it signed, made with
    the openssl command: ca.pem, server.pem/.key, client.pem/.key in ``directory``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=pgcapture test CA")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", "san.ext")  # fmt: skip
