"""What ``pgcapture status`` reports: each part of a deployment, looked at once, read-only.

``collect`` looks at every selected source's slot (``pg_replication_slots`` and the server's WAL
position, read in a read-only transaction: catalog queries only, never a user table), its
JetStream stream, the durable consumer of each of its URIs, its replica's position
(``pgcapture.sources``), and the dumps the controller has in progress. The parts are looked at
concurrently, each within the timeout; a part that cannot be reached is ``unreachable`` with the
reason in one line, and the others are still reported.

Health (``Report.healthy``): every part reachable and none ``unhealthy``. Unhealthy is a
missing slot, a slot of another database or plugin, an inactive slot lagging more than
``[metrics] slot_lag_warn``, a slot whose WAL is ``unreserved`` or ``lost``, a missing stream
or one whose last message was not written by capture, and a replica without a position. A
missing consumer is not: the gateway creates it when the URI is first used.

Lag in time: WAL carries no clock, so a slot's lag is given in bytes only. The stream gives the
source commit time of its newest stored transaction and its age; while the slot lags, capture is
at most that far behind (on an idle source the age is just the time since the last write). A
replica's ``lag_seconds`` is the source time between the newest stored commit and the newest
applied one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import nats.errors
import nats.js.errors
import psycopg
from nats.js import JetStreamContext
from psycopg.rows import dict_row

from pgcapture.checkpoint import Checkpoint
from pgcapture.config import Config, SourceConfig, UriConfig
from pgcapture.errors import PgCaptureError, SourceError
from pgcapture.log.batch import Fragment, decode_payload
from pgcapture.log.client import connect_nats
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.ops.metrics import commit_time
from pgcapture.proto import pb
from pgcapture.replica.store import read_position

OK: Final = "ok"
UNHEALTHY: Final = "unhealthy"
UNREACHABLE: Final = "unreachable"
_STREAM_NOT_FOUND: Final = 10059  # JetStream API error code
_FAILURES: Final = (psycopg.Error, nats.errors.Error, OSError, PgCaptureError)
# One row whatever the slot: the server's WAL position (replayed on a standby, where
# pg_current_wal_lsn() is refused), joined with the slot when it exists.
_SLOT_SQL: Final = """
SELECT w.lsn::text AS current_lsn, s.slot_name IS NOT NULL AS exists, s.plugin, s.database,
       current_database() AS here, s.active, s.active_pid,
       s.confirmed_flush_lsn::text AS confirmed, (w.lsn - s.confirmed_flush_lsn)::bigint AS lag,
       s.wal_status, s.safe_wal_size
  FROM (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                    ELSE pg_current_wal_lsn() END AS lsn) w
  LEFT JOIN pg_replication_slots s ON s.slot_name = %s
