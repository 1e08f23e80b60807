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
from pgcapture.wire import varint

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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _string(data: bytes, pos: int, tag: int) -> tuple[str, int]:
    if pos >= len(data) or data[pos] != tag:
        return "", pos  # proto3 omits an empty string
    length, start = _varint(data, pos + 1)
    return data[start : start + length].decode(), start + length


def read_head(message: bytes) -> Head:
    """The kind, body offset and table(s) of a stored ``Message``."""
    kind = message[0]
    _, body = _varint(message, 1)
    if kind == CHANGE:
        pos = body
        if message[pos] == 0x08:  # op (absent for INSERT, proto3's default)
            _, pos = _varint(message, pos + 1)
        schema, pos = _string(message, pos, 0x12)
        table, _ = _string(message, pos, 0x1A)
        return Head(kind, body, ((schema, table),))
    if kind == TRUNCATE:
        truncate = pb.Message.FromString(message).truncate
        return Head(kind, body, tuple((t.schema, t.table) for t in truncate.tables))
    return Head(kind, body, ())


def commit_time(message: bytes) -> int:
    """The commit time (microseconds since 2000-01-01) of a Begin or Commit record."""
    msg = pb.Message.FromString(message)
    return msg.begin.commit_time if message[0] == BEGIN else msg.commit.commit_time


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


def checkpoint_bytes(lsn: int, seq: int) -> bytes:
    """A serialized ``Checkpoint`` without data."""
    out = b""
    if lsn:
        out += b"\x08" + varint(lsn)
    if seq:
        out += b"\x10" + varint(seq)
    return out


def capture_message(lsn: int, seq: int, message: bytes, head: Head) -> bytes:
    """The serialized ``CaptureMessage`` for a change or truncate record."""
    checkpoint = checkpoint_bytes(lsn, seq)
    body = memoryview(message)[head.body :]
    tag = b"\x12" if head.kind == CHANGE else b"\x1a"  # CaptureMessage.change / .truncate
    return b"".join((b"\x0a", varint(len(checkpoint)), checkpoint, tag, varint(len(body)), body))
