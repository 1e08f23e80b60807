"""The decoder against pgoutput bytes recorded from PostgreSQL (scripts/record-pgoutput-golden).

OIDs, xids, LSNs and times change with every recording, so they are checked against the facts
recorded with them and against each other, never against constants.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from struct import pack

import pytest
from pgoutput_testlib import CASES, Decoded, decode_case, encode, parse_lsn

from pgcapture.pgoutput import (
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
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

INT4, INT8, TEXT, BOOL, FLOAT8, TIMESTAMPTZ, NUMERIC, VARCHAR = (
    23,
    20,
    25,
    16,
    701,
    1184,
    1700,
    1043,
)
EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC)
TEN_MINUTES = 600_000_000  # microseconds


def micros(moment: datetime) -> int:
    return (moment - EPOCH_2000) // timedelta(microseconds=1)


def rows_of(case: Decoded, cls: type) -> list[int]:
    return [i for i, m in enumerate(case.messages) if isinstance(m, cls)]


# -- every case -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_golden_messages_reencode_to_the_same_bytes(name: str) -> None:
    case = decode_case(name)
    for row, message in zip(case.golden.rows, case.messages, strict=True):
        assert encode(message) == row.data, message


@pytest.mark.parametrize("name", CASES)
def test_transactions_are_consistent(name: str) -> None:
    """Begin/Commit pairs agree with each other and with the slot's lsn and xid columns."""
    case = decode_case(name)
    begin: Begin | None = None
    begin_row = None
    for row, message in zip(case.golden.rows, case.messages, strict=True):
        if isinstance(message, Begin):
            assert begin is None
            begin, begin_row = message, row
            assert row.xid == message.xid
            assert 0 < row.lsn <= message.final_lsn
        elif isinstance(message, Commit):
            assert begin is not None
            assert begin_row is not None
            assert message.commit_lsn == begin.final_lsn
            assert message.commit_time == begin.commit_time
            assert message.flags == 0
            assert message.end_lsn > message.commit_lsn
            assert row.lsn == message.end_lsn
            assert row.xid == begin.xid
            begin = None
        elif begin is not None:
            assert begin_row is not None
            assert row.xid == begin.xid
            assert begin_row.lsn <= row.lsn <= begin.final_lsn
    assert begin is None


@pytest.mark.parametrize("name", CASES)
def test_times_are_those_of_the_recording(name: str) -> None:
    case = decode_case(name)
    recorded_at = case.golden.facts["recorded_at"]
    # (under a replication origin, Begin has the origin's commit time: see test_origin)
    times = [] if name == "origin" else [m.commit_time for m in case.of(Begin)]
    times += [m.commit_time for m in case.of(StreamCommit) + case.of(CommitPrepared)]
    times += [m.prepare_time for m in case.of(Prepare) + case.of(StreamPrepare)]
    for t in times:
        assert recorded_at <= t < recorded_at + TEN_MINUTES


@pytest.mark.parametrize("name", CASES)
def test_relation_cache_holds_the_last_relation_messages(name: str) -> None:
    case = decode_case(name)
    relations = {r.relid: r for r in case.of(Relation)}
    assert case.decoder.relations == relations
    for relation in relations.values():
        assert relation.relid == case.golden.facts[f"relid:{qualified(relation)}"]


def qualified(relation: Relation) -> str:
    return (
        relation.name if relation.namespace == "public" else f"{relation.namespace}.{relation.name}"
    )


# -- insert, update, delete -------------------------------------------------------------------


NARROW_COLUMNS = [
    ("id", INT4), ("a", INT4), ("b", INT8), ("c", TEXT),
    ("d", BOOL), ("e", FLOAT8), ("f", TIMESTAMPTZ),
]  # fmt: skip


@pytest.mark.parametrize("name", ["dml_binary", "dml_text"])
def test_dml_relation(name: str) -> None:
    case = decode_case(name)
    assert case.tags() == "BRIICBUCBUCBDCBDC"
    (relation,) = case.of(Relation)
    assert relation.xid is None
    assert (relation.namespace, relation.name) == ("public", "narrow")
    assert relation.replica_identity == "d"
    assert [(c.name, c.type_oid) for c in relation.columns] == NARROW_COLUMNS
    assert [c.type_modifier for c in relation.columns] == [-1] * 7
    assert [c.is_key for c in relation.columns] == [True] + [False] * 6


