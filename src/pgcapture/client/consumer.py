"""``Consumer``: connect to a gateway, decode changes into models, hand them to handlers.

Two ways to consume, one engine (``session.Session``):

- handlers: ``await consumer.run(handlers={User: on_user})`` (or ``@consumer.handler(User)``)
  runs until ``stop()`` or a permanent error, reconnecting after transient ones;
- iteration: ``async with consumer: async for change in consumer: ...``.

``run`` reconnects with exponential backoff (``pgcapture.backoff``) after UNAVAILABLE, a lost
connection or a gateway restart; a stream that delivered something resets the backoff. A
permanent refusal (unknown URI, bad regex or parameter, token) ends ``run`` with a
``GatewayRefused`` whose message names the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar, get_args

import psycopg

from pgcapture.backoff import Backoff
from pgcapture.client.build import EventBuilder
from pgcapture.client.change import Change, Truncate
from pgcapture.client.errors import ChangeDecodeError, GatewayUnavailable
from pgcapture.client.gateway import (
    GatewayStream,
    TlsConfig,
    auth_metadata,
    capture_parameters,
    init_parameters,
    open_channel,
)
from pgcapture.client.iteration import Iterator, Sink
from pgcapture.client.models import ModelSpec
from pgcapture.client.routing import (
    ConsumerStats,
    DecodeErrorCallback,
    DecodePolicy,
    Handler,
    Routes,
    routes_for,
    specs_of,
)
from pgcapture.client.session import Session, SessionSettings
from pgcapture.client.typeinfo import TypeResolver
from pgcapture.client.values import ValueDecoder
from pgcapture.errors import ConfigError, PgCaptureError
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.client")

M = TypeVar("M")
R = TypeVar("R")
T = TypeVar("T")


def _log_decode_error(error: ChangeDecodeError, message: pb.CaptureMessage) -> None:
    cp = message.checkpoint
    log.error("undecodable change at lsn %d seq %d: %s", cp.lsn, cp.seq, error)


class Consumer:
    """A consumer of one URI of a pgcapture gateway (``target`` is ``host:port``).

    - ``table_regex``: only tables whose name matches (sent as the ``TableRegex`` parameter);
      ``parameters``: more ``CaptureInit`` parameters.
    - ``token``: sent as ``authorization: Bearer <token>``. ``tls``: ``True`` for TLS with
      the system's CA roots, or a ``TlsConfig`` (CA file, client certificate and key).
    - ``batched``: ``CaptureBatched`` (many changes per message, acknowledged by ranges);
      ``False`` for the Go project's ``Capture`` method, for gateways that lack it.
    - ``dsn``: the **source database** (or a physical copy of it), to look up user-defined
      types by OID; without it their values are ``RawValue`` (see the consumer guide).
    - ``models``: models used for tables without a handler when iterating.
    - ``concurrency``: handlers running at once; changes of one row never run together and
      keep their order; TRUNCATE and DDL wait for what came before them.
    - ``decode_errors``: what happens to a change with a value that cannot be decoded, after
      ``on_decode_error(error, message)`` (default: log it) was called:
      ``"requeue"`` (default) requeues it with the error as reason, so nothing is lost and the
      change is decoded again once the cause is fixed (a ``dsn``, a model field type) and the
      consumer restarted; ``"skip"`` acknowledges it unhandled, logged and counted in
      ``stats.skipped`` (the Go library's behaviour); ``"stop"`` ends ``run()`` with the
      ``ChangeDecodeError``, the change unacknowledged.
    - ``ack_interval``: longest wait before settled changes are acknowledged while others of
      the batch are still running; ``close_grace``: how long ``stop`` waits for the gateway
      to end the stream.
    """

    def __init__(
        self,
        target: str,
        uri: str,
        *,
        table_regex: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        token: str | None = None,
        tls: bool | TlsConfig | None = None,
        batched: bool = True,
        dsn: str | psycopg.AsyncConnection[Any] | None = None,
        models: Iterable[type[Any]] = (),
        concurrency: int = 1,
        decode_errors: DecodePolicy = "requeue",
        on_decode_error: DecodeErrorCallback | None = None,
        backoff: Backoff | None = None,
        ack_interval: float = 0.1,
        close_grace: float = 5.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target or not uri:
            raise ConfigError(f"target {target!r} and uri {uri!r} must both be non-empty")
        if concurrency < 1:
            raise ConfigError(f"concurrency={concurrency} must be at least 1")
        if decode_errors not in get_args(DecodePolicy):
            raise ConfigError(
                f"decode_errors={decode_errors!r} must be one of 'requeue', 'skip', 'stop'"
            )
        if ack_interval <= 0 or close_grace < 0:
            raise ConfigError(f"ack_interval={ack_interval} must be > 0, close_grace >= 0")
        if dsn is not None and not isinstance(dsn, str | psycopg.AsyncConnection):
            raise ConfigError(
                f"dsn must be a connection string or a psycopg.AsyncConnection, not "
                f"{type(dsn).__qualname__}"
            )
        self._target = target
        self._uri = uri
        self._parameters = init_parameters(capture_parameters(table_regex, parameters))
        self._metadata = auth_metadata(token)
        self._tls = TlsConfig() if tls is True else (tls or None)
        if self._tls is not None:
            self._tls.credentials()  # read the files now: a bad path fails here, not later
        self._batched = batched
        self._dsn = dsn
        self._models = specs_of(models)
        self._settings = SessionSettings(
            concurrency, decode_errors, on_decode_error or _log_decode_error, ack_interval,
            close_grace,
        )  # fmt: skip
        self._backoff = backoff or Backoff()
        self._channel_options = tuple(channel_options)
        self._handlers: dict[type[Any], Handler] = {}
        self._session: Session | None = None
        self._stopping = False
        self._started = False
        self._wake = asyncio.Event()
        self._sink: Sink | None = None
        self._pump: asyncio.Task[None] | None = None
        self._entered = False
        self.stats = ConsumerStats()

    # -- handlers -------------------------------------------------------------------------

    def handler(
        self, model: type[M]
    ) -> Callable[[Callable[[Change[M]], R]], Callable[[Change[M]], R]]:
        """Decorator: handle the changes of ``model``'s table (sync or async function).

        ``model`` may also be ``Row``: the handler then gets the changes of every table without
        a handler of its own, as ``Change[Row]``.
        """

        def register(fn: Callable[[Change[M]], R]) -> Callable[[Change[M]], R]:
            self._handlers[model] = fn
            return fn

        return register

    def on_truncate(self, fn: Callable[[Truncate], R]) -> Callable[[Truncate], R]:
        """Decorator: handle ``Truncate`` events (without it they are acknowledged)."""
        self._handlers[Truncate] = fn
        return fn

    # -- running --------------------------------------------------------------------------

    async def run(self, handlers: Mapping[type[Any], Handler] | None = None) -> None:
        """Consume until ``stop()``; raise ``GatewayRefused`` (or a ``ChangeDecodeError``
        under ``decode_errors="stop"``) when consuming cannot go on.

        ``handlers`` maps a model class (or ``Row``, or ``Truncate``) to its handler, in
        addition to those registered with ``handler`` / ``on_truncate``.
        """
        self._claim()
        merged = {**self._handlers, **(handlers or {})}
        if not merged:
            raise ConfigError(
                "run() has no handlers: pass handlers={Model: fn}, decorate functions with "
                "@consumer.handler(Model), or iterate with `async for` instead"
            )
        routes, models = routes_for(merged, self._models)
        await self._serve(routes, models, self._settings)

    def stop(self) -> None:
        """Stop gracefully: take no new change, let running handlers finish and acknowledge
        them, close the stream. Safe to call from a handler or a signal handler; ``run()``
        returns once it is done."""
        self._stopping = True
        self._wake.set()
        if self._sink is not None:
            self._sink.abandon()
        if self._session is not None:
            self._session.stop()

    async def __aenter__(self) -> Consumer:
        self._entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        if self._pump is not None:
            await self._pump

    def __aiter__(self) -> AsyncIterator[Change[Any] | Truncate]:
        """Events one at a time (inside ``async with consumer``); see ``iteration``."""
        if not self._entered:
            raise ConfigError(
                "iterate a Consumer inside `async with consumer:` so that leaving the loop "
                "closes its stream"
            )
        if self._sink is None:
            self._claim()
            self._sink = Sink()
            routes, models = routes_for(dict(self._handlers), self._models)
            handle = self._sink.handle
            routes = Routes(dict.fromkeys(models, handle), rows=handle, truncate=handle)
            settings = dataclasses.replace(self._settings, concurrency=1)
            self._pump = asyncio.create_task(self._pump_main(routes, models, settings))
        return Iterator(self._sink)

    async def _pump_main(
        self, routes: Routes, models: dict[tuple[str, str], ModelSpec], settings: SessionSettings
    ) -> None:
        assert self._sink is not None
        try:
            await self._serve(routes, models, settings)
        except Exception as exc:
            self._sink.end(exc)
        else:
            self._sink.end(None)

    def _claim(self) -> None:
        if self._started:
            raise ConfigError("this Consumer already ran; a Consumer runs once, create a new one")
        self._started = True

    async def _serve(
        self, routes: Routes, models: dict[tuple[str, str], ModelSpec], settings: SessionSettings
    ) -> None:
        decoder = ValueDecoder()
        resolver = TypeResolver(decoder, self._dsn) if self._dsn is not None else None
        builder = EventBuilder(decoder, models)
        attempt = 0
        try:
            while not self._stopping:
                delivered, problem = await self._session_once(routes, builder, resolver, settings)
                if problem is None:
                    return
                attempt = 0 if delivered else attempt + 1
                delay = self._backoff.delay(attempt)
                log.warning("%s; reconnecting in %.2fs", problem, delay)
                self.stats.reconnects += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            if resolver is not None:
                await resolver.close()

    async def _session_once(
        self,
        routes: Routes,
        builder: EventBuilder,
        resolver: TypeResolver | None,
        settings: SessionSettings,
    ) -> tuple[int, GatewayUnavailable | None]:
        """One stream: (changes it delivered, why it failed) or ``(n, None)`` after a stop."""
        channel = open_channel(self._target, self._tls, self._channel_options)
        session: Session | None = None
        try:
            stream = await self._unless_stopped(
                GatewayStream.open(
                    channel, target=self._target, uri=self._uri, parameters=self._parameters,
                    metadata=self._metadata, batched=self._batched,
                )
            )  # fmt: skip
            if stream is None:
                return 0, None
            session = Session(stream, settings, builder, resolver, routes, self.stats)
            self._session = session
            if self._stopping:
                session.stop()
            await session.run()
            return session.delivered, None
        except GatewayUnavailable as exc:
            return (session.delivered if session is not None else 0), exc
        finally:
            self._session = None
            await channel.close()

    async def _unless_stopped(self, opening: Coroutine[Any, Any, T]) -> T | None:
        """``opening``'s result, or ``None`` if ``stop()`` came first (a connection attempt
        to an unresponsive address would otherwise hold ``stop`` for its whole timeout)."""
        task = asyncio.ensure_future(opening)
        stopped = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, PgCaptureError):
            await task
        return None
