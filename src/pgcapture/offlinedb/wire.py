"""The startup phase of the PostgreSQL frontend/backend protocol, without I/O.

Contract:

* ``StartupReader`` is fed the bytes a client sends before it is relayed and returns, one by
  one, the packets of the startup phase (PostgreSQL docs, "Frontend/Backend Protocol" →
  "Message Flow" → "Start-up", and "Message Formats"): ``SSLRequest``, ``GSSENCRequest``,
  ``CancelRequest`` and ``StartupMessage``. It returns ``None`` while a packet is incomplete,
  however the bytes were split. After a ``StartupMessage`` or ``CancelRequest`` it is done;
  ``trailing`` holds whatever the client sent after it. A packet that breaks the protocol
  raises ``StartupError`` with the SQLSTATE and message PostgreSQL itself would send.
* ``BackendKeyScanner`` is fed a server's bytes from the start of a connection and finds its
  ``BackendKeyData`` (the key a later ``CancelRequest`` must present). It keeps only the bytes
  of a message header or of the key message itself, whatever the size of other messages, and
  stops looking at the first ``ReadyForQuery`` or ``ErrorResponse``.
* ``error_response`` builds an ``ErrorResponse`` message; ``cancel_request`` a
  ``CancelRequest`` packet.

Protocol 3.x is accepted with any minor version: the packet is relayed unchanged and the
server negotiates the minor version itself (``NegotiateProtocolVersion``). Since protocol 3.2
(PostgreSQL 18) the cancel secret is 4 to 256 bytes long, so secrets are ``bytes``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pgcapture.errors import ProtocolError

SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
PROTOCOL_3_0: Final = 196608  # 3 << 16

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH (src/include/libpq/pqcomm.h).
MAX_STARTUP_LENGTH: Final = 10000
MIN_SECRET: Final = 4
MAX_SECRET: Final = 256

NO_ENCRYPTION: Final = b"N"  # the answer to SSLRequest and GSSENCRequest we always give

_INT32: Final = struct.Struct("!i")
_HEADER: Final = struct.Struct("!ci")  # type byte, length (counting itself)

# SQLSTATEs PostgreSQL uses for a bad startup packet.
PROTOCOL_VIOLATION: Final = "08P01"
FEATURE_NOT_SUPPORTED: Final = "0A000"
INVALID_AUTHORIZATION: Final = "28000"


class StartupError(ProtocolError):
    """A client's startup packet breaks the protocol; ``sqlstate`` is the code to answer with."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class SSLRequest:
    """The client asks for TLS before the startup message."""


@dataclass(frozen=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption before the startup message."""


@dataclass(frozen=True)
class CancelRequest:
    """The client asks to cancel the query running in the backend holding this key."""

    pid: int
    secret: bytes


@dataclass(frozen=True)
class StartupMessage:
    """The client's startup message; ``packet`` is its exact bytes, to be relayed as is."""

    major: int
    minor: int
    parameters: Mapping[str, str]
    packet: bytes

    @property
    def user(self) -> str:
        return self.parameters["user"]

    @property
    def database(self) -> str:
        """The database asked for; PostgreSQL defaults it to the user name."""
        return self.parameters.get("database") or self.user

    def for_database(self, database: str) -> bytes:
        """The same startup message asking for ``database`` instead."""
        if self.parameters.get("database") == database:
            return self.packet
        parameters = {**self.parameters, "database": database}
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in parameters.items())
        version = (self.major << 16) | self.minor
        return struct.pack("!ii", 8 + len(body) + 1, version) + body + b"\0"


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


