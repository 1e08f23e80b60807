"""Which handler gets which event, and the consumer's counters.

``routes_for`` turns the handlers a consumer was given (keyed by model class, ``Row`` for
every table without a handler of its own, ``Truncate`` for truncates) into ``Routes`` and the
``ModelSpec`` of every table that has a model. A table with no route is acknowledged without
decoding its values.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pgcapture.client.change import Row, Truncate
from pgcapture.client.errors import ChangeDecodeError
from pgcapture.client.models import ModelSpec, model_spec
from pgcapture.errors import ConfigError
from pgcapture.proto import pb

Handler = Callable[[Any], Awaitable[object] | object]
DecodeErrorCallback = Callable[[ChangeDecodeError, pb.CaptureMessage], Awaitable[object] | object]
DecodePolicy = Literal["requeue", "skip", "stop"]


@dataclass
class ConsumerStats:
    """Counters of a consumer, over all its streams."""

    received: int = 0
    """Messages delivered by the gateway."""
    handled: int = 0
    """Events whose handler returned (or that iteration moved past)."""
    acked: int = 0
    requeued: int = 0
    """Requeued by a handler error, ``requeue()``, a decode error or a failed type lookup."""
    decode_errors: int = 0
    skipped: int = 0
    """Undecodable changes acknowledged without a handler (``decode_errors="skip"``)."""
    ignored: int = 0
    """Events acknowledged because no handler wants their table."""
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class Routes:
    """Which handler an event goes to; ``None`` = acknowledge without decoding."""

    tables: Mapping[tuple[str, str], Handler]
    rows: Handler | None = None
    truncate: Handler | None = None

    def handler_for(self, message: pb.CaptureMessage) -> Handler | None:
        if message.HasField("truncate"):
            return self.truncate
        if not message.HasField("change"):
            return None  # a kind of message this library does not know: acknowledged
        change = message.change
        return self.tables.get((change.schema, change.table), self.rows)


def specs_of(models: Iterable[type[Any]]) -> dict[tuple[str, str], ModelSpec]:
    specs: dict[tuple[str, str], ModelSpec] = {}
    for model in models:
        add_spec(specs, model_spec(model))
    return specs


def add_spec(specs: dict[tuple[str, str], ModelSpec], spec: ModelSpec) -> None:
    table = (spec.schema, spec.table)
    other = specs.get(table)
    if other is not None and other.model is not spec.model:
        raise ConfigError(
            f"models {other.model.__qualname__} and {spec.model.__qualname__} both map table "
            f"{spec.schema}.{spec.table}; use one model per table"
        )
    specs[table] = spec


def routes_for(
    handlers: Mapping[type[Any], Handler], models: Mapping[tuple[str, str], ModelSpec]
) -> tuple[Routes, dict[tuple[str, str], ModelSpec]]:
    specs = dict(models)
    tables: dict[tuple[str, str], Handler] = {}
    for key, fn in handlers.items():
        if key is Truncate or key is Row:
            continue
        spec = model_spec(key)
        table = (spec.schema, spec.table)
        if table in tables:
            raise ConfigError(
                f"two handlers for table {spec.schema}.{spec.table} (models "
                f"{specs[table].model.__qualname__} and {key.__qualname__}); keep one"
            )
        specs.pop(table, None)
        add_spec(specs, spec)
        tables[table] = fn
    return Routes(tables, rows=handlers.get(Row), truncate=handlers.get(Truncate)), specs
