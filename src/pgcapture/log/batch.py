"""Cutting a source's record stream into ``LogBatch`` payloads (sans-I/O).

Records go in in (lsn, seq) order; ``Batch``es come out. A batch is cut when it holds
``max_records`` records, or when the next record would take it past ``max_bytes`` (a single
record that does not fit an empty batch is cut into fragments, below), or when the caller
``flush``es (its linger time is up). Nothing waits for a transaction to end: a transaction larger
than a batch spans several batches, so memory stays bounded by one batch whatever the transaction
size.

A record larger than ``max_bytes`` (a row with a value of many megabytes: PostgreSQL allows 1 GB
per field, NATS at most 64 MB per message) is stored as *fragments*: consecutive batches of one
``LogRecord`` each, holding consecutive slices of the record's ``Message`` with their ``offset``
and the whole length ``total`` (docs/protocol.md, "Records larger than a message"). Such a
``Batch`` has ``part_end``/``part_total`` set; readers put the record together again
(``Assembler`` in log/reader.py).

The payload is the serialized ``LogBatch`` message of ``pgcapture.proto``, built by concatenating
each record's already-serialized wire ``Message`` into a ``LogRecord`` without re-encoding it; it
is byte-for-byte what ``LogBatch.SerializeToString()`` would produce.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.proto import pb
from pgcapture.wire import SMALL, VARINTS, varint

_RECORD_TAG: Final = b"\x0a"  # LogBatch.records = 1, length-delimited
_LSN_TAG: Final = b"\x08"  # LogRecord.lsn = 1, varint
_SEQ_TAG: Final = b"\x10"  # LogRecord.seq = 2, varint
_MESSAGE_TAG: Final = b"\x1a"  # LogRecord.message = 3, length-delimited
_OFFSET_TAG: Final = b"\x20"  # LogRecord.offset = 4, varint
_TOTAL_TAG: Final = b"\x28"  # LogRecord.total = 5, varint
FRAGMENT_OVERHEAD: Final = 64  # more than the tags and varints of a fragment's LogRecord
# LogRecord.seq (omitted when 0, protobuf's default) followed by the message tag
_SEQ_MESSAGE: Final = (_MESSAGE_TAG, *(_SEQ_TAG + v + _MESSAGE_TAG for v in VARINTS[1:]))
_TAGGED: Final = tuple(_RECORD_TAG + v for v in VARINTS)  # a records entry's tag and length


@dataclass(frozen=True, slots=True)
class Batch:
    """One JetStream message's worth of consecutive records.

    ``commit_end`` is the highest Commit ``end_lsn`` in the batch (0 when it holds no Commit):
    once this batch and every earlier one are stored, the slot may be confirmed up to it.
    ``last_commit`` is the wire ``Message`` of the batch's last Commit (``b""`` when none).
    A fragment (see the module docstring) holds one slice of one record, which ends at byte
    ``part_end`` of the record's ``part_total`` bytes; ``part_total`` is 0 for other batches.
    """

    payload: bytes
    first: Checkpoint
    last: Checkpoint
    count: int
    commit_end: int = 0
    last_commit: bytes = b""
    part_end: int = 0
    part_total: int = 0

    @property
    def is_fragment(self) -> bool:
        return self.part_total > 0

    @property
    def completes_record(self) -> bool:
        """False only for a fragment that is not the record's last."""
        return self.part_end == self.part_total

    def __len__(self) -> int:
        return len(self.payload)


def encode_record(lsn: int, seq: int, message: bytes) -> bytes:
    """One ``LogBatch.records`` entry: tag, length and the serialized ``LogRecord``."""
    middle = _SEQ_MESSAGE[seq] if seq < SMALL else _SEQ_TAG + varint(seq) + _MESSAGE_TAG
    body = _LSN_TAG + varint(lsn) + middle + varint(len(message)) + message
    return _RECORD_TAG + varint(len(body)) + body


def encode_fragment(lsn: int, seq: int, piece: bytes, offset: int, total: int) -> bytes:
    """A ``LogBatch`` payload holding one fragment: bytes ``[offset, offset + len(piece))`` of
    a record's ``total``-byte message."""
    middle = _SEQ_TAG + varint(seq) + _MESSAGE_TAG if seq else _MESSAGE_TAG
    body = b"".join(
        (
            _LSN_TAG + varint(lsn) + middle + varint(len(piece)),
            piece,
            _OFFSET_TAG + varint(offset) if offset else b"",
            _TOTAL_TAG + varint(total),
        )
    )
    return _RECORD_TAG + varint(len(body)) + body


