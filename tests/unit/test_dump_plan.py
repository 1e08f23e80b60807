"""Planning dump chunks, checking keys, and the controller's records, without servers."""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcapture.dump.chunks import LAST_PAGE
from pgcapture.dump.plan import (
    DumpRefused,
    TableSize,
    check_keys,
    key_chunks,
    page_ranges,
    pages_per_chunk,
    parse_table_name,
)
from pgcapture.dump.scheduler import requeue_delay
from pgcapture.dump.store import Chunk, ChunkRecord, Dump, DumpRecord, chunk_key, new_dump_id


def table(pages: int = 100, reltuples: float = -1, relpages: int = 0) -> TableSize:
    return TableSize("public", "t", pages, reltuples, relpages)


@given(pages=st.integers(0, 5000), per_chunk=st.integers(1, 700))
def test_page_ranges_cover_every_page_once_and_the_last_is_open_ended(
    pages: int, per_chunk: int
) -> None:
    ranges = page_ranges(pages, per_chunk)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == LAST_PAGE
    for (_, end), (begin, _) in itertools.pairwise(ranges):
        assert begin == end + 1
    assert all(end - begin + 1 == per_chunk for begin, end in ranges[:-1])
    assert len(ranges) == max(1, -(-pages // per_chunk))


def test_an_empty_table_is_one_open_ended_chunk() -> None:
    assert page_ranges(0, 10) == [(0, LAST_PAGE)]


@pytest.mark.parametrize(
    ("size", "chunk_pages", "chunk_rows", "expected"),
    [
        (table(), 7, 20_000, 7),  # given pages win
        (table(), 0, 20_000, 200),  # never analyzed: 100 rows per page
        (table(reltuples=0, relpages=0), 0, 250, 2),
        (table(reltuples=4000, relpages=100), 0, 400, 10),  # 40 rows per page
        (table(reltuples=4000, relpages=100), 0, 10, 1),  # at least one page
        (table(reltuples=50, relpages=0), 0, 1000, 10),  # relpages unknown: assumed density
    ],
)
def test_pages_per_chunk_from_setting_or_statistics(
    size: TableSize, chunk_pages: int, chunk_rows: int, expected: int
) -> None:
    assert pages_per_chunk(size, chunk_pages, chunk_rows) == expected


def test_table_names_default_to_schema_public() -> None:
    assert parse_table_name("orders") == ("public", "orders")
    assert parse_table_name("sales.orders") == ("sales", "orders")
    for bad in ("", ".orders", "sales."):
        with pytest.raises(DumpRefused, match="is not a table name") as caught:
            parse_table_name(bad)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_keys_must_name_exactly_the_key_columns() -> None:
    check_keys("public.t", ["a", "b"], ['{"a": 1, "b": "x"}', '{"b": 2, "a": 3}'])
    problems = {
        '{"a": 1}': "lacks key column 'b'",
        '{"a": 1, "b": 2, "c": 3}': "names 'c', which is not a key column",
        '{"a": null, "b": 2}': "has null for key column 'a'",
        "[1, 2]": "is not an object",
        "nope": "is not an object",
    }
    for key, problem in problems.items():
        with pytest.raises(DumpRefused) as caught:
            check_keys("public.t", ["a", "b"], ['{"a": 0, "b": 0}', key])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"key {key!r} {problem}" in caught.value.message
        assert '{"a": ..., "b": ...}' in caught.value.message


def test_a_table_without_key_columns_cannot_be_dumped_by_key() -> None:
    with pytest.raises(DumpRefused, match="neither a primary key nor a REPLICA IDENTITY") as caught:
        check_keys("public.t", [], ['{"a": 1}'])
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_key_chunks_hold_up_to_a_thousand_keys() -> None:
    keys = [f'{{"id": {i}}}' for i in range(2001)]
    chunks = key_chunks("public", "t", keys)
    assert [len(c.keys) for c in chunks] == [1000, 1000, 1]
    assert [k for c in chunks for k in c.keys] == keys
    assert all((c.page_begin, c.page_end) == (0, 0) for c in chunks)


def test_dump_ids_are_short_unique_sortable_and_kv_safe() -> None:
    ids = [new_dump_id(1_700_000_000 + i / 1000) for i in range(500)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 500
    assert all(re.fullmatch(r"[0-9a-z]{12}", i) for i in ids)
    assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", chunk_key("orders.eu", ids[0], 3))


def test_requeue_backoff_doubles_from_two_seconds_up_to_the_maximum() -> None:
    assert [requeue_delay(n, 60) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]
    assert requeue_delay(1000, 300) == 300


def chunk(n: int, **fields: Any) -> Chunk:
    record = ChunkRecord(dump="d1", uri="u", n=n, schema_name="public", table="t", **fields)
    return Chunk(chunk_key("u", "d1", n), record, n + 1)


def test_availability_of_pending_claimed_and_key_chunks() -> None:
    now = time.time()
    assert chunk(0).record.available(now, key_chunks=False)
    assert not chunk(0, not_before=now + 1).record.available(now, key_chunks=False)
    assert not chunk(0, state="claimed", expires=now + 1).record.available(now, key_chunks=True)
    assert chunk(0, state="claimed", expires=now - 1).record.available(now, key_chunks=True)
    assert not chunk(0, state="done").record.available(now, key_chunks=True)
    assert not chunk(0, keys=['{"id": 1}']).record.available(now, key_chunks=False)
    assert chunk(0, keys=['{"id": 1}']).record.available(now, key_chunks=True)


def test_a_dump_is_done_when_every_chunk_is_and_reports_its_progress() -> None:
    now = time.time()
    record = DumpRecord(id="d1", uri="u", tables=["public.t"], chunks=3, created=now, updated=now)
    dump = Dump("dump.u.d1", record, 1)
    dump.chunks = {
        0: chunk(0, state="done", rows=10, updated=now + 1),
        1: chunk(1, state="claimed", expires=now + 5, requeues=2, last_error="x", failed_at=now),
        2: chunk(2, requeues=1, last_error="later", failed_at=now + 1),
    }
    status = dump.status(now)
    assert (status.state, status.chunks_done, status.chunks_running) == ("running", 1, 1)
    assert (status.rows, status.retries, status.last_error) == (10, 3, "later")
    assert not status.HasField("finished")
    assert [c.record.n for c in dump.open_chunks()] == [1, 2]
    for n in (1, 2):
        dump.chunks[n] = chunk(n, state="done", rows=5, updated=now + 2)
    status = dump.status(now)
    assert (status.state, status.chunks_done, status.rows) == ("done", 3, 20)
    assert status.finished.ToNanoseconds() == int((now + 2) * 1e9)
    stopped = Dump("dump.u.d1", record.model_copy(update={"state": "stopped"}), 2, dump.chunks)
    assert stopped.state == "stopped"
