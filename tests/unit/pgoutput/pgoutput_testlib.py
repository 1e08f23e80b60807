"""Golden pgoutput messages and a reference encoder, shared by the decoder's tests.

The golden files in ``golden/`` were recorded from a real server by
``scripts/record-pgoutput-golden``; see that script for their format. ``encode`` writes a
typed message back into pgoutput bytes, straight from the protocol documentation and without
using the decoder, so that ``encode(decode(data)) == data`` checks every field's position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from struct import pack
from typing import Any

from pgcapture.pgoutput import (
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputDecoder,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
CASES = tuple(sorted(path.stem for path in GOLDEN_DIR.glob("*.json")))


@dataclass(frozen=True)
class Row:
    """One row of pg_logical_slot_get_binary_changes: one pgoutput message."""

    lsn: int
    xid: int
    data: bytes


@dataclass(frozen=True)
class Golden:
    name: str
    proto: int
    facts: dict[str, Any]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Decoded:
    """A golden case decoded in order by one decoder."""

    golden: Golden
    messages: tuple[PgOutputMessage, ...]
    in_stream_before: tuple[bool, ...]  # the decoder's stream state before each message
    decoder: PgOutputDecoder

    def of(self, cls: type[Any]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, cls)]

    def tags(self) -> str:
        return "".join(chr(row.data[0]) for row in self.golden.rows)


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


@cache
def load(name: str) -> Golden:
    raw = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    rows = tuple(
        Row(parse_lsn(m["lsn"]), int(m["xid"]), bytes.fromhex(m["hex"])) for m in raw["messages"]
    )
    return Golden(name, int(raw["options"]["proto_version"]), raw["facts"], rows)


def decode_case(name: str) -> Decoded:
    golden = load(name)
    decoder = PgOutputDecoder(golden.proto)
    messages, states = [], []
    for row in golden.rows:
        states.append(decoder.in_stream)
        messages.append(decoder.decode(row.data))
    return Decoded(golden, tuple(messages), tuple(states), decoder)


def golden_messages() -> list[tuple[int, bool, bytes]]:
    """Every golden message with what a decoder needs to read it: (protocol, in stream, data)."""
    out = []
    for name in CASES:
        decoded = decode_case(name)
        for row, in_stream in zip(decoded.golden.rows, decoded.in_stream_before, strict=True):
            out.append((decoded.golden.proto, in_stream, row.data))
    return out


# -- reference encoder ------------------------------------------------------------------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else pack(">I", xid)


def encode_tuple(row: TupleData) -> bytes:
    out = [pack(">H", len(row.kinds))]
    for kind, value in zip(row.kinds, row.values, strict=True):
        out.append(bytes([kind]))
        if value is not None:
            out.append(pack(">i", len(value)) + value)
    return b"".join(out)


def tup(*columns: tuple[str, bytes | None]) -> TupleData:
    """TupleData from (kind, value) pairs: ("t", b"1"), ("b", b"\\0"), ("n", None), ("u", None)."""
    return TupleData(
        "".join(kind for kind, _ in columns).encode(), tuple(value for _, value in columns)
    )


def encode(m: PgOutputMessage) -> bytes:
    match m:
        case Begin():
            return b"B" + pack(">QqI", m.final_lsn, m.commit_time, m.xid)
        case Commit():
            return b"C" + pack(">BQQq", m.flags, m.commit_lsn, m.end_lsn, m.commit_time)
        case Origin():
            return b"O" + pack(">Q", m.commit_lsn) + _s(m.name)
        case Relation():
            columns = b"".join(
                pack(">B", c.flags) + _s(c.name) + pack(">Ii", c.type_oid, c.type_modifier)
                for c in m.columns
            )
            head = _xid(m.xid) + pack(">I", m.relid) + _s(m.namespace) + _s(m.name)
            tail = pack(">BH", ord(m.replica_identity), len(m.columns))
            return b"R" + head + tail + columns
        case Type():
            return b"Y" + _xid(m.xid) + pack(">I", m.oid) + _s(m.namespace) + _s(m.name)
        case Insert():
            return b"I" + _xid(m.xid) + pack(">I", m.relid) + b"N" + encode_tuple(m.new)
        case Update():
            old = b"" if m.old is None else str(m.old_kind).encode() + encode_tuple(m.old)
            head = b"U" + _xid(m.xid) + pack(">I", m.relid)
            return head + old + b"N" + encode_tuple(m.new)
        case Delete():
            head = b"D" + _xid(m.xid) + pack(">I", m.relid)
            return head + m.old_kind.encode() + encode_tuple(m.old)
        case Truncate():
            head = b"T" + _xid(m.xid) + pack(">IB", len(m.relids), m.options)
            return head + pack(f">{len(m.relids)}I", *m.relids)
        case LogicalMessage():
            head = b"M" + _xid(m.xid) + pack(">BQ", int(m.transactional), m.lsn) + _s(m.prefix)
            return head + pack(">i", len(m.content)) + m.content
        case _:
            return _encode_stream_or_two_phase(m)


def _encode_stream_or_two_phase(m: PgOutputMessage) -> bytes:
    match m:
        case StreamStart():
            return b"S" + pack(">IB", m.xid, int(m.first_segment))
        case StreamStop():
            return b"E"
        case StreamCommit():
            return b"c" + pack(">IBQQq", m.xid, m.flags, m.commit_lsn, m.end_lsn, m.commit_time)
        case StreamAbort():
            extra = b"" if m.abort_lsn is None else pack(">Qq", m.abort_lsn, m.abort_time)
            return b"A" + pack(">II", m.xid, m.subxid) + extra
        case BeginPrepare():
            fields = pack(">QQqI", m.prepare_lsn, m.end_lsn, m.prepare_time, m.xid)
            return b"b" + fields + _s(m.gid)
        case Prepare() | StreamPrepare():
            tag = b"P" if isinstance(m, Prepare) else b"p"
            fields = pack(">BQQqI", m.flags, m.prepare_lsn, m.end_lsn, m.prepare_time, m.xid)
            return tag + fields + _s(m.gid)
        case CommitPrepared():
            fields = pack(">BQQqI", m.flags, m.commit_lsn, m.end_lsn, m.commit_time, m.xid)
            return b"K" + fields + _s(m.gid)
        case RollbackPrepared():
            fields = pack(
                ">BQQqqI", m.flags, m.prepare_end_lsn, m.rollback_end_lsn,
                m.prepare_time, m.rollback_time, m.xid,
            )  # fmt: skip
            return b"r" + fields + _s(m.gid)
    raise TypeError(f"not a pgoutput message: {m!r}")
