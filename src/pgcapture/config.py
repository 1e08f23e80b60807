"""The deployment's configuration: one TOML file, overridden by environment and flags.

``load_config`` reads the file (``tomllib``), applies ``PGCAPTURE_<SECTION>__<KEY>...``
environment variables (``__`` separates levels; a value is read as a TOML value when it parses
as one, else as a string), then flag overrides given as dotted keys, and validates the result
into ``Config``. Every problem ends in one ``ConfigError`` that lists each bad key by its dotted
path, where its value came from, what is wrong and how to fix it (DESIGN.md, contract 8).
Unknown keys are errors, so a typo never passes silently. docs/configuration.md is the
reference.

Durations are seconds (int or float) or strings such as ``"500ms"``, ``"30s"``, ``"5m"``,
``"12h"``, ``"7d"``; sizes are bytes or strings such as ``"512KiB"``, ``"64MB"``, ``"10GiB"``.
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from pgcapture.errors import ConfigError
from pgcapture.lsn import LSN

ENV_PREFIX: Final = "PGCAPTURE_"
_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
SOURCE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_duration(value: Any) -> Any:
    """Seconds from a number or a string with a unit; anything else is left to validation."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration; write seconds (30) or a number with a unit: "
                '"500ms", "30s", "5m", "12h", "7d"'
            )
        return float(match[1]) * _DURATION_UNITS[match[2]]
    return value


def parse_size(value: Any) -> Any:
    """Bytes from a number or a string with a unit; anything else is left to validation."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a size; write bytes (1048576) or a number with a unit: "
                '"512KiB", "64MB", "10GiB"'
            )
        return int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])
    return value


def _as_list(value: Any) -> Any:
    """A single string where a list of strings is expected."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("write a URL string or a list of URL strings")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsConfig(_Section):
    """``[nats]``: how to reach the JetStream cluster."""

    url: Annotated[list[str], BeforeValidator(_as_list)] = ["nats://127.0.0.1:4222"]
    name: str = "pgcapture"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: Path | None = None
    connect_timeout: PositiveDuration = 5.0
    lock_bucket: str = Field(default="pgcapture_locks", pattern=r"^[A-Za-z0-9_-]+$")

    @property
    def servers(self) -> list[str]:
        return [u.strip() for url in self.url for u in url.split(",") if u.strip()]


class StreamConfig(_Section):
    """``[sources.NAME.stream]``: the source's JetStream stream."""

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    subject: str | None = Field(default=None, pattern=r"^[^\s*>]+$")
    replicas: Literal[1, 3, 5] = 1
    storage: Literal["file", "memory"] = "file"
    max_age: Duration = 0.0
    max_bytes: Size = Field(default=-1, ge=-1)
    duplicate_window: PositiveDuration = 120.0


class BatchConfig(_Section):
    """``[sources.NAME.batch]``: how records are grouped into JetStream messages."""

    max_records: int = Field(default=2000, ge=1)
    max_bytes: Size = Field(default=512 << 10, ge=1024)
    linger: Duration = 0.005


class PublishConfig(_Section):
    """``[sources.NAME.publish]``: bounds on unacknowledged publishes."""

    max_in_flight: int = Field(default=256, ge=1)
    max_in_flight_bytes: Size = Field(default=32 << 20, ge=1 << 16)
    ack_timeout: PositiveDuration = 10.0


class LockConfig(_Section):
    """``[sources.NAME.lock]``: the single-writer lease."""

    ttl: int = Field(default=15, ge=1)
    wait: Duration | None = None  # None: wait until the lease is released or expires


class ReplicaConfig(_Section):
    """``[sources.NAME.replica]``: how ``replicate`` applies the source's stream to a replica."""

    dsn: str = ""
    max_changes: int = Field(default=20_000, ge=1)
    max_delay: Duration = 1.0
    queue_rows: int = Field(default=5_000, ge=1)
    skip_ddl: list[int] = []
    # SCHEMA.TABLE: created on the replica from its first change while it does not exist
    create_missing: list[str] = []
    lock_wait: Duration | None = None  # None: wait until the other replicate is gone


class SourceConfig(_Section):
    """``[sources.NAME]``: one source database and its stream."""

    name: str = ""
    dsn: str = ""
    slot: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")
    publication: str | None = None
    tables: list[str] | None = None
    status_interval: PositiveDuration = 10.0
    stream: StreamConfig = StreamConfig()
    batch: BatchConfig = BatchConfig()
    publish: PublishConfig = PublishConfig()
    lock: LockConfig = LockConfig()
    replica: ReplicaConfig = ReplicaConfig()

    @property
    def slot_name(self) -> str:
        return self.slot or "pgcapture_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())

    @property
    def stream_name(self) -> str:
        return self.stream.name or "PGCAPTURE_" + self.name.upper()

    @property
    def subject(self) -> str:
        return self.stream.subject or "pgcapture." + self.name


