"""First end-to-end check of the gateway: capture -> JetStream -> gateway -> Go-style client."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from gateway_helpers import GoStyleClient, captured, gateway_config, running_gateway
from log_helpers import run_sql

from pgcapture.local import LocalNats

pytestmark = pytest.mark.integration


async def test_go_style_client_receives_and_acks(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)", "CREATE TABLE u (id int)")
    config = gateway_config(dsn, nats.url, "smoke", app={"start": "beginning"})
    got: list[tuple[str, int]] = []
    async with captured(config, "smoke"), running_gateway(config) as address:
        await run_sql(
            dsn,
            "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g",
            "INSERT INTO u VALUES (1)",
            "UPDATE t SET v = 'x' WHERE id <= 10",
        )
        client = GoStyleClient(address, "app", TableRegex="^t$")

        def handler(m: dict[str, object]) -> None:
            change = m["change"]
            assert isinstance(change, dict)
            got.append((change["table"], change["op"]))

        task = asyncio.create_task(client.capture(handler))
        async with asyncio.timeout(10):
            while len(got) < 310:
                await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    assert all(table == "t" for table, _ in got)
    assert len(got) == 310
