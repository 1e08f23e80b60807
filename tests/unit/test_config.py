"""The configuration file: defaults, overrides by environment and flags, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgcapture.config import load_config, parse_duration, parse_size
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