"""

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A source's replication slot. ``lag_bytes``: WAL written since ``confirmed_flush_lsn``;
    ``safe_wal_size``: bytes before max_slot_wal_keep_size drops the slot's WAL (None: no
    limit)."""

    name: str
    state: str = OK
    reason: str | None = None
    exists: bool | None = None
    active: bool | None = None
    active_pid: int | None = None
    confirmed_flush_lsn: LSN | None = None
    current_wal_lsn: LSN | None = None
    lag_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """A source's stream: its size, sequences, last stored checkpoint and newest commit."""

    name: str
    state: str = OK
    reason: str | None = None
    exists: bool | None = None
    messages: int | None = None
    bytes: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_commit_time: datetime | None = None
    last_commit_age_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    name: str
    slot: SlotStatus
    stream: StreamStatus


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    """The durable consumer of one URI. Sequences are stream sequences."""

    uri: str
    source: str
    stream: str
    consumer: str
    state: str = OK
    reason: str | None = None
    exists: bool | None = None
    num_pending: int | None = None
    num_ack_pending: int | None = None
    num_redelivered: int | None = None
    ack_floor_seq: int | None = None
    delivered_seq: int | None = None


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A source's replica position; lags are measured against the stream's last checkpoint."""

    source: str
    state: str = OK
    reason: str | None = None
    lsn: LSN | None = None
    stream_seq: int | None = None
    origin: str | None = None
    commit_time: datetime | None = None
    apply_time: datetime | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DumpsStatus:
    """The controller's unfinished dumps; ``controller`` is None when none is configured."""

    controller: str | None
    state: str = OK
    reason: str | None = None
    dumps: tuple[pb.DumpStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    collected_at: datetime
    sources: tuple[SourceStatus, ...]
    uris: tuple[ConsumerStatus, ...]
    replicas: tuple[ReplicaStatus, ...]
    dumps: DumpsStatus

    def parts(self) -> list[tuple[str, str, str | None]]:
        """(what, state, reason) of every part, e.g. ("source app slot", "ok", None)."""
        out: list[tuple[str, str, str | None]] = []
        for s in self.sources:
            out.append((f"source {s.name} slot", s.slot.state, s.slot.reason))
            out.append((f"source {s.name} stream", s.stream.state, s.stream.reason))
        out.extend((f"uri {u.uri}", u.state, u.reason) for u in self.uris)
        out.extend((f"replica of {r.source}", r.state, r.reason) for r in self.replicas)
        out.append(("dumps", self.dumps.state, self.dumps.reason))
        return out

    @property
    def healthy(self) -> bool:
        return all(state == OK for _, state, _ in self.parts())


class DumpLister(Protocol):
    """Where the unfinished dumps come from (the controller), and its address for the report."""

    @property
    def address(self) -> str: ...

    async def unfinished(self) -> Sequence[pb.DumpStatus]: ...


async def collect(
    config: Config, names: Sequence[str], within: float, dumps: DumpLister | None
) -> Report:
    """Every part of sources ``names``, each within ``within`` seconds, with the URIs of those
    sources and the dumps of those URIs (every dump when ``names`` are all the sources)."""
    now = datetime.now(UTC)
    sources = [config.source(name, need_dsn=False) for name in names]
    uris = [u for u in config.gateway.uris.values() if u.source in names]
    dump_uris = {u.name for u in uris} if set(names) != set(config.sources) else None
    lag_limit = config.metrics.slot_lag_warn
    slots, replicas, (streams, consumers), dump_status = await asyncio.gather(
        asyncio.gather(*(_slot(s, lag_limit, within) for s in sources)),
        asyncio.gather(*(_replica(s, within) for s in sources if s.replica.dsn)),
        _nats_parts(config, sources, uris, within, now),
        _dumps(dumps, dump_uris, within),
    )
    stream_of = {s.name: stream for s, stream in zip(sources, streams, strict=True)}
    return Report(
        collected_at=now,
        sources=tuple(
            SourceStatus(s.name, slot, stream_of[s.name])
            for s, slot in zip(sources, slots, strict=True)
        ),
        uris=tuple(consumers),
        replicas=tuple(_with_lag(r, stream_of[r.source]) for r in replicas),
        dumps=dump_status,
    )


async def _guarded(work: Awaitable[T], within: float, unreachable: Callable[[str], U]) -> T | U:
    """``work``'s result, or ``unreachable(reason)`` when it fails to reach its server."""
    try:
        async with asyncio.timeout(within):
            return await work
    except TimeoutError:
        return unreachable(f"no answer within {within:g}s (--timeout)")
    except _FAILURES as exc:
        return unreachable(_one_line(exc))


def _unreachable(make: Callable[..., T], *ident: Any) -> Callable[[str], T]:
    """``make(*ident, UNREACHABLE, reason)``: a part that could not be looked at."""
    return partial(make, *ident, UNREACHABLE)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _connect(dsn: str, within: float) -> psycopg.AsyncConnection[Any]:
    """A connection whose transactions are read-only."""
    conn = await psycopg.AsyncConnection.connect(
        dsn,
        connect_timeout=max(2, math.ceil(within)),
        application_name="pgcapture status",
    )
    await conn.set_read_only(True)
    return conn


async def _slot(source: SourceConfig, lag_limit: int, within: float) -> SlotStatus:
    name = source.slot_name
    if not source.dsn:
        reason = f"sources.{source.name}.dsn is not set; set it to see the slot"
        return SlotStatus(name, UNREACHABLE, reason)

    async def read() -> SlotStatus:
        async with await _connect(source.dsn, within) as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = await (await cur.execute(_SLOT_SQL, (name,))).fetchone()
        assert row is not None
        return _slot_status(source, row, lag_limit)

    return await _guarded(read(), within, _unreachable(SlotStatus, name))


def _slot_status(source: SourceConfig, row: dict[str, Any], lag_limit: int) -> SlotStatus:
    """The slot as ``_SLOT_SQL`` found it, judged."""
    name = source.slot_name
    current = LSN.parse(row["current_lsn"]) if row["current_lsn"] else None
    if not row["exists"]:
        return SlotStatus(
            name, UNHEALTHY, f"slot {name!r} does not exist; `pgcapture capture --source "
            f"{source.name}` creates it", exists=False, current_wal_lsn=current,
        )  # fmt: skip
    problems = _slot_problems(source, row, lag_limit)
    return SlotStatus(
        name,
        UNHEALTHY if problems else OK,
        "; ".join(problems) or None,
        exists=True,
        active=row["active"],
        active_pid=row["active_pid"],
        confirmed_flush_lsn=LSN.parse(row["confirmed"]) if row["confirmed"] else None,
        current_wal_lsn=current,
        lag_bytes=row["lag"],
        wal_status=row["wal_status"],
        safe_wal_size=row["safe_wal_size"],
    )


def _slot_problems(source: SourceConfig, row: dict[str, Any], lag_limit: int) -> list[str]:
    if row["plugin"] != "pgoutput" or row["database"] != row["here"]:
        return [
            f"slot {source.slot_name!r} is a {row['plugin'] or 'physical'} slot of database "
            f"{row['database']!r}; capture needs a pgoutput slot of {row['here']!r}: set "
            f"sources.{source.name}.slot to another name"
        ]
    problems = []
    if row["wal_status"] == "lost":
        problems.append(
            "the server removed WAL the slot still needed, so it can no longer be read: drop "
            "it and start again from a new snapshot (`pgcapture bootstrap`)"
        )
    elif row["wal_status"] == "unreserved":
        problems.append(
            "the slot's WAL is past max_slot_wal_keep_size and goes at the next checkpoint "
            "unless capture catches up"
        )
    lag = row["lag"]
    if not row["active"] and lag is not None and lag > lag_limit:
        problems.append(
            f"inactive and {lag} bytes behind the WAL (more than metrics.slot_lag_warn, "
            f"{lag_limit}); start `pgcapture capture --source {source.name}`"
        )
    return problems


async def _nats_parts(
    config: Config,
    sources: Sequence[SourceConfig],
    uris: Sequence[UriConfig],
    within: float,
    now: datetime,
) -> tuple[list[StreamStatus], list[ConsumerStatus]]:
    """The streams and URI consumers, over one connection."""
    stream_of = {s.name: s.stream_name for s in sources}
    idents = [(u.name, u.source, stream_of[u.source], u.consumer_name) for u in uris]
    nats_config = config.nats.model_copy(update={"connect_timeout": within})
    nc = await _guarded(connect_nats(nats_config), within, str)
    if isinstance(nc, str):
        return (
            [StreamStatus(s.stream_name, UNREACHABLE, nc) for s in sources],
            [ConsumerStatus(*ident, UNREACHABLE, nc) for ident in idents],
        )
    try:
        js = nc.jetstream(timeout=within)
        stream_looks = [
            _guarded(_stream(js, s, now), within, _unreachable(StreamStatus, s.stream_name))
            for s in sources
        ]
        consumer_looks = [
            _guarded(_consumer(js, ident), within, _unreachable(ConsumerStatus, *ident))
            for ident in idents
        ]
        streams, consumers = await asyncio.gather(
            asyncio.gather(*stream_looks), asyncio.gather(*consumer_looks)
        )
        return list(streams), list(consumers)
    finally:
        await nc.close()


async def _stream(js: JetStreamContext, source: SourceConfig, now: datetime) -> StreamStatus:
    name = source.stream_name
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return StreamStatus(
            name, UNHEALTHY, f"stream {name!r} does not exist; `pgcapture capture --source "
            f"{source.name}` creates it", exists=False,
        )  # fmt: skip
    state = info.state
    status = StreamStatus(
        name,
        exists=True,
        messages=state.messages,
        bytes=state.bytes,
        first_seq=state.first_seq,
        last_seq=state.last_seq,
    )
    try:
        tail = await read_tail(js, name)
    except SourceError as exc:
        return dataclasses.replace(status, state=UNHEALTHY, reason=_one_line(exc))
    stamp = await _last_commit_time(js, name, tail.seq) if tail.checkpoint else None
    age = round((now - stamp).total_seconds(), 3) if stamp else None
    return dataclasses.replace(
        status,
        last_seq=tail.seq,
        last_checkpoint=tail.checkpoint,
        last_commit_time=stamp,
        last_commit_age_seconds=age,
    )


async def _last_commit_time(js: JetStreamContext, stream: str, seq: int) -> datetime | None:
    """The source commit time of the last Begin or Commit in message ``seq`` (None when the
    message holds neither: the middle of a large transaction, or a fragment of a large change)."""
    try:
        msg = await js.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None  # removed by the retention limits meanwhile
    records = decode_payload(msg.data or b"")
    if isinstance(records, Fragment):
        return None  # a part of a large change
    for record in reversed(records):
        if pb.Message.FromString(record.message).WhichOneof("type") in ("begin", "commit"):
            return datetime.fromtimestamp(commit_time(record.message), UTC)
    return None


async def _consumer(js: JetStreamContext, ident: tuple[str, str, str, str]) -> ConsumerStatus:
    """The consumer of ``ident``: (uri, source, stream, consumer)."""
    stream, name = ident[2:]
    try:
        info = await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError as exc:
        why = (
            f"stream {stream!r} does not exist yet"
            if exc.err_code == _STREAM_NOT_FOUND
            else "not created yet: the gateway creates it when a client of this URI connects"
        )
        return ConsumerStatus(*ident, OK, why, exists=False)
    return ConsumerStatus(
        *ident,
        exists=True,
        num_pending=info.num_pending,
        num_ack_pending=info.num_ack_pending,
        num_redelivered=info.num_redelivered,
        ack_floor_seq=info.ack_floor.stream_seq if info.ack_floor else 0,
        delivered_seq=info.delivered.stream_seq if info.delivered else 0,
    )


async def _replica(source: SourceConfig, within: float) -> ReplicaStatus:
    return await _guarded(
        _position(source, within), within, _unreachable(ReplicaStatus, source.name)
    )


async def _position(source: SourceConfig, within: float) -> ReplicaStatus:
    name = source.name
    try:
        async with await _connect(source.replica.dsn, within) as conn:
            position = await read_position(conn, name)
            cur = await conn.execute(
                "SELECT apply_time FROM pgcapture.sources WHERE id = %s", (name,)
            )
            row = await cur.fetchone()
    except psycopg.errors.UndefinedTable:
        position = None
    if position is None:
        return ReplicaStatus(
            name, UNHEALTHY, f"the replica has no position for source {name!r}: bootstrap it "
            "(`pgcapture bootstrap`), or for a source captured from its beginning start "
            "`pgcapture replicate --from-start`",
        )  # fmt: skip
    return ReplicaStatus(
        name,
        lsn=position.lsn,
        stream_seq=position.stream_seq,
        origin=position.origin,
        commit_time=position.commit_time,
        apply_time=row[0] if row else None,
    )


def _with_lag(replica: ReplicaStatus, stream: StreamStatus) -> ReplicaStatus:
    """``replica`` with its lag behind the stream's last checkpoint, when both are known."""
    end = stream.last_checkpoint
    if replica.lsn is None or end is None:
        return replica
    lag = max(end.lsn - replica.lsn, 0)
    seconds: float | None = None
    if lag == 0:
        seconds = 0.0
    elif replica.commit_time is not None and stream.last_commit_time is not None:
        seconds = max((stream.last_commit_time - replica.commit_time).total_seconds(), 0.0)
    return dataclasses.replace(replica, lag_bytes=lag, lag_seconds=seconds)


async def _dumps(dumps: DumpLister | None, uris: set[str] | None, within: float) -> DumpsStatus:
    if dumps is None:
        return DumpsStatus(None, OK, "no controller configured")
    address = dumps.address

    async def listed() -> DumpsStatus:
        statuses = await dumps.unfinished()
        return DumpsStatus(
            address, dumps=tuple(s for s in statuses if uris is None or s.uri in uris)
        )

    return await _guarded(listed(), within, _unreachable(DumpsStatus, address))
