"""The gateway's delivery contract against real servers: acknowledgements reach JetStream,
requeues come back after their delay, the last delivery goes to the dead-letter stream, ordered
URIs keep each row key's order across requeues, and refusals carry precise status codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import defaultdict
from typing import Any

import grpc
import nats as natslib
import psycopg
import pytest
from gateway_helpers import (
    BatchedClient,
    GoStyleClient,
    captured,
    consumer_state,
    gateway_config,
    int_of,
    row_values,
    running_gateway,
    wait_until,
)
from google.protobuf.struct_pb2 import Struct
from log_helpers import http_get, run_sql

from pgcapture.config import MetricsConfig, validate_config
from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port
from pgcapture.proto import pb, pb_grpc

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def consuming(*clients: Any) -> Any:
    tasks = [asyncio.create_task(c.run() if hasattr(c, "run") else c) for c in clients]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def test_acks_reach_jetstream_and_filtered_tables_are_skipped(
    dsn: str, nats: LocalNats
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)", "CREATE TABLE u (id int)")
    config = gateway_config(dsn, nats.url, "acks", app={"start": "beginning"})
    metrics_port = free_port()
    config = config.model_copy(
        update={"metrics": MetricsConfig(listen=f"127.0.0.1:{metrics_port}")}
    )
    got: list[dict[str, Any]] = []
    async with captured(config, "acks"), running_gateway(config) as address:
        await run_sql(
            dsn,
            "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g",
            "INSERT INTO u VALUES (1)",
            "UPDATE t SET v = 'x' WHERE id <= 10",
            "DELETE FROM t WHERE id = 300",
            "TRUNCATE u",
        )
        client = GoStyleClient(address, "app", TableRegex="^t$")
        async with consuming(client.capture(lambda m: got.append(m["change"]))):
            await wait_until(lambda: len(got) >= 311)
            await asyncio.sleep(0.3)  # nothing else may come
            info = await consumer_state(nats.url, "PGCAPTURE_ACKS", "pgcapture_app")
            stream_last = info.delivered.stream_seq
            async with asyncio.timeout(10):
                while info.ack_floor.stream_seq < stream_last or info.num_ack_pending:
                    await asyncio.sleep(0.1)
                    info = await consumer_state(nats.url, "PGCAPTURE_ACKS", "pgcapture_app")
            status, body = await http_get(metrics_port, "/metrics")
            assert status == 200
            text = body.decode()
            for line in (
                'pgcapture_gateway_delivered_total{uri="app"} 311.0',
                'pgcapture_gateway_acked_total{uri="app"} 311.0',
                'pgcapture_gateway_in_flight{uri="app"} 0.0',
                'pgcapture_gateway_clients{uri="app"} 1.0',
            ):
                assert line in text, line
            assert 'pgcapture_gateway_lag_seconds{uri="app"}' in text
            status, body = await http_get(metrics_port, "/healthz")
            assert status == 200
            assert json.loads(body)["uris"]["app"]["clients"] == 1
    assert len(got) == 311
    assert {c["table"] for c in got} == {"t"}
    ops = [c["op"] for c in got]
    assert ops.count(pb.Change.INSERT) == 300
    assert ops.count(pb.Change.UPDATE) == 10
    assert ops.count(pb.Change.DELETE) == 1


async def lag_seconds(port: int) -> float:
    _, body = await http_get(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith('pgcapture_gateway_lag_seconds{uri="app"}'):
            return float(line.split()[-1])
    raise AssertionError("no lag_seconds for uri app")


async def test_lag_seconds_counts_from_the_oldest_unacknowledged_commit(
    dsn: str, nats: LocalNats
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    port = free_port()
    config = gateway_config(
        dsn, nats.url, "lag", app={"start": "beginning", "ack_wait": 1.5}
    ).model_copy(update={"metrics": MetricsConfig(listen=f"127.0.0.1:{port}")})
    async with captured(config, "lag"), running_gateway(config) as address:
        await run_sql(dsn, "INSERT INTO t VALUES (1)")
        async with grpc.aio.insecure_channel(address) as channel:
            stream = pb_grpc.DBLogGatewayStub(channel).CaptureBatched()
            await stream.write(pb.CaptureRequest(init=pb.CaptureInit(uri="app")))
            batch = await stream.read()
            held_since = time.monotonic()
            await asyncio.sleep(2.0)  # the client holds the change: the URI falls behind
            lag = await lag_seconds(port)
            assert 1.0 <= lag <= time.monotonic() - held_since + 1.0, lag
            ack = pb.CaptureAckRange(first_id=batch.first_id, last_id=batch.first_id)
            await stream.write(pb.CaptureRequest(ack_range=ack))
            async with asyncio.timeout(10):
                while await lag_seconds(port) != 0.0:  # caught up
                    await asyncio.sleep(0.2)
            stream.cancel()


async def test_requeue_waits_for_the_delay_then_dead_letters(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    config = gateway_config(
        dsn, nats.url, "dlq",
        app={"start": "beginning", "requeue_delay": 0.4, "max_deliveries": 3},
    )  # fmt: skip
    seen: dict[int, list[float]] = defaultdict(list)

    def decide(message: pb.CaptureMessage) -> str:
        row = int_of(row_values(message.change.new)["id"])
        seen[row].append(time.monotonic())
        return "index unavailable: row 5" if row == 5 else ""

    async with captured(config, "dlq"), running_gateway(config) as address:
        await run_sql(dsn, "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20) g")
        async with consuming(BatchedClient(address, "app", decide)):
            await wait_until(lambda: len(seen[5]) >= 3 and len(seen) == 20, 30)
            nc = await natslib.connect(nats.url)
            try:
                js = nc.jetstream()
                async with asyncio.timeout(10):
                    while True:
                        with contextlib.suppress(natslib.js.errors.NotFoundError):
                            info = await js.stream_info("PGCAPTURE_DLQ_APP")
                            if info.state.messages:
                                break
                        await asyncio.sleep(0.1)
                dead = await js.get_msg("PGCAPTURE_DLQ_APP", seq=1)
            finally:
                await nc.close()
            await asyncio.sleep(1.5)  # no fourth delivery
    times = seen[5]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.35  # requeue_delay
    assert times[2] - times[1] >= 0.75  # doubled for the second requeue
    assert all(len(v) == 1 for k, v in seen.items() if k != 5)  # acked ones never come back
    headers = dead.headers or {}
    assert headers["Pgcapture-Uri"] == "app"
    assert headers["Pgcapture-Deliveries"] == "3"
    assert headers["Pgcapture-Reason"] == "index unavailable: row 5"
    record = pb.LogBatch.FromString(dead.data).records[0]
    change = pb.Message.FromString(record.message).change
    assert int_of(row_values(change.new)["id"]) == 5


async def test_ordered_uri_keeps_each_keys_order_across_requeues(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE k (id int PRIMARY KEY, version int)")
    config = gateway_config(
        dsn, nats.url, "ord",
        app={"start": "beginning", "ordered": True, "requeue_delay": 0.05, "max_deliveries": 50},
    )  # fmt: skip
    rng = random.Random(7)
    handled: dict[int, list[int]] = defaultdict(list)
    events: list[int] = []  # versions handled, -1 for the truncate

    def decide(message: pb.CaptureMessage) -> str:
        if rng.random() < 0.25:
            return "try later"
        if message.HasField("truncate"):
            events.append(-1)
            return ""
        row = row_values(message.change.new)
        handled[int_of(row["id"])].append(int_of(row["version"]))
        events.append(int_of(row["version"]))
        return ""

    keys, rounds = 30, 8
    statements = [f"INSERT INTO k SELECT g, 0 FROM generate_series(1, {keys}) g"]
    statements += [
        f"UPDATE k SET version = version + 1 WHERE id % {1 + r % 3} = 0 OR id < 4"
        for r in range(rounds)
    ]
    statements += ["TRUNCATE k", f"INSERT INTO k SELECT g, 100 FROM generate_series(1, {keys}) g"]
    async with captured(config, "ord"), running_gateway(config) as address:
        await run_sql(dsn, *statements)
        clients = [BatchedClient(address, "app", decide) for _ in range(2)]
        async with consuming(*clients):
            expected = await _versions(dsn)
            await wait_until(
                lambda: all(handled[k] and handled[k][-1] == v for k, v in expected.items()), 60
            )
    for key, versions in handled.items():
        assert versions == sorted(versions), (key, versions)
        assert len(versions) == len(set(versions)), (key, versions)
    # The truncate came after every change committed before it, and before every one after.
    cut = events.index(-1)
    assert all(v < 100 for v in events[:cut])
    assert all(v == 100 for v in events[cut + 1 :])


async def _versions(dsn: str) -> dict[int, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT id, version FROM k")
        return dict(await cur.fetchall())


async def _refusal(address: str, *requests: pb.CaptureRequest, batched: bool = False) -> Any:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DBLogGatewayStub(channel)
        call = stub.CaptureBatched() if batched else stub.Capture()
        for request in requests:
            await call.write(request)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(_drain(call), 10)
        return caught.value


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def _init(uri: str, **params: Any) -> pb.CaptureRequest:
    struct = Struct()
    struct.update(params)
    return pb.CaptureRequest(init=pb.CaptureInit(uri=uri, parameters=struct))


async def test_refusals_have_precise_status_codes(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    config = gateway_config(dsn, nats.url, "codes", app={"start": "beginning"})
    data = config.model_dump(mode="json")
    data["sources"]["not_captured"] = {"dsn": dsn}
    data["gateway"]["uris"]["later"] = {"source": "not_captured"}
    config = validate_config(data)
    async with captured(config, "codes"), running_gateway(config) as address:
        error = await _refusal(address, _init("nope"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown URI 'nope'" in error.details()
        assert "serves: app" in error.details()

        error = await _refusal(address, _init("app", TableRegex="(unclosed"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "TableRegex '(unclosed'" in error.details()

        error = await _refusal(address, _init("app", TableRegex=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be a string" in error.details()

        error = await _refusal(address, _init("app", MaxUnacked=0))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

        ack = pb.CaptureRequest(ack=pb.CaptureAck(checkpoint=pb.Checkpoint(lsn=1, seq=1)))
        error = await _refusal(address, ack)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first request should be a CaptureInit" in error.details()

        error = await _refusal(address, _init("app", Unknown="ignored"), ack)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "did not deliver" in error.details()

        error = await _refusal(address, _init("later"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "stream 'PGCAPTURE_NOT_CAPTURED' of URI 'later' does not exist yet" in (
            error.details()
        )

        bad_range = pb.CaptureRequest(ack_range=pb.CaptureAckRange(first_id=3, last_id=9))
        error = await _refusal(address, _init("app"), bad_range, batched=True)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_clients_of_one_uri_share_it_and_uris_are_independent(
    dsn: str, nats: LocalNats
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    config = gateway_config(
        dsn, nats.url, "share", one={"start": "beginning"}, two={"start": "beginning"}
    )
    async with captured(config, "share"), running_gateway(config) as address:
        await run_sql(
            dsn, *(f"INSERT INTO t SELECT g FROM generate_series({i}, {i + 99}) g"
                   for i in range(0, 2000, 100)),
        )  # fmt: skip
        sharing = [BatchedClient(address, "one", MaxUnacked=60) for _ in range(2)]
        alone = BatchedClient(address, "two")
        async with consuming(*sharing, alone):
            await wait_until(
                lambda: sum(len(c.handled) for c in sharing) >= 2000 and len(alone.handled) >= 2000
            )
            await asyncio.sleep(0.3)
    ids = [[int_of(row_values(m.change.new)["id"]) for m, _ in c.handled] for c in sharing]
    assert all(ids), "both clients of URI one received work"
    assert sorted(ids[0] + ids[1]) == list(range(2000))  # each change once
    assert sorted(int_of(row_values(m.change.new)["id"]) for m, _ in alone.handled) == list(
        range(2000)
    )


async def test_start_positions_of_new_uris(dsn: str, nats: LocalNats) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    probe = gateway_config(dsn, nats.url, "start")
    async with captured(probe, "start"):
        await run_sql(dsn, "INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await asyncio.sleep(1.1)
            at = (await (await conn.execute("SELECT now()")).fetchone())[0]  # type: ignore[index]
            await conn.execute("INSERT INTO t VALUES (3)")
            lsn = (await (await conn.execute("SELECT pg_current_wal_lsn()")).fetchone())[0]  # type: ignore[index]
            await conn.execute("INSERT INTO t VALUES (4)")
        config = gateway_config(
            dsn, nats.url, "start",
            all={"start": "beginning"},
            new={"start": "new"},
            lsn={"start": f"lsn:{lsn}"},
            time={"start": f"time:{at.isoformat()}"},
        )  # fmt: skip
        await asyncio.sleep(0.5)  # 1..4 are stored
        async with running_gateway(config) as address:
            clients = {uri: BatchedClient(address, uri) for uri in ("all", "new", "lsn", "time")}
            async with consuming(*clients.values()):
                await wait_until(lambda: len(clients["all"].handled) >= 4)
                await asyncio.sleep(0.5)  # "new" is created: only what comes after
                await run_sql(dsn, "INSERT INTO t VALUES (5)")
                await wait_until(lambda: all(
                    c.handled and int_of(row_values(c.handled[-1][0].change.new)["id"]) == 5
                    for c in clients.values()
                ))  # fmt: skip
    got = {
        uri: [int_of(row_values(m.change.new)["id"]) for m, _ in c.handled]
        for uri, c in clients.items()
    }
    assert got == {"all": [1, 2, 3, 4, 5], "new": [5], "lsn": [4, 5], "time": [3, 4, 5]}


async def test_a_small_window_keeps_reading_the_stream(dsn: str, nats: LocalNats) -> None:
    """The hub fetches again whenever acknowledgements make room, also after its backlog ran
    dry with every client full (a window far smaller than a fetch)."""
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    config = gateway_config(dsn, nats.url, "window", app={"start": "beginning", "max_unacked": 7})
    async with captured(config, "window"), running_gateway(config) as address:
        await run_sql(
            dsn, *(f"INSERT INTO t SELECT g FROM generate_series({i}, {i + 99}) g"
                   for i in range(0, 3000, 100)),
        )  # fmt: skip
        client = BatchedClient(address, "app")
        async with consuming(client):
            await wait_until(lambda: len(client.handled) >= 3000, 60)
    assert sorted(int_of(row_values(m.change.new)["id"]) for m, _ in client.handled) == list(
        range(3000)
    )
