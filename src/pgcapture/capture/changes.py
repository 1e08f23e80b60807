"""From decoded pgoutput messages to checkpointed wire records (DESIGN.md, contract 1).

``ChangeAssembler.feed`` takes the messages of one slot in order and returns, for each message
that the stream carries, a ``Record``: its checkpoint and the serialized wire ``Message``.
Begin = (commit LSN, 0), the transaction's changes and truncates (commit LSN, 1..n), Commit =
(commit LSN, n + 1). Nothing is buffered: a transaction of any size streams through.

Column values are passed through as the bytes the server sent, never decoded. Row images follow
the wire contract (contract 3):

* ``new``: every column; NULL as a field without value; an unchanged TOASTed column is absent,
  except under REPLICA IDENTITY FULL where the old row carries it and it is copied over.
* ``old``: under REPLICA IDENTITY FULL the whole old row (NULLs as fields without value); with a
  key-only old image (``K``) just the key columns, since the server sends NULL for the others.
* ``Field.key`` is set on every field of a column the Relation message flags as part of the
  replica identity (every column under REPLICA IDENTITY FULL), in both images.

An assembler made with ``hold=True`` holds every relation its Relation message announces: a row
change of a held relation raises ``RelationHeld`` before anything is consumed, so that the
caller can look at the relation's column types (``relation``) and then ``release`` it (and feed
the same message again), or leave it held. ``hold`` puts a released relation back on hold;
``watch`` makes each change of a relation call a function first. Released relations cost the
row path nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from struct import Struct
from typing import Final, NamedTuple

from pgcapture import wire
from pgcapture.capture.layout import RowLayout, skeleton_of
from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ProtocolError
from pgcapture.lsn import format_lsn
from pgcapture.pgoutput import (
    BINARY,
    NULL,
    TEXT,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleData,
    Type,
    Update,
)

_MAX_LAYOUTS: Final = 1024
_U32: Final = Struct(">I")
_U16: Final = Struct(">H")
_I32: Final = Struct(">i")


class RelationHeld(Exception):
    """A row change of a held relation arrived; nothing of it was consumed."""

    def __init__(self, relid: int) -> None:
        super().__init__(relid)
        self.relid = relid


class Record(NamedTuple):
    """One message of the stream: checkpoint (``lsn``, ``seq``) and wire ``Message`` bytes.

    ``end_lsn`` is set on Commit records only: the WAL position just past the commit, the one
    to confirm to the slot once the whole transaction is durable downstream.
    """

    lsn: int
    seq: int
    message: bytes
    end_lsn: int = 0

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.lsn, self.seq)

    @property
    def is_commit(self) -> bool:
        return self.end_lsn != 0


@dataclass(frozen=True, slots=True)
class _RelationEncoder:
    """Per-relation constants for building wire changes."""

    schema: str
    table: str
    types: tuple[int, ...]  # the columns' type OIDs
    full_identity: bool
    prefixes: tuple[bytes, ...]
    suffixes: tuple[bytes, ...]  # per column, what follows the value: the key flag or nothing
    nulls: tuple[bytes, ...]  # per column, a NULL field: prefix and suffix
    keys: tuple[bool, ...]
    heads: tuple[bytes, bytes, bytes]  # Change head for INSERT, UPDATE, DELETE
    # Per column, value length -> the bytes before the value in a Change.new entry
    # (entry tag, entry length, name, oid, value tag, value length); see _fast_tuple. The
    # column's suffix follows the value.
    new_heads: tuple[dict[int, bytes], ...]
    old_heads: tuple[dict[int, bytes], ...]

    @classmethod
    def of(cls, rel: Relation) -> _RelationEncoder:
        heads = tuple(
            wire.change_head(op, rel.namespace, rel.name)
            for op in (wire.OP_INSERT, wire.OP_UPDATE, wire.OP_DELETE)
        )
        prefixes = tuple(wire.field_prefix(c.name, c.type_oid) for c in rel.columns)
        suffixes = tuple(wire.field_suffix(c.is_key) for c in rel.columns)
        return cls(
            schema=rel.namespace,
            table=rel.name,
            types=tuple(c.type_oid for c in rel.columns),
            full_identity=rel.replica_identity == "f",
            prefixes=prefixes,
            suffixes=suffixes,
            nulls=tuple(p + s for p, s in zip(prefixes, suffixes, strict=True)),
            keys=tuple(c.is_key for c in rel.columns),
            heads=(heads[0], heads[1], heads[2]),
            new_heads=tuple({} for _ in rel.columns),
            old_heads=tuple({} for _ in rel.columns),
        )


class ChangeAssembler:
    """Assigns checkpoints and encodes wire messages; holds only the relation cache."""

    def __init__(self, hold: bool = False) -> None:
        self._relations: dict[int, _RelationEncoder] = {}  # released: the fast path's
        self._hold = hold
        self._held: dict[int, _RelationEncoder] = {}
        self._watched: dict[int, tuple[_RelationEncoder, Callable[[], None]]] = {}
        # Compiled layouts by (relation, tag, message size); see layout.py. A shape becomes a
        # layout the second time it is seen; a Relation message drops its relation's layouts.
        self._layouts: dict[tuple[int, int, int], RowLayout] = {}
        self._seen: set[tuple[int, int, int]] = set()
        self._lsn = 0  # commit LSN of the open transaction, 0 outside one
        self._seq = 0

    @property
    def open_lsn(self) -> int:
        """The commit LSN of the transaction being read (its Begin came, its Commit did not
        yet), 0 between transactions."""
        return self._lsn

    def relation(self, relid: int) -> _RelationEncoder:
        """The relation ``relid`` as its last Relation message described it."""
        return self._relation(relid)

    def release(self, relid: int) -> None:
        """Changes of the held relation ``relid`` are assembled from now on."""
        rel = self._held.pop(relid, None)
        if rel is not None:
            self._relations[relid] = rel

    def hold(self, relid: int) -> None:
        """Changes of ``relid`` raise ``RelationHeld`` again (until its next ``release``)."""
        rel = self._relations.pop(relid, None)
        if rel is not None:
            self._held[relid] = rel

    def watch(self, relid: int, seen: Callable[[], None]) -> None:
        """Each change of ``relid`` (held or released) calls ``seen`` before it is assembled."""
        rel = self._held.pop(relid, None) or self._relations.pop(relid, None)
        if rel is not None:
            self._watched[relid] = (rel, seen)

    def feed_raw(self, data: bytes, decode: Callable[[bytes], PgOutputMessage]) -> Record | None:
        """``feed(decode(data))``, with a fused path for the common row messages.

        Inserts, updates without an old image and deletes with a key-only image of known
        relations, outside a stream block, are turned into wire bytes straight from the
        pgoutput bytes, without building message objects. Anything else, or anything the fast
        path does not fully understand, goes through ``decode`` (which raises ``DecodeError``
        on malformed input) and ``feed``; both paths produce identical records (tested).
        """
        if self._lsn:
            tag = data[0]
            if tag == 73 or tag == 85 or tag == 68:  # 'I', 'U', 'D'
                body = self._fast_change(data, tag)
                if body is not None:
                    self._seq += 1
                    return Record(self._lsn, self._seq, body)
        return self.feed(decode(data))

    def _fast_change(self, data: bytes, tag: int) -> bytes | None:
        relid = _U32.unpack_from(data, 1)[0] if len(data) > 7 else 0
        rel = self._relations.get(relid)
        if rel is None or (tag == 85 and rel.full_identity):
            return None
        part = data[5]
        if tag == 68:  # Delete: 'K' key image only
            if part != 75:
                return None
            old = _fast_tuple(data, 6, rel, wire.TAG_OLD, rel.old_heads, rel.keys)
            return None if old is None else wire.wrap_change(rel.heads[2] + old)
        if part != 78:  # Insert or Update without an old image: 'N' new tuple follows
            return None
        key = (relid, tag, len(data))
        layout = self._layouts.get(key)
        if layout is not None:
            body = layout.encode(data, 6)
            if body is not None:
                return body
        elif key in self._seen:
            self._compile(key, rel, data)
        else:
            self._remember(key)
        new = _fast_tuple(data, 6, rel, wire.TAG_NEW, rel.new_heads, None)
        if new is None:
            return None
        return wire.wrap_change((rel.heads[0] if tag == 73 else rel.heads[1]) + new)

    def _remember(self, key: tuple[int, int, int]) -> None:
        if len(self._seen) >= _MAX_LAYOUTS:
            self._seen.clear()
        self._seen.add(key)

    def _compile(self, key: tuple[int, int, int], rel: _RelationEncoder, data: bytes) -> None:
        skeleton = skeleton_of(data, 6)
        if skeleton is None or len(skeleton) != len(rel.prefixes):
            return
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        head = rel.heads[0] if key[1] == 73 else rel.heads[1]
        self._layouts[key] = RowLayout(skeleton, rel.prefixes, rel.suffixes, head, wire.TAG_NEW)

    def feed(self, msg: PgOutputMessage) -> Record | None:
        kind = type(msg)
        if kind is Insert or kind is Update or kind is Delete:
            return self._change(msg)  # type: ignore[arg-type]
        if kind is Begin:
            return self._begin(msg)  # type: ignore[arg-type]
        if kind is Commit:
            return self._commit(msg)  # type: ignore[arg-type]
        if kind is Relation:
            assert isinstance(msg, Relation)
            relid = msg.relid
            self._watched.pop(relid, None)
            if self._hold:
                self._relations.pop(relid, None)
                self._held[relid] = _RelationEncoder.of(msg)
            else:
                self._relations[relid] = _RelationEncoder.of(msg)
            self._layouts = {k: v for k, v in self._layouts.items() if k[0] != msg.relid}
            return None
        if kind is Truncate:
            return self._truncate(msg)  # type: ignore[arg-type]
        if kind is Type or kind is Origin or kind is LogicalMessage:
            return None
        raise ProtocolError(
            f"unexpected pgoutput message {kind.__name__}: streaming and two-phase decoding are "
            "not requested by pgcapture, so the server should not send it"
        )

    def _begin(self, msg: Begin) -> Record:
        if self._lsn:
            raise ProtocolError(
                f"Begin at {format_lsn(msg.final_lsn)} inside the transaction committing at "
                f"{format_lsn(self._lsn)}"
            )
        self._lsn, self._seq = msg.final_lsn, 0
        body = wire.encode_begin_message(msg.final_lsn, msg.commit_time, msg.xid)
        return Record(msg.final_lsn, 0, body)

    def _commit(self, msg: Commit) -> Record:
        if msg.commit_lsn != self._lsn:
            raise ProtocolError(
                f"Commit at {format_lsn(msg.commit_lsn)} does not close the open transaction "
                f"({format_lsn(self._lsn) if self._lsn else 'none open'})"
            )
        self._lsn = 0
        body = wire.encode_commit_message(msg.commit_lsn, msg.end_lsn, msg.commit_time)
        return Record(msg.commit_lsn, self._seq + 1, body, msg.end_lsn)

    def _next_seq(self, what: str) -> int:
        if not self._lsn:
            raise ProtocolError(f"{what} outside a transaction")
        self._seq += 1
        return self._seq

    def _relation(self, relid: int) -> _RelationEncoder:
        rel = self._relations.get(relid) or self._held.get(relid)
        if rel is not None:
            return rel
        watched = self._watched.get(relid)
        if watched is not None:
            return watched[0]
        raise ProtocolError(f"change for relation oid {relid} before its Relation message")

    def _changed(self, relid: int) -> _RelationEncoder:
        """The relation of a row change; raises ``RelationHeld`` for a held one."""
        rel = self._relations.get(relid)
        if rel is not None:
            return rel
        if relid in self._held:
            if not self._lsn:
                raise ProtocolError("row change outside a transaction")
            raise RelationHeld(relid)
        watched = self._watched.get(relid)
        if watched is not None:
            watched[1]()
            return watched[0]
        return self._relation(relid)

    def _change(self, msg: Insert | Update | Delete) -> Record:
        rel = self._changed(msg.relid)
        seq = self._next_seq("row change")
        if type(msg) is Insert:
            new = _fields(rel, msg.new)
            body = wire.encode_change_message(rel.heads[0], new, [])
        elif type(msg) is Update:
            old = _old_fields(rel, msg.old_kind, msg.old)
            full_old = msg.old if rel.full_identity else None
            new = _fields(rel, msg.new, full_old)
            body = wire.encode_change_message(rel.heads[1], new, old)
        else:
            assert isinstance(msg, Delete)
            old = _old_fields(rel, msg.old_kind, msg.old)
            body = wire.encode_change_message(rel.heads[2], [], old)
        return Record(self._lsn, seq, body)

    def _truncate(self, msg: Truncate) -> Record:
        seq = self._next_seq("truncate")
        tables = [(r.schema, r.table) for r in map(self._relation, msg.relids)]
        body = wire.encode_truncate_message(tables, msg.cascade, msg.restart_identity)
        return Record(self._lsn, seq, body)


def _fast_tuple(
    data: bytes,
    off: int,
    rel: _RelationEncoder,
    entry_tag: bytes,
    cache: tuple[dict[int, bytes], ...],
    only: tuple[bool, ...] | None,
) -> bytes | None:
    """Encode the tuple at ``off`` (which must end the message) as repeated ``Field`` entries,
    or None when the fast path does not apply (unchanged TOAST, a shape mismatch, a
    malformed tuple: the slow path then decides)."""
    natts = _U16.unpack_from(data, off)[0]
    prefixes = rel.prefixes
    suffixes, nulls = rel.suffixes, rel.nulls
    if natts != len(prefixes):
        return None
    off += 2
    parts: list[bytes] = []
    append = parts.append
    unpack = _I32.unpack_from
    size = len(data)
    for i in range(natts):
        kind = data[off]
        if kind == 98 or kind == 116:  # 'b', 't'
            n = unpack(data, off + 1)[0]
            start = off + 5
            off = start + n
            if n < 0 or off > size:
                return None
            if only is not None and not only[i]:
                continue
            heads = cache[i]
            head = heads.get(n if kind == 98 else -1 - n)
            suffix = suffixes[i]
            if head is None:
                head = _entry_head(entry_tag, prefixes[i], suffix, kind, n, heads)
            append(head)
            append(data[start:off])
            if suffix:
                append(suffix)
        elif kind == 110:  # 'n'
            off += 1
            if only is None or only[i]:
                append(wire.entry(entry_tag, nulls[i]))
        else:
            return None
    return b"".join(parts) if off == size else None


def _entry_head(
    entry_tag: bytes, prefix: bytes, suffix: bytes, kind: int, n: int, heads: dict[int, bytes]
) -> bytes:
    """Everything of one ``Change.new``/``old`` entry before a value of ``n`` bytes (which
    ``suffix`` follows), cached per column by length (negative keys for text values)."""
    value_head = wire.value_head(kind, n)
    field_len = len(prefix) + len(value_head) + n + len(suffix)
    head = entry_tag + wire.varint(field_len) + prefix + value_head
    if len(heads) < 256:
        heads[n if kind == 98 else -1 - n] = head
    return head


def _fields(
    rel: _RelationEncoder,
    row: TupleData,
    fill: TupleData | None = None,
    only: tuple[bool, ...] | None = None,
) -> list[bytes]:
    """Encode a row image. An unchanged TOASTed column is absent unless ``fill`` (the full old
    row under REPLICA IDENTITY FULL) has its value; ``only`` keeps just the flagged columns."""
    out: list[bytes] = []
    encode = wire.encode_field
    prefixes, suffixes = rel.prefixes, rel.suffixes
    values = row.values
    for i, kind in enumerate(row.kinds):
        if only is not None and not only[i]:
            continue
        if kind in (BINARY, TEXT):
            out.append(encode(prefixes[i], kind, values[i], suffixes[i]))
        elif kind == NULL:
            out.append(rel.nulls[i])
        elif fill is not None and i < len(fill.kinds) and fill.kinds[i] in (BINARY, TEXT):
            out.append(encode(prefixes[i], fill.kinds[i], fill.values[i], suffixes[i]))
    return out


def _old_fields(rel: _RelationEncoder, old_kind: str | None, old: TupleData | None) -> list[bytes]:
    if old is None:
        return []
    if old_kind == "O":
        return _fields(rel, old)
    # Key-only image: the server sends NULL for every non-key column; keep the key columns.
    return _fields(rel, old, only=rel.keys)
