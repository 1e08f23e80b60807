"""Dump rows among a URI's stream changes without time travel (docs/dumps.md).

A chunk is read on the logical replica at its applied position ``R`` (every source transaction
committed at or before ``R`` is in the rows, nothing after). Its rows join the hub's backlog
only once the hub has taken every stream message up to ``R``, so stream changes at or before
``R`` are ahead of them, and changes after ``R`` come after them, with two exceptions that a
``Watch`` catches: a change after ``R`` already taken before the rows were injected (the
replica was read while the stream was ahead of it) makes the dumped row stale, so the row is
dropped (the stream delivers the newer version); a truncate after ``R`` already taken drops
every row of the chunk. Rows of a table without a key cannot be told apart by key: an
identical row inserted by the stream at or before ``R`` (already on its way to the client)
drops one dumped copy, so each row is delivered once.

A ``DumpChunk`` is the settlement of one chunk: its rows go to one client stream, and it is
done when every row is acknowledged, or requeued (its reason goes back to the controller) as
soon as one row is requeued or the stream ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Final

from pgcapture.gateway.records import Key, change_keys
from pgcapture.proto import pb
from pgcapture.wire import varint

if TYPE_CHECKING:
    from pgcapture.gateway.hub import Session

Table = tuple[str, str]
Identity = tuple[tuple[str, bytes | str | None], ...]

DUMP_ORDER: Final = 1 << 40  # dump rows sort after every stream record of their position
_LAST: Final = b"\x1a\x01\x01"  # Checkpoint.data = [1]: the chunk's last row (Go project)


class DumpChunk:
    """One chunk being delivered to one client stream."""

    __slots__ = (
        "complete",
        "dump_id",
        "info",
        "lsn",
        "outcome",
        "pending",
        "room",
        "rows",
        "session",
    )

    def __init__(self, info: pb.DumpInfoResponse, dump_id: int, session: Session, lsn: int):
        self.info = info
        self.dump_id = dump_id
        self.session = session
        self.lsn = lsn  # the replica position the rows were read at
        self.pending = 0  # rows injected and not settled yet
        self.complete = False  # every row injected
        self.rows = 0  # rows acknowledged
        self.room = asyncio.Event()
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        return self.outcome.done()

    def finish(self, reason: str) -> None:
        """Done (``reason`` empty) or to be requeued with ``reason``; the first call wins."""
        if not self.outcome.done():
            self.outcome.set_result(reason)
        self.room.set()

    def settled(self) -> None:
        self.pending -= 1
        self.rows += 1
        if self.complete and self.pending <= 0:
            self.finish("")
        self.room.set()


class Watch:
    """What the hub took from the stream for one table since a chunk of it was asked for."""

    __slots__ = ("inserted", "keyed", "table", "touched", "truncated")

    def __init__(self, table: Table) -> None:
        self.table = table
        self.touched: dict[Key, int] = {}  # row key -> newest commit LSN taken
        self.truncated = 0  # newest truncate taken
        self.inserted: list[tuple[int, Identity]] = []  # a keyless table's inserted rows
        self.keyed = True

    def see_change(self, lsn: int, keys: tuple[Key, ...], change: bytes) -> None:
        if keys and not keys[0][2]:  # no key columns: the table is its only identity
            self.keyed = False
            if change_op(change) == pb.Change.INSERT:
                self.inserted.append((lsn, identity(change)))
            return
        touched = self.touched
        for key in keys:
            if touched.get(key, 0) < lsn:
                touched[key] = lsn

    def see_truncate(self, lsn: int) -> None:
        self.truncated = max(self.truncated, lsn)

    def filter(self, position: int) -> RowFilter:
        """The rule for rows read at ``position``, from what was seen so far; it keeps
        looking at this watch, so changes taken while the rows stream in count too."""
        return RowFilter(self, position)


class RowFilter:
    """Decides, row by row, whether a dumped row is still the newest version."""

    __slots__ = ("_copies", "_position", "_watch")

    def __init__(self, watch: Watch, position: int) -> None:
        self._watch = watch
        self._position = position
        self._copies: Counter[Identity] | None = None

    def keeps(self, keys: tuple[Key, ...], change: bytes) -> bool:
        watch, position = self._watch, self._position
        if watch.truncated > position:
            return False  # a truncate after the read: the stream has the table's newer state
        if keys and not keys[0][2]:
            return self._first_copy(change)
        touched = watch.touched
        return not any(touched.get(key, 0) > position for key in keys)

    @property
    def all_stale(self) -> bool:
        return self._watch.truncated > self._position

    @property
    def needs_keys(self) -> bool:
        return bool(self._watch.touched) or not self._watch.keyed

    def _first_copy(self, change: bytes) -> bool:
        """Keyless table: one dumped copy of a row the stream inserted at or before the read
        position is dropped per such insert."""
        if self._copies is None:
            self._copies = Counter(
                row for lsn, row in self._watch.inserted if lsn <= self._position
            )
        if not self._copies:
            return True
        row = identity(change)
        if self._copies[row] > 0:
            self._copies[row] -= 1
            return False
        return True


def row_keys(change: bytes) -> tuple[Key, ...]:
    """A dumped row's keys, the way the stream's changes are keyed."""
    return change_keys(change, 0)


def identity(change: bytes) -> Identity:
    """A row's whole content (its new image), for tables without a key."""
    parsed = pb.Change.FromString(change)
    return tuple(
        (f.name, getattr(f, kind) if (kind := f.WhichOneof("value")) else None) for f in parsed.new
    )


def change_op(change: bytes) -> int:
    """A serialized Change's op (INSERT when the field is absent, as proto3 omits zero)."""
    return change[1] if change[:1] == b"\x08" else pb.Change.INSERT


def payload_head(dump_id: int, last: bool) -> bytes:
    """The bytes of a dump row's ``CaptureMessage`` before its change's length: the checkpoint
    (lsn 0, seq = the dump id, data [1] on the chunk's last row) and the change's tag."""
    checkpoint = (b"\x10" + varint(dump_id) if dump_id else b"") + (_LAST if last else b"")
    return b"\x0a" + varint(len(checkpoint)) + checkpoint + b"\x12"


def dump_payload(dump_id: int, change: bytes, last: bool) -> bytes:
    """The serialized ``CaptureMessage`` of a dump row."""
    return payload_head(dump_id, last) + varint(len(change)) + change
