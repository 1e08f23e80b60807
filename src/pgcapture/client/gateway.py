"""The gRPC side: channel (TLS, token), one ``Capture`` / ``CaptureBatched`` stream, errors.

All network I/O of the consumer is here. ``GatewayStream.read`` returns the deliveries of the
next response as ``(delivery id, CaptureMessage)`` pairs and ``send`` acknowledges ranges of
ids; for the Go project's ``Capture`` method, which has no delivery ids, the stream numbers
messages itself and acknowledges each by echoing its checkpoint. gRPC errors are translated
once, here: permanent refusals become ``GatewayRefused`` subclasses, everything else
``GatewayUnavailable`` (the consumer reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import struct_pb2

from pgcapture.client.acks import AckRange
from pgcapture.client.errors import (
    AccessDenied,
    GatewayRefused,
    GatewayUnavailable,
    InvalidRequest,
    MethodUnsupported,
    StreamRejected,
    UnknownUri,
)
from pgcapture.errors import ConfigError, PgCaptureError
from pgcapture.proto import pb, pb_grpc

Delivery = tuple[int, pb.CaptureMessage]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS to the gateway: a CA bundle (default: the system's roots), a client certificate
    and key for mutual TLS, and the name to verify when it differs from the target's host."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> Any:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "tls: cert_file and key_file go together (a client certificate needs its key); "
                "set both or neither"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file"),
            private_key=_read(self.key_file, "key_file"),
            certificate_chain=_read(self.cert_file, "cert_file"),
        )


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls {what} {str(path)!r} cannot be read: {exc.strerror}") from exc


def open_channel(
    target: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> Any:
    """A ``grpc.aio`` channel to ``target`` (``host:port``), plain or TLS. Messages from the
    gateway may be as large as the largest row (gRPC's default limit is 4 MiB), so the receive
    limit is lifted unless ``options`` sets one."""
    opts = list(options)
    if not any(name == "grpc.max_receive_message_length" for name, _ in opts):
        opts.append(("grpc.max_receive_message_length", -1))
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=opts)


def init_parameters(parameters: Mapping[str, Any]) -> struct_pb2.Struct:
    """``CaptureInit.parameters`` from a mapping of JSON-like values."""
    struct = struct_pb2.Struct()
    try:
        struct.update(dict(parameters))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"parameters {dict(parameters)!r} cannot be sent as a protobuf Struct ({exc}); "
            "use strings, numbers, booleans, None, lists and dicts"
        ) from exc
    return struct


def capture_parameters(
    table_regex: str | None, parameters: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``parameters`` with ``TableRegex`` added from ``table_regex`` (checked to compile)."""
    merged = dict(parameters or {})
    if table_regex is not None:
        if "TableRegex" in merged:
            raise ConfigError(
                "TableRegex is given twice, as table_regex= and in parameters=; keep one"
            )
        try:
            re.compile(table_regex)
        except re.error as exc:
            raise ConfigError(
                f"table_regex {table_regex!r} is not a valid regular expression: {exc}"
            ) from exc
        merged["TableRegex"] = table_regex
    return merged


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """The call metadata carrying ``token``: ``authorization: Bearer <token>``."""
    if token is None:
        return []
    if not token or token != token.strip() or any(c in token for c in "\r\n"):
        raise ConfigError(
            "token is empty or has surrounding whitespace or line breaks; pass the bare token"
        )
    return [("authorization", f"Bearer {token}")]


_PERMANENT: Final[Mapping[Any, type[GatewayRefused]]] = {
    grpc.StatusCode.NOT_FOUND: UnknownUri,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.FAILED_PRECONDITION: StreamRejected,
    grpc.StatusCode.UNIMPLEMENTED: MethodUnsupported,
}

_FIXES: Final[Mapping[str, str]] = {
    "NOT_FOUND": "use a uri the gateway is configured to serve",
    "INVALID_ARGUMENT": "fix the table_regex / parameters it names",
    "UNAUTHENTICATED": "pass token= with a token the gateway accepts",
    "PERMISSION_DENIED": "use a token that is granted this uri",
    "FAILED_PRECONDITION": "retrying the same stream cannot succeed; report it if it persists",
    "UNIMPLEMENTED": "an older gateway has no CaptureBatched: pass batched=False to use Capture",
}


def translate(exc: Any, target: str, uri: str) -> PgCaptureError:
    """A ``grpc.aio.AioRpcError`` as the consumer's error for it."""
    code = exc.code()
    details = exc.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    refused = _PERMANENT.get(code)
    if refused is None:
        return GatewayUnavailable(
            f"gateway {target} (uri {uri!r}): {name}: {details or 'no details'}", name
        )
    return refused(
        f"gateway {target} refused uri {uri!r}: {name}: {details or 'no details'}; {_FIXES[name]}",
        name,
        details,
    )


class GatewayStream:
    """One open stream; ``open`` sends the ``CaptureInit``."""

    def __init__(self, call: Any, batched: bool, target: str, uri: str) -> None:
        self._call = call
        self._batched = batched
        self._target = target
        self._uri = uri
        self._write_lock = asyncio.Lock()
        self._next_id = 1
        self._checkpoints: dict[int, pb.Checkpoint] = {}  # Capture only: id -> checkpoint

    @classmethod
    async def open(
        cls,
        channel: Any,
        *,
        target: str,
        uri: str,
        parameters: struct_pb2.Struct,
        metadata: Sequence[tuple[str, str]],
        batched: bool,
    ) -> GatewayStream:
        stub = pb_grpc.DBLogGatewayStub(channel)
        method = stub.CaptureBatched if batched else stub.Capture
        stream = cls(method(metadata=tuple(metadata)), batched, target, uri)
        init = pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=parameters))
        await stream._write(init)
        return stream

    async def read(self) -> list[Delivery]:
        """The next response's deliveries; ``GatewayUnavailable`` when the stream ended."""
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self._target, self._uri) from exc
        if response is grpc.aio.EOF:
            raise GatewayUnavailable(
                f"gateway {self._target} (uri {self._uri!r}) ended the stream (restart or drain)",
                "EOF",
            )
        if self._batched:
            first = response.first_id
            return [(first + i, m) for i, m in enumerate(response.messages)]
        delivery_id = self._next_id
        self._next_id += 1
        self._checkpoints[delivery_id] = response.checkpoint
        return [(delivery_id, response)]

    async def send(self, ranges: Sequence[AckRange]) -> None:
        """Acknowledge (or requeue) ranges of delivery ids."""
        for r in ranges:
            if self._batched:
                ack = pb.CaptureAckRange(first_id=r.first, last_id=r.last, requeue_reason=r.reason)
                await self._write(pb.CaptureRequest(ack_range=ack))
                continue
            for delivery_id in range(r.first, r.last + 1):
                checkpoint = self._checkpoints.pop(delivery_id)
                one = pb.CaptureAck(checkpoint=checkpoint, requeue_reason=r.reason)
                await self._write(pb.CaptureRequest(ack=one))

    async def _write(self, request: pb.CaptureRequest) -> None:
        async with self._write_lock:
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as exc:
                raise translate(exc, self._target, self._uri) from exc
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                raise GatewayUnavailable(
                    f"gateway {self._target} (uri {self._uri!r}): the stream closed while "
                    f"acknowledging ({exc})",
                    "CLOSED",
                ) from exc

    async def close(self, grace: float) -> None:
        """Half-close and give the gateway ``grace`` seconds to end the stream, so that the
        last acknowledgements are read before the call is cancelled. Whatever was delivered
        and not acknowledged is delivered again (to this consumer or another one)."""
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._call.done_writing()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace):
                await self._call.code()
        self._call.cancel()