URI_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_START_RE: Final = re.compile(r"^(beginning|new|lsn:[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}|time:.+)$")


class UriConfig(_Section):
    """``[gateway.uris.URI]``: what consumers of one URI read and how it is delivered."""

    name: str = ""
    source: str
    consumer: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    start: str = Field(default="new", pattern=_START_RE.pattern)
    ordered: bool = False
    requeue_delay: Duration = 5.0
    requeue_max_delay: Duration = 300.0
    max_deliveries: int = Field(default=10, ge=1)
    dead_letter_stream: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    max_unacked: int = Field(default=2000, ge=1)
    ack_wait: PositiveDuration = 60.0
    max_ack_pending: int = Field(default=1000, ge=1)
    dumper: str = ""  # host:port of the `pgcapture dumper` serving this URI's source

    @field_validator("start")
    @classmethod
    def _start_time_parses(cls, value: str) -> str:
        if value.startswith("time:"):
            try:
                datetime.fromisoformat(value[5:])
            except ValueError:
                raise ValueError(
                    f'{value[5:]!r} is not an ISO 8601 time; write e.g. "time:2026-11-21T09:30:00Z"'
                ) from None
        return value

    @property
    def start_lsn(self) -> LSN | None:
        """``start = "lsn:X/Y"``: the first commit LSN a new URI delivers."""
        return LSN.parse(self.start[4:]) if self.start.startswith("lsn:") else None

    @property
    def start_time(self) -> datetime | None:
        """``start = "time:..."``: a new URI delivers what was stored from then on (UTC when
        the time has no zone)."""
        if not self.start.startswith("time:"):
            return None
        value = datetime.fromisoformat(self.start[5:])
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @property
    def consumer_name(self) -> str:
        return self.consumer or "pgcapture_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)

    @property
    def dead_letter_name(self) -> str:
        return self.dead_letter_stream or "PGCAPTURE_DLQ_" + re.sub(
            r"[^A-Za-z0-9_-]", "_", self.name.upper()
        )

    @property
    def dead_letter_subject(self) -> str:
        return "pgcapture.dlq." + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)


class TlsConfig(_Section):
    """``[gateway.tls]``: server certificate, optional client certificates."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    disabled: bool = False


class TokenConfig(_Section):
    """``[gateway.auth.tokens.NAME]``: one bearer token and the URIs it may read."""

    token: str | None = None
    token_file: Path | None = None
    uris: list[str] = ["*"]


class AuthConfig(_Section):
    """``[gateway.auth]``: bearer tokens with per-URI authorization."""

    disabled: bool = False
    tokens: dict[str, TokenConfig] = {}


class GatewayConfig(_Section):
    """``[gateway]``: the consumer-facing gRPC service."""

    listen: str = "127.0.0.1:10001"
    max_batch_records: int = Field(default=500, ge=1)
    max_batch_bytes: Size = Field(default=1 << 20, ge=1024)
    max_message_bytes: Size = Field(default=64 << 20, ge=1 << 20)
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    uris: dict[str, UriConfig] = {}
    controller: str = ""  # host:port of `pgcapture controller`; empty: no dumps
    dump_wait: PositiveDuration = 30.0  # a chunk waits this long for the stream to reach it


class ControllerConfig(_Section):
    """``[controller]``: the dump scheduler (``pgcapture controller``, docs/dumps.md)."""

    listen: str = "127.0.0.1:10002"
    bucket: str = Field(default="pgcapture_dumps", pattern=r"^[A-Za-z0-9_-]+$")
    replicas: Literal[1, 3, 5] = 1  # of the bucket when the controller creates it
    chunk_pages: int = Field(default=0, ge=0)  # 0: from the table's statistics (chunk_rows)
    chunk_rows: int = Field(default=20_000, ge=1)
    cool_down: Duration = 0.0
    claim_ttl: PositiveDuration = 10.0
    max_backoff: PositiveDuration = 60.0


class DumperConfig(_Section):
    """``[dumper]``: reads dump chunks on a source's logical replica (``pgcapture dumper``)."""

    listen: str = "127.0.0.1:10003"
    source: str = ""  # the source whose replica ([sources.NAME.replica] dsn) is read
    batch_rows: int = Field(default=1000, ge=1)
    batch_bytes: Size = Field(default=1 << 20, ge=1024)


