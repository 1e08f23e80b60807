"""Reading a source's stream back in order: stored batches and their records.

``read_batches`` walks the stream from a sequence up to the last message stored when it was
called, with an ordered (ephemeral, flow-controlled) consumer, and yields each message as a
``StoredBatch``: its stream sequence, the checkpoints of its headers and its decoded records.
It checks what the log promises: headers agree with the payload, and checkpoints only increase
from one message to the next. It is what the tests read the log with, and a base for readers
that follow the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ProtocolError
from pgcapture.log.batch import decode_batch
from pgcapture.log.stream import HEADER_FIRST, HEADER_LAST


@dataclass(frozen=True, slots=True)
class StoredBatch:
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


def parse_message(msg: Msg, seq: int, after: Checkpoint | None = None) -> StoredBatch:
    """A stored message as a batch, checked against its own headers and, when given, against
    the last checkpoint of the message before it (``after``)."""
    first, last = bounds(msg.headers, seq)
    if after is not None and first <= after:
        raise ProtocolError(f"stream message {seq} starts at {first}, not after {after}")
    records = decode_batch(msg.data)
    if not records or records[0].checkpoint != first or records[-1].checkpoint != last:
        raise ProtocolError(
            f"stream message {seq}: headers say {first}..{last}, the payload holds "
            f"{len(records)} records"
        )
    return StoredBatch(seq, first, last, records)


async def read_batches(
    js: JetStreamContext, stream: str, start_seq: int = 1, patience: float = 10.0
) -> AsyncIterator[StoredBatch]:
    """Every message from ``start_seq`` to the stream's current last one, in order; each must
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
    previous: Checkpoint | None = None
    try:
        while True:
            msg = await sub.next_msg(patience)
            seq = msg.metadata.sequence.stream
            batch = parse_message(msg, seq, previous)
            previous = batch.last
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
