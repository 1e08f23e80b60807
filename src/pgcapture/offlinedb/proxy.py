"""The OfflineDB endpoint: a PostgreSQL wire-protocol proxy that routes by database name.

Contract:

* A client connects as to any PostgreSQL server. ``SSLRequest`` and ``GSSENCRequest`` are
  answered 'N' (no encryption; libpq with ``sslmode=prefer`` goes on in clear, with
  ``sslmode=require`` it gives up with its own message). The ``StartupMessage`` must speak
  protocol 3.x.
* ``Backends.resolve`` says which PostgreSQL server holds the database the client asked for;
  it raises ``Refused`` when there is none. The proxy connects to that server, sends it the
  client's startup message unchanged and from then on relays bytes both ways untouched:
  authentication happens end to end, COPY and everything else pass through. When either side
  ends, both connections are closed. ``Backend.opened``/``closed`` bracket every relayed
  connection.
* The server's ``BackendKeyData`` is remembered while its connection lasts, so a
  ``CancelRequest`` arriving on a new client connection is forwarded to the server that issued
  the key. Unknown keys are dropped silently, as PostgreSQL does.
* Anything that stops a connection before the relay starts (a bad startup packet, a refusal,
  a server that cannot be reached, a timeout) is answered with a FATAL ``ErrorResponse``
  carrying a SQLSTATE, a message and a hint, then the connection is closed.

``listen`` is ``HOST:PORT``, ``:PORT`` (every interface) or ``unix:PATH``; port 0 picks a free
port, and ``start()`` returns the bound address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from pgcapture.errors import ConfigError, PgCaptureError, ProtocolError
from pgcapture.offlinedb.wire import (
    NO_ENCRYPTION,
    PROTOCOL_VIOLATION,
    BackendKey,
    BackendKeyScanner,
    CancelRequest,
    StartupError,
    StartupMessage,
    StartupReader,
    cancel_request,
    error_response,
)
from pgcapture.ops.http import parse_listen

log = logging.getLogger("pgcapture.offlinedb")

_CHUNK: Final = 65536
CONNECTION_FAILURE: Final = "08006"
CANNOT_CONNECT_NOW: Final = "57P03"
INTERNAL_ERROR: Final = "XX000"


class Refused(PgCaptureError):
    """A connection cannot be served; the client gets a FATAL error with these fields."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Backend:
    """A PostgreSQL server to relay to: ``host`` and ``port``, or the Unix socket file ``path``
    (``<socket dir>/.s.PGSQL.<port>``). Subclasses override ``opened``/``closed`` to count
    the connections relayed to it."""

    host: str | None = None
    port: int = 5432
    path: str | None = None
    database: str | None = None  # the name to ask the server for; None: the client's

    def __post_init__(self) -> None:
        if (self.host is None) == (self.path is None):
            raise ValueError("a Backend needs either host (and port) or path, not both")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"

    def opened(self) -> None:
        """A client's connection to this server has been established."""

    def closed(self) -> None:
        """A client's connection to this server has ended."""


