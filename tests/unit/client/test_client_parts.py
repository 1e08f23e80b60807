"""The consumer's parts without I/O: ack ranges, per-key scheduling, backoff, configuration."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcapture.checkpoint import Checkpoint
from pgcapture.client import (
    Backoff,
    Change,
    Consumer,
    Op,
    RawValue,
    Row,
    TableName,
    TlsConfig,
    Truncate,
    ValueFormat,
)
from pgcapture.client.acks import AckRange, AckTracker
from pgcapture.client.ordering import KeyedScheduler, ordering_of
from pgcapture.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def test_acks_coalesce_consecutive_ids_with_the_same_reason() -> None:
    tracker = AckTracker()
    tracker.delivered(9)
    for i in (3, 1, 2, 5, 6, 9):
        tracker.settle(i)
    tracker.settle(7, "boom")
    tracker.settle(8, "boom")
    assert tracker.outstanding == 1  # id 4
    assert tracker.take() == [
        AckRange(1, 3),
        AckRange(5, 6),
        AckRange(7, 8, "boom"),
        AckRange(9, 9),
    ]
    assert tracker.take() == []
    tracker.settle(4)
    with pytest.raises(ValueError, match="settled twice"):
        tracker.settle(4)


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    exact = Backoff(initial=0.1, maximum=1.0, jitter=0.0)
    assert [exact.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert exact.delay(10_000) == 1.0
    jittered = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rng=random.Random(7))
    delays = [jittered.delay(3) for _ in range(50)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1
    with pytest.raises(ConfigError, match="0 < initial <= maximum"):
        Backoff(initial=2, maximum=1)


async def test_scheduler_serializes_a_key_and_runs_other_keys_together() -> None:
    scheduler = KeyedScheduler(limit=4)
    log: list[str] = []
    running: set[str] = set()
    overlap = 0

    def job(name: str, key: str) -> Any:
        async def run() -> None:
            nonlocal overlap
            assert key not in {r[0] for r in running}, f"{name} runs beside its key"
            running.add(name)
            overlap = max(overlap, len(running))
            await asyncio.sleep(0.01)
            running.discard(name)
            log.append(name)

        return run

    for name in ("a1", "b1", "a2", "c1", "a3", "b2"):
        await scheduler.submit({name[0]}, ["t"], False, job(name, name[0]))
    await scheduler.drain(cancel_waiting=False)
    assert [n for n in log if n[0] == "a"] == ["a1", "a2", "a3"]
    assert [n for n in log if n[0] == "b"] == ["b1", "b2"]
    assert overlap > 1
    assert scheduler.error is None


async def test_scheduler_barrier_waits_for_earlier_and_blocks_later_jobs() -> None:
    scheduler = KeyedScheduler(limit=8)
    log: list[str] = []

    def job(name: str, delay: float) -> Any:
        async def run() -> None:
            await asyncio.sleep(delay)
            log.append(name)

        return run

    await scheduler.submit({"k1"}, ["t"], False, job("before-slow", 0.05))
    await scheduler.submit({"k2"}, ["u"], False, job("other-table", 0.0))
    await scheduler.submit(set(), ["t"], True, job("truncate", 0.0))
    await scheduler.submit({"k3"}, ["t"], False, job("after", 0.0))
    await scheduler.drain(cancel_waiting=False)
    assert log.index("before-slow") < log.index("truncate") < log.index("after")
    assert log[0] == "other-table"


async def test_drain_with_cancel_waiting_runs_only_started_jobs() -> None:
    scheduler = KeyedScheduler(limit=8)
    started = asyncio.Event()
    release = asyncio.Event()
    ran: list[str] = []

    async def first() -> None:
        started.set()
        await release.wait()
        ran.append("first")

    async def second() -> None:
        ran.append("second")

    await scheduler.submit({"k"}, ["t"], False, first)
    await scheduler.submit({"k"}, ["t"], False, second)
    await started.wait()
    drained = asyncio.create_task(scheduler.drain(cancel_waiting=True))
    await asyncio.sleep(0.01)
    release.set()
    await drained
    assert ran == ["first"]
    assert not await scheduler.submit({"k"}, ["t"], False, second)  # closed


def event(op: Op, key: dict[str, Any], old_key: dict[str, Any] | None = None) -> Change[Row]:
    return Change(
        op, "public", "t", Checkpoint(1, 1), None, None, Row(key),
        Row(old_key) if old_key else None,
    )  # fmt: skip


def test_ordering_keys_cover_old_and_new_key_and_barriers() -> None:
    keys, tables, barrier = ordering_of(event(Op.UPDATE, {"id": 2}, {"id": 1}))
    assert len(keys) == 2
    assert ("public", "t") in tables
    assert not barrier
    keys_json, _, _ = ordering_of(event(Op.INSERT, {"doc": {"a": [1]}}))  # unhashable values
    assert len(keys_json) == 1
    _, tables, barrier = ordering_of(
        Truncate((TableName("public", "a"),), False, False, Checkpoint(1, 1))
    )
    assert tables == [("public", "a")]
    assert barrier
    ddl = Change(Op.INSERT, "pgcapture", "ddl_logs", Checkpoint(1, 1), None, None, Row({"id": 1}))
    assert ordering_of(ddl)[2]  # DDL waits for everything before it


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"table_regex": "("}, "not a valid regular expression"),
        ({"table_regex": "a", "parameters": {"TableRegex": "b"}}, "given twice"),
        ({"token": " x"}, "surrounding whitespace"),
        ({"concurrency": 0}, "at least 1"),
        ({"decode_errors": "ignore"}, "must be one of"),
        ({"tls": TlsConfig(cert_file="c.pem")}, "cert_file and key_file go together"),
        ({"tls": TlsConfig(ca_file="/nonexistent/ca.pem")}, "cannot be read"),
        ({"parameters": {"x": object()}}, "cannot be sent as a protobuf Struct"),
    ],
)
def test_bad_consumer_options_are_config_errors(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Consumer("localhost:1", "u", **options)


async def test_run_without_handlers_says_how_to_add_them() -> None:
    with pytest.raises(ConfigError, match="run\\(\\) has no handlers"):
        await Consumer("localhost:1", "u").run()


async def test_iteration_outside_async_with_is_refused() -> None:
    with pytest.raises(ConfigError, match="async with consumer"):
        aiter(Consumer("localhost:1", "u"))


_ARRAY_HEADER = st.tuples(
    st.integers(0, 2), st.integers(0, 1), st.sampled_from([16, 20, 23, 25, 1700, 2950, 99999])
).map(lambda t: struct.pack(">iiI", *t))
_WIRE = st.one_of(
    st.binary(max_size=64),
    st.tuples(_ARRAY_HEADER, st.binary(max_size=48)).map(lambda t: t[0] + t[1]),
)


@settings(max_examples=400, deadline=None)
@given(_WIRE)
def test_raw_value_readers_refuse_malformed_bytes_without_crashing(data: bytes) -> None:
    raw = RawValue(99999, data, ValueFormat.BINARY)
    readers: list[tuple[Any, type]] = [(raw.as_array, list), (raw.as_record, tuple)]
    for read, kind in readers:
        try:
            value = read()
        except (ValueError, psycopg.Error, struct.error):
            continue  # refused: the only acceptable alternative to a value of the right kind
        assert isinstance(value, kind)


def test_public_api_is_exactly_this() -> None:
    import pgcapture.client

    assert sorted(pgcapture.client.__all__) == sorted(
        [
            "UNCHANGED", "AccessDenied", "Backoff", "Change", "ChangeDecodeError",
            "Column", "Consumer", "ConsumerError", "ConsumerStats", "GatewayRefused",
            "GatewayUnavailable", "InvalidRequest", "MethodUnsupported", "Op", "RawValue", "Row",
            "StreamRejected", "TableName", "TlsConfig", "Truncate", "TypeLookupError",
            "TypeResolver", "Unchanged", "UnknownUri", "ValueDecoder", "ValueFormat", "table",
            "to_dict", "to_json",
        ]
    )  # fmt: skip
    assert all(hasattr(pgcapture.client, name) for name in pgcapture.client.__all__)
