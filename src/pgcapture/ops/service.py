"""``capture`` as a service: the pipeline with its metrics, slot lag check and HTTP endpoint.

``serve_capture`` runs ``run_capture`` for one configured source, with every session's writer
wrapped in ``MeteredWriter``, a ``SlotLagMonitor`` on its own connection, and (when
``[metrics] listen`` is set) ``/metrics`` and ``/healthz``. Health is good while a session is
capturing; while reconnecting or after a fatal error it is 503 with the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pgcapture.capture.pipeline import LogWriter
from pgcapture.capture.reader import TextFallback
from pgcapture.capture.retry import run_capture
from pgcapture.config import Config, SourceConfig
from pgcapture.log.writer import StreamWriter
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.ops.metrics import CaptureMetrics, MeteredWriter, SlotLagMonitor


def health(
    status: ServiceStatus, metrics: CaptureMetrics, lag: SlotLagMonitor
) -> tuple[bool, dict[str, Any]]:
    detail: dict[str, Any] = {"slot_lag_bytes": lag.lag}
    if metrics.last_ack:
        detail["seconds_since_last_ack"] = round(time.monotonic() - metrics.last_ack, 3)
    return status.health(**detail)


async def serve_capture(config: Config, source: SourceConfig, stop: asyncio.Event) -> None:
    """Capture ``source`` until ``stop``; metrics and health on ``config.metrics.listen``."""
    metrics = CaptureMetrics(source.name)
    status = ServiceStatus()
    lag = SlotLagMonitor(
        source.dsn, source.slot_name, metrics,
        config.metrics.slot_lag_warn, config.metrics.slot_lag_interval,
    )  # fmt: skip
    server = OpsServer(metrics.registry, lambda: health(status, metrics, lag))
    if config.metrics.listen:
        await server.start(config.metrics.listen)

    def wrap(writer: StreamWriter) -> LogWriter:
        metrics.labels(metrics.sessions).inc()
        return MeteredWriter(writer, metrics)

    def on_error(exc: BaseException) -> None:
        metrics.errors.labels(source.name, type(exc).__name__).inc()

    def on_text_fallback(fallback: TextFallback) -> None:
        metrics.text_fallbacks.labels(source.name, fallback.type_name).inc()

    monitor = asyncio.ensure_future(lag.run())
    try:
        await run_capture(
            source, config.nats, stop, wrap=wrap, status=status, on_error=on_error,
            on_text_fallback=on_text_fallback,
        )  # fmt: skip
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        await server.close()
