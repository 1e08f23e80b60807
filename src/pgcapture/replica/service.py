"""``replicate`` as a service: sessions that apply a source's stream to one replica database.

A session connects to the replica (``session_replication_role = replica``, so ordinary triggers,
foreign-key checks and event triggers stay quiet as for PostgreSQL's own apply worker;
``synchronous_commit = off``, safe because the position commits with the data: a replica crash
loses both together and they are applied again), takes the replica's single-writer lock (waiting
while another replicate holds it, as after a crash until its server process ends), reads
its position, locates it in the stream and applies from there. A transient failure (a
connection, a deadlock) ends the session and a new one resumes from the committed position
after a backoff; anything that needs a person (a missing table, a DDL statement that cannot be
replayed, a change that cannot be located) stops replicate with the message saying what to do.

Metrics (``[metrics] listen``): transactions, changes and commits applied, the position, the
source commit time of the last applied transaction, and the lag behind the stream in bytes of
WAL and in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
import psycopg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

from pgcapture.backoff import Backoff
from pgcapture.capture.retry import is_transient
from pgcapture.config import Config, SourceConfig
from pgcapture.errors import ConfigError, ConnectionLost, PermissionDenied
from pgcapture.log.client import connect_nats
from pgcapture.log.follow import Follower, StreamMissing, locate
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.ops.http import OpsServer, ServiceStatus
from pgcapture.replica.apply import Applied, Applier, ApplySettings, source_time
from pgcapture.replica.catalog import parse_table_arg
from pgcapture.replica.pipeline import ApplyFailed, Pipeline
from pgcapture.replica.store import (
    Position,
    ensure_schema,
    read_position,
    set_position,
    take_lock,
)

log = logging.getLogger("pgcapture.replicate")
_TRANSIENT_SQLSTATES = ("40001", "40P01", "55P03", "57014", "53")


class ReplicaMetrics:
    """The metrics of one replica's apply loop (a registry of its own)."""

    def __init__(self, source: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ns, labels = "pgcapture_replica", ["source"]
        self.transactions = Counter(
            f"{ns}_transactions", "Source transactions applied", labels, registry=r
        )
        self.changes = Counter(
            f"{ns}_changes", "Changes applied (rows, DDL, truncates)", labels, registry=r
        )
        self.commits = Counter(
            f"{ns}_commits", "Replica transactions committed", labels, registry=r
        )
        self.position = Gauge(
            f"{ns}_applied_lsn", "Commit LSN of the last applied transaction", labels, registry=r
        )
        self.last_commit = Gauge(
            f"{ns}_last_commit_timestamp_seconds",
            "Source commit time of the last applied transaction",
            labels,
            registry=r,
        )
        self.lag_bytes = Gauge(
            f"{ns}_lag_bytes", "WAL between the stream's end and the position", labels, registry=r
        )
        self.lag_seconds = Gauge(
            f"{ns}_lag_seconds",
            "Age of the last applied commit while the stream holds more",
            labels,
            registry=r,
        )
        self.sessions = Counter(f"{ns}_sessions", "Sessions started", labels, registry=r)
        self.errors = Counter(
            f"{ns}_errors", "Sessions ended by an error", [*labels, "error"], registry=r
        )
        self.source = source
        self.applied = 0
        self.applied_time = 0.0  # Unix time of the last applied commit

    def committed(self, applied: Applied) -> None:
        s = self.source
        self.transactions.labels(s).inc(applied.transactions)
        self.changes.labels(s).inc(applied.changes)
        self.commits.labels(s).inc()
        self.position.labels(s).set(applied.lsn)
        self.applied = applied.lsn
        if applied.commit_time:
            self.applied_time = source_time(applied.commit_time).timestamp()
            self.last_commit.labels(s).set(self.applied_time)

    def stream_end(self, lsn: int) -> None:
        behind = max(0, lsn - self.applied)
        self.lag_bytes.labels(self.source).set(behind)
        lag = time.time() - self.applied_time if behind and self.applied_time else 0.0
        self.lag_seconds.labels(self.source).set(max(0.0, lag))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StreamMissing):
        return True  # capture creates it; wait for it
    if isinstance(exc, ApplyFailed):
        return exc.sqlstate is not None and exc.sqlstate.startswith(_TRANSIENT_SQLSTATES)
    return is_transient(exc)