class Backends(Protocol):
    """Where each database lives."""

    async def resolve(self, database: str, user: str, parameters: dict[str, str]) -> Backend:
        """The server for ``database``; raises ``Refused`` (unknown database, no capacity, no
        snapshot, a copy that failed to start)."""
        ...


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Proxy:
    """Accepts PostgreSQL clients on ``listen`` and relays each to its database's server."""

    def __init__(
        self,
        backends: Backends,
        listen: str,
        *,
        startup_timeout: float = 10.0,
        resolve_timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.backends = backends
        self.listen = listen
        self.startup_timeout = startup_timeout
        self.resolve_timeout = resolve_timeout
        self.connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._keys: dict[BackendKey, Backend] = {}

    async def serve(self, stop: asyncio.Event, ready: Callable[[str], None] | None = None) -> None:
        """Serve until ``stop`` is set; ``ready`` is called with the bound address."""
        address = await self.start()
        try:
            if ready is not None:
                ready(address)
            await stop.wait()
        finally:
            await self.close()

    async def start(self) -> str:
        """Start listening; the bound address (port 0 resolved)."""
        try:
            if self.listen.startswith("unix:"):
                path = self.listen.removeprefix("unix:")
                self._server = await asyncio.start_unix_server(self._accept, path=path)
                return self.listen
            host, port = parse_listen(self.listen, "offlinedb.listen", "127.0.0.1:6432")
            self._server = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.listen!r} for offlinedb: {exc.strerror}; choose "
                'another address, e.g. "127.0.0.1:6432"'
            ) from exc
        bound: int = self._server.sockets[0].getsockname()[1]
        return f"{self.listen.rpartition(':')[0]}:{bound}"

    async def close(self) -> None:
        """Stop listening and end every relayed connection."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        if self.listen.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.removeprefix("unix:"))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._session((reader, writer))
        except (StartupError, Refused) as exc:
            await _send_error(writer, exc)
        except OSError as exc:
            log.debug("client connection ended: %s", exc)
        finally:
            self._sessions.discard(task)
            await _close(writer)

    async def _session(self, client: Streams) -> None:
        first = await self._startup(client)
        if first is None:
            return
        request, trailing = first
        if isinstance(request, CancelRequest):
            await self._forward_cancel(request)
            return
        backend = await self._resolve(request)
        server = await self._connect(backend, request.database)
        backend.opened()
        try:
            packet = request.for_database(backend.database) if backend.database else request.packet
            server[1].write(packet + trailing)
            await self._relay(client, server, backend)
        finally:
            backend.closed()
            await _close(server[1])

    async def _startup(
        self, client: Streams
    ) -> tuple[CancelRequest | StartupMessage, bytes] | None:
        """The client's final startup packet and the bytes after it; ``None`` if it left."""
        try:
            async with asyncio.timeout(self.startup_timeout):
                return await _read_startup(client)
        except TimeoutError:
            raise Refused(
                PROTOCOL_VIOLATION,
                f"no startup packet received within {self.startup_timeout:g} s",
            ) from None

    async def _resolve(self, request: StartupMessage) -> Backend:
        database = request.database
        try:
            async with asyncio.timeout(self.resolve_timeout):
                return await self.backends.resolve(database, request.user, dict(request.parameters))
        except Refused:
            raise
        except TimeoutError:
            raise Refused(
                CANNOT_CONNECT_NOW,
                f'database "{database}" is not ready after {self.resolve_timeout:g} s',
                "try again in a moment",
            ) from None
        except Exception as exc:
            log.exception("resolving database %r failed", database)
            raise Refused(
                INTERNAL_ERROR,
                f'cannot find the server of database "{database}": {exc}',
                "this is a fault of the offlinedb service; see its log",
            ) from exc

    async def _connect(self, backend: Backend, database: str) -> Streams:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await _open(backend)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise Refused(
                CONNECTION_FAILURE,
                f'cannot reach the server of database "{database}" at {backend}: {reason}',
                "the database's server is not running or not accepting connections; "
                "try again, and if it persists check the offlinedb service",
            ) from exc

    async def _relay(self, client: Streams, server: Streams, backend: Backend) -> None:
        """Copy bytes both ways until either side ends, noting the server's cancel key."""
        scanner = BackendKeyScanner()

        def watch(data: bytes) -> None:
            key = scanner.receive_data(data)
            if key is not None:
                self._keys[key] = backend

        up = asyncio.ensure_future(_pump(client[0], server[1]))
        down = asyncio.ensure_future(_pump(server[0], client[1], watch))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if isinstance(task.exception(), ProtocolError):
                    log.warning("server %s broke the protocol: %s", backend, task.exception())
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            if scanner.key is not None:
                self._keys.pop(scanner.key, None)

    async def _forward_cancel(self, request: CancelRequest) -> None:
        backend = self._keys.get(BackendKey(request.pid, request.secret))
        if backend is None:
            log.debug("cancel request for unknown backend pid %d dropped", request.pid)
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await _open(backend)
                try:
                    writer.write(cancel_request(request.pid, request.secret))
                    # The server closes the connection once it has handled the request.
                    await reader.read()
                finally:
                    await _close(writer)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot forward a cancel request to %s: %r", backend, exc)


async def _read_startup(client: Streams) -> tuple[CancelRequest | StartupMessage, bytes] | None:
    reader, writer = client
    packets = StartupReader()
    while True:
        event = packets.next_event()
        if isinstance(event, CancelRequest | StartupMessage):
            return event, packets.trailing
        if event is not None:  # SSLRequest or GSSENCRequest: we never encrypt
            writer.write(NO_ENCRYPTION)
            await writer.drain()
        elif data := await reader.read(_CHUNK):
            packets.receive_data(data)
        else:
            return None


async def _open(backend: Backend) -> Streams:
    if backend.path is not None:
        return await asyncio.open_unix_connection(backend.path)
    return await asyncio.open_connection(backend.host, backend.port)


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    watch: Callable[[bytes], None] | None = None,
) -> None:
    """Copy until end of stream; a reset connection is an end too."""
    with contextlib.suppress(OSError):
        while data := await source.read(_CHUNK):
            if watch is not None:
                watch(data)
            sink.write(data)
            await sink.drain()


async def _send_error(writer: asyncio.StreamWriter, exc: StartupError | Refused) -> None:
    hint = exc.hint if isinstance(exc, Refused) else None
    log.info("connection refused: %s (%s)", exc.message, exc.sqlstate)
    with contextlib.suppress(OSError):
        writer.write(error_response(exc.sqlstate, exc.message, hint=hint))
        await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
