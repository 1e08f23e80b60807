"""Records larger than a message: fragments, their exact bytes, and putting them together."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.errors import ProtocolError
from pgcapture.log.batch import Batch, Batcher, Fragment, decode_payload, encode_fragment
from pgcapture.log.reader import Assembler, StoredBatch
from pgcapture.log.stream import HEADER_FIRST, HEADER_LAST, HEADER_PART, part_header
from pgcapture.proto import pb

u64 = st.integers(min_value=1, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
LSN = 0x16_0000_0100


@dataclass
class StoredMsg:
    """What the assembler reads of a stream message (nats-py's Msg has the same attributes)."""

    headers: dict[str, str]
    data: bytes


def stored(batch: Batch) -> StoredMsg:
    headers = {HEADER_FIRST: batch.first.key(), HEADER_LAST: batch.last.key()}
    if batch.is_fragment:
        headers[HEADER_PART] = part_header(batch.part_end, batch.part_total)
    return StoredMsg(headers, batch.payload)


def feed(assembler: Assembler, batches: list[Batch], first_seq: int = 1) -> list[StoredBatch]:
    out = []
    for seq, batch in enumerate(batches, first_seq):
        result = assembler.feed(stored(batch), seq)  # type: ignore[arg-type]
        if result is not None:
            out.append(result)
    return out


@given(u64, u32, st.binary(min_size=1, max_size=5000), st.integers(0, 10**7), u64)
def test_fragment_encoding_matches_protobuf(
    lsn: int, seq: int, piece: bytes, offset: int, total: int
) -> None:
    expected = pb.LogBatch(
        records=[pb.LogRecord(lsn=lsn, seq=seq, message=piece, offset=offset, total=total)]
    ).SerializeToString()
    payload = encode_fragment(lsn, seq, piece, offset, total)
    assert payload == expected
    assert decode_payload(payload) == Fragment(lsn, seq, piece, offset, total)


@given(
    st.integers(min_value=1, max_value=30),
    st.integers(min_value=200, max_value=2000),
    st.integers(min_value=1, max_value=20000),
)
def test_a_record_larger_than_a_batch_is_cut_into_fragments_that_rebuild_it(
    before: int, max_bytes: int, size: int
) -> None:
    big = bytes(i % 251 for i in range(size))
    records = [Record(LSN, 0, b"begin")]
    records += [Record(LSN, i, b"x" * 20) for i in range(1, before)]
    records += [
        Record(LSN, before, big),
        Record(LSN, before + 1, b"y"),
        Record(LSN, before + 2, b"c", LSN + 8),
    ]
    batcher = Batcher(1000, max_bytes)
    batches = batcher.extend(records)
    last = batcher.flush()
    batches += [last] if last else []
    assert all(len(b) <= max_bytes for b in batches)
    parts = [b for b in batches if b.is_fragment]
    if len(big) + 16 <= max_bytes:
        assert not parts
    else:
        assert len(parts) >= 2
        assert [b.part_total for b in parts] == [len(big)] * len(parts)
        assert parts[-1].completes_record
        assert not any(b.completes_record for b in parts[:-1])
    out = [r for b in feed(Assembler(), batches) for r in b.records]
    assert out == [*records[:-1], Record(LSN, before + 2, b"c")]  # end_lsn is not stored


def _big_record_batches(size: int = 3000, max_bytes: int = 1000) -> list[Batch]:
    batcher = Batcher(100, max_bytes)
    records = [Record(LSN, 0, b"begin"), Record(LSN, 1, b"z" * size), Record(LSN, 2, b"c", 1)]
    batches = batcher.extend(records)
    last = batcher.flush()
    return [*batches, *([last] if last else [])]


def test_a_fragment_run_cut_by_a_crash_is_dropped_when_the_record_comes_again() -> None:
    batches = _big_record_batches()
    begin, parts, commit = batches[0], batches[1:-1], batches[-1]
    assert len(parts) == 4
    # capture wrote two fragments, crashed, and wrote the record again from its start
    out = feed(Assembler(), [begin, *parts[:2], *parts, commit])
    assert [r.seq for b in out for r in b.records] == [0, 1, 2]
    assert out[1].records[0].message == b"z" * 3000
    assert out[1].seq == 1 + 2 + 4  # the sequence of the last fragment
    # ... or again whole, after a restart with a larger max_bytes
    single = Batcher(100, 1 << 20)
    single.add(Record(LSN, 1, b"z" * 3000))
    flushed = single.flush()
    assert flushed is not None
    out = feed(Assembler(), [begin, *parts[:3], flushed, commit])
    assert [r.message for b in out for r in b.records][1] == b"z" * 3000


def test_a_reader_refuses_to_start_in_the_middle_of_a_record() -> None:
    parts = _big_record_batches()[1:-1]
    with pytest.raises(ProtocolError, match="must start at a record's first fragment"):
        feed(Assembler(), parts[1:])


def test_a_new_record_after_an_unfinished_one_is_refused() -> None:
    batches = _big_record_batches()
    with pytest.raises(ProtocolError, match="is unfinished"):
        feed(Assembler(), [batches[0], batches[1], batches[-1]])


def test_a_fragment_whose_header_disagrees_with_its_payload_is_refused() -> None:
    parts = _big_record_batches()[1:-1]
    msg = stored(parts[0])
    msg.headers[HEADER_PART] = part_header(10, 3000)
    with pytest.raises(ProtocolError, match="does not match its payload"):
        Assembler().feed(msg, 1)  # type: ignore[arg-type]


def test_checkpoints_must_still_increase() -> None:
    batches = _big_record_batches()
    with pytest.raises(ProtocolError, match="not after"):
        feed(Assembler(Checkpoint(LSN, 5)), batches)
