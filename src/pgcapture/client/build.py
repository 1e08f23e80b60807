"""Wire messages -> events: ``CaptureMessage`` in, ``Change`` / ``Truncate`` out (no I/O).

Only the columns a model maps (and the key columns) are decoded, so an undecodable column the
model does not declare never stops a change. Every failure becomes a ``ChangeDecodeError``
naming the table, the column, its type OID and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from pgcapture.checkpoint import Checkpoint
from pgcapture.client.change import Change, Op, Row, TableName, Ticket, Truncate
from pgcapture.client.errors import ChangeDecodeError
from pgcapture.client.models import ModelSpec
from pgcapture.client.values import UNCHANGED, RawValue, ValueDecoder, field_bytes, field_format
from pgcapture.proto import pb

_OPS: Final = {
    pb.Change.INSERT: Op.INSERT,
    pb.Change.UPDATE: Op.UPDATE,
    pb.Change.DELETE: Op.DELETE,
}
_NO_DSN_FIX: Final = (
    "pass dsn= (the source database) to the Consumer so user types are looked up, or "
    "declare the field as RawValue (or str / an Enum / a tuple / a list, see the guide)"
)
_BAD_VALUE_FIX: Final = (
    "declare the model field as `... | RawValue` to receive such values undecoded; until "
    "then the change is handled as decode_errors= says"
)


def checkpoint_of(message: pb.CaptureMessage) -> Checkpoint:
    return Checkpoint(message.checkpoint.lsn, message.checkpoint.seq)


class EventBuilder:
    """Builds events with ``decoder``; ``models`` maps (schema, table) to its model."""

    def __init__(self, decoder: ValueDecoder, models: Mapping[tuple[str, str], ModelSpec]) -> None:
        self._decoder = decoder
        self._models = models

    def oids(self, message: pb.CaptureMessage) -> set[int]:
        """The type OIDs ``build`` will decode for ``message``."""
        if not message.HasField("change"):
            return set()
        change = message.change
        spec = self._models.get((change.schema, change.table))
        if spec is None:
            return {f.oid for f in change.new} | {f.oid for f in change.old}
        wanted = spec.columns
        return {f.oid for f in (*change.new, *change.old) if f.key or f.name in wanted}

    def build(self, message: pb.CaptureMessage, ticket: Ticket) -> Change[Any] | Truncate:
        if message.HasField("truncate"):
            t = message.truncate
            return Truncate(
                tuple(TableName(x.schema, x.table) for x in t.tables),
                t.cascade,
                t.restart_identity,
                checkpoint_of(message),
                ticket,
            )
        change = message.change
        spec = self._models.get((change.schema, change.table))
        op = _OPS.get(change.op)
        if op is None:
            raise ChangeDecodeError(
                change.schema, change.table, "", 0, f"unknown operation {change.op}",
                "upgrade pgcapture: the gateway sends operations this library does not know",
            )  # fmt: skip
        new = self._image(change, change.new, spec) if change.new else None
        old = self._image(change, change.old, spec) if change.old else None
        old_key = self._key(change, change.old) if change.old else None
        key = old_key if op is Op.DELETE or not change.new else self._key(change, change.new)
        return Change(
            op, change.schema, change.table, checkpoint_of(message), new, old,
            key or Row(), old_key or None, ticket,
        )  # fmt: skip

    def _decode(self, change: pb.Change, f: pb.Field) -> Any:
        try:
            return self._decoder.decode_field(f)
        except Exception as exc:
            raise ChangeDecodeError(
                change.schema, change.table, f.name, f.oid, _describe(exc), _BAD_VALUE_FIX
            ) from exc

    def _key(self, change: pb.Change, fields: Sequence[pb.Field]) -> Row:
        return Row({f.name: self._decode(change, f) for f in fields if f.key})

    def _image(self, change: pb.Change, fields: Sequence[pb.Field], spec: ModelSpec | None) -> Any:
        if spec is None:
            return Row({f.name: self._decode(change, f) for f in fields})
        by_column = {f.name: f for f in fields}
        values: dict[str, Any] = {}
        for fs in spec.fields:
            wire = by_column.get(fs.column)
            if wire is None:
                values[fs.attr] = UNCHANGED
                continue
            try:
                value = self._decoder.decode_field(wire)
            except Exception as exc:
                value = self._undecodable(change, wire, fs.convert, exc)
            try:
                values[fs.attr] = fs.convert(value)
            except Exception as exc:
                fix = _NO_DSN_FIX if isinstance(value, RawValue) else _BAD_VALUE_FIX
                raise ChangeDecodeError(
                    change.schema, change.table, wire.name, wire.oid, _describe(exc), fix
                ) from exc
        try:
            return spec.construct(values)
        except Exception as exc:
            raise ChangeDecodeError(
                change.schema, change.table, "", 0,
                f"model {spec.model.__qualname__} refused the values: {_describe(exc)}",
                "make the model accept every decoded value (and UNCHANGED)",
            ) from exc  # fmt: skip

    def _undecodable(self, change: pb.Change, wire: pb.Field, convert: Any, exc: Exception) -> Any:
        """A value psycopg cannot load: a ``RawValue`` if the field takes one, else an error."""
        fmt = field_format(wire)
        assert fmt is not None  # NULL always decodes
        raw = RawValue(wire.oid, field_bytes(wire), fmt)
        try:
            if convert(raw) is raw:
                return raw
        except Exception:
            pass
        raise ChangeDecodeError(
            change.schema, change.table, wire.name, wire.oid, _describe(exc), _BAD_VALUE_FIX
        ) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
