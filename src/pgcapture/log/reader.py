"""Reading a source's stream back in order: stored batches and their records.

``read_batches`` walks the stream from a sequence up to the last message stored when it was
called, with an ordered (ephemeral, flow-controlled) consumer, and yields each message as a
``StoredBatch``: its stream sequence, the checkpoints of its headers and its decoded records.
It checks what the log promises: headers agree with the payload, and checkpoints only increase
from one message to the next. It is what the tests read the log with, and a base for readers
that follow the stream.

A record too large for one message is stored as fragments in consecutive messages
(log/batch.py). ``Assembler`` puts them together for readers that read every message in order:
it yields a ``StoredBatch`` of the whole record with the last fragment. A fragment run cut by a
capture crash is followed by the same record again, from its first fragment (or whole): the cut
run is dropped. ``whole_record`` does the same for a reader that holds only the last fragment
(a gateway, whose durable consumer may hand the fragments to several gateways): it reads the
earlier fragments back by sequence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ProtocolError
from pgcapture.log.batch import Fragment, decode_payload
from pgcapture.log.stream import HEADER_FIRST, HEADER_LAST, HEADER_PART, parse_part


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """Whole records of the stream: one message's, or one record put together from fragments
    (then ``seq`` is the sequence of its last fragment)."""

    seq: int
    first: Checkpoint
    last: Checkpoint
    records: list[Record]


def bounds(headers: dict[str, str] | None, seq: int) -> tuple[Checkpoint, Checkpoint]:
    """The first and last checkpoints of stream message ``seq``, from its headers."""
    headers = headers or {}
    try:
        return Checkpoint.from_key(headers[HEADER_FIRST]), Checkpoint.from_key(headers[HEADER_LAST])
    except KeyError as exc:
        raise ProtocolError(f"stream message {seq} lacks the {exc.args[0]} header") from None


def parse_fragment(headers: dict[str, str] | None, data: bytes, seq: int) -> Fragment | None:
    """The fragment stream message ``seq`` holds, or None when it holds whole records."""
    part = parse_part((headers or {}).get(HEADER_PART))
    if part is None:
        return None
    decoded = decode_payload(data)
    first, last = bounds(headers, seq)
    if (
        not isinstance(decoded, Fragment)
        or decoded.checkpoint != first
        or first != last
        or (decoded.end, decoded.total) != part
    ):
        raise ProtocolError(
            f"stream message {seq}: its {HEADER_PART} header ({part[0]}/{part[1]}) does not "
            "match its payload"
        )
    return decoded


class Assembler:
    """Stored messages in stream order in, batches of whole records out (sans-I/O).

    ``after`` is the last checkpoint read before the first message fed, if any. Checks that
    checkpoints only increase, except that a record whose fragments were cut short by a crash
    comes again after them."""

    def __init__(self, after: Checkpoint | None = None) -> None:
        self.previous = after
        self._pieces: list[bytes] = []
        self._size = 0
        self._open: Checkpoint | None = None  # the record being put together

    @property
    def holding(self) -> int:
        """Bytes of an unfinished record held."""
        return self._size

    def feed(self, msg: Msg, seq: int) -> StoredBatch | None:
        """The batch ``msg`` (stream sequence ``seq``) completes, if any."""
        first, last = bounds(msg.headers, seq)
        fragment = parse_fragment(msg.headers, msg.data, seq)
        again = (
            self._open is not None
            and first == self._open
            and (fragment is None or fragment.offset == 0)
        )
        if again:
            self._drop()
        elif self._open is not None and (fragment is None or first != self._open):
            raise ProtocolError(
                f"stream message {seq} starts at {first}, but record {self._open} is unfinished"
            )
        elif self._open is None and self.previous is not None and first <= self.previous:
            raise ProtocolError(
                f"stream message {seq} starts at {first}, not after {self.previous}"
            )
        self.previous = last
        if fragment is None:
            return _whole(msg, seq, first, last)
        return self._add(fragment, seq)

    def _add(self, fragment: Fragment, seq: int) -> StoredBatch | None:
        if fragment.offset != self._size:
            raise ProtocolError(
                f"stream message {seq} holds bytes {fragment.offset}..{fragment.end} of record "
                f"{fragment.checkpoint}, but {self._size} bytes of it came before (a reader "
                "must start at a record's first fragment)"
            )
        self._pieces.append(fragment.piece)
        self._size = fragment.end
        self._open = fragment.checkpoint
        if fragment.end < fragment.total:
            return None
        message = b"".join(self._pieces)
        self._drop()
        at = fragment.checkpoint
        return StoredBatch(seq, at, at, [Record(fragment.lsn, fragment.seq, message)])

    def _drop(self) -> None:
        self._pieces, self._size, self._open = [], 0, None


def _whole(msg: Msg, seq: int, first: Checkpoint, last: Checkpoint) -> StoredBatch:
    records = decode_payload(msg.data)
    if (
        isinstance(records, Fragment)
        or not records
        or records[0].checkpoint != first
        or records[-1].checkpoint != last
    ):
        held = "a fragment" if isinstance(records, Fragment) else f"{len(records)} records"
        raise ProtocolError(
            f"stream message {seq}: headers say {first}..{last}, the payload holds {held}"
        )
    return StoredBatch(seq, first, last, records)


async def whole_record(js: JetStreamContext, stream: str, seq: int, last: Fragment) -> Record:
    """The record whose last fragment is stream message ``seq``, its earlier fragments read
    back by sequence (they are the messages right before it)."""
    pieces = [last.piece]
    offset = last.offset
    at = seq
    while offset > 0:
        at -= 1
        msg = await js.get_msg(stream, seq=at)
        fragment = parse_fragment(msg.headers, msg.data or b"", at)
        if fragment is None or fragment.checkpoint != last.checkpoint or fragment.end != offset:
            raise ProtocolError(
                f"stream message {at} is not the fragment of record {last.checkpoint} that "
                f"ends at byte {offset}"
            )
        pieces.append(fragment.piece)
        offset = fragment.offset
    pieces.reverse()
    return Record(last.lsn, last.seq, b"".join(pieces))


async def read_batches(
    js: JetStreamContext, stream: str, start_seq: int = 1, patience: float = 10.0
) -> AsyncIterator[StoredBatch]:
    """Every message from ``start_seq`` to the stream's current last one, in order, records in
    fragments put together (a record cut short at the end is not yielded); each message must
    arrive within ``patience`` seconds."""
    info = await js.stream_info(stream)
    end = info.state.last_seq
    start = max(start_seq, info.state.first_seq)
    if info.state.messages == 0 or start > end:
        return
    subject = (info.config.subjects or [">"])[0]
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        ),
    )
    assembler = Assembler()
    try:
        while True:
            msg = await sub.next_msg(patience)
            seq = msg.metadata.sequence.stream
            batch = assembler.feed(msg, seq)
            if batch is not None:
                yield batch
            if seq >= end:
                return
    finally:
        await sub.unsubscribe()


async def read_records(js: JetStreamContext, stream: str, start_seq: int = 1) -> list[Record]:
    """All records of the stream, in order (for tests and small streams)."""
    out: list[Record] = []
    async for batch in read_batches(js, stream, start_seq):
        out.extend(batch.records)
    return out
