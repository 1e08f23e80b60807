"""The consumer library against the real chain: PostgreSQL -> capture -> JetStream -> gateway ->
``pgcapture.client``. Values equal what psycopg returns for a SELECT of the same row; a handler
error is redelivered; the consumer rides through a gateway SIGKILL without losing anything."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import signal
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import captured, gateway_config, gateway_file, gateway_process, running_gateway
from log_helpers import run_sql
from psycopg import DataError
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.datetime import (
    DateBinaryLoader,
    TimestampBinaryLoader,
    TimestamptzBinaryLoader,
)
from psycopg.types.enum import EnumInfo, register_enum
from test_capture_types import COLUMNS, SETUP

from pgcapture.client import Change, Consumer, Op, RawValue, Row
from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port

pytestmark = pytest.mark.integration


def _plain(value: Any) -> Any:
    """Comparable form: enums by label, composites as tuples, NaN equal to NaN, and the types
    psycopg has no binary loader for (it returns their bytes) as their bytes."""
    if isinstance(value, RawValue):
        return bytes(value.data)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN(float)"
    if isinstance(value, Decimal) and value.is_nan():
        return "NaN(numeric)"
    return value


def _infinite(base: type[Any], top: object, bottom: object) -> type[Any]:
    """psycopg's loader, with PostgreSQL's ±infinity as the Python limits (psycopg docs,
    "Adapting infinity dates"), as the library documents."""

    class Loader(base):  # type: ignore[misc, valid-type]
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except DataError:
                return top if bytes(data)[0] < 0x80 else bottom

    return Loader


async def test_every_type_family_decodes_as_psycopg_selects_it(dsn: str, nats: LocalNats) -> None:
    columns = ", ".join(f"{name} {kind}" for name, (kind, _) in COLUMNS.items())
    await run_sql(
        dsn, *SETUP.strip().split(";\n"), f"CREATE TABLE types (id int PRIMARY KEY, {columns})"
    )
    config = gateway_config(dsn, nats.url, "types", app={"start": "beginning"})
    received: dict[int, Row] = {}
    async with captured(config, "types"), running_gateway(config) as address:
        for row in range(3):
            values = ", ".join(values[row] for _, values in COLUMNS.values())
            await run_sql(dsn, f"INSERT INTO types VALUES ({row}, {values})")
        consumer = Consumer(address, "app", table_regex="^types$", dsn=dsn)
        async with asyncio.timeout(60), consumer:
            async for event in consumer:
                assert isinstance(event, Change)
                assert event.op is Op.INSERT
                assert event.new is not None
                received[event.new["id"]] = event.new
                if len(received) == 3:
                    event.ack()
                    break
    with psycopg.connect(dsn) as conn:
        utc_max, utc_min = datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)
        for name, base, top, bottom in (
            ("date", DateBinaryLoader, date.max, date.min),
            ("timestamp", TimestampBinaryLoader, datetime.max, datetime.min),
            ("timestamptz", TimestamptzBinaryLoader, utc_max, utc_min),
        ):
            conn.adapters.register_loader(name, _infinite(base, top, bottom))
        conn.execute("SET TimeZone = 'UTC'")
        for name in ("mood",):
            info = EnumInfo.fetch(conn, name)
            assert info is not None
            register_enum(info, conn)
        composite = CompositeInfo.fetch(conn, "pair")
        assert composite is not None
        register_composite(composite, conn)
        cur = conn.execute("SELECT * FROM types ORDER BY id", binary=True)
        names = [d.name for d in cur.description or ()]
        rows = cur.fetchall()
    assert len(rows) == 3
    mismatches = []
    for row in rows:
        got = received[row[0]]
        for name, expected in zip(names, row, strict=True):
            if _plain(got[name]) != _plain(expected):
                mismatches.append((row[0], name, got[name], expected))
    assert mismatches == []


async def test_handler_error_is_redelivered_and_then_handled(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    config = gateway_config(
        dsn, nats.url, "retry", app={"start": "beginning", "requeue_delay": 0.2}
    )
    attempts: dict[int, int] = {}
    async with captured(config, "retry"), running_gateway(config) as address:
        await run_sql(dsn, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g")
        consumer = Consumer(address, "app", table_regex="^t$")

        @consumer.handler(Row)
        def handle(change: Change[Row]) -> None:
            assert change.new is not None
            key = change.new["id"]
            attempts[key] = attempts.get(key, 0) + 1
            if key % 10 == 0 and attempts[key] == 1:
                raise RuntimeError(f"search index busy for {key}")
            if len(attempts) == 50 and all(
                n == (2 if k % 10 == 0 else 1) for k, n in attempts.items()
            ):
                consumer.stop()

        await asyncio.wait_for(consumer.run(), 60)
    assert attempts == {k: 2 if k % 10 == 0 else 1 for k in range(1, 51)}
    assert consumer.stats.requeued == 5


async def test_consumer_reconnects_through_gateway_kills(
    dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    config = gateway_config(dsn, nats.url, "lib", app={"start": "beginning"})
    port = free_port()
    config_file = gateway_file(
        tmp_path / "pgcapture.toml", nats.url, "lib", dsn, port, start="beginning", ack_wait=3
    )

    seen: list[int] = []
    consumer = Consumer(f"127.0.0.1:{port}", "app", table_regex="^t$")

    @consumer.handler(Row)
    async def handle(change: Change[Row]) -> None:
        assert change.new is not None
        seen.append(change.new["id"])

    async with captured(config, "lib"):
        gateway = gateway_process(config_file)
        task = asyncio.create_task(consumer.run())
        try:
            for round_ in range(3):
                base = round_ * 1000
                await run_sql(
                    dsn,
                    *(f"INSERT INTO t SELECT g FROM generate_series({b}, {b + 49}) g"
                      for b in range(base, base + 1000, 50)),
                )  # fmt: skip
                async with asyncio.timeout(30):
                    while len(set(seen)) < base + 100:
                        await asyncio.sleep(0.02)
                gateway.send_signal(signal.SIGKILL)
                gateway.wait(10)
                gateway = gateway_process(config_file)
            async with asyncio.timeout(60):
                while len(set(seen)) < 3000:
                    await asyncio.sleep(0.05)
        finally:
            consumer.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(20)
    assert set(seen) == set(range(3000))
    assert consumer.stats.reconnects >= 3