def test_dml_binary_values() -> None:
    case = decode_case("dml_binary")
    first, second = case.of(Insert)
    relid = case.golden.facts["relid:narrow"]
    assert first.relid == second.relid == relid
    assert first.xid is None
    assert first.new == TupleData(
        b"bbbbbbb",
        (
            pack(">i", 1),
            pack(">i", 42),
            pack(">q", 9_000_000_000),
            "héllo".encode(),
            b"\x01",
            pack(">d", 1.5),
            pack(">q", micros(datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))),
        ),
    )
    assert second.new == TupleData(b"bnnnnnn", (b"\x00\x00\x00\x02",) + (None,) * 6)
    plain, key_change = case.of(Update)
    assert (plain.old_kind, plain.old) == (None, None)
    assert plain.new.values[:2] == (b"\x00\x00\x00\x01", b"\x00\x00\x00\x2b")
    assert key_change.old_kind == "K"
    assert key_change.old == TupleData(b"bnnnnnn", (b"\x00\x00\x00\x02",) + (None,) * 6)
    assert key_change.new == TupleData(b"bnnnnnn", (b"\x00\x00\x00\x0a",) + (None,) * 6)
    deleted = [(d.old_kind, d.old.kinds, d.old.values[0]) for d in case.of(Delete)]
    assert deleted == [("K", b"bnnnnnn", b"\x00\x00\x00\x0a"), ("K", b"bnnnnnn", pack(">i", 1))]


def test_dml_text_values() -> None:
    case = decode_case("dml_text")
    first, second = case.of(Insert)
    assert first.new == TupleData(
        b"ttttttt",
        (b"1", b"42", b"9000000000", "héllo".encode(), b"t", b"1.5",
         b"2024-01-02 03:04:05.678901+00"),
    )  # fmt: skip
    assert second.new == TupleData(b"tnnnnnn", (b"2",) + (None,) * 6)
    plain, key_change = case.of(Update)
    assert plain.old is None
    assert plain.new.values[1] == b"43"
    assert (key_change.old_kind, key_change.old.values[0], key_change.new.values[0]) == (
        "K", b"2", b"10",
    )  # fmt: skip
    assert [d.old.values[0] for d in case.of(Delete)] == [b"10", b"1"]


def test_text_and_binary_recordings_describe_the_same_relation() -> None:
    assert decode_case("dml_text").of(Relation) == decode_case("dml_binary").of(Relation)


def test_replica_identities_and_old_rows() -> None:
    case = decode_case("replica_identity")
    assert case.tags() == "BRIRIRICBUUUCBDDC"
    full, nothing, index = case.of(Relation)
    assert (full.name, full.replica_identity) == ("ident_full", "f")
    assert [c.is_key for c in full.columns] == [True, True]
    assert (nothing.name, nothing.replica_identity) == ("ident_nothing", "n")
    assert [c.flags for c in nothing.columns] == [0, 0]
    assert (index.name, index.replica_identity) == ("ident_index", "i")
    assert [(c.name, c.is_key) for c in index.columns] == [
        ("id", False), ("code", True), ("v", False),
    ]  # fmt: skip
    old_row, same_key, new_key = case.of(Update)
    assert (old_row.relid, old_row.old_kind) == (full.relid, "O")
    assert old_row.old == TupleData(b"tt", (b"1", b"a"))
    assert old_row.new == TupleData(b"tt", (b"1", b"b"))
    assert (same_key.relid, same_key.old_kind, same_key.old) == (index.relid, None, None)
    assert new_key.old_kind == "K"
    assert new_key.old == TupleData(b"ntn", (None, b"k1", None))
    assert new_key.new == TupleData(b"ttt", (b"1", b"k2", b"b"))
    full_delete, key_delete = case.of(Delete)
    assert (full_delete.old_kind, full_delete.old) == ("O", TupleData(b"tt", (b"1", b"b")))
    assert (key_delete.old_kind, key_delete.old) == ("K", TupleData(b"ntn", (None, b"k2", None)))


