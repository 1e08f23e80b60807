"""The consumer's life against the fake gateway: Capture mode, iteration, graceful stop,
reconnects, concurrency with per-key order, and user types looked up through ``dsn``."""

from __future__ import annotations

import asyncio
import re
import socket
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Any

import psycopg
import pytest
from client_helpers import GatewayServer, change, db_field, int4, key_of, text, truncate, user_row

from pgcapture.client import Backoff, Change, Consumer, Op, Row, Truncate, UnknownUri, table

pytestmark = pytest.mark.timeout(60)


@table("users")
@dataclass
class User:
    id: int
    name: str


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.2, jitter=0.0)


async def stop_and_wait(consumer: Consumer, task: asyncio.Task[None]) -> None:
    consumer.stop()
    async with asyncio.timeout(10):
        await task


async def test_capture_mode_acks_each_message_by_echoing_its_checkpoint(
    gateway: GatewayServer,
) -> None:
    messages = [
        change("users", 5, i, new=[int4("id", i, key=True), text("name", "n")], data=b"\x01\x02")
        for i in range(1, 6)
    ]
    gateway.fake.script("u", messages)
    consumer = Consumer(gateway.target, "u", batched=False)

    @consumer.handler(User)
    def on_user(c: Change[User]) -> None:
        if c.key["id"] == 3:
            raise RuntimeError("three")

    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) + len(gateway.fake.requeued) == 5)
    await stop_and_wait(consumer, task)

    log = gateway.fake.streams[0]
    assert log.method == "Capture"
    assert [r.ack.checkpoint for r in log.acks] == [m.checkpoint for m in messages]
    assert [r.ack.requeue_reason for r in log.acks] == ["", "", "RuntimeError: three", "", ""]
    assert gateway.fake.violations == []


async def test_iteration_acks_a_change_when_the_loop_asks_for_the_next(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script(
        "u", [user_row(1, 1, "a"), user_row(2, 2, "b"), truncate(3, "users"), user_row(4, 4, "d")]
    )
    seen: list[Any] = []
    async with Consumer(gateway.target, "u", models=[User]) as consumer:
        async for event in consumer:
            if isinstance(event, Truncate):
                seen.append("truncate")
                continue
            assert isinstance(event.new, User)
            seen.append(event.new.name)
            if event.new.name == "a":
                await asyncio.sleep(0.3)  # longer than the ack interval
                assert gateway.fake.acked == []  # not before the loop asks for the next one
            if event.new.name == "b":
                event.requeue("later")
            if event.new.name == "d":
                break  # d is left unacknowledged: it is delivered again
    assert seen == ["a", "b", "truncate", "d"]
    assert gateway.fake.acked == [(1, 1), (3, 1)]
    assert gateway.fake.requeued == [((2, 1), "later")]
    assert consumer.stats.handled == 3
    assert gateway.fake.streams[0].half_closed  # leaving `async with` closed the stream


async def test_iteration_yields_rows_for_tables_without_model(gateway: GatewayServer) -> None:
    gateway.fake.script("u", [change("orders", 1, new=[int4("id", 9, key=True)])])
    async with Consumer(gateway.target, "u") as consumer:
        async for event in consumer:
            assert isinstance(event, Change)
            assert isinstance(event.new, Row)
            assert event.key == {"id": 9}
            event.ack()
            break
    await gateway.fake.wait_for(lambda: gateway.fake.acked == [(1, 1)])


async def test_graceful_stop_finishes_running_handler_and_acks_only_handled(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script("u", [user_row(i, i, f"n{i}") for i in range(1, 11)])
    entered = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []
    consumer = Consumer(gateway.target, "u")

    @consumer.handler(User)
    async def on_user(c: Change[User]) -> None:
        if c.key["id"] == 3:
            entered.set()
            await release.wait()
        handled.append(c.key["id"])

    task = asyncio.create_task(consumer.run())
    async with asyncio.timeout(10):
        await entered.wait()
    consumer.stop()
    await asyncio.sleep(0.1)
    assert not task.done()  # waits for the running handler
    release.set()
    async with asyncio.timeout(10):
        await task

    assert handled == [1, 2, 3]
    assert gateway.fake.acked == [(1, 1), (2, 1), (3, 1)]
    assert gateway.fake.requeued == []
    assert [key_of(m) for m in gateway.fake.unacked("u")] == [(i, 1) for i in range(4, 11)]
    assert len(gateway.fake.streams) == 1
    assert gateway.fake.streams[0].half_closed


async def test_reconnects_with_backoff_after_gateway_restart(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a"), user_row(2, 2, "b")])
    handled: list[int] = []
    consumer = Consumer(gateway.target, "u", backoff=fast_backoff())
    consumer.handler(User)(lambda c: handled.append(c.key["id"]))
    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 2)

    await gateway.stop()
    async with asyncio.timeout(10):  # several failed attempts while the gateway is down
        while consumer.stats.reconnects < 5:
            await asyncio.sleep(0.02)
    gateway.fake.script("u", [user_row(3, 3, "c")])
    await gateway.start()
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 3)
    await stop_and_wait(consumer, task)

    assert handled == [1, 2, 3]
    delays = [float(m) for m in re.findall(r"reconnecting in ([\d.]+)s", caplog.text)]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.2]  # exponential, capped at the maximum
    assert consumer.stats.reconnects == len(delays) >= 5
    assert len(gateway.fake.streams) == 2


