"""Pure parts of the writer and the capture loop: stream settings, error classes, backoff."""

from __future__ import annotations

import asyncio
import json
import logging

import nats.errors
import nats.js.errors
import psycopg
import pytest
from nats.js import api

from pgcapture.backoff import Backoff
from pgcapture.capture.retry import _unwrap, is_transient
from pgcapture.errors import ConfigError, ConnectionLost, SlotInUse, SourceError
from pgcapture.log.lease import describe_owner, new_owner_id
from pgcapture.log.stream import StreamSettings, stream_conflicts
from pgcapture.ops.http import parse_listen
from pgcapture.ops.logs import JsonFormatter

SETTINGS = StreamSettings("PGCAPTURE_APP", "pgcapture.app", replicas=3, max_age=86400)


def test_a_stream_made_from_the_settings_has_no_conflicts() -> None:
    config = api.StreamConfig.from_response(SETTINGS.config().as_dict())
    assert stream_conflicts(config, SETTINGS) == []
    assert config.allow_direct is True
    assert config.discard == api.DiscardPolicy.OLD


def test_each_differing_setting_is_named_with_both_values() -> None:
    existing = SETTINGS.config()
    existing.num_replicas = 1
    existing.max_age = 3600
    existing.subjects = ["other"]
    existing.storage = api.StorageType.MEMORY
    conflicts = stream_conflicts(existing, SETTINGS)
    assert conflicts == [
        "subjects is ['other'] (configured ['pgcapture.app'])",
        "replicas is 1 (configured 3)",
        "storage is 'memory' (configured 'file')",
        "max_age is 3600.0 (configured 86400.0)",
    ]


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionLost("x"),
        SlotInUse("x"),
        nats.errors.NoServersError(),
        nats.errors.TimeoutError(),
        nats.js.errors.ServiceUnavailableError(code=503, description="jetstream not ready"),
        OSError("connection refused"),
        psycopg.OperationalError("connection to server failed: Connection refused"),
    ],
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("x"),
        SourceError("held by another"),
        psycopg.OperationalError('database "nope" does not exist'),
        psycopg.OperationalError("password authentication failed for user x"),
        nats.js.errors.BadRequestError(code=400, description="bad"),
        ValueError("a bug"),
    ],
)
def test_permanent_failures_are_not_retried(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_permanent_error_explains_a_failed_task_group() -> None:
    group = BaseExceptionGroup("x", [ConnectionLost("a"), ExceptionGroup("y", [ConfigError("b")])])
    assert isinstance(_unwrap(group), ConfigError)
    assert isinstance(_unwrap(BaseExceptionGroup("x", [asyncio.CancelledError()])), BaseException)


def test_backoff_grows_to_its_maximum_and_starts_again_at_attempt_zero() -> None:
    backoff = Backoff(initial=0.2, maximum=1.0)
    delays = [backoff.delay(attempt) for attempt in range(6)]
    assert 0.1 <= delays[0] <= 0.2
    assert 0.5 <= delays[-1] <= 1.0
    assert backoff.delay(0) <= 0.2


def test_owner_id_describes_the_process() -> None:
    assert describe_owner(new_owner_id().encode()).startswith("pid ")
    assert describe_owner(b"not json") == "b'not json'"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9187", ("127.0.0.1", 9187)),
        (":9187", ("0.0.0.0", 9187)),
        ("[::1]:1", ("::1", 1)),
    ],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


def test_bad_listen_address_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen 'localhost' is not HOST:PORT"):
        parse_listen("localhost")


def test_json_logs_carry_extra_fields_and_errors() -> None:
    record = logging.LogRecord("pgcapture.capture", logging.WARNING, "f", 1, "lag %d", (5,), None)
    record.source = "app"
    error = ConnectionLost("gone")
    record.exc_info = (type(error), error, None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning"
    assert line["message"] == "lag 5"
    assert line["source"] == "app"
    assert line["error"] == "ConnectionLost: gone"


async def test_a_session_that_ignores_the_stop_is_cancelled_after_the_grace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM must end capture even while a session is busy connecting or waiting for its
    slot (a walsender of a killed predecessor can hold it for wal_sender_timeout)."""
    from pgcapture.capture import retry
    from pgcapture.config import validate_config

    cancelled = asyncio.Event()

    async def busy(self: object, stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)  # e.g. waiting for the slot, deaf to ``stop``
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(retry.CaptureSession, "run", busy)
    monkeypatch.setattr(retry, "STOP_GRACE", 0.2)
    config = validate_config(
        {"nats": {"url": "nats://127.0.0.1:1"}, "sources": {"app": {"dsn": "dbname=app"}}}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(retry.run_capture(config.source("app"), config.nats, stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert cancelled.is_set()
    assert "did not finish within 0.2s of the stop" in caplog.text