def test_user_types_are_announced_by_type_messages() -> None:
    case = decode_case("types")
    facts = case.golden.facts
    assert case.tags() == "BYYYRIIC"
    types = [(t.oid, t.namespace, t.name, t.xid) for t in case.of(Type)]
    assert types == [
        (facts["typoid:app.mood"], "app", "mood", None),
        (facts["typoid:app.pair"], "app", "pair", None),
        (facts["typoid:app.mood[]"], "app", "_mood", None),
    ]
    (relation,) = case.of(Relation)
    assert (relation.namespace, relation.name) == ("app", "typed")
    assert [(c.name, c.type_oid, c.type_modifier) for c in relation.columns] == [
        ("id", INT4, -1),
        ("m", facts["typoid:app.mood"], -1),
        ("p", facts["typoid:app.pair"], -1),
        ("moods", facts["typoid:app.mood[]"], -1),
        ("prix_€", NUMERIC, (10 << 16 | 2) + 4),  # numeric(10, 2)
        ("label", VARCHAR, 20 + 4),  # varchar(20)
    ]
    full, nulls = case.of(Insert)
    assert full.new.values == (b"1", b"happy", b"(7,seven)", b"{sad,ok}", b"12.50", b"label")
    assert nulls.new == TupleData(b"tnnnnn", (b"2",) + (None,) * 5)


def test_unchanged_toast_value_is_kind_u() -> None:
    case = decode_case("toast")
    assert case.golden.facts["toast_relation_bytes"] > 0  # the value was stored out of line
    assert case.tags() == "BRICBUCBDC"
    (insert,) = case.of(Insert)
    assert insert.new.kinds == b"ttt"
    big = insert.new.values[2]
    assert big is not None
    assert len(big) == 3000
    assert big.isalnum()
    (update,) = case.of(Update)
    assert update.old is None
    assert update.new == TupleData(b"ttu", (b"1", b"2", None))
    (delete,) = case.of(Delete)
    assert delete.old == TupleData(b"tnn", (b"1", None, None))


def test_truncate_options_and_relations() -> None:
    case = decode_case("truncate")
    facts = case.golden.facts
    counter, parent, child = (facts[f"relid:{n}"] for n in ("counter", "parent", "child"))
    truncates = [(t.options, t.cascade, t.restart_identity, t.relids) for t in case.of(Truncate)]
    assert truncates == [
        (0, False, False, (counter,)),
        (1, True, False, (parent, child)),
        (2, False, True, (counter,)),
        (3, True, True, (parent, child)),
    ]
    assert all(t.xid is None for t in case.of(Truncate))


def test_logical_messages() -> None:
    case = decode_case("messages")
    assert case.tags() == "BMRICMM"
    in_tx, outside, rolled_back = case.of(LogicalMessage)
    (begin,) = case.of(Begin)
    assert (in_tx.transactional, in_tx.prefix, in_tx.content) == (True, "app/tx", b"hello")
    assert in_tx.lsn == case.golden.rows[1].lsn
    assert in_tx.lsn < begin.final_lsn
    assert (outside.transactional, outside.prefix) == (False, "app/nontx")
    assert outside.content == b"\x00\xff\x10"
    assert (rolled_back.transactional, rolled_back.content) == (False, b"")
    assert rolled_back.prefix == "app/rolled-back"
    assert all(m.xid is None for m in (in_tx, outside, rolled_back))
    assert outside.lsn == case.golden.rows[5].lsn < rolled_back.lsn


def test_origin() -> None:
    case = decode_case("origin")
    assert case.tags() == "BORIC"
    (origin,) = case.of(Origin)
    assert origin.name == "upstream"
    assert origin.commit_lsn == parse_lsn(case.golden.facts["origin_lsn"])
    # The server reports the origin's commit time (pg_replication_origin_xact_setup) as the
    # transaction's commit time, not the local one.
    (begin,) = case.of(Begin)
    assert begin.commit_time == case.golden.facts["origin_time"]


# -- streaming (protocol 2) -------------------------------------------------------------------