def fragments(record: Record, size: int) -> list[Batch]:
    """``record`` as fragment batches whose payloads hold at most ``size`` bytes of it each."""
    lsn, seq, message, _ = record
    total, step = len(message), max(1, size)
    view = memoryview(message)
    out = []
    for offset in range(0, total, step):
        piece = bytes(view[offset : offset + step])
        end = offset + len(piece)
        checkpoint = Checkpoint(lsn, seq)
        payload = encode_fragment(lsn, seq, piece, offset, total)
        out.append(Batch(payload, checkpoint, checkpoint, 1, part_end=end, part_total=total))
    return out


@dataclass(frozen=True, slots=True)
class Fragment:
    """One fragment of a record, as stored (see the module docstring)."""

    lsn: int
    seq: int
    piece: bytes
    offset: int
    total: int

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.lsn, self.seq)

    @property
    def end(self) -> int:
        return self.offset + len(self.piece)


def decode_payload(payload: bytes) -> list[Record] | Fragment:
    """The records of a ``LogBatch`` payload (``end_lsn`` is not stored and comes back 0), or
    the fragment it holds."""
    batch = pb.LogBatch.FromString(payload)
    records = batch.records
    if len(records) == 1 and records[0].total:
        r = records[0]
        return Fragment(r.lsn, r.seq, r.message, r.offset, r.total)
    return [Record(r.lsn, r.seq, r.message) for r in records]


def decode_batch(payload: bytes) -> list[Record]:
    """The records of a ``LogBatch`` payload that holds whole records (not a fragment)."""
    decoded = decode_payload(payload)
    if isinstance(decoded, Fragment):
        raise ValueError(
            f"the payload holds a fragment of record {decoded.checkpoint}, not whole records"
        )
    return decoded


class Batcher:
    """Accumulates encoded records and cuts ``Batch``es by count and bytes."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("max_records and max_bytes must be positive")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._count = 0
        self._size = 0
        self._first = (0, 0)
        self._last = (0, 0)
        self._commit_end = 0
        self._last_commit = b""

    @property
    def pending(self) -> int:
        """Records held that no batch carries yet."""
        return self._count

    @property
    def pending_bytes(self) -> int:
        return self._size

    def add(self, record: Record) -> Batch | None:
        """Take one record; returns the batch it completed, if any."""
        out = self.extend((record,))
        return out[0] if out else None

    def extend(self, records: Iterable[Record]) -> list[Batch]:
        """Take records in order; returns the batches they completed (usually none or one)."""
        # The hot path of capture: table lookups instead of varint calls, counters in locals,
        # and the pieces of each entry appended to one list that is joined once per batch.
        out: list[Batch] = []
        extend = self._parts.extend
        max_records, max_bytes = self.max_records, self.max_bytes
        count, size = self._count, self._size
        head_lsn, head, head_len = -1, b"", 0
        lsn, seq = self._last  # the record before the first one, if any is pending
        for record in records:
            previous = (lsn, seq)
            lsn, seq, message, end_lsn = record
            if lsn != head_lsn:
                head_lsn, head = lsn, _LSN_TAG + varint(lsn)
                head_len = len(head)
            m = len(message)
            middle = _SEQ_MESSAGE[seq] if seq < SMALL else _SEQ_TAG + varint(seq) + _MESSAGE_TAG
            mlen = VARINTS[m] if m < SMALL else varint(m)
            n = head_len + len(middle) + len(mlen) + m
            tagged = _TAGGED[n] if n < SMALL else _RECORD_TAG + varint(n)
            if count and size + n + len(tagged) > max_bytes:
                out.append(self._cut(count, size, previous))
                extend, count, size = self._parts.extend, 0, 0
            if n + len(tagged) > max_bytes:
                out.extend(fragments(record, max_bytes - FRAGMENT_OVERHEAD))
                continue
            if not count:
                self._first = (lsn, seq)
            extend((tagged, head, middle, mlen, message))
            count += 1
            size += n + len(tagged)
            if end_lsn:
                self._commit_end, self._last_commit = end_lsn, message
            if count >= max_records:
                out.append(self._cut(count, size, (lsn, seq)))
                extend, count, size = self._parts.extend, 0, 0
        self._count, self._size = count, size
        if count:
            self._last = (lsn, seq)
        return out

    def flush(self) -> Batch | None:
        """Cut whatever is pending (the linger time is up, or the stream is stopping)."""
        return self._cut(self._count, self._size, self._last) if self._count else None

    def _cut(self, count: int, size: int, last: tuple[int, int]) -> Batch:
        batch = Batch(
            payload=b"".join(self._parts),
            first=Checkpoint(*self._first),
            last=Checkpoint(*last),
            count=count,
            commit_end=self._commit_end,
            last_commit=self._last_commit,
        )
        self._parts = []
        self._count = 0
        self._size = 0
        self._commit_end = 0
        self._last_commit = b""
        return batch