class MetricsConfig(_Section):
    """``[metrics]``: the HTTP endpoint and the slot lag check."""

    listen: str = ""
    slot_lag_warn: Size = Field(default=1 << 30, ge=0)
    slot_lag_interval: PositiveDuration = 10.0


class LogConfig(_Section):
    """``[log]``: structured logs on stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class OfflineDatabase(_Section):
    """``[offlinedb.databases.NAME]``: what a client asking for database NAME gets."""

    source: str  # [sources.SOURCE]: the stream that keeps copies fresh
    snapshot_dsn: str = ""  # take snapshots from this server (e.g. a replica); default: the source
    scripts: list[Path] = []  # SQL run on a new copy before any client may connect
    masks: dict[str, str] = {}  # "schema.table.column" -> SQL expression of the masked value


class OfflineDbConfig(_Section):
    """``[offlinedb]``: on-demand, masked copies of sources behind one PostgreSQL endpoint."""

    listen: str = "127.0.0.1:15432"
    store: Path = Path("offlinedb")  # snapshots and running copies live under this directory
    keep: int = Field(default=3, ge=1)  # snapshots kept per database
    idle_timeout: PositiveDuration = 600.0
    max_copies: int = Field(default=4, ge=1)
    max_disk: Size = Field(default=0, ge=0)  # bytes of copies at most; 0: no cap
    databases: dict[str, OfflineDatabase] = {}


class Config(_Section):
    """The whole deployment."""

    nats: NatsConfig = NatsConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    sources: dict[str, SourceConfig] = {}
    gateway: GatewayConfig = GatewayConfig()
    controller: ControllerConfig = ControllerConfig()
    dumper: DumperConfig = DumperConfig()
    offlinedb: OfflineDbConfig = OfflineDbConfig()

    def source(self, name: str, need_dsn: bool = True) -> SourceConfig:
        """Source ``name``; ``need_dsn``: its database is connected to, so its dsn is needed."""
        try:
            source = self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(
                f"source {name!r} is not configured (configured sources: {known}); add a "
                f"[sources.{name}] section with its dsn, or pass --dsn"
            ) from None
        if need_dsn and not source.dsn:
            raise ConfigError(
                f"invalid configuration: sources.{name}.dsn: required but not set; "
                + _missing_hint(("sources", name, "dsn"))
            )
        return source


_PATTERN_HINTS: Final = {
    "slot": "a slot name holds only lower-case letters, digits and '_'",
    "name": "a stream name holds only letters, digits, '_' and '-'",
    "lock_bucket": "a bucket name holds only letters, digits, '_' and '-'",
    "subject": "a subject holds no spaces, '*' or '>'",
}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """File, then environment, then ``overrides`` (dotted keys, e.g. ``sources.app.dsn``)."""
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        data = _read_toml(path)
    for key, value in _env_overrides(env or {}).items():
        _set(data, key, value, origins, f"environment variable {_env_name(key)}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(data, tuple(dotted.split(".")), value, origins, "command line")
    return validate_config(data, origins, f" (file {str(path)!r})" if path else "")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {str(path)!r} is not valid TOML: {exc}") from None


def _env_name(key: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(k.upper() for k in key)


def _env_overrides(env: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """``PGCAPTURE_NATS__URL=...`` -> {("nats", "url"): ...}; variables without ``__`` (such
    as PGCAPTURE_CONFIG) are not configuration keys and are left alone."""
    out: dict[tuple[str, ...], Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        key = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        out[key] = parse_value(raw)
    return out


def parse_value(raw: str) -> Any:
    """A TOML value (number, boolean, array, quoted string) when ``raw`` is one, else ``raw``."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(
    data: dict[str, Any],
    key: tuple[str, ...],
    value: Any,
    origins: dict[tuple[str, ...], str],
    origin: str,
) -> None:
    node = data
    for i, part in enumerate(key[:-1]):
        if i == 1 and key[0] == "sources":
            part = _match_source(node, part)
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(key[: i + 1])} is not a table; cannot set {origin}")
        node = child
    node[key[-1]] = value
    origins[key] = origin


def _match_source(sources: dict[str, Any], name: str) -> str:
    """Environment variable names are upper case; match source names without case."""
    for existing in sources:
        if existing.lower() == name.lower():
            return existing
    return name


def validate_config(
    data: dict[str, Any],
    origins: Mapping[tuple[str, ...], str] | None = None,
    where: str = "",
) -> Config:
    for name, section in (data.get("sources") or {}).items():
        if isinstance(section, dict):
            section["name"] = name
    gateway = data.get("gateway")
    uris = gateway.get("uris") if isinstance(gateway, dict) else None
    for name, section in (uris if isinstance(uris, dict) else {}).items():
        if isinstance(section, dict):
            section["name"] = name
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origins or {}, where)) from None
    _check_sources(config)
    _check_gateway(config)
    return config


