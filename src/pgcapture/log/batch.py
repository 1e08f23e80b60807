"""Cutting a source's record stream into ``LogBatch`` payloads (sans-I/O).

Records go in in (lsn, seq) order; ``Batch``es come out. A batch is cut when it holds
``max_records`` records, or when the next record would take it past ``max_bytes`` (a single
record larger than that becomes a batch of its own), or when the caller ``flush``es (its linger
time is up). Nothing waits for a transaction to end: a transaction larger than a batch spans
several batches, so memory stays bounded by one batch whatever the transaction size.

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
# LogRecord.seq (omitted when 0, protobuf's default) followed by the message tag
_SEQ_MESSAGE: Final = (_MESSAGE_TAG, *(_SEQ_TAG + v + _MESSAGE_TAG for v in VARINTS[1:]))
_TAGGED: Final = tuple(_RECORD_TAG + v for v in VARINTS)  # a records entry's tag and length


@dataclass(frozen=True, slots=True)
class Batch:
    """One JetStream message's worth of consecutive records.

    ``commit_end`` is the highest Commit ``end_lsn`` in the batch (0 when it holds no Commit):
    once this batch and every earlier one are stored, the slot may be confirmed up to it.
    ``last_commit`` is the wire ``Message`` of the batch's last Commit (``b""`` when none).
    """

    payload: bytes
    first: Checkpoint
    last: Checkpoint
    count: int
    commit_end: int = 0
    last_commit: bytes = b""

    def __len__(self) -> int:
        return len(self.payload)


def encode_record(lsn: int, seq: int, message: bytes) -> bytes:
    """One ``LogBatch.records`` entry: tag, length and the serialized ``LogRecord``."""
    middle = _SEQ_MESSAGE[seq] if seq < SMALL else _SEQ_TAG + varint(seq) + _MESSAGE_TAG
    body = _LSN_TAG + varint(lsn) + middle + varint(len(message)) + message
    return _RECORD_TAG + varint(len(body)) + body


def decode_batch(payload: bytes) -> list[Record]:
    """The records of a ``LogBatch`` payload (``end_lsn`` is not stored and comes back 0)."""
    batch = pb.LogBatch.FromString(payload)
    return [Record(r.lsn, r.seq, r.message) for r in batch.records]


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
