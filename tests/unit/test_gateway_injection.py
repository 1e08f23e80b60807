"""Dump rows among stream changes: the row identities, the stale-row rule, the payload."""

from __future__ import annotations

from pgcapture.gateway.injection import Watch, change_op, dump_payload, identity, row_keys
from pgcapture.gateway.records import change_keys, read_head
from pgcapture.proto import pb

TABLE = ("public", "items")


def change(op: int, key: int | None, value: str, *, keyed: bool = True) -> bytes:
    fields = [pb.Field(name="v", oid=25, binary=value.encode())]
    if key is not None:
        fields.insert(0, pb.Field(name="id", oid=23, binary=key.to_bytes(4, "big"), key=keyed))
    return pb.Change(op=op, schema=TABLE[0], table=TABLE[1], new=fields).SerializeToString()


def stored(body: bytes) -> bytes:
    return pb.Message(change=pb.Change.FromString(body)).SerializeToString()


def test_a_dump_row_has_the_key_of_the_stream_changes_of_its_row() -> None:
    dumped = change(pb.Change.UPDATE, 7, "dumped")
    for op in (pb.Change.INSERT, pb.Change.UPDATE):
        message = stored(change(op, 7, "streamed"))
        assert row_keys(dumped) == change_keys(message, read_head(message).body)
    assert row_keys(dumped) != row_keys(change(pb.Change.UPDATE, 8, "dumped"))


def test_a_row_changed_after_the_read_position_is_stale() -> None:
    watch = Watch(TABLE)
    row = change(pb.Change.UPDATE, 1, "a")
    keys = row_keys(row)
    watch.see_change(100, keys, row)
    assert watch.filter(100).keeps(keys, row)  # the dump already holds that change
    assert not watch.filter(99).keeps(keys, row)  # the stream has a newer version
    other = change(pb.Change.UPDATE, 2, "b")
    assert watch.filter(99).keeps(row_keys(other), other)


def test_a_filter_sees_changes_taken_after_it_was_made() -> None:
    watch = Watch(TABLE)
    keep = watch.filter(50)
    row = change(pb.Change.UPDATE, 1, "a")
    assert not keep.needs_keys
    watch.see_change(60, row_keys(row), row)
    assert keep.needs_keys
    assert not keep.keeps(row_keys(row), row)


def test_a_truncate_after_the_read_position_makes_the_whole_chunk_stale() -> None:
    watch = Watch(TABLE)
    watch.see_truncate(80)
    assert watch.filter(79).all_stale
    assert not watch.filter(80).all_stale


def test_a_keyless_row_the_stream_inserted_up_to_the_read_position_is_dumped_once() -> None:
    watch = Watch(TABLE)
    a = change(pb.Change.INSERT, None, "a")
    b = change(pb.Change.INSERT, None, "b")
    keys = row_keys(a)
    assert keys == ((TABLE[0], TABLE[1], ()),)
    watch.see_change(10, keys, a)  # delivered by the stream before the dump rows
    watch.see_change(30, keys, b)  # after the read position: not in the dump
    keep = watch.filter(20)
    assert keep.needs_keys
    dumped_a = change(pb.Change.UPDATE, None, "a")
    dumped_b = change(pb.Change.UPDATE, None, "b")
    assert not keep.keeps(keys, dumped_a)  # one copy came through the stream
    assert keep.keeps(keys, dumped_a)  # a second, equal row of the table is dumped
    assert keep.keeps(keys, dumped_b)


def test_identity_and_op_read_the_serialized_change() -> None:
    row = change(pb.Change.DELETE, 3, "x")
    assert change_op(row) == pb.Change.DELETE
    assert change_op(change(pb.Change.INSERT, 3, "x")) == pb.Change.INSERT
    assert identity(row) == (("id", (3).to_bytes(4, "big")), ("v", b"x"))


def test_dump_payload_is_the_go_projects_dump_message() -> None:
    row = change(pb.Change.UPDATE, 9, "nine")
    for last in (False, True):
        message = pb.CaptureMessage.FromString(dump_payload(123456789, row, last))
        assert message.checkpoint.lsn == 0
        assert message.checkpoint.seq == 123456789
        assert message.checkpoint.data == (b"\x01" if last else b"")
        assert message.change == pb.Change.FromString(row)
        expected = pb.CaptureMessage(
            checkpoint=pb.Checkpoint(lsn=0, seq=123456789, data=b"\x01" if last else b""),
            change=pb.Change.FromString(row),
        )
        assert dump_payload(123456789, row, last) == expected.SerializeToString()
