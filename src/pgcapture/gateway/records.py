"""What the gateway needs to know about a stored record, read from its wire bytes.

A stored record is a serialized ``Message`` (pgcapture.proto). The gateway forwards a change's
bytes as they are: a ``CaptureMessage`` is the checkpoint followed by the ``Change`` body, which
is the stored ``Message{change}`` without its own tag and length, so nothing is decoded or
re-encoded on the way to a client. Only the head of a change (schema and table, for the table
filter) is read by hand; a change's key (ordered delivery) and the rare Begin, Commit and
Truncate records are decoded with protobuf.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from pgcapture.proto import pb
from pgcapture.wire import read_varint, varint

_TABLES: dict[bytes, tuple[tuple[str, str], ...]] = {}  # a change's head bytes -> its table

BEGIN: Final = 0x0A  # Message.begin = 1
COMMIT: Final = 0x12  # Message.commit = 2
CHANGE: Final = 0x1A  # Message.change = 3
TRUNCATE: Final = 0x2A  # Message.truncate = 5

Key = tuple[str, str, tuple[tuple[str, bytes | str | None], ...]]


class Head(NamedTuple):
    """A record's kind (the ``Message`` tag byte), where its body starts, and its tables."""

    kind: int
    body: int
    tables: tuple[tuple[str, str], ...]


def _string(data: bytes, pos: int, tag: int) -> tuple[str, int]:
    if pos >= len(data) or data[pos] != tag:
        return "", pos  # proto3 omits an empty string
    length, start = read_varint(data, pos + 1)
    return data[start : start + length].decode(), start + length


def read_head(message: bytes) -> Head:
    """The kind, body offset and table(s) of a stored ``Message``."""
    kind = message[0]
    _, body = read_varint(message, 1)
    if kind == CHANGE:
        pos = body
        if pos < len(message) and message[pos] == 0x08:  # op (absent for INSERT: default)
            _, pos = read_varint(message, pos + 1)
        start = pos
        for tag in (0x12, 0x1A):  # schema, table (absent when empty)
            if pos < len(message) and message[pos] == tag:
                length, pos = read_varint(message, pos + 1)
                pos += length
        key = message[start:pos]
        tables = _TABLES.get(key)
        if tables is None:
            schema, at = _string(message, start, 0x12)
            table, _ = _string(message, at, 0x1A)
            tables = ((schema, table),)
            if len(_TABLES) < 100_000:
                _TABLES[key] = tables
        return Head(kind, body, tables)
    if kind == TRUNCATE:
        truncate = pb.Message.FromString(message).truncate
        return Head(kind, body, tuple((t.schema, t.table) for t in truncate.tables))
    return Head(kind, body, ())


def change_keys(message: bytes, body: int) -> tuple[Key, ...]:
    """The row identities a change touches: its new row's and, when the key changed, its old
    row's, each as (schema, table, key column values). Columns flagged ``key`` identify a row;
    a key column missing from the new image (unchanged TOAST) takes its value from the old
    image. A table without key columns has one identity: the whole table."""
    change = pb.Change.FromString(message[body:])
    schema, table = change.schema, change.table
    new = {f.name: _value(f) for f in change.new if f.key}
    old = {f.name: _value(f) for f in change.old if f.key}
    keys: list[Key] = []
    if change.new:  # insert or update: the row as it is now
        names = sorted(new.keys() | old.keys())
        keys.append((schema, table, tuple((n, new[n] if n in new else old[n]) for n in names)))
    if old:  # update that changed the key, or delete: the row as it was
        key = (schema, table, tuple(sorted(old.items())))
        if key not in keys:
            keys.append(key)
    if not keys or not keys[0][2]:
        return ((schema, table, ()),)
    return tuple(keys)


def _value(field: pb.Field) -> bytes | str | None:
    kind = field.WhichOneof("value")
    return None if kind is None else getattr(field, kind)


def lsn_field(lsn: int) -> bytes:
    return b"\x08" + varint(lsn) if lsn else b""


def seq_field(seq: int) -> bytes:
    if not seq:
        return b""
    return b"\x10" + varint(seq)


def capture_message(lsn_part: bytes, seq: int, message: bytes, head: Head) -> bytes:
    """The serialized ``CaptureMessage`` for a change or truncate record; ``lsn_part`` is
    ``lsn_field(lsn)`` (the same for every record of a transaction)."""
    checkpoint = lsn_part + seq_field(seq)
    size = len(message) - head.body
    body = memoryview(message)[head.body :]
    tag = b"\x12" if head.kind == CHANGE else b"\x1a"  # CaptureMessage.change / .truncate
    return b"".join((b"\x0a", varint(len(checkpoint)), checkpoint, tag, varint(size), body))
