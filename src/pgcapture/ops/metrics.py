"""Prometheus metrics of ``capture``, added around the core, never inside it (STYLE.md rule 6).

``CaptureMetrics`` owns a registry of its own (so several can live in one process) with:

* ``pgcapture_capture_records_total``, ``..._messages_total``, ``..._bytes_total``: records,
  JetStream messages and payload bytes acknowledged (per second: ``rate()`` of these);
* ``pgcapture_capture_publish_seconds``: publish-to-acknowledgement latency of each message;
* ``pgcapture_capture_in_flight_messages`` / ``..._in_flight_bytes``: unacknowledged publishes;
* ``pgcapture_capture_slot_lag_bytes``: ``pg_current_wal_lsn() - confirmed_flush_lsn``;
* ``pgcapture_capture_last_commit_timestamp_seconds``: commit time of the last stored commit;
* ``pgcapture_capture_sessions_total`` / ``..._errors_total``: sessions started, and ended by
  an error (by error class), i.e. reconnects;
* ``pgcapture_capture_text_fallbacks_total``: transactions read again with text values because
  a value's type has no binary send function (by type, e.g. ``aclitem``).

``MeteredWriter`` wraps a writer and counts what passes through it; ``SlotLagMonitor`` polls
the slot's lag on its own connection and logs a warning while it is above a threshold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pgcapture.log.batch import Batch
from pgcapture.proto import pb

log = logging.getLogger("pgcapture.capture")
_PG_EPOCH: float = 946_684_800.0  # 2000-01-01 in Unix seconds
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class CaptureMetrics:
    """The metrics of one source's capture."""

    def __init__(self, source: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["source"]
        r = self.registry
        ns = "pgcapture_capture"
        self.records = Counter(f"{ns}_records", "Records stored", labels, registry=r)
        self.messages = Counter(f"{ns}_messages", "JetStream messages stored", labels, registry=r)
        self.bytes = Counter(f"{ns}_bytes", "Payload bytes stored", labels, registry=r)
        self.latency = Histogram(
            f"{ns}_publish_seconds", "Publish to acknowledgement", labels,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(f"{ns}_in_flight_messages", "Unacked messages", labels, registry=r)
        self.in_flight_bytes = Gauge(f"{ns}_in_flight_bytes", "Unacked bytes", labels, registry=r)
        self.slot_lag = Gauge(f"{ns}_slot_lag_bytes", "WAL not yet confirmed", labels, registry=r)
        self.last_commit = Gauge(
            f"{ns}_last_commit_timestamp_seconds", "Commit time of the last stored commit",
            labels, registry=r,
        )  # fmt: skip
        self.sessions = Counter(f"{ns}_sessions", "Sessions started", labels, registry=r)
        self.errors = Counter(
            f"{ns}_errors", "Sessions ended by an error", [*labels, "error"], registry=r
        )
        self.text_fallbacks = Counter(
            f"{ns}_text_fallbacks", "Transactions read with text values", [*labels, "type"],
            registry=r,
        )  # fmt: skip
        self.source = source
        self.last_ack = 0.0  # monotonic time of the last acknowledgement

    def labels(self, metric: Any) -> Any:
        return metric.labels(self.source)


def commit_time(message: bytes) -> float:
    """Unix time of a wire Begin or Commit message."""
    msg = pb.Message.FromString(message)
    micros = msg.begin.commit_time if msg.HasField("begin") else msg.commit.commit_time
    return _PG_EPOCH + micros / 1e6


class MeteredWriter:
    """A writer that updates ``CaptureMetrics`` on every publish and acknowledgement."""

    def __init__(self, inner: Any, metrics: CaptureMetrics) -> None:
        self._inner = inner
        self._m = metrics
        self._sent: dict[int, float] = {}
        m = metrics
        self._records, self._messages = m.labels(m.records), m.labels(m.messages)
        self._bytes, self._latency = m.labels(m.bytes), m.labels(m.latency)
        self._in_flight, self._in_flight_bytes = m.labels(m.in_flight), m.labels(m.in_flight_bytes)
        self._last_commit = m.labels(m.last_commit)

    @property
    def in_flight(self) -> int:
        return int(self._inner.in_flight)

    async def publish(self, batch: Batch) -> None:
        await self._inner.publish(batch)
        self._sent[id(batch)] = time.monotonic()
        self._gauges()

    async def acked(self) -> Batch:
        batch: Batch = await self._inner.acked()
        now = time.monotonic()
        sent = self._sent.pop(id(batch), now)
        self._latency.observe(now - sent)
        self._records.inc(batch.count)
        self._messages.inc()
        self._bytes.inc(len(batch))
        if batch.last_commit:
            self._last_commit.set(commit_time(batch.last_commit))
        self._m.last_ack = now
        self._gauges()
        return batch

    async def drained(self) -> None:
        await self._inner.drained()

    def _gauges(self) -> None:
        self._in_flight.set(self._inner.in_flight)
        self._in_flight_bytes.set(self._inner.in_flight_bytes)


class SlotLagMonitor:
    """Polls ``pg_current_wal_lsn() - confirmed_flush_lsn`` of one slot."""

    def __init__(
        self, dsn: str, slot: str, metrics: CaptureMetrics, warn_bytes: int, interval: float
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.metrics = metrics
        self.warn_bytes = warn_bytes
        self.interval = interval
        self.lag: int | None = None
        self._warned_at = 0.0

    async def run(self) -> None:
        """Forever: a failed poll is logged at debug level and retried next interval."""
        while True:
            try:
                await self._poll()
            except psycopg.Error as exc:
                log.debug("slot lag poll failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def _poll(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=5
        ) as conn:
            cur = await conn.execute(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
                "FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            )
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return
        self.observe(int(row[0]))

    def observe(self, lag: int) -> None:
        self.lag = lag
        self.metrics.labels(self.metrics.slot_lag).set(lag)
        now = time.monotonic()
        if self.warn_bytes and lag > self.warn_bytes and now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "slot %s lags %d bytes behind the WAL (threshold %d): capture is behind or "
                "stopped; the server keeps that WAL until it catches up",
                self.slot, lag, self.warn_bytes,
                extra={"slot": self.slot, "lag_bytes": lag, "threshold": self.warn_bytes},
            )  # fmt: skip
        elif lag <= self.warn_bytes:
            self._warned_at = 0.0