async def test_gateway_ending_the_stream_is_followed_by_a_reconnect(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a")])
    consumer = Consumer(gateway.target, "u", backoff=fast_backoff())
    consumer.handler(User)(lambda c: None)
    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 1)
    gateway.fake.script("u", [user_row(2, 2, "b")])
    gateway.fake.end_streams()
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 2)
    await stop_and_wait(consumer, task)
    assert consumer.stats.reconnects == 1


async def test_concurrency_never_runs_one_key_twice_and_keeps_its_order(
    gateway: GatewayServer,
) -> None:
    messages = [user_row(100, i % 4, f"v{i}", seq=i + 1) for i in range(40)]
    gateway.fake.script("u", messages)
    running: set[int] = set()
    most = 0
    order: dict[int, list[str]] = defaultdict(list)
    consumer = Consumer(gateway.target, "u", concurrency=8)

    @consumer.handler(User)
    async def on_user(c: Change[User]) -> None:
        nonlocal most
        assert c.new is not None
        assert c.new.id not in running, "two changes of one row ran at once"
        running.add(c.new.id)
        most = max(most, len(running))
        await asyncio.sleep(0.005 * (1 + c.new.id % 3))
        order[c.new.id].append(c.new.name)
        running.discard(c.new.id)

    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 40)
    await stop_and_wait(consumer, task)

    assert most == 4  # the four keys ran side by side
    for key, names in order.items():
        assert names == [f"v{i}" for i in range(40) if i % 4 == key]
    assert sorted(gateway.fake.acked) == [key_of(m) for m in messages]
    assert gateway.fake.violations == []


async def test_acks_flow_while_a_slow_handler_of_the_batch_still_runs(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script("u", [user_row(1, 1, "slow"), user_row(2, 2, "fast")])
    release = asyncio.Event()
    consumer = Consumer(gateway.target, "u", concurrency=2, ack_interval=0.05)

    @consumer.handler(User)
    async def on_user(c: Change[User]) -> None:
        if c.key["id"] == 1:
            await release.wait()

    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: gateway.fake.acked == [(2, 1)])
    release.set()
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 2)
    await stop_and_wait(consumer, task)


class Mood(Enum):
    SAD = "sad"
    OK = "ok"
    HAPPY = "happy"


@table("moods")
@dataclass
class MoodRow:
    id: int
    mood: Mood | None
    label: str


async def test_consumer_with_dsn_decodes_user_types(gateway: GatewayServer, types_dsn: str) -> None:
    with psycopg.connect(types_dsn) as conn:
        fields = [db_field(conn, "mood", "'happy'::mood"), db_field(conn, "label", "'sad'::mood")]
    gateway.fake.script("u", [change("moods", 1, new=[int4("id", 1, key=True), *fields])])
    got: list[MoodRow] = []
    consumer = Consumer(gateway.target, "u", dsn=types_dsn)

    @consumer.handler(MoodRow)
    def on_mood(c: Change[MoodRow]) -> None:
        assert c.op is Op.INSERT
        assert c.new is not None
        got.append(c.new)

    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 1)
    await stop_and_wait(consumer, task)
    assert got == [MoodRow(id=1, mood=Mood.HAPPY, label="sad")]


async def test_stop_before_run_returns_at_once(gateway: GatewayServer) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a")])
    consumer = Consumer(gateway.target, "u")
    consumer.handler(User)(lambda c: None)
    consumer.stop()
    async with asyncio.timeout(5):
        await consumer.run()
    assert gateway.fake.acked == []


async def test_iteration_raises_the_permanent_error_that_ended_it(gateway: GatewayServer) -> None:
    async with Consumer(gateway.target, "missing") as consumer:
        with pytest.raises(UnknownUri, match="'missing'"):
            async for _ in consumer:
                pass


async def test_stop_is_prompt_while_connecting_to_an_unresponsive_gateway() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        consumer = Consumer(target, "u", backoff=Backoff(initial=5.0, maximum=5.0))
        consumer.handler(User)(lambda c: None)
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(0.5)
        assert not task.done()
        consumer.stop()
        async with asyncio.timeout(2):
            await task


async def test_stop_is_prompt_while_waiting_to_reconnect() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
    consumer = Consumer(target, "u", backoff=Backoff(initial=5.0, maximum=5.0))
    consumer.handler(User)(lambda c: None)
    task = asyncio.create_task(consumer.run())
    while consumer.stats.reconnects == 0:
        await asyncio.sleep(0.05)
    consumer.stop()
    async with asyncio.timeout(2):
        await task
