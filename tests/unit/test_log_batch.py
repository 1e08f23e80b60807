"""The batcher: exact LogBatch bytes, cuts by count and bytes, nothing lost or reordered."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pgcapture.capture.changes import Record
from pgcapture.checkpoint import Checkpoint
from pgcapture.log.batch import Batch, Batcher, decode_batch, encode_record
from pgcapture.proto import pb

u64 = st.integers(min_value=1, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)


def _transactions(sizes: list[int], payload: bytes = b"m" * 40) -> list[Record]:
    """Begin, ``n`` changes and Commit per transaction, with increasing commit LSNs."""
    out: list[Record] = []
    lsn = 0x16_0000_0000
    for n in sizes:
        lsn += 0x100
        out.append(Record(lsn, 0, b"begin" + payload))
        out.extend(Record(lsn, i, payload + i.to_bytes(4)) for i in range(1, n + 1))
        out.append(Record(lsn, n + 1, b"commit", lsn + 0x30))
    return out


def _all(batcher: Batcher, records: list[Record], chunks: list[int] | None = None) -> list[Batch]:
    """Feed ``records`` in reads of the given sizes (one read by default), then flush."""
    batches: list[Batch] = []
    start = 0
    for size in [*(chunks or []), len(records)]:
        batches += batcher.extend(records[start : start + size])
        start += size
    last = batcher.flush()
    return [*batches, *([last] if last else [])]


@given(u64, u32, st.binary(min_size=1, max_size=20000))  # a wire Message is never empty
def test_record_encoding_matches_protobuf(lsn: int, seq: int, message: bytes) -> None:
    expected = pb.LogBatch(
        records=[pb.LogRecord(lsn=lsn, seq=seq, message=message)]
    ).SerializeToString()
    assert encode_record(lsn, seq, message) == expected
    assert Batcher(10, 1 << 20).extend([Record(lsn, seq, message)]) == []
    batcher = Batcher(10, 1 << 20)
    batcher.add(Record(lsn, seq, message))
    flushed = batcher.flush()
    assert flushed is not None
    assert flushed.payload == expected


@given(
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=12),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=50, max_value=3000),
    st.lists(st.integers(min_value=0, max_value=40), max_size=30),
)
def test_batches_carry_every_record_once_in_order(
    sizes: list[int], max_records: int, max_bytes: int, chunks: list[int]
) -> None:
    records = _transactions(sizes)
    batches = _all(Batcher(max_records, max_bytes), records, chunks)
    whole = [b for b in batches if not b.is_fragment]  # records larger than max_bytes: fragments
    decoded = [r for b in whole for r in decode_batch(b.payload)]
    small = [r for r in records if len(encode_record(r.lsn, r.seq, r.message)) <= max_bytes]
    assert [(r.lsn, r.seq, r.message) for r in decoded] == [
        (r.lsn, r.seq, r.message) for r in small
    ]
    for batch in whole:
        inside = decode_batch(batch.payload)
        assert batch.count == len(inside) <= max_records
        assert batch.first == inside[0].checkpoint
        assert batch.last == inside[-1].checkpoint
        assert len(batch) <= max_bytes
    assert all(
        a.last < b.first or (a.last == b.first and a.is_fragment)
        for a, b in itertools.pairwise(batches)
    )


def test_commit_end_is_the_last_commit_of_the_batch() -> None:
    records = _transactions([2, 0, 3])
    batches = _all(Batcher(4, 1 << 20), records)
    commits = {r.checkpoint: r.end_lsn for r in records if r.end_lsn}
    for batch in batches:
        inside = [r.checkpoint for r in decode_batch(batch.payload)]
        ends = [commits[c] for c in inside if c in commits]
        assert batch.commit_end == (ends[-1] if ends else 0)
        assert bool(batch.last_commit) == bool(ends)


def test_large_transaction_spans_batches_without_waiting_for_commit() -> None:
    batcher = Batcher(100, 1 << 20)
    records = _transactions([1000])[:-1]  # Begin and 1000 changes, no Commit yet
    batches = batcher.extend(records)
    assert len(batches) == 10
    assert batcher.pending == 1
    assert all(b.commit_end == 0 for b in batches)
    assert batches[0].first == Checkpoint(records[0].lsn, 0)


def test_byte_limit_cuts_before_the_record_that_would_exceed_it() -> None:
    big = Record(1, 1, b"x" * 960)
    batcher = Batcher(1000, 1000)
    assert batcher.extend([Record(1, 0, b"b" * 50)]) == []
    batches = batcher.extend([big])
    assert len(batches) == 1
    assert batches[0].count == 1
    assert batcher.pending == 1
    assert batcher.pending_bytes > 960


def test_record_larger_than_the_limit_goes_in_fragments_of_its_own() -> None:
    batcher = Batcher(1000, 200)
    batches = _all(batcher, [Record(1, 0, b"a"), Record(1, 1, b"z" * 500), Record(1, 2, b"c")])
    assert [b.count for b in batches] == [1, 1, 1, 1, 1, 1]
    assert [b.part_end for b in batches] == [0, 136, 272, 408, 500, 0]
    assert all(len(b) <= 200 for b in batches)


def test_flush_of_an_empty_batcher_is_none() -> None:
    batcher = Batcher(10, 1000)
    assert batcher.flush() is None
    assert batcher.pending == 0
    assert batcher.pending_bytes == 0


def test_large_seq_and_long_messages_use_multibyte_varints() -> None:
    records = [Record(1 << 40, 300, b"q" * 20000), Record(1 << 40, 70000, b"r")]
    (batch,) = _all(Batcher(10, 1 << 20), records)
    assert decode_batch(batch.payload) == [Record(r.lsn, r.seq, r.message) for r in records]
