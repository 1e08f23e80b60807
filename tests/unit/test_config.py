"""The configuration file: defaults, overrides by environment and flags, clear errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgcapture.config import (
    Config,
    UriConfig,
    load_config,
    parse_duration,
    parse_size,
    validate_config,
)
from pgcapture.errors import ConfigError

EXAMPLE = """
[nats]
url = ["nats://n1:4222", "nats://n2:4222"]

[metrics]
listen = ":9187"
slot_lag_warn = "2GiB"

[sources.app]
dsn = "host=/run/postgresql dbname=app"
tables = ["public.orders"]

[sources.app.stream]
replicas = 3
max_age = "7d"
max_bytes = "50GiB"

[sources.app.batch]
linger = "10ms"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgcapture.toml"
    path.write_text(text)
    return path


def test_example_file_with_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, EXAMPLE), env={})
    app = config.source("app")
    assert config.nats.servers == ["nats://n1:4222", "nats://n2:4222"]
    assert config.metrics.slot_lag_warn == 2 << 30
    assert app.name == "app"
    assert app.tables == ["public.orders"]
    assert app.slot_name == "pgcapture_app"
    assert app.publication is None
    assert app.stream_name == "PGCAPTURE_APP"
    assert app.subject == "pgcapture.app"
    assert app.stream.replicas == 3
    assert app.stream.max_age == 7 * 86400
    assert app.stream.max_bytes == 50 << 30
    assert app.stream.duplicate_window == 120
    assert app.batch.linger == pytest.approx(0.01)
    assert app.batch.max_records == 2000
    assert app.lock.ttl == 15
    assert app.publish.ack_timeout == 10


def test_environment_overrides_file_and_flags_override_both(tmp_path: Path) -> None:
    env = {
        "PGCAPTURE_NATS__URL": "nats://env:4222",
        "PGCAPTURE_SOURCES__APP__STREAM__REPLICAS": "1",
        "PGCAPTURE_SOURCES__APP__DSN": "dbname=from_env",
        "PGCAPTURE_CONFIG": "ignored.toml",  # not a key: no "__"
        "PGCAPTURE_NATS_SERVER": "/usr/bin/nats-server",
    }
    config = load_config(
        _write(tmp_path, EXAMPLE), env=env, overrides={"sources.app.dsn": "dbname=from_flag"}
    )
    app = config.source("app")
    assert config.nats.servers == ["nats://env:4222"]
    assert app.stream.replicas == 1
    assert app.dsn == "dbname=from_flag"


def test_flags_alone_make_a_source() -> None:
    config = load_config(
        None, env={}, overrides={"sources.s1.dsn": "dbname=x", "nats.url": "nats://a:1,nats://b:2"}
    )
    assert config.source("s1").stream_name == "PGCAPTURE_S1"
    assert config.nats.servers == ["nats://a:1", "nats://b:2"]


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, EXAMPLE.replace("replicas = 3", "replica = 3"))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert "sources.app.stream.replica: unknown key" in text
    assert "max_age" in text
    assert "replicas" in text


def test_bad_value_names_the_key_the_value_and_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            _write(tmp_path, EXAMPLE), env={"PGCAPTURE_SOURCES__APP__STREAM__REPLICAS": "2"}
        )
    text = str(err.value)
    assert "sources.app.stream.replicas" in text
    assert "got 2" in text
    assert "PGCAPTURE_SOURCES__APP__STREAM__REPLICAS" in text


def test_bad_duration_and_size_say_how_to_write_them(tmp_path: Path) -> None:
    path = _write(tmp_path, EXAMPLE.replace('"7d"', '"a week"').replace('"50GiB"', '"lots"'))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    text = str(err.value)
    assert "sources.app.stream.max_age" in text
    assert '"7d"' in text
    assert "sources.app.stream.max_bytes" in text
    assert '"10GiB"' in text


