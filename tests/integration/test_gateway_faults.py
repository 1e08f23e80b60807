"""The gateway SIGKILLed mid-stream: the consumer reconnects, nothing unacknowledged is lost, and
only changes of stream messages whose acknowledgement had not reached JetStream come again."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import Counter
from pathlib import Path

import grpc
import nats as natslib
import pytest
from gateway_helpers import captured, consumer_state, gateway_config, gateway_file, gateway_process
from google.protobuf.struct_pb2 import Struct
from log_helpers import run_sql

from pgcapture.local import LocalNats
from pgcapture.local.postgres import free_port
from pgcapture.log.reader import read_batches
from pgcapture.proto import pb, pb_grpc

pytestmark = pytest.mark.integration


class Reconnecting:
    """Consumes CaptureBatched, acknowledging everything, reconnecting after any error;
    ``handled`` lists (lsn, seq, epoch) per handled change."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.epoch = 0
        self.handled: list[tuple[int, int, int]] = []
        self.reconnects = 0

    async def run(self) -> None:
        while True:
            try:
                await self._once()
            except (grpc.aio.AioRpcError, OSError):
                self.reconnects += 1
                await asyncio.sleep(0.2)

    async def _once(self) -> None:
        params = Struct()
        params.update({"TableRegex": "^t$"})
        init = pb.CaptureRequest(init=pb.CaptureInit(uri="app", parameters=params))
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = pb_grpc.DBLogGatewayStub(channel).CaptureBatched()
            await call.write(init)
            async for batch in call:
                epoch = self.epoch
                for m in batch.messages:
                    self.handled.append((m.checkpoint.lsn, m.checkpoint.seq, epoch))
                last = batch.first_id + len(batch.messages) - 1
                rng = pb.CaptureAckRange(first_id=batch.first_id, last_id=last)
                await call.write(pb.CaptureRequest(ack_range=rng))


async def test_gateway_sigkill_loses_nothing_and_redelivers_only_unacked(
    dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    await run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    config = gateway_config(dsn, nats.url, "kill", app={"start": "beginning", "ack_wait": 5})
    port = free_port()
    config_file = gateway_file(
        tmp_path / "pgcapture.toml", nats.url, "kill", dsn, port, start="beginning", ack_wait=5
    )
    rng = random.Random(11)
    kills: list[tuple[int, int]] = []  # (ack floor, messages pending) right after each kill
    consumer = Reconnecting(f"127.0.0.1:{port}")
    async with captured(config, "kill"):
        gateway = gateway_process(config_file)
        task = asyncio.create_task(consumer.run())
        try:
            for round_ in range(4):
                for i in range(10):
                    base = round_ * 10_000 + i * 100
                    await run_sql(
                        dsn,
                        f"INSERT INTO t SELECT g, 0 FROM generate_series({base}, {base + 99}) g",
                        f"UPDATE t SET v = v + 1 WHERE id BETWEEN {base} AND {base + 20}",
                    )
                    await asyncio.sleep(rng.uniform(0, 0.05))
                if round_ < 3:
                    async with asyncio.timeout(30):  # mid-stream: this gateway has delivered
                        while not any(e == consumer.epoch for _, _, e in consumer.handled):
                            await asyncio.sleep(0.05)
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    gateway.send_signal(signal.SIGKILL)
                    gateway.wait(10)
                    consumer.epoch += 1
                    info = await consumer_state(nats.url, "PGCAPTURE_KILL", "pgcapture_app")
                    kills.append((info.ack_floor.stream_seq, info.num_ack_pending))
                    gateway = gateway_process(config_file)
            async with asyncio.timeout(30):  # capture has stored every change of the workload
                while len(expected := await _changes(nats.url)) < 4 * 10 * (100 + 21):
                    await asyncio.sleep(0.2)
            async with asyncio.timeout(60):
                while not set(expected) <= {(lsn, seq) for lsn, seq, _ in consumer.handled}:
                    await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(20)
    assert consumer.reconnects >= 3
    counts = Counter((lsn, seq) for lsn, seq, _ in consumer.handled)
    assert set(counts) == set(expected)  # every change, nothing else
    first_epoch: dict[tuple[int, int], int] = {}
    redelivered_messages: dict[int, set[int]] = {}
    for lsn, seq, epoch in consumer.handled:
        key = (lsn, seq)
        if key not in first_epoch:
            first_epoch[key] = epoch
            continue
        # A change came again after kill number `epoch`: its stream message was not
        # acknowledged to JetStream when the gateway died.
        assert epoch > first_epoch[key], key
        floor, _ = kills[epoch - 1]
        assert expected[key] > floor, (key, expected[key], floor)
        redelivered_messages.setdefault(epoch, set()).add(expected[key])
    for epoch, messages in redelivered_messages.items():
        assert len(messages) <= kills[epoch - 1][1], (epoch, len(messages), kills[epoch - 1])


async def _changes(url: str) -> dict[tuple[int, int], int]:
    """Every change of table t in the stream, with the sequence of the message holding it."""
    nc = await natslib.connect(url)
    out: dict[tuple[int, int], int] = {}
    try:
        async for batch in read_batches(nc.jetstream(), "PGCAPTURE_KILL"):
            for record in batch.records:
                message = pb.Message.FromString(record.message)
                if message.WhichOneof("type") == "change" and message.change.table == "t":
                    out[(record.lsn, record.seq)] = batch.seq
    finally:
        await nc.close()
    return out
