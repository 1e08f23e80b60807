"""``capture`` into JetStream: the stream holds exactly what the slot holds, in order.

Each test compares the stream with a reference: a second slot, created next to capture's, read
with a plain ``SlotReader`` (what a single uninterrupted capture would have written).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import AsyncIterator

import nats as natslib
import pytest
from log_helpers import (
    WORKLOAD,
    assert_same_log,
    capturing,
    http_get,
    make_config,
    poll,
    prepare_slots,
    reference,
    run_sql,
    stream_records,
    wait_for_stream,
)
from nats.js import api

from pgcapture.capture.retry import run_capture
from pgcapture.errors import ConfigError, SourceError
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.log.reader import StoredBatch, read_batches
from pgcapture.ops.metrics import CaptureMetrics, SlotLagMonitor
from pgcapture.ops.service import serve_capture

pytestmark = pytest.mark.integration
_sources = itertools.count(1)


def source_name() -> str:
    return f"log{next(_sources)}"


async def test_stream_holds_exactly_what_the_slot_holds(dsn: str, nats: LocalNats) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    async with capturing(config, name):
        await run_sql(dsn, *WORKLOAD)
        expected = await reference(dsn, source)
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
    stored = await stream_records(nats.url, source.stream_name)
    assert_same_log(stored, expected)
    assert len(expected) > 3000


async def test_batches_are_cut_within_large_transactions_and_headers_match(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    async with capturing(config, name):
        await run_sql(dsn, *WORKLOAD[:3], "INSERT INTO done VALUES (1)")
        expected = await reference(dsn, source)
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
    nc = await natslib.connect(nats.url)
    try:
        batches = [b async for b in read_batches(nc.jetstream(), source.stream_name)]
        raw = await nc.jetstream().get_msg(source.stream_name, seq=batches[-1].seq)
    finally:
        await nc.close()
    assert max(len(b.records) for b in batches) == 50  # max_records
    assert raw.headers is not None
    assert raw.headers["Nats-Msg-Id"] == raw.headers["Pgcapture-Last"] == batches[-1].last.key()


async def test_empty_stream_starts_at_the_slot_not_at_the_wal_end(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await prepare_slots(dsn, source)
    await run_sql(dsn, "CREATE TABLE done (id int)", "INSERT INTO done VALUES (1)")
    expected = await reference(dsn, source)
    async with capturing(config, name):
        await wait_for_stream(nats.url, source.stream_name, expected[-1])
    assert_same_log(await stream_records(nats.url, source.stream_name), expected)


async def test_second_capture_with_no_lock_wait_fails_at_once_naming_the_holder(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name)
    async with capturing(config, name):
        await wait_until_running(nats.url, name)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgcapture", "capture", "--dsn", dsn, "--nats", nats.url,
            "--source", name, "--lock-wait", "0", stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    text = err.decode()
    assert f"source '{name}' is already being captured by pid" in text
    assert "stop that process first" in text


async def wait_until_running(url: str, name: str) -> None:
    """Until the source's lease is taken."""
    nc = await natslib.connect(url)
    try:
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(natslib.errors.Error):
                    kv = await nc.jetstream().key_value("pgcapture_locks")
                    entry = await kv.get(name)
                    if entry.value:
                        return
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_stream_with_conflicting_settings_is_reported_not_changed(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name, stream={"max_age": "1d"})
    source = config.source(name)
    nc = await natslib.connect(nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            api.StreamConfig(name=source.stream_name, subjects=[source.subject], max_age=3600)
        )
        with pytest.raises(ConfigError) as err:
            await asyncio.wait_for(run_capture(source, config.nats, asyncio.Event()), 20)
        info = await js.stream_info(source.stream_name)
    finally:
        await nc.close()
    text = str(err.value)
    assert f"stream '{source.stream_name}' exists with settings that differ" in text
    assert "max_age is 3600.0 (configured 86400.0)" in text
    assert info.config.max_age == 3600


async def test_replicas_on_a_single_server_are_refused_with_the_fix(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name, stream={"replicas": 3})
    with pytest.raises(ConfigError, match="replicas to 1 on a single nats-server"):
        await asyncio.wait_for(run_capture(config.source(name), config.nats, asyncio.Event()), 20)


async def test_unreachable_database_is_retried_until_stopped(nats: LocalNats) -> None:
    dsn = "host=/nonexistent-dir port=1 dbname=nope connect_timeout=2"
    config = make_config(dsn, nats.url, source_name())
    source = next(iter(config.sources.values()))
    stop = asyncio.Event()
    task = asyncio.create_task(run_capture(source, config.nats, stop))
    await asyncio.sleep(1.0)  # a refused connection is transient: it keeps retrying
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 20)