def test_missing_dsn_says_how_to_set_it(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[sources.app]\nslot = 'x'\n"), env={})
    with pytest.raises(ConfigError, match=r"sources\.app\.dsn: required.*--dsn"):
        config.source("app")
    assert config.source("app", need_dsn=False).dsn == ""


def test_unknown_source_lists_the_configured_ones(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, EXAMPLE), env={})
    with pytest.raises(ConfigError, match=r"source 'other' is not configured.*app"):
        config.source("other")


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[nats\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_two_sources_on_one_stream_are_refused(tmp_path: Path) -> None:
    text = (
        "[sources.a]\ndsn = 'x'\n[sources.a.stream]\nname = 'S'\n"
        "[sources.b]\ndsn = 'y'\n[sources.b.stream]\nname = 'S'\n"
    )
    with pytest.raises(ConfigError, match="same stream 'S' as source 'a'"):
        load_config(_write(tmp_path, text), env={})


def test_bad_source_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only letters, digits"):
        load_config(_write(tmp_path, '[sources."a.b"]\ndsn = "x"\n'), env={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("1.5d", 129600), (7, 7)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"), [("512KiB", 512 << 10), ("64MB", 64_000_000), ("1gib", 1 << 30), (10, 10)]
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


# -- [gateway] ---------------------------------------------------------------------------------

GATEWAY = """
[sources.app]
dsn = "dbname=app"

[sources.billing]
dsn = "dbname=billing"

[gateway]
listen = "0.0.0.0:10001"

[gateway.tls]
cert = "/etc/pgcapture/gateway.pem"
key = "/etc/pgcapture/gateway.key"

[gateway.auth.tokens.reporting]
token_file = "/etc/pgcapture/reporting.token"
uris = ["orders"]

[gateway.uris.orders]
source = "app"
"""


def _gateway(tmp_path: Path, extra: str = "", env: dict[str, str] | None = None) -> Config:
    return load_config(_write(tmp_path, GATEWAY + extra), env=env or {})


def test_gateway_defaults() -> None:
    gateway = load_config(None, env={}).gateway
    assert gateway.listen == "127.0.0.1:10001"
    assert gateway.max_batch_records == 500
    assert gateway.max_batch_bytes == 1 << 20
    assert gateway.max_message_bytes == 64 << 20
    assert gateway.tls.cert is None
    assert gateway.tls.key is None
    assert gateway.tls.client_ca is None
    assert gateway.tls.disabled is False
    assert gateway.auth.disabled is False
    assert gateway.auth.tokens == {}
    assert gateway.uris == {}


def test_gateway_uri_defaults_and_derived_names(tmp_path: Path) -> None:
    config = _gateway(tmp_path)
    uri = config.gateway.uris["orders"]
    assert uri.name == "orders"
    assert uri.source == "app"
    assert uri.consumer_name == "pgcapture_orders"
    assert uri.start == "new"
    assert uri.ordered is False
    assert uri.requeue_delay == 5
    assert uri.requeue_max_delay == 300
    assert uri.max_deliveries == 10
    assert uri.dead_letter_name == "PGCAPTURE_DLQ_ORDERS"
    assert uri.dead_letter_subject == "pgcapture.dlq.orders"
    assert uri.max_unacked == 2000
    assert uri.ack_wait == 60
    assert uri.max_ack_pending == 1000
    assert uri.dumper == ""
    token = config.gateway.auth.tokens["reporting"]
    assert token.token is None
    assert token.token_file == Path("/etc/pgcapture/reporting.token")
    assert token.uris == ["orders"]
    assert config.gateway.tls.cert == Path("/etc/pgcapture/gateway.pem")


def test_gateway_values_with_units_and_start_positions(tmp_path: Path) -> None:
    extra = """
[gateway.uris."orders.eu"]
source = "app"
start = "lsn:16/B374D848"
requeue_delay = "500ms"
requeue_max_delay = "1m"
ack_wait = "2m"

[gateway.uris.invoices]
source = "billing"
start = "beginning"
"""
    config = _gateway(tmp_path, extra)
    eu = config.gateway.uris["orders.eu"]
    assert eu.start == "lsn:16/B374D848"
    assert eu.requeue_delay == pytest.approx(0.5)
    assert eu.requeue_max_delay == 60
    assert eu.ack_wait == 120
    assert eu.consumer_name == "pgcapture_orders_eu"
    assert config.gateway.uris["invoices"].start == "beginning"


def test_gateway_uri_with_a_bad_start_is_refused(tmp_path: Path) -> None:
    extra = '\n[gateway.uris.late]\nsource = "app"\nstart = "yesterday"\n'
    with pytest.raises(ConfigError, match=r"gateway\.uris\.late\.start: .*got 'yesterday'"):
        _gateway(tmp_path, extra)


def test_gateway_uri_names_hold_letters_digits_and_punctuation_only(tmp_path: Path) -> None:
    extra = '\n[gateway.uris."orders eu"]\nsource = "app"\n'
    with pytest.raises(ConfigError, match=r"gateway\.uris\.orders eu: a URI may hold only"):
        _gateway(tmp_path, extra)


def test_gateway_uri_of_an_unknown_source_lists_the_sources(tmp_path: Path) -> None:
    extra = '\n[gateway.uris.payments]\nsource = "payments"\n'
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, extra)
    text = str(err.value)
    assert "gateway.uris.payments.source: 'payments' is not a configured source" in text
    assert "(configured: app, billing)" in text
    assert "[sources.payments]" in text


def test_gateway_uri_needs_a_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.uris\.bare\.source: required but not set"):
        _gateway(tmp_path, "\n[gateway.uris.bare]\nordered = true\n")


@pytest.mark.parametrize(
    "fields",
    ['token = "abc"\ntoken_file = "/etc/t"', 'uris = ["orders"]'],
    ids=["both", "neither"],
)
def test_gateway_token_needs_exactly_one_of_token_and_token_file(
    tmp_path: Path, fields: str
) -> None:
    extra = f"\n[gateway.auth.tokens.ci]\n{fields}\n"
    with pytest.raises(
        ConfigError, match=r"gateway\.auth\.tokens\.ci: set exactly one of token and token_file"
    ):
        _gateway(tmp_path, extra)


def test_gateway_token_listing_an_unknown_uri_is_refused(tmp_path: Path) -> None:
    extra = '\n[gateway.auth.tokens.ci]\ntoken = "abc"\nuris = ["orders", "refunds"]\n'
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, extra)
    text = str(err.value)
    assert "gateway.auth.tokens.ci.uris: 'refunds' is not a configured URI" in text
    assert "'orders'" not in text
    assert '"*"' in text


def test_gateway_requeue_max_delay_below_requeue_delay_is_refused(tmp_path: Path) -> None:
    extra = 'requeue_delay = "10m"\nrequeue_max_delay = "1m"\n'
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, extra)
    text = str(err.value)
    assert "gateway.uris.orders.requeue_max_delay: 60.0s is below requeue_delay (600.0s)" in text
    assert "raise it" in text


