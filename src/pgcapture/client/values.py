"""Column values: (type OID, PostgreSQL binary or text form) -> Python, with psycopg's loaders.

A ``ValueDecoder`` owns a private ``psycopg.adapt.AdaptersMap`` copied from psycopg's global
one, so every type psycopg knows decodes exactly as a ``SELECT`` through psycopg would, and
registering user types (``typeinfo``) never touches the global map. Three additions:

- an OID with no loader decodes to ``RawValue(oid, data, format)``, never to bytes that look
  like a value: the loader registered for OID 0 is psycopg's fallback for unknown OIDs, so this
  also holds for the elements of arrays, records and ranges;
- ``infinity`` / ``-infinity`` of ``date``, ``timestamp`` and ``timestamptz`` decode to
  ``date.max`` / ``date.min``, ``datetime.max`` / ``datetime.min`` (UTC for timestamptz) instead
  of psycopg's ``DataError`` (psycopg docs, "Adapting infinity dates"), everywhere, including in
  arrays and range bounds;
- ``timestamptz`` is aware in UTC: the map has no connection, so no session time zone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Final

import psycopg
from psycopg import abc, pq
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import AdaptersMap, Loader, Transformer

from pgcapture.client.binary import check_array, check_record
from pgcapture.proto import pb

_DATE_OID: Final = 1082
_TIMESTAMP_OID: Final = 1114
_TIMESTAMPTZ_OID: Final = 1184
_RECORD_OID: Final = 2249
_TEXT_ARRAY_OID: Final = 1009
_UNKNOWN_OID: Final = 0  # psycopg's fallback for OIDs without a loader

# Binary sizes of fixed-width built-in types. psycopg's C loaders trust the server and read
# that many bytes whatever they are given; a value of another length is refused before.
FIXED_SIZES: Final[dict[int, int]] = {
    16: 1, 18: 1, 20: 8, 21: 2, 23: 4, 26: 4, 700: 4, 701: 8, 1082: 4, 1083: 8, 1114: 8,
    1184: 8, 1186: 16, 1266: 12, 2950: 16,
}  # fmt: skip


class Unchanged(Enum):
    """The type of ``UNCHANGED``: a column the change does not carry.

    In ``Change.new`` it is an unchanged TOASTed value (PostgreSQL does not send a large
    value an UPDATE did not touch); in ``Change.old`` a column that is not part of the
    replica identity. It is not ``None``: ``None`` is SQL NULL. Declare model fields that can
    be absent as ``str | Unchanged`` (or ``str | Unchanged | None``) and test with
    ``is UNCHANGED``; mypy narrows the type after the test.
    """

    UNCHANGED = "UNCHANGED"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED
"""The marker of a column absent from the change (see ``Unchanged``)."""


class ValueFormat(Enum):
    """How a value is encoded on the wire: ``Field.binary`` or ``Field.text``."""

    BINARY = "binary"
    TEXT = "text"

    @property
    def pq(self) -> pq.Format:
        return pq.Format.BINARY if self is ValueFormat.BINARY else pq.Format.TEXT


@dataclass(frozen=True, slots=True)
class RawValue:
    """A value whose type has no decoder: its type OID and its bytes, exactly as received.

    It appears for user-defined types when the consumer has no ``dsn`` (enums, composites,
    domains, their arrays) and for the few built-in types psycopg does not load (``money``,
    ``xml``, ``tsvector``, geometric types, ``bit``, ``pg_lsn``, ...). The helpers read the
    forms that describe themselves, after checking that the bytes have that form:

    >>> RawValue(16390, b"happy", ValueFormat.BINARY).as_text()   # an enum label
    'happy'
    """

    oid: int
    data: bytes
    format: ValueFormat

    def as_text(self) -> str:
        """The bytes as UTF-8 text: the label of an enum, the value of a text-like type."""
        return self.data.decode("utf-8")

    def as_record(self) -> tuple[Any, ...]:
        """A composite value as a tuple, with psycopg's ``record`` loader.

        The binary form carries each field's type OID, so fields of known types decode to
        their Python values (others to ``RawValue``); the text form gives every field as text.
        """
        decoder = fallback_decoder()
        if self.format is ValueFormat.BINARY:
            check_record(self.data, decoder.fixed_sizes)
        result: tuple[Any, ...] = decoder.decode(_RECORD_OID, self.data, self.format)
        return result

    def as_array(self) -> list[Any]:
        """An array value as a (nested) list.

        The binary form carries the element type OID: elements of known types decode to their
        Python values, others to ``RawValue``. The text form gives every element as text.
        """
        # The text[] loaders serve any array: the binary one is psycopg's generic loader, which
        # reads the element OID from the array's header; the text one gives elements as text.
        decoder = fallback_decoder()
        if self.format is ValueFormat.BINARY:
            check_array(self.data, decoder.fixed_sizes)
        result: list[Any] = decoder.decode(_TEXT_ARRAY_OID, self.data, self.format)
        return result


class _RawBinaryLoader(Loader):
    format = pq.Format.BINARY

    def load(self, data: Buffer) -> RawValue:
        return RawValue(self.oid, bytes(data), ValueFormat.BINARY)


class _RawTextLoader(Loader):
    format = pq.Format.TEXT

    def load(self, data: Buffer) -> RawValue:
        return RawValue(self.oid, bytes(data), ValueFormat.TEXT)


def _infinity_loader(oid: int, fmt: pq.Format, top: object, bottom: object) -> type[Loader]:
    """psycopg's own loader for ``oid``, with ``±infinity`` mapped to ``top`` / ``bottom``."""
    found = psycopg.adapters.get_loader(oid, fmt)
    assert found is not None, f"psycopg has no loader for built-in oid {oid}"
    inner: type[abc.Loader] = found
    if fmt == pq.Format.TEXT:
        plus, minus = b"infinity", b"-infinity"
    elif oid == _DATE_OID:
        plus, minus = struct.pack(">i", 2**31 - 1), struct.pack(">i", -(2**31))
    else:
        plus, minus = struct.pack(">q", 2**63 - 1), struct.pack(">q", -(2**63))

    class InfinityLoader(Loader):
        format = fmt

        def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
            super().__init__(oid, context)
            self._inner = inner(oid, context)

        def load(self, data: Buffer) -> Any:
            if data == plus:
                return top
            if data == minus:
                return bottom
            return self._inner.load(data)

    InfinityLoader.__qualname__ = InfinityLoader.__name__ = f"Infinity{inner.__name__}"
    return InfinityLoader


