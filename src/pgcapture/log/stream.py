"""A source's JetStream stream: its settings, creating or checking it, and reading its tail.

The layout (docs/protocol.md, "The log on NATS JetStream"): one stream per source,
``PGCAPTURE_<SOURCE>`` on subject ``pgcapture.<source>``, retention by limits with discard-old,
a duplicate window, direct get allowed. Each message's payload is a ``LogBatch``; its headers
carry the first and last checkpoint keys (``Pgcapture-First``, ``Pgcapture-Last``), and
``Nats-Msg-Id`` is the last one. A fragment of a record too large for one message also carries
``Pgcapture-Part`` = ``<end>/<total>`` (bytes of the record up to the end of this fragment, and
in all); only the record's last fragment has a ``Nats-Msg-Id``.

``ensure_stream`` creates a missing stream; an existing one with other settings is reported with
every difference, never changed. ``read_tail`` says where the stream ends: its last sequence and
the last checkpoint it stores, which is where capture resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import nats.js.errors
from nats.js import JetStreamContext, api

from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ConfigError, SourceError

HEADER_FIRST: Final = "Pgcapture-First"
HEADER_LAST: Final = "Pgcapture-Last"
HEADER_PART: Final = "Pgcapture-Part"


def part_header(end: int, total: int) -> str:
    return f"{end}/{total}"


def parse_part(value: str | None) -> tuple[int, int] | None:
    """(end, total) of a ``Pgcapture-Part`` header value; None when absent."""
    if not value:
        return None
    end, _, total = value.partition("/")
    return int(end), int(total)


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What pgcapture asks of a source's stream. ``max_age`` 0 and ``max_bytes`` -1 = no limit."""

    name: str
    subject: str
    replicas: int = 1
    storage: Literal["file", "memory"] = "file"
    max_age: float = 0.0
    max_bytes: int = -1
    duplicate_window: float = 120.0

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            description="pgcapture: ordered change log of one source database",
            subjects=[self.subject],
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            max_msgs=-1,
            storage=api.StorageType(self.storage),
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            allow_direct=True,
        )


def stream_conflicts(existing: api.StreamConfig, wanted: StreamSettings) -> list[str]:
    """The settings of an existing stream that differ from what is configured, as phrases."""
    want = wanted.config()
    checks: list[tuple[str, Any, Any]] = [
        ("subjects", existing.subjects, want.subjects),
        ("replicas", existing.num_replicas, want.num_replicas),
        ("storage", _enum_value(existing.storage), _enum_value(want.storage)),
        ("max_age", _seconds(existing.max_age), _seconds(want.max_age)),
        ("max_bytes", existing.max_bytes, want.max_bytes),
        ("duplicate_window", _seconds(existing.duplicate_window), want.duplicate_window),
        ("retention", _enum_value(existing.retention), "limits"),
        ("discard", _enum_value(existing.discard), "old"),
        ("allow_direct", bool(existing.allow_direct), True),
    ]
    return [
        f"{key} is {have!r} (configured {expect!r})"
        for key, have, expect in checks
        if have != expect
    ]


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _seconds(value: float | None) -> float:
    return round(float(value or 0.0), 3)


async def ensure_stream(js: JetStreamContext, settings: StreamSettings) -> api.StreamInfo:
    """Create the stream if it is missing; an existing one must match the settings."""
    try:
        info = await js.stream_info(settings.name)
    except nats.js.errors.NotFoundError:
        try:
            return await js.add_stream(settings.config())
        except nats.js.errors.APIError as exc:
            raise ConfigError(
                f"cannot create stream {settings.name!r} on subject {settings.subject!r}: "
                f"{exc.description}; {_create_hint(exc)}"
            ) from exc
    conflicts = stream_conflicts(info.config, settings)
    if conflicts:
        raise ConfigError(
            f"stream {settings.name!r} exists with settings that differ from the configuration: "
            f"{'; '.join(conflicts)}. pgcapture does not change an existing stream: set the "
            "configuration to match, or change the stream yourself "
            f"(e.g. `nats stream edit {settings.name}`)"
        )
    return info


def _create_hint(exc: nats.js.errors.APIError) -> str:
    text = (exc.description or "").lower()
    if "replicas" in text:
        return "set the stream's replicas to 1 on a single nats-server (3 needs a cluster)"
    if "overlap" in text:
        return "another stream already takes this subject; give the source another subject"
    return "check the stream settings of this source"


@dataclass(frozen=True, slots=True)
class Tail:
    """Where the stream ends: its last sequence (0 if never written) and last stored checkpoint.

    ``partial`` is True when the last message is a fragment that is not its record's last (a
    capture stopped in the middle of a large record): that record is not stored whole, so it is
    written again, from its first fragment."""

    seq: int
    checkpoint: Checkpoint | None
    partial: bool = False


async def read_tail(js: JetStreamContext, stream: str) -> Tail:
    """The stream's last sequence and the ``Pgcapture-Last`` of its last message.

    Both come from the stream leader's API (not a direct get, which a lagging replica may
    answer), so they are what is stored.
    """
    info = await js.stream_info(stream)
    last_seq = info.state.last_seq
    if info.state.messages == 0:
        return Tail(last_seq, None)
    try:
        msg = await js.get_msg(stream, seq=last_seq)
    except nats.js.errors.NotFoundError:
        return Tail(last_seq, None)  # removed by the retention limits since stream_info
    key = (msg.headers or {}).get(HEADER_LAST)
    if not key:
        raise SourceError(
            f"the last message of stream {stream!r} (sequence {last_seq}) has no {HEADER_LAST} "
            "header, so it was not written by `pgcapture capture`; give this source a stream "
            "of its own"
        )
    part = parse_part(msg.headers.get(HEADER_PART) if msg.headers else None)
    partial = part is not None and part[0] != part[1]
    return Tail(last_seq, Checkpoint.from_key(key), partial)