def test_gateway_uris_sharing_a_consumer_are_refused(tmp_path: Path) -> None:
    extra = '\n[gateway.uris.audit]\nsource = "app"\nconsumer = "pgcapture_orders"\n'
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, extra)
    text = str(err.value)
    assert "gateway.uris.audit: uses the same consumer 'pgcapture_orders' as URI 'orders'" in text
    assert "[gateway.uris.audit]" in text


def test_gateway_uri_names_that_derive_the_same_consumer_are_refused(tmp_path: Path) -> None:
    extra = (
        '\n[gateway.uris."orders.eu"]\nsource = "app"\n[gateway.uris.orders_eu]\nsource = "app"\n'
    )
    with pytest.raises(ConfigError, match="same consumer 'pgcapture_orders_eu'"):
        _gateway(tmp_path, extra)


def test_gateway_same_consumer_name_on_different_sources_is_allowed(tmp_path: Path) -> None:
    extra = '\n[gateway.uris.invoices]\nsource = "billing"\nconsumer = "pgcapture_orders"\n'
    config = _gateway(tmp_path, extra)
    assert config.gateway.uris["invoices"].consumer_name == "pgcapture_orders"


def test_gateway_unknown_uri_key_lists_the_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, "max_unacked_changes = 5\n")
    text = str(err.value)
    assert (
        "gateway.uris.orders.max_unacked_changes: unknown key; the keys allowed here are:" in text
    )
    for key in ("ack_wait", "consumer", "max_unacked", "requeue_delay", "source", "start"):
        assert key in text
    assert " name," not in text  # set from the section's name, not a key to write