async def test_missing_database_is_a_clear_permanent_error(
    pg: LocalPostgres, nats: LocalNats
) -> None:
    config = make_config(pg.dsn("no_such_db"), nats.url, source_name())
    source = next(iter(config.sources.values()))
    with pytest.raises(SourceError, match=r'"no_such_db" does not exist.*check the source'):
        await asyncio.wait_for(run_capture(source, config.nats, asyncio.Event()), 20)


async def test_metrics_and_health_endpoint(dsn: str, nats: LocalNats) -> None:
    name = source_name()
    port = free_port()
    config = make_config(dsn, nats.url, name)
    config = config.model_copy(update={"metrics": config.metrics.model_copy(
        update={"listen": f"127.0.0.1:{port}", "slot_lag_interval": 0.2}
    )})  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(serve_capture(config, config.source(name), stop))
    try:

        async def healthy() -> bool:
            with contextlib.suppress(OSError):
                return (await http_get(port, "/healthz"))[0] == 200
            return False

        await poll(healthy)
        await run_sql(
            dsn, "CREATE TABLE m (id int)", "INSERT INTO m SELECT generate_series(1, 500)"
        )

        async def counted() -> bool:
            body = (await http_get(port, "/metrics"))[1].decode()
            return f'pgcapture_capture_records_total{{source="{name}"}}' in body and (
                "pgcapture_capture_last_commit_timestamp_seconds" in body
            )

        await poll(counted)
        status, body = await http_get(port, "/healthz")
        detail = json.loads(body)
        assert status == 200
        assert detail["state"] == "running"
        metrics = (await http_get(port, "/metrics"))[1].decode()
        for metric in ("publish_seconds_bucket", "in_flight_messages", "slot_lag_bytes"):
            assert f"pgcapture_capture_{metric}" in metrics
        assert (await http_get(port, "/nothing"))[0] == 404
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_slot_lag_above_the_threshold_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    metrics = CaptureMetrics("lagging")
    monitor = SlotLagMonitor("", "s1", metrics, warn_bytes=1000, interval=1)
    with caplog.at_level("WARNING", logger="pgcapture.capture"):
        monitor.observe(500)
        monitor.observe(5000)
        monitor.observe(6000)  # warned already within the minute
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "slot s1 lags 5000 bytes behind the WAL (threshold 1000)" in warnings[0].getMessage()
    assert (
        metrics.registry.get_sample_value("pgcapture_capture_slot_lag_bytes", {"source": "lagging"})
        == 6000
    )


async def test_lease_is_released_on_clean_stop(dsn: str, nats: LocalNats) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name, lock={"ttl": 30, "wait": 0})
    async with capturing(config, name):
        await wait_until_running(nats.url, name)
    # With a 30 s TTL and no wait, this only starts because the lease was given back.
    async with capturing(config, name):
        await wait_until_running(nats.url, name)


async def test_source_error_when_lease_is_held_in_process(dsn: str, nats: LocalNats) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name, lock={"ttl": 30, "wait": 0})
    async with capturing(config, name):
        await wait_until_running(nats.url, name)
        with pytest.raises(SourceError, match="already being captured"):
            await asyncio.wait_for(
                run_capture(config.source(name), config.nats, asyncio.Event()), 20
            )


async def test_records_larger_than_the_servers_max_payload_are_stored_in_fragments(
    dsn: str, nats: LocalNats
) -> None:
    name = source_name()
    config = make_config(dsn, nats.url, name)
    await run_sql(dsn, "CREATE TABLE big (v text)")
    await prepare_slots(dsn, config.source(name))
    await run_sql(
        dsn,
        "INSERT INTO big VALUES (repeat('x', 2000000)), ('small')",
        "CREATE TABLE done (id int)",
        "INSERT INTO done VALUES (1)",
    )
    expected = await reference(dsn, config.source(name))
    async with capturing(config, name):
        await wait_for_stream(nats.url, config.source(name).stream_name, expected[-1])
    assert_same_log(await stream_records(nats.url, config.source(name).stream_name), expected)
    assert max(len(r.message) for r in expected) > 2000000  # more than max_payload (1 MiB)
    parts = [
        b.last
        async for b in _all_batches(nats.url, config.source(name).stream_name)
        if b.last.seq == 1 and b.records[0].message.endswith(b"x" * 100)
    ]
    assert len(parts) == 1  # the record put together once, from its fragments


async def _all_batches(url: str, stream: str) -> AsyncIterator[StoredBatch]:
    nc = await natslib.connect(url)
    try:
        async for batch in read_batches(nc.jetstream(), stream):
            yield batch
    finally:
        await nc.close()