def new_adapters() -> AdaptersMap:
    """A private copy of psycopg's adapters with the additions described above."""
    amap = AdaptersMap(psycopg.adapters)
    amap.register_loader(_UNKNOWN_OID, _RawBinaryLoader)
    amap.register_loader(_UNKNOWN_OID, _RawTextLoader)
    bounds: dict[int, tuple[object, object]] = {
        _DATE_OID: (date.max, date.min),
        _TIMESTAMP_OID: (datetime.max, datetime.min),
        _TIMESTAMPTZ_OID: (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)),
    }
    for oid, (top, bottom) in bounds.items():
        for fmt in (pq.Format.BINARY, pq.Format.TEXT):
            amap.register_loader(oid, _infinity_loader(oid, fmt, top, bottom))
    return amap


class ValueDecoder:
    """Decodes values by type OID; user types are added to ``adapters`` by ``TypeResolver``.

    >>> decoder = ValueDecoder()
    >>> decoder.decode(23, b"\\x00\\x00\\x00\\x2a")
    42
    >>> decoder.decode(16390, b"happy")     # an OID nobody registered
    RawValue(oid=16390, data=b'happy', format=<ValueFormat.BINARY: 'binary'>)
    """

    def __init__(self) -> None:
        self.adapters = new_adapters()
        self.fixed_sizes = dict(FIXED_SIZES)  # a domain over a fixed-width type is added
        self._tx = Transformer(self.adapters)

    def knows(self, oid: int) -> bool:
        """Whether ``oid`` has a loader of its own (else its values become ``RawValue``)."""
        amap = self.adapters
        return (
            amap.get_loader(oid, pq.Format.BINARY) is not None
            or amap.get_loader(oid, pq.Format.TEXT) is not None
        )

    def refresh(self) -> None:
        """Start using loaders registered since: a Transformer caches the loader of each OID."""
        self._tx = Transformer(self.adapters)

    def decode(self, oid: int, data: bytes, fmt: ValueFormat = ValueFormat.BINARY) -> Any:
        """The Python value of ``data``; raises what psycopg's loader raises on bad input."""
        if fmt is ValueFormat.BINARY:
            self._check_size(oid, data)
        return self._tx.get_loader(oid, fmt.pq).load(data)

    def _check_size(self, oid: int, data: bytes) -> None:
        size = self.fixed_sizes.get(oid)
        if size is not None and len(data) != size:
            raise ValueError(f"{len(data)} bytes where the binary form has {size}")

    def decode_field(self, field: pb.Field) -> Any:
        """A wire ``Field``'s value: ``None`` for SQL NULL (neither ``binary`` nor ``text``)."""
        kind = field.WhichOneof("value")
        if kind == "binary":
            data = field.binary
            self._check_size(field.oid, data)
            return self._tx.get_loader(field.oid, pq.Format.BINARY).load(data)
        if kind == "text":
            return self._tx.get_loader(field.oid, pq.Format.TEXT).load(field.text.encode())
        return None


_fallback: ValueDecoder | None = None


def fallback_decoder() -> ValueDecoder:
    """The decoder of built-in types only, shared by ``RawValue``'s helpers."""
    global _fallback
    if _fallback is None:
        _fallback = ValueDecoder()
    return _fallback


def field_format(field: pb.Field) -> ValueFormat | None:
    """The wire format of a field's value, ``None`` for SQL NULL."""
    kind = field.WhichOneof("value")
    if kind == "binary":
        return ValueFormat.BINARY
    if kind == "text":
        return ValueFormat.TEXT
    return None


def field_bytes(field: pb.Field) -> bytes:
    """A field's value as bytes, whatever its format (empty for NULL)."""
    return field.binary if field.WhichOneof("value") == "binary" else field.text.encode()