def test_gateway_unknown_tls_and_auth_keys_list_the_valid_keys(tmp_path: Path) -> None:
    text = GATEWAY.replace('key = "/etc', 'private_key = "/etc').replace("uris = [", "allowed = [")
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), env={})
    message = str(err.value)
    assert "gateway.tls.private_key: unknown key" in message
    assert "cert, client_ca, disabled, key" in message
    assert "gateway.auth.tokens.reporting.allowed: unknown key" in message
    assert "token, token_file, uris" in message


def test_gateway_environment_overrides(tmp_path: Path) -> None:
    env = {
        "PGCAPTURE_GATEWAY__URIS__ORDERS__MAX_UNACKED": "5",
        "PGCAPTURE_GATEWAY__URIS__ORDERS__ORDERED": "true",
        "PGCAPTURE_GATEWAY__LISTEN": "127.0.0.1:20001",
        "PGCAPTURE_GATEWAY__MAX_MESSAGE_BYTES": "16MiB",
        "PGCAPTURE_GATEWAY__AUTH__TOKENS__REPORTING__URIS": '["*"]',
    }
    config = _gateway(tmp_path, env=env)
    assert config.gateway.uris["orders"].max_unacked == 5
    assert config.gateway.uris["orders"].ordered is True
    assert config.gateway.listen == "127.0.0.1:20001"
    assert config.gateway.max_message_bytes == 16 << 20
    assert config.gateway.auth.tokens["reporting"].uris == ["*"]


def test_gateway_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    env = {"PGCAPTURE_GATEWAY__URIS__ORDERS__MAX_UNACKED": "0"}
    with pytest.raises(ConfigError) as err:
        _gateway(tmp_path, env=env)
    text = str(err.value)
    assert "gateway.uris.orders.max_unacked" in text
    assert "PGCAPTURE_GATEWAY__URIS__ORDERS__MAX_UNACKED" in text


def test_gateway_flags_disable_tls_and_auth(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, GATEWAY),
        env={},
        overrides={"gateway.tls.disabled": True, "gateway.auth.disabled": True},
    )
    assert config.gateway.tls.disabled is True
    assert config.gateway.auth.disabled is True
    assert config.gateway.tls.cert == Path("/etc/pgcapture/gateway.pem")


def test_gateway_message_size_below_one_mebibyte_is_refused(tmp_path: Path) -> None:
    text = GATEWAY.replace('listen = "0.0.0.0:10001"', 'max_message_bytes = "64KiB"')
    with pytest.raises(ConfigError, match=r"gateway\.max_message_bytes: .*1048576"):
        load_config(_write(tmp_path, text), env={})


def test_uri_start_positions_are_checked_when_the_configuration_loads() -> None:
    def uri(start: str) -> UriConfig:
        data = {
            "sources": {"app": {"dsn": "x"}},
            "gateway": {"uris": {"u": {"source": "app", "start": start}}},
        }
        return validate_config(data).gateway.uris["u"]

    assert uri("lsn:16/B374D848").start_lsn == 0x16B374D848
    assert uri("time:2026-11-21T09:30:00").start_time == datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
    assert uri("new").start_lsn is None
    assert uri("new").start_time is None
    with pytest.raises(ConfigError, match=r"gateway\.uris\.u\.start: 'yesterday' is not an ISO"):
        uri("time:yesterday")