def _check_sources(config: Config) -> None:
    problems = []
    seen: dict[str, str] = {}
    for name, source in config.sources.items():
        if not SOURCE_NAME_RE.match(name):
            problems.append(
                f"sources.{name}: a source name may hold only letters, digits, '_' and '-'; "
                "rename the section"
            )
        for what, value in (
            ("stream", source.stream_name),
            ("subject", source.subject),
            ("slot", source.slot_name),
        ):
            other = seen.setdefault(f"{what}:{value}", name)
            if other != name:
                problems.append(
                    f"sources.{name}: uses the same {what} {value!r} as source {other!r}; give "
                    f"one of them its own [sources.{name}.stream] {what}"
                    if what != "slot"
                    else f"sources.{name}: uses the same slot {value!r} as source {other!r}; "
                    "set a distinct slot"
                )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _check_gateway(config: Config) -> None:
    problems = []
    seen: dict[str, str] = {}
    for name, uri in config.gateway.uris.items():
        if not URI_RE.match(name):
            problems.append(
                f"gateway.uris.{name}: a URI may hold only letters, digits, '_', '.' and '-'; "
                "rename the section"
            )
        if uri.source not in config.sources:
            known = ", ".join(sorted(config.sources)) or "none"
            problems.append(
                f"gateway.uris.{name}.source: {uri.source!r} is not a configured source "
                f"(configured: {known}); add a [sources.{uri.source}] section"
            )
        if uri.requeue_max_delay < uri.requeue_delay:
            problems.append(
                f"gateway.uris.{name}.requeue_max_delay: {uri.requeue_max_delay}s is below "
                f"requeue_delay ({uri.requeue_delay}s); raise it"
            )
        for what, value in (
            ("consumer", uri.consumer_name),
            ("dead letter stream", uri.dead_letter_name),
        ):
            scope = uri.source if what == "consumer" else ""  # stream names are global
            other = seen.setdefault(f"{what}:{scope}:{value}", name)
            if other != name:
                problems.append(
                    f"gateway.uris.{name}: uses the same {what} {value!r} as URI {other!r}; "
                    f"set a distinct one in [gateway.uris.{name}]"
                )
    for name, token in config.gateway.auth.tokens.items():
        if (token.token is None) == (token.token_file is None):
            problems.append(f"gateway.auth.tokens.{name}: set exactly one of token and token_file")
        problems.extend(
            f"gateway.auth.tokens.{name}.uris: {uri!r} is not a configured URI; "
            'list URIs of [gateway.uris] or "*"'
            for uri in token.uris
            if uri != "*" and uri not in config.gateway.uris
        )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _explain(exc: ValidationError, origins: Mapping[tuple[str, ...], str], where: str) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc) or "(top level)"
        origin = _origin_of(loc, origins)
        lines.append(f"{key}: {_problem(error, loc)}{f' (from {origin})' if origin else ''}")
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines)


def _origin_of(loc: tuple[str, ...], origins: Mapping[tuple[str, ...], str]) -> str:
    for i in range(len(loc), -1, -1):
        if loc[:i] in origins:
            return origins[loc[:i]]
    return ""


def _problem(error: Any, loc: tuple[str, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = ", ".join(_valid_keys(loc[:-1])) or "none"
        return f"unknown key; the keys allowed here are: {valid}"
    if kind == "missing":
        return "required but not set; " + _missing_hint(loc)
    given = error.get("input")
    text = error["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        text = _PATTERN_HINTS.get(loc[-1], text)
    return f"{text} (got {given!r})" if not isinstance(given, dict) else text


def _missing_hint(loc: tuple[str, ...]) -> str:
    if loc[:1] == ("sources",) and loc[-1] == "dsn" and len(loc) == 3:
        return f'add dsn = "..." to [sources.{loc[1]}] or pass --dsn'
    return "add it to the configuration file"


def _valid_keys(loc: tuple[str, ...]) -> list[str]:
    model: Any = Config
    named = False  # inside a table of named sections ([sources.NAME], [gateway.uris.NAME])
    for part in loc:
        if isinstance(model, dict):
            model, named = model["*"], True
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            model = {"*": typing.get_args(annotation)[1]}
            continue
        if not isinstance(annotation, type):
            return []
        model, named = annotation, False
    if isinstance(model, dict) or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return sorted(k for k in model.model_fields if k != "name" or not named)