class StartupReader:
    """Turns the client's first bytes into startup-phase packets (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False
        self._negotiated: set[type[StartupEvent]] = set()

    @property
    def trailing(self) -> bytes:
        """Bytes received after the final packet (the client may pipeline its first query)."""
        return bytes(self._buffer) if self._done else b""

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> StartupEvent | None:
        """The next complete packet, or ``None`` until more bytes arrive."""
        if self._done:
            raise StartupError(PROTOCOL_VIOLATION, "the startup phase is over")
        if len(self._buffer) < 4:
            return None
        length = _INT32.unpack_from(self._buffer)[0]
        if not 8 <= length <= MAX_STARTUP_LENGTH:
            raise StartupError(PROTOCOL_VIOLATION, f"invalid length of startup packet: {length}")
        if len(self._buffer) < length:
            return None
        packet = bytes(self._buffer[:length])
        del self._buffer[:length]
        event = parse_packet(packet)
        self._check_order(event)
        return event

    def _check_order(self, event: StartupEvent) -> None:
        if isinstance(event, SSLRequest | GSSENCRequest):
            if type(event) in self._negotiated:
                what = "SSL" if isinstance(event, SSLRequest) else "GSSAPI"
                raise StartupError(PROTOCOL_VIOLATION, f"{what} negotiation asked for twice")
            self._negotiated.add(type(event))
        else:
            self._done = True


def parse_packet(packet: bytes) -> StartupEvent:
    """One whole startup-phase packet (length word included) as an event."""
    code = _INT32.unpack_from(packet, 4)[0]
    body = packet[8:]
    if code == SSL_REQUEST_CODE:
        return _bare(SSLRequest(), body)
    if code == GSSENC_REQUEST_CODE:
        return _bare(GSSENCRequest(), body)
    if code == CANCEL_REQUEST_CODE:
        return _cancel(body)
    return _startup(code, packet)


def _bare(event: SSLRequest | GSSENCRequest, body: bytes) -> StartupEvent:
    if body:
        raise StartupError(PROTOCOL_VIOLATION, "invalid length of startup packet")
    return event


def _cancel(body: bytes) -> CancelRequest:
    if not MIN_SECRET <= len(body) - 4 <= MAX_SECRET:
        raise StartupError(PROTOCOL_VIOLATION, "invalid length of cancel request packet")
    return CancelRequest(_INT32.unpack_from(body)[0], body[4:])


def _startup(version: int, packet: bytes) -> StartupMessage:
    major, minor = version >> 16, version & 0xFFFF
    if major != 3:
        raise StartupError(
            FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
        )
    parameters = _parameters(packet[8:])
    if not parameters.get("user"):
        raise StartupError(
            INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet"
        )
    return StartupMessage(major, minor, parameters, packet)


def _parameters(body: bytes) -> dict[str, str]:
    """Name/value pairs, each NUL-terminated, the list ended by one more NUL."""
    if body == b"\0":
        return {}
    if not body.endswith(b"\0\0"):
        raise StartupError(
            PROTOCOL_VIOLATION, "invalid startup packet layout: expected terminator as last byte"
        )
    fields = body[:-2].split(b"\0")
    if len(fields) % 2:
        raise StartupError(
            PROTOCOL_VIOLATION, "invalid startup packet layout: a parameter has no value"
        )
    try:
        words = [field.decode() for field in fields]
    except UnicodeDecodeError as exc:
        raise StartupError(
            PROTOCOL_VIOLATION, "invalid startup packet: a parameter is not valid UTF-8"
        ) from exc
    return dict(zip(words[::2], words[1::2], strict=True))


@dataclass(frozen=True)
class BackendKey:
    """A backend's ``BackendKeyData``: its process id and cancel secret."""

    pid: int
    secret: bytes


class BackendKeyScanner:
    """Finds ``BackendKeyData`` in a server's byte stream (see the module docstring)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0  # body bytes of the current message still to pass over
        self.done = False
        self.key: BackendKey | None = None

    def receive_data(self, data: bytes) -> BackendKey | None:
        """Scan ``data``; the key when it is completed by these bytes, else ``None``."""
        if self.done:
            return None
        before = self.key
        view = memoryview(data)
        while view and not self.done:
            view = self._step(view)
        return self.key if self.key is not before else None

    def _step(self, view: memoryview) -> memoryview:
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            return view[taken:]
        need = 5 if len(self._buffer) < 5 else 1 + _HEADER.unpack_from(self._buffer)[1]
        taken = min(need - len(self._buffer), len(view))
        self._buffer += view[:taken]
        if len(self._buffer) == 5:
            self._header()
        elif len(self._buffer) == need:
            self._key_message()
        return view[taken:]

    def _header(self) -> None:
        tag, length = _HEADER.unpack_from(self._buffer)
        if length < 4:
            raise ProtocolError(f"server message {tag!r} has invalid length {length}")
        if tag in (b"Z", b"E"):
            self.done = True
        elif tag == b"K":
            if not MIN_SECRET <= length - 8 <= MAX_SECRET:
                raise ProtocolError(f"BackendKeyData has invalid length {length}")
            return
        self._skip = length - 4
        self._buffer.clear()

    def _key_message(self) -> None:
        pid = _INT32.unpack_from(self._buffer, 5)[0]
        self.key = BackendKey(pid, bytes(self._buffer[9:]))
        self._buffer.clear()


def error_response(
    sqlstate: str,
    message: str,
    *,
    hint: str | None = None,
    detail: str | None = None,
    severity: str = "FATAL",
) -> bytes:
    """An ``ErrorResponse`` ('E') message with fields S, V, C, M and, when given, D and H."""
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(code + text.encode() + b"\0" for code, text in fields) + b"\0"
    return b"E" + _INT32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    """The ``CancelRequest`` packet that asks the server to cancel backend ``pid``'s query."""
    return _INT32.pack(12 + len(secret)) + struct.pack("!ii", CANCEL_REQUEST_CODE, pid) + secret
