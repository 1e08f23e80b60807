"""Connecting to NATS for one capture session.

The session owns its connection: when the connection drops, ``on_lost`` is called and the
session ends (its unacknowledged publishes are unknowable, and resuming from the stream's tail
is exact), then the caller connects again. nats-py's own reconnection is only used to try every
server of the list on connect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats
import nats.errors
from nats.aio.client import Client as NATS

from pgcapture.config import NatsConfig
from pgcapture.errors import ConfigError, ConnectionLost

log = logging.getLogger("pgcapture.nats")


async def connect_nats(cfg: NatsConfig, on_lost: Callable[[], None] | None = None) -> NATS:
    """A connection to the first server of ``cfg.servers`` that answers."""

    async def disconnected() -> None:
        if on_lost is not None:
            on_lost()

    async def error(exc: Exception) -> None:
        log.debug("nats client: %r", exc)

    try:
        return await nats.connect(
            servers=cfg.servers,
            name=cfg.name,
            user=cfg.user,
            password=cfg.password,
            token=cfg.token,
            user_credentials=str(cfg.creds) if cfg.creds else None,
            connect_timeout=cfg.connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            disconnected_cb=disconnected,
            error_cb=error,
        )
    except nats.errors.AuthorizationError as exc:
        raise ConfigError(
            f"NATS refused the credentials for {', '.join(cfg.servers)}: check [nats] user, "
            "password, token or creds"
        ) from exc
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise ConnectionLost(
            f"cannot connect to NATS at {', '.join(cfg.servers)}: {exc!r}"
        ) from exc