def test_streamed_transactions() -> None:
    case = decode_case("streaming")
    facts = case.golden.facts
    top, sub, doomed = facts["commit_xid"], facts["subxid"], facts["abort_xid"]
    assert case.decoder.in_stream is False
    starts = case.of(StreamStart)
    assert [s.xid for s in starts if s.first_segment] == [top, doomed]
    assert len([s for s in starts if s.xid == top]) >= 2
    assert len(case.of(StreamStop)) == len(starts)
    (commit,) = case.of(StreamCommit)
    assert (commit.xid, commit.flags) == (top, 0)
    assert (
        commit.commit_lsn < commit.end_lsn == case.golden.rows[rows_of(case, StreamCommit)[0]].lsn
    )
    aborts = [(a.xid, a.subxid, a.abort_lsn, a.abort_time) for a in case.of(StreamAbort)]
    assert aborts == [(top, sub, None, None), (doomed, doomed, None, None)]


def test_stream_blocks_carry_xids() -> None:
    case = decode_case("streaming")
    facts = case.golden.facts
    top, sub, doomed = facts["commit_xid"], facts["subxid"], facts["abort_xid"]
    data = (Relation, Insert, Update, Delete, Truncate, LogicalMessage)
    for message, in_stream in zip(case.messages, case.in_stream_before, strict=True):
        if isinstance(message, data):
            # Inside a block: the (sub)transaction's xid; outside: none.
            assert (message.xid is not None) == in_stream, message
    inserts = {i.new.values[0]: i.xid for i in case.of(Insert)}
    assert inserts[b"1"] == inserts[b"2"] == top
    assert inserts[b"3"] == sub  # written in the rolled-back subtransaction
    assert inserts[b"4"] > sub  # a later subtransaction of the same transaction
    assert inserts[b"100"] == doomed
    assert inserts[b"5"] is None  # the small transaction was not streamed
    (message,) = case.of(LogicalMessage)
    assert (message.xid, message.transactional, message.content) == (top, True, b"in stream")
    (truncate,) = case.of(Truncate)
    assert truncate.xid is not None
    assert truncate.cascade
    (small,) = [b for b in case.of(Begin) if b.xid == facts["small_xid"]]
    assert small.xid == facts["small_xid"]


# -- two-phase commit (protocol 3) ------------------------------------------------------------


def test_prepared_transactions() -> None:
    case = decode_case("two_phase")
    facts = case.golden.facts
    assert case.tags().startswith("bRIPKbIPr")
    begins, prepares = case.of(BeginPrepare), case.of(Prepare)
    for begin, prepare in zip(begins, prepares, strict=True):
        assert (begin.prepare_lsn, begin.end_lsn, begin.prepare_time, begin.xid, begin.gid) == (
            prepare.prepare_lsn, prepare.end_lsn, prepare.prepare_time, prepare.xid, prepare.gid,
        )  # fmt: skip
        assert prepare.prepare_lsn < prepare.end_lsn
        assert prepare.xid == facts[f"xid:{prepare.gid}"]
        assert prepare.flags == 0
    assert [p.gid for p in prepares] == ["gid-commit", "gid-rollback-ü"]
    committed = case.of(CommitPrepared)[0]
    assert (committed.gid, committed.xid) == ("gid-commit", prepares[0].xid)
    assert committed.commit_lsn >= prepares[0].end_lsn
    assert committed.end_lsn > committed.commit_lsn
    (rollback,) = case.of(RollbackPrepared)
    assert (rollback.gid, rollback.xid) == ("gid-rollback-ü", prepares[1].xid)
    assert rollback.prepare_end_lsn == prepares[1].end_lsn
    assert rollback.prepare_time == prepares[1].prepare_time <= rollback.rollback_time
    assert rollback.rollback_end_lsn > rollback.prepare_end_lsn


def test_streamed_prepared_transaction() -> None:
    case = decode_case("two_phase")
    xid = case.golden.facts["xid:gid-stream"]
    starts = case.of(StreamStart)
    assert {s.xid for s in starts} == {xid}
    assert starts[0].first_segment
    (insert,) = [i for i in case.of(Insert) if i.xid is not None]
    assert (insert.xid, insert.new.values) == (xid, (b"202", b"gid-stream"))
    (prepared,) = case.of(StreamPrepare)
    assert (prepared.xid, prepared.gid, prepared.flags) == (xid, "gid-stream", 0)
    assert prepared.prepare_lsn < prepared.end_lsn
    committed = case.of(CommitPrepared)[1]
    assert (committed.xid, committed.gid) == (xid, "gid-stream")
    assert committed.commit_lsn >= prepared.end_lsn
