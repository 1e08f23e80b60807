"""Reading a stored change's values straight from its wire bytes (the apply hot path).

A wire ``Message{change}`` written by capture (``pgcapture.wire``) is laid out as: the change's
head (op, schema, table), then one length-delimited ``Field`` per column of the new image and
then of the old image, each with its name, type OID, value and, for a column of the replica
identity, the key flag (``Field.key``, after the value). For one table and row shape
everything but the values and their lengths is the same from row to row. ``scan_change``
walks the bytes once and returns:

* ``head``: the head's bytes (which table, which operation);
* ``shape``: the bytes of every field without its value (key flag included), with a NULL
  written as if it were a binary value (a NULL and a value of the same column fit the same
  statement);
* the new and old images' values (binary send format, text as UTF-8, or None for NULL).

``(head, shape, len(new))`` identifies a prepared plan; rows with a known key skip building any
protobuf object (``upb`` costs about half a microsecond per field just to hand one out).
Anything not laid out as capture writes it returns None, and the caller decodes the message
with protobuf instead.
"""

from __future__ import annotations

import operator
import struct
from typing import NamedTuple

from pgcapture.wire import read_varint

_CHANGE = 0x1A  # Message.change = 3
_NEW, _OLD = 0x22, 0x2A  # Change.new = 4, Change.old = 5
_NAME, _OID = 0x0A, 0x10  # Field.name = 1, Field.oid = 2
_BINARY, _TEXT = 0x1A, 0x22  # Field.binary = 3, Field.text = 4
_KEY_TAG = 0x28  # Field.key = 5, varint
_KEY = b"\x28\x01"  # Field.key = true, after the value (false, the default, is not written)
_AS_BINARY = b"\x1a"


class Row(NamedTuple):
    head: bytes
    shape: bytes
    new: list[bytes | None]
    old: list[bytes | None]
    parts: tuple[bytes, ...]  # the shape, field by field
    spans: tuple[tuple[int, int] | None, ...]  # where each value is in the message (None: NULL)
    keys: tuple[bool, ...]  # whether each field ends with the key flag (its part too)


class Layout(NamedTuple):
    """A row shape seen before, to read the next rows of that table by (``read_values``)."""

    parts: tuple[bytes, ...]  # each field up to its value: name, oid and value tag
    ends: tuple[bytes, ...]  # what follows each value: the key flag or nothing
    nulls: tuple[bytes, ...]  # each field as a NULL: name, oid and key flag, no value tag
    tags: tuple[int, ...]  # the entry tag of each field (new or old image)
    new: int  # how many fields belong to the new image

    @classmethod
    def of(cls, row: Row) -> Layout:
        count = len(row.new)
        tags = tuple(_NEW if i < count else _OLD for i in range(len(row.parts)))
        keys = zip(row.parts, row.keys, strict=True)
        heads = tuple(p[: -len(_KEY)] if k else p for p, k in keys)
        ends = tuple(_KEY if k else b"" for k in row.keys)
        nulls = tuple(h[:-1] + e for h, e in zip(heads, ends, strict=True))
        return cls(heads, ends, nulls, tags, count)


def scan_change(msg: bytes) -> Row | None:
    """The values of a wire ``Message{change}``, or None when it is not laid out as expected."""
    try:
        return _scan(msg)
    except IndexError:
        return None


def _head(msg: bytes) -> tuple[int, int, int] | None:
    """Where a ``Message{change}``'s head starts, where its fields start and where it ends
    (IndexError on truncated bytes)."""
    if msg[0] != _CHANGE:
        return None
    size = msg[1]
    pos = 2
    if size & 0x80:
        size, pos = read_varint(msg, 1)
    end = pos + size
    if end != len(msg):
        return None
    p = pos
    if msg[p] == 0x08:  # op (absent for INSERT, proto3's default)
        p += 2
    for tag in (0x12, 0x1A):  # schema, table
        if msg[p] != tag:
            return None
        length = msg[p + 1]
        if length & 0x80:
            length, q = read_varint(msg, p + 1)
            p = q + length
        else:
            p += 2 + length
    return pos, p, end


