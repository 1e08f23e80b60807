"""The consumer loop against an in-process fake gateway: acks, requeues, errors, reconnects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import grpc
import pytest
from client_helpers import (
    FakeGateway,
    GatewayServer,
    change,
    int4,
    key_of,
    make_certificates,
    text,
    truncate,
    user_row,
)

from pgcapture.client import (
    AccessDenied,
    Backoff,
    Change,
    ChangeDecodeError,
    Consumer,
    InvalidRequest,
    MethodUnsupported,
    Op,
    Row,
    StreamRejected,
    TlsConfig,
    Truncate,
    UnknownUri,
    table,
)
from pgcapture.proto import pb

pytestmark = pytest.mark.timeout(60)


@table("public.users")
@dataclass
class User:
    id: int
    name: str


def consumer_for(gateway: GatewayServer, uri: str = "u", **options: object) -> Consumer:
    options.setdefault("backoff", Backoff(initial=0.05, maximum=0.2))
    return Consumer(gateway.target, uri, **options)  # type: ignore[arg-type]


async def run_until(consumer: Consumer, gateway: GatewayServer, condition: object) -> None:
    """Run ``consumer`` until ``condition()`` holds on the fake, then stop it."""
    task = asyncio.create_task(consumer.run())
    try:
        await gateway.fake.wait_for(condition)  # type: ignore[arg-type]
    finally:
        consumer.stop()
        async with asyncio.timeout(10):
            await task


async def test_handled_changes_are_acked_as_coalesced_ranges(gateway: GatewayServer) -> None:
    messages = [user_row(100, i, f"n{i}", seq=i) for i in range(1, 251)]
    gateway.fake.script("u", messages)
    seen: list[tuple[Op, int, str]] = []
    consumer = consumer_for(gateway)

    @consumer.handler(User)
    def on_user(c: Change[User]) -> None:
        assert c.new is not None
        seen.append((c.op, c.new.id, c.new.name))

    await run_until(consumer, gateway, lambda: len(gateway.fake.acked) == 250)

    assert seen == [(Op.INSERT, i, f"n{i}") for i in range(1, 251)]
    assert gateway.fake.acked == [key_of(m) for m in messages]
    ranges = [r.ack_range for r in gateway.fake.streams[0].acks]
    assert len(ranges) <= 6  # three batches of at most 100: one range each, not 250 acks
    assert all(not r.requeue_reason for r in ranges)
    assert gateway.fake.violations == []
    assert consumer.stats.handled == 250
    assert consumer.stats.acked == 250


async def test_handler_exception_requeues_with_type_and_message(gateway: GatewayServer) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a"), user_row(2, 2, "bad"), user_row(3, 3, "c")])
    consumer = consumer_for(gateway)

    @consumer.handler(User)
    async def on_user(c: Change[User]) -> None:
        if c.new is not None and c.new.name == "bad":
            raise ValueError("name 'bad' is refused")

    await run_until(consumer, gateway, lambda: len(gateway.fake.acked) == 2)

    assert gateway.fake.requeued == [((2, 1), "ValueError: name 'bad' is refused")]
    assert gateway.fake.acked == [(1, 1), (3, 1)]
    assert consumer.stats.requeued == 1
    assert consumer.stats.handled == 2


async def test_tables_without_handler_and_truncates_are_acked_unhandled(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script(
        "u",
        [
            change("orders", 1, new=[int4("id", 1, key=True)]),
            user_row(2, 7, "x"),
            truncate(3, "orders"),
        ],
    )
    handled: list[int] = []
    consumer = consumer_for(gateway)
    consumer.handler(User)(lambda c: handled.append(c.key["id"]))

    await run_until(consumer, gateway, lambda: len(gateway.fake.acked) == 3)

    assert handled == [7]
    assert consumer.stats.ignored == 2


async def test_row_and_truncate_handlers_get_their_events(gateway: GatewayServer) -> None:
    gateway.fake.script(
        "u",
        [
            change("orders", 1, new=[int4("id", 1, key=True), text("note", "n")]),
            truncate(2, "orders", "users"),
        ],
    )
    events: list[object] = []
    consumer = consumer_for(gateway)

    async def on_row(c: Change[Row]) -> None:
        events.append((c.table, dict(c.new or {})))

    def on_truncate(t: Truncate) -> None:
        events.append([str(x) for x in t.tables])

    task = asyncio.create_task(consumer.run({Row: on_row, Truncate: on_truncate}))
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 2)
    consumer.stop()
    await task

    assert events == [("orders", {"id": 1, "note": "n"}), ["public.orders", "public.users"]]


async def test_explicit_requeue_from_handler_is_sent(gateway: GatewayServer) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a")])
    consumer = consumer_for(gateway)

    @consumer.handler(User)
    def on_user(c: Change[User]) -> None:
        c.requeue("not yet")

    await run_until(consumer, gateway, lambda: len(gateway.fake.requeued) == 1)
    assert gateway.fake.requeued == [((1, 1), "not yet")]
    assert gateway.fake.acked == []


BAD_DATE = pb.Field(name="born", oid=1082, binary=b"\x00\x01")  # two bytes: not a date


def bad_user(lsn: int) -> pb.CaptureMessage:
    return change("users", lsn, new=[int4("id", lsn, key=True), text("name", "x"), BAD_DATE])


@table("users")
@dataclass
class UserWithBirth:
    id: int
    name: str
    born: date


async def test_decode_error_requeue_policy_calls_callback_and_requeues(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a"), bad_user(2)])
    reported: list[tuple[str, int]] = []
    consumer = consumer_for(
        gateway,
        on_decode_error=lambda err, msg: reported.append((err.column, msg.checkpoint.lsn)),
    )
    consumer.handler(UserWithBirth)(lambda c: None)

    await run_until(consumer, gateway, lambda: len(gateway.fake.requeued) == 1)

    assert reported == [("born", 2)]
    (key, reason), *_ = gateway.fake.requeued
    assert key == (2, 1)
    assert reason.startswith("ChangeDecodeError: cannot decode public.users.born (type oid 1082)")
    assert consumer.stats.decode_errors == 1
    assert consumer.stats.skipped == 0


async def test_decode_error_skip_policy_acks_logs_and_counts(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.fake.script("u", [bad_user(1), user_row(2, 2, "b")])
    handled: list[int] = []
    consumer = consumer_for(gateway, decode_errors="skip")
    consumer.handler(UserWithBirth)(lambda c: handled.append(c.key["id"]))

    await run_until(consumer, gateway, lambda: len(gateway.fake.acked) == 2)

    assert handled == [2]
    assert consumer.stats.skipped == 1
    assert consumer.stats.decode_errors == 1
    assert any("decode_errors='skip'" in r.message for r in caplog.records)


async def test_decode_error_stop_policy_ends_run_without_acking_it(
    gateway: GatewayServer,
) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a"), bad_user(2), user_row(3, 3, "c")])
    consumer = consumer_for(gateway, decode_errors="stop")
    consumer.handler(UserWithBirth)(lambda c: None)

    with pytest.raises(ChangeDecodeError, match=r"public\.users\.born"):
        async with asyncio.timeout(10):
            await consumer.run()

    await gateway.fake.wait_for(lambda: gateway.fake.acked == [(1, 1)])
    assert gateway.fake.requeued == []


async def test_unknown_uri_ends_run_with_one_line_naming_the_fix(gateway: GatewayServer) -> None:
    consumer = consumer_for(gateway, uri="nope")
    consumer.handler(User)(lambda c: None)
    with pytest.raises(UnknownUri) as caught:
        async with asyncio.timeout(10):
            await consumer.run()
    message = str(caught.value)
    assert "\n" not in message
    assert "'nope'" in message
    assert "NOT_FOUND" in message
    assert "use a uri" in message
    assert len(gateway.fake.streams) == 1  # not retried


@pytest.mark.parametrize(
    ("code", "error", "fix"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, "fix the table_regex"),
        (grpc.StatusCode.PERMISSION_DENIED, AccessDenied, "granted this uri"),
        (grpc.StatusCode.FAILED_PRECONDITION, StreamRejected, "cannot succeed"),
        (grpc.StatusCode.UNIMPLEMENTED, MethodUnsupported, "batched=False"),
    ],
)
async def test_permanent_refusals_end_run_without_retrying(
    gateway: GatewayServer, code: grpc.StatusCode, error: type[Exception], fix: str
) -> None:
    gateway.fake.script("u", [])
    gateway.fake.refuse["u"] = (code, "the details")
    consumer = consumer_for(gateway)
    consumer.handler(User)(lambda c: None)
    with pytest.raises(error, match=f"{code.name}: the details; .*{fix}"):
        async with asyncio.timeout(10):
            await consumer.run()
    assert len(gateway.fake.streams) == 1


async def test_unavailable_broker_is_retried_until_it_is_back(gateway: GatewayServer) -> None:
    gateway.fake.script("u", [user_row(1, 1, "a")])
    gateway.fake.refuse["u"] = (grpc.StatusCode.UNAVAILABLE, "lost its NATS connection")
    consumer = consumer_for(gateway)
    consumer.handler(User)(lambda c: None)
    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.streams) >= 3)
    del gateway.fake.refuse["u"]
    await gateway.fake.wait_for(lambda: gateway.fake.acked == [(1, 1)])
    consumer.stop()
    await task
    assert consumer.stats.reconnects >= 2


async def test_token_is_sent_as_bearer_metadata(gateway: GatewayServer) -> None:
    gateway.fake.token = "s3cret"
    gateway.fake.script("u", [user_row(1, 1, "a")])
    consumer = consumer_for(gateway, token="s3cret", table_regex="^users$")
    consumer.handler(User)(lambda c: None)

    await run_until(consumer, gateway, lambda: len(gateway.fake.acked) == 1)

    log = gateway.fake.streams[0]
    assert log.metadata["authorization"] == "Bearer s3cret"
    assert log.init.uri == "u"
    assert log.init.parameters.fields["TableRegex"].string_value == "^users$"
    assert log.method == "CaptureBatched"


async def test_wrong_token_is_access_denied(gateway: GatewayServer) -> None:
    gateway.fake.token = "s3cret"
    gateway.fake.script("u", [])
    consumer = consumer_for(gateway, token="wrong")
    consumer.handler(User)(lambda c: None)
    with pytest.raises(AccessDenied, match="pass token="):
        async with asyncio.timeout(10):
            await consumer.run()


async def test_mutual_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server.key").read_bytes(), (tmp_path / "server.pem").read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = GatewayServer(FakeGateway(), credentials)
    await server.start()
    try:
        server.fake.script("u", [user_row(1, 1, "a")])
        tls = TlsConfig(
            ca_file=tmp_path / "ca.pem",
            cert_file=tmp_path / "client.pem",
            key_file=tmp_path / "client.key",
        )
        consumer = consumer_for(server, tls=tls)
        consumer.handler(User)(lambda c: None)
        await run_until(consumer, server, lambda: server.fake.acked == [(1, 1)])
    finally:
        await server.stop()
