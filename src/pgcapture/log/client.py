"""Connecting to NATS.

A capture session owns its connection: when the connection drops, ``on_lost`` is called and the
session ends (its unacknowledged publishes are unknowable, and resuming from the stream's tail
is exact), then the caller connects again. nats-py's own reconnection is only used to try every
server of the list on connect.

A long-lived server such as the gateway asks for ``reconnect_forever``: the client waits for a
server to answer (at start too), reconnects after every loss without giving up, and reports each
loss (``on_lost``) and each return (``on_reconnected``) so the server can refuse new work while
the log is out of reach instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from pgcapture.config import NatsConfig
from pgcapture.errors import ConfigError, ConnectionLost

log = logging.getLogger("pgcapture.nats")


async def connect_nats(
    cfg: NatsConfig,
    on_lost: Callable[[], None] | None = None,
    *,
    reconnect_forever: bool = False,
    on_reconnected: Callable[[], None] | None = None,
) -> NATS:
    """A connection to the first server of ``cfg.servers`` that answers.

    ``reconnect_forever``: retry connecting and reconnecting without limit (while unconnected,
    each distinct error is logged once as a warning); the call returns once a server answered,
    and cancelling it closes the client.
    """
    servers = ", ".join(cfg.servers)
    last_error = ""
    nc = NATS()

    async def disconnected() -> None:
        if reconnect_forever and not nc.is_closed:
            log.warning("lost the connection to NATS at %s; reconnecting", servers)
        if on_lost is not None:
            on_lost()

    async def reconnected() -> None:
        nonlocal last_error
        last_error = ""
        log.info("reconnected to NATS at %s", servers)
        if on_reconnected is not None:
            on_reconnected()

    async def error(exc: Exception) -> None:
        nonlocal last_error
        text = _describe(exc)
        if reconnect_forever and not nc.is_connected and text != last_error:
            log.warning("NATS at %s: %s; retrying until it answers", servers, text)
        else:
            log.debug("nats client: %r", exc)
        last_error = text

    options: dict[str, Any] = {"max_reconnect_attempts": 1, "reconnect_time_wait": 0.2}
    if reconnect_forever:
        options = {
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1.0,
            "reconnected_cb": reconnected,
        }
    try:
        await nc.connect(
            servers=cfg.servers,
            name=cfg.name,
            user=cfg.user,
            password=cfg.password,
            token=cfg.token,
            user_credentials=str(cfg.creds) if cfg.creds else None,
            # Annotated int by nats-py, used as an asyncio timeout: fractions of a second work.
            connect_timeout=cfg.connect_timeout,  # type: ignore[arg-type]
            allow_reconnect=True,
            disconnected_cb=disconnected,
            error_cb=error,
            **options,
        )
    except nats.errors.AuthorizationError as exc:
        raise ConfigError(
            f"NATS refused the credentials for {servers}: check [nats] user, password, token "
            "or creds"
        ) from exc
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise ConnectionLost(f"cannot connect to NATS at {servers}: {exc!r}") from exc
    except BaseException:
        # Cancelled while still trying (reconnect_forever): leave no socket or task behind.
        await nc.close()
        raise
    return nc


def _describe(exc: Exception) -> str:
    if isinstance(exc, nats.errors.AuthorizationError):
        return "the server refused the credentials (check [nats] user, password, token or creds)"
    return str(exc) or type(exc).__name__


async def connect_until_stopped(
    cfg: NatsConfig,
    stop: asyncio.Event,
    on_lost: Callable[[], None],
    on_reconnected: Callable[[], None],
) -> NATS | None:
    """Connect, waiting as long as it takes for a server and reconnecting forever after; None
    when ``stop`` comes first (the services' way to start before NATS is up)."""
    connecting = asyncio.ensure_future(
        connect_nats(cfg, on_lost, reconnect_forever=True, on_reconnected=on_reconnected)
    )
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
    return None if connecting.cancelled() else connecting.result()
