"""A small HTTP endpoint on asyncio: ``GET /metrics`` (Prometheus text format) and
``GET /healthz`` (200 while healthy, 503 otherwise, with a JSON body saying why).

It answers one request per connection (HTTP/1.0 style, ``Connection: close``), which is all that
Prometheus scrapers and health probes need, and runs in the event loop like everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pgcapture.errors import ConfigError

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


@dataclass
class ServiceStatus:
    """What a service (capture, replicate) is doing, for the health endpoint and logs."""

    state: str = "connecting"  # connecting | running | retrying | stopped | failed
    sessions: int = 0
    last_error: str = ""
    changed: float = field(default_factory=time.time)

    def set(self, state: str, error: BaseException | None = None) -> None:
        self.state = state
        self.changed = time.time()
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"

    def health(self, **detail: Any) -> tuple[bool, dict[str, Any]]:
        """Healthy while running; the body says the state, since when, and ``detail``."""
        ok = self.state == "running"
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "state": self.state,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.changed)),
            "sessions": self.sessions,
            **detail,
        }
        if self.last_error:
            body["last_error"] = self.last_error
        return ok, body


def parse_listen(
    listen: str, setting: str = "metrics.listen", example: str = "127.0.0.1:9187"
) -> tuple[str, int]:
    """``"127.0.0.1:9187"``, ``":9187"`` (all interfaces) or ``"9187"``; a refusal names
    ``setting`` and an ``example``."""
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        port_only = example.rpartition(":")[2]
        raise ConfigError(
            f'{setting} {listen!r} is not HOST:PORT; write e.g. "{example}" or ":{port_only}"'
        )
    return (host.strip("[]") or "0.0.0.0"), number


class OpsServer:
    """Serves one registry and one health check."""

    def __init__(self, registry: CollectorRegistry, health: HealthCheck) -> None:
        self.registry = registry
        self.health = health
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {listen!r} for metrics: {exc.strerror}; choose another "
                "metrics.listen address"
            ) from exc

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/healthz", "/health"):
            ok, detail = self.health()
            body = json.dumps(detail, default=str).encode() + b"\n"
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
