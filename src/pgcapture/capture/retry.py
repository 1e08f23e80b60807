"""Capture as a service: sessions restarted after transient failures.

``run_capture`` runs ``CaptureSession``s one after another until stopped. A session that ends
with a transient failure (a connection, an unacknowledged or refused publish, the slot still held
by the walsender of a dead session) is followed by a new one after an exponential backoff with
jitter, reset by a session that made progress; a permanent failure (configuration, a permission,
another capture holding the lease) ends ``run_capture`` with the error that says what to fix.
Resuming is exact because the stream's tail, not memory, says what is stored.

On stop, a session gets ``STOP_GRACE`` seconds to publish what it holds and release its lease;
one that is still busy then (connecting, or waiting for the slot to be free) is cancelled, which
loses nothing for the same reason: a process asked to stop always stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
import psycopg

from pgcapture.backoff import Backoff
from pgcapture.capture.pipeline import CaptureSession, WriterWrapper
from pgcapture.capture.reader import TextFallback
from pgcapture.config import NatsConfig, SourceConfig
from pgcapture.errors import ConnectionLost, PgCaptureError, SlotInUse, SourceError
from pgcapture.log.lease import new_owner_id
from pgcapture.ops.http import ServiceStatus

log = logging.getLogger("pgcapture.capture")
STOP_GRACE = 10.0  # seconds a session may take to finish after stop is set


async def run_capture(
    source: SourceConfig,
    nats_cfg: NatsConfig,
    stop: asyncio.Event,
    wrap: WriterWrapper | None = None,
    status: ServiceStatus | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_text_fallback: Callable[[TextFallback], None] | None = None,
) -> None:
    """Capture ``source`` until ``stop`` is set, reconnecting after transient failures;
    ``on_text_fallback`` hears of each transaction read with text values (``SlotReader``)."""
    status = status or ServiceStatus()
    owner = new_owner_id()
    backoff, attempt = Backoff(maximum=10.0), 0
    while not stop.is_set():
        session = CaptureSession(source, nats_cfg, owner, wrap, status, on_text_fallback)
        status.sessions += 1
        status.set("connecting")
        try:
            await _until_stopped(session, stop, source.name)
        except BaseException as raised:
            exc = _unwrap(raised)
            if not is_transient(exc):
                status.set("failed", exc)
                raise _explain_permanent(exc) from None
            status.set("retrying", exc)
            if on_error is not None:
                on_error(exc)
            attempt = 0 if session.acked_batches > 0 else attempt + 1
            delay = backoff.delay(attempt)
            log.warning(
                "capture of %s interrupted: %s; reconnecting in %.1fs", source.name, exc, delay,
                extra={"source": source.name, "error": type(exc).__name__},
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
    status.set("stopped")


async def _until_stopped(session: CaptureSession, stop: asyncio.Event, name: str) -> None:
    """Run ``session``; once ``stop`` is set, give it ``STOP_GRACE`` seconds, then cancel it."""
    task = asyncio.ensure_future(session.run(stop))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=STOP_GRACE)
        if not task.done():
            log.warning(
                "capture of %s did not finish within %gs of the stop; cancelled (nothing is "
                "lost: the next start resumes from the stream's tail)", name, STOP_GRACE,
                extra={"source": name},
            )  # fmt: skip
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if task.cancelled():
                return
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
    task.result()


def _unwrap(exc: BaseException) -> BaseException:
    """The one error that explains a failed task group: a permanent one before others."""
    while isinstance(exc, BaseExceptionGroup):
        errors = [_unwrap(e) for e in exc.exceptions]
        permanent = [e for e in errors if not is_transient(e)]
        exc = (permanent or errors)[0]
    return exc


def is_transient(exc: BaseException) -> bool:
    """Whether a new session may succeed where this one failed."""
    if isinstance(exc, ConnectionLost | SlotInUse):
        return True
    if isinstance(exc, PgCaptureError | asyncio.CancelledError):
        return False
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code in (None, 408, 500, 503) or isinstance(
            exc, nats.js.errors.ServiceUnavailableError
        )
    if isinstance(exc, psycopg.OperationalError):
        return not _permanent_pg_error(exc)
    return isinstance(exc, nats.errors.Error | OSError | TimeoutError)


def _explain_permanent(exc: BaseException) -> BaseException:
    """A permanent connection failure as the error that says what to fix."""
    if isinstance(exc, psycopg.OperationalError):
        return SourceError(
            f"cannot connect to the source database: {str(exc).strip()}; check the source's dsn "
            "(host, port, dbname, user) and the server's pg_hba.conf"
        )
    return exc


def _permanent_pg_error(exc: psycopg.OperationalError) -> bool:
    text = str(exc)
    return any(
        marker in text
        for marker in ("password authentication failed", "does not exist", "no pg_hba.conf")
    )