async def replicate(
    config: Config,
    source: SourceConfig,
    replica_dsn: str,
    stop: asyncio.Event,
    settings: ApplySettings | None = None,
    from_start: bool = False,
    metrics: ReplicaMetrics | None = None,
    status: ServiceStatus | None = None,
) -> None:
    """Apply ``source``'s stream to the replica until ``stop``; restart after transient errors."""
    settings = settings or ApplySettings()
    metrics = metrics or ReplicaMetrics(source.name)
    status = status or ServiceStatus()
    backoff, attempt = Backoff(maximum=10.0), 0
    while not stop.is_set():
        session = _Session(config, source, replica_dsn, settings, metrics, status)
        status.sessions += 1
        metrics.sessions.labels(source.name).inc()
        try:
            await session.run(stop, from_start)
        except Exception as exc:
            if not _transient(exc):
                status.set("failed", exc)
                raise
            status.set("retrying", exc)
            metrics.errors.labels(source.name, type(exc).__name__).inc()
            attempt = 0 if session.progressed else attempt + 1
            delay = backoff.delay(attempt)
            log.warning(
                "replication of %s interrupted: %s; resuming in %.1fs", source.name,
                str(exc) or repr(exc), delay,
                extra={"source": source.name, "error": type(exc).__name__},
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
    status.set("stopped")


class _Session:
    def __init__(
        self,
        config: Config,
        source: SourceConfig,
        replica_dsn: str,
        settings: ApplySettings,
        metrics: ReplicaMetrics,
        status: ServiceStatus,
    ) -> None:
        self.config = config
        self.source = source
        self.dsn = replica_dsn
        self.settings = settings
        self.metrics = metrics
        self.status = status
        self.progressed = False

    async def run(self, stop: asyncio.Event, from_start: bool) -> None:
        lost = asyncio.Event()
        nc = await connect_nats(self.config.nats, on_lost=lost.set)
        conn: psycopg.AsyncConnection[Any] | None = None
        follower: Follower | None = None
        monitor: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            conn = await _connect(self.dsn)
            search_path = await _prepare_session(conn)
            if not await take_lock(conn, stop, self.source.replica.lock_wait):
                return  # stopped while another replicate held the lock
            position = await self._position(conn, from_start)
            self.metrics.applied = position.lsn
            if position.commit_time is not None:
                self.metrics.applied_time = position.commit_time.timestamp()
            start = await locate(js, self.source.stream_name, position.lsn, position.stream_seq)
            follower = Follower(js, self.source.stream_name, self.source.subject, start)
            follower.start()
            monitor = asyncio.create_task(
                self._watch_lag(js, self.config.metrics.slot_lag_interval)
            )
            pipe = Pipeline(conn)
            pipe.open()

            def committed(applied: Applied) -> None:
                self.progressed = True
                self.metrics.committed(applied)

            applier = Applier(pipe, position, self.settings, committed, search_path)
            self.status.set("running")
            log.info(
                "replicating %s from %s (stream message %d)", self.source.name, position.lsn,
                start, extra={"source": self.source.name},
            )  # fmt: skip
            while not stop.is_set():
                if lost.is_set():
                    raise ConnectionLost("lost the NATS connection")
                batch = await follower.get(0.05 if applier.pending else 0.5)
                if batch is None:
                    await applier.idle()
                    continue
                await applier.apply(batch, more=follower.ready() > 0)
            await applier.idle()
        finally:
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            if follower is not None:
                await follower.close()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            with contextlib.suppress(Exception):
                await nc.close()

    async def _position(self, conn: psycopg.AsyncConnection[Any], from_start: bool) -> Position:
        await ensure_schema(conn)
        position = await read_position(conn, self.source.name)
        if position is not None:
            return position
        if from_start:
            return await set_position(conn, self.source.name, 0, "the start of the stream")
        raise ConfigError(
            f"the replica has no position for source {self.source.name!r} yet, so replicate "
            "does not know which changes it already holds. Bootstrap it first: `pgcapture "
            "bootstrap --from snapshot` (an empty database) or `--from physical` (a promoted "
            "physical copy of the source); or, for an empty replica of a source captured from "
            "its very beginning, start with --from-start"
        )

    async def _watch_lag(self, js: JetStreamContext, interval: float = 5.0) -> None:
        while True:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                tail = await read_tail(js, self.source.stream_name)
                if tail.checkpoint is not None:
                    self.metrics.stream_end(tail.checkpoint.lsn)
            await asyncio.sleep(interval)


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="pgcapture replicate"
        )
    except psycopg.OperationalError as exc:
        raise ConnectionLost(f"cannot connect to the replica: {str(exc).strip()}") from exc


async def _prepare_session(conn: psycopg.AsyncConnection[Any]) -> str:
    """Session settings of the apply connection; returns its default search_path."""
    try:
        await conn.execute("SET session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        role = conn.info.parameter_status("session_authorization") or "the replicate role"
        raise PermissionDenied(
            f"role {role!r} may not set session_replication_role on the replica, which keeps "
            "triggers and foreign-key checks from firing twice; connect as a superuser, or "
            f"GRANT SET ON PARAMETER session_replication_role TO {role} (PostgreSQL 15+)"
        ) from None
    await conn.execute("SET synchronous_commit = off")
    cur = await conn.execute("SHOW search_path")
    row = await cur.fetchone()
    return str(row[0]) if row else "public"


def _tables(names: list[str], where: str) -> frozenset[tuple[str, str]]:
    try:
        return frozenset(parse_table_arg(name) for name in names)
    except ValueError as exc:
        raise ConfigError(
            f"{where} (--create-missing): {exc}; write SCHEMA.TABLE, e.g. public.orders, with "
            'double quotes around a name that holds a dot or quote, e.g. "my.schema".orders'
        ) from None


def health(status: ServiceStatus, metrics: ReplicaMetrics) -> tuple[bool, dict[str, Any]]:
    return status.health(applied_lsn=str(LSN(metrics.applied)))


async def serve_replicate(
    config: Config, source: SourceConfig, stop: asyncio.Event, from_start: bool = False
) -> None:
    """``replicate`` for ``source`` into ``[sources.NAME.replica] dsn``, with its metrics and
    health on ``config.metrics.listen``."""
    rep = source.replica
    settings = ApplySettings(
        rep.max_changes, rep.max_delay, rep.queue_rows, frozenset(rep.skip_ddl),
        _tables(rep.create_missing, f"[sources.{source.name}.replica] create_missing"),
    )  # fmt: skip
    metrics = ReplicaMetrics(source.name)
    status = ServiceStatus()
    server = OpsServer(metrics.registry, lambda: health(status, metrics))
    if config.metrics.listen:
        await server.start(config.metrics.listen)
    try:
        await replicate(config, source, rep.dsn, stop, settings, from_start, metrics, status)
    finally:
        await server.close()