def _scan(msg: bytes) -> Row | None:
    found = _head(msg)
    if found is None:
        return None
    pos, p, end = found
    head = msg[pos:p]
    parts: list[bytes] = []
    spans: list[tuple[int, int] | None] = []
    keys: list[bool] = []
    new: list[bytes | None] = []
    old: list[bytes | None] = []
    values = new
    while p < end:
        tag = msg[p]
        length = msg[p + 1]
        if length & 0x80:
            length, q = read_varint(msg, p + 1)
        else:
            q = p + 2
        field_end = q + length
        if tag != _NEW:
            if tag != _OLD:
                return None
            values = old
        elif values is old:
            return None  # a new field after old ones
        if msg[q] != _NAME:
            return None
        v = q + 2 + msg[q + 1]  # names are at most 63 bytes: a one-byte length
        if v < field_end and msg[v] == _OID:
            v += 1
            while msg[v] & 0x80:
                v += 1
            v += 1
        if v == field_end or msg[v] == _KEY_TAG:  # unset value: NULL
            key = v != field_end
            if key and (v + 2 != field_end or not msg.startswith(_KEY, v)):
                return None
            parts.append(msg[q:v] + _AS_BINARY + msg[v:field_end])
            values.append(None)
            spans.append(None)
        else:
            kind = msg[v]
            if kind != _BINARY and kind != _TEXT:
                return None
            size = msg[v + 1]
            if size & 0x80:
                size, start = read_varint(msg, v + 1)
            else:
                start = v + 2
            stop = start + size
            key = stop != field_end
            if key and (stop + 2 != field_end or not msg.startswith(_KEY, stop)):
                return None
            parts.append(msg[q : v + 1] + msg[stop:field_end])
            values.append(msg[start:stop])
            spans.append((start, stop))
        keys.append(key)
        p = field_end
    if p != end:
        return None
    return Row(head, b"".join(parts), new, old, tuple(parts), tuple(spans), tuple(keys))


def read_head(msg: bytes) -> tuple[bytes, int] | None:
    """The head of a wire ``Message{change}`` and where its fields start."""
    try:
        found = _head(msg)
    except IndexError:
        return None
    return (msg[found[0] : found[1]], found[1]) if found is not None else None


def read_values(
    msg: bytes, pos: int, layout: Layout
) -> tuple[list[bytes | None], list[bytes | None]] | None:
    """The new and old values of a change whose fields start at ``pos``, when it has exactly
    ``layout``'s shape (else None): one comparison per field instead of reading its name."""
    values: list[bytes | None] = []
    end = len(msg)
    try:
        for part, after, null, tag in zip(
            layout.parts, layout.ends, layout.nulls, layout.tags, strict=True
        ):
            if msg[pos] != tag:
                return None
            length = msg[pos + 1]
            if length & 0x80:
                length, q = read_varint(msg, pos + 1)
            else:
                q = pos + 2
            pos = q + length
            if msg.startswith(part, q, pos):
                v = q + len(part)
                size = msg[v]
                if size & 0x80:
                    size, start = read_varint(msg, v)
                else:
                    start = v + 1
                stop = start + size
                # the value must end where this field's end (key flag or nothing) begins
                if stop + len(after) != pos or not msg.startswith(after, stop):
                    return None
                values.append(msg[start:stop])
            elif pos == q + len(null) and msg.startswith(null, q):
                values.append(None)
            else:
                return None
    except IndexError:
        return None
    if pos != end:
        return None
    count = layout.new
    return values[:count], values[count:]


class Frame:
    """Every byte of a change message except its values, for rows of one exact size.

    Rows of a table whose values have the same lengths (fixed-width types, ``char(n)``, equal
    NULLs) are byte-for-byte equal outside their values: head, field names, type OIDs, tags and
    every length. ``values`` checks that with one big-integer mask comparison and cuts the values
    out with one ``struct`` call, whatever the number of columns. A row that differs anywhere
    outside its values differs at a length or name byte, so it is never taken for another shape.
    """

    __slots__ = ("_mask", "_single_null", "_skeleton", "_take", "_unpack", "new", "size")

    def __init__(self, msg: bytes, row: Row) -> None:
        self.size = len(msg)
        mask = bytearray(b"\xff" * self.size)
        fmt = [">"]
        at = 0
        take: list[int] = []
        for span in row.spans:
            if span is None:
                take.append(-1)
                continue
            start, end = span
            mask[start:end] = bytes(end - start)
            fmt.append(f"{start - at}x{end - start}s")
            take.append(len(take) - take.count(-1))
            at = end
        fmt.append(f"{self.size - at}x")
        self._mask = int.from_bytes(mask, "big")
        self._skeleton = int.from_bytes(msg, "big") & self._mask
        self._unpack = struct.Struct("".join(fmt)).unpack
        # NULLs: pick the values and a None appended after them, in field order
        nulls = len(take) - take.count(-1)
        self._take = (
            operator.itemgetter(*[i if i >= 0 else nulls for i in take])
            if -1 in take and len(take) > 1
            else None
        )
        self._single_null = take == [-1]
        self.new = len(row.new)

    def values(self, msg: bytes) -> list[bytes | None] | None:
        """All values of ``msg`` (new image first) if it has this frame, else None."""
        if len(msg) != self.size or int.from_bytes(msg, "big") & self._mask != self._skeleton:
            return None
        found: tuple[bytes, ...] = self._unpack(msg)
        if self._take is not None:
            return list(self._take((*found, None)))
        return [None] if self._single_null else list(found)
