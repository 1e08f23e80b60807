"""ChangeAssembler: checkpoints, row images, and the fused fast path equal to the slow path."""

from __future__ import annotations

import struct

import pytest
from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcapture.capture.changes import ChangeAssembler, Record
from pgcapture.errors import ProtocolError
from pgcapture.pgoutput import PgOutputDecoder
from pgcapture.proto import pb


def relation(relid: int, columns: list[tuple[str, int, bool]], identity: str = "d") -> bytes:
    body = struct.pack(">cI", b"R", relid) + b"public\0" + b"tbl\0" + identity.encode()
    body += struct.pack(">H", len(columns))
    for name, oid, key in columns:
        body += struct.pack(">B", int(key)) + name.encode() + b"\0" + struct.pack(">Ii", oid, -1)
    return body


def tuple_bytes(values: list[tuple[str, bytes]]) -> bytes:
    out = struct.pack(">H", len(values))
    for kind, value in values:
        out += kind.encode()
        if kind in "bt":
            out += struct.pack(">i", len(value)) + value
    return out


def begin(lsn: int) -> bytes:
    return struct.pack(">cQqI", b"B", lsn, 0, 7)


def commit(lsn: int) -> bytes:
    return struct.pack(">cBQQq", b"C", 0, lsn, lsn + 40, 0)


cells = st.one_of(
    st.tuples(st.just("b"), st.binary(max_size=40)),
    st.tuples(st.just("t"), st.text(max_size=20).map(str.encode)),
    st.tuples(st.just("n"), st.just(b"")),
    st.tuples(st.just("u"), st.just(b"")),
)


def both_paths(
    messages: list[bytes], fast: ChangeAssembler | None = None
) -> tuple[list[Record], list[Record]]:
    slow, fast = ChangeAssembler(), fast or ChangeAssembler()
    slow_decoder, fast_decoder = PgOutputDecoder(1), PgOutputDecoder(1)
    slow_out = [r for m in messages if (r := slow.feed(slow_decoder.decode(m))) is not None]
    fast_out = [r for m in messages if (r := fast.feed_raw(m, fast_decoder.decode)) is not None]
    return slow_out, fast_out


def check_keys(records: list[Record], keys: dict[str, bool]) -> int:
    """Every change is protobuf's own serialization, its fields flagged ``key`` exactly for the
    key columns; returns how many fields were checked."""
    checked = 0
    for record in records:
        try:
            msg = pb.Message.FromString(record.message)
        except ProtobufDecodeError:  # a text value that is not UTF-8 (binary values sent as text)
            continue
        assert msg.SerializeToString() == record.message
        for f in [*msg.change.new, *msg.change.old]:
            assert f.key == keys[f.name], f.name
            checked += 1
    return checked


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda n: st.tuples(
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.lists(st.lists(cells, min_size=n, max_size=n), min_size=1, max_size=4),
            st.sampled_from("dfn"),
        )
    )
)
def test_fast_path_produces_the_same_records(case: tuple[list[bool], list, str]) -> None:  # type: ignore[type-arg]
    keys, rows, identity = case
    if identity == "f":
        keys = [True] * len(keys)  # the server flags every column under REPLICA IDENTITY FULL
    columns = [(f"c{i}", 20 + i, key) for i, key in enumerate(keys)]
    messages = [begin(1000), relation(5, columns, identity)]
    for row in rows:
        new = tuple_bytes(row)
        # Repeated: the second sighting compiles a layout, the third uses it.
        messages += [b"I" + struct.pack(">I", 5) + b"N" + new] * 3
        messages += [b"U" + struct.pack(">I", 5) + b"N" + new] * 3
        # Same size, other skeleton: binary and text swapped; must not go through the layout.
        swapped = [({"b": "t", "t": "b"}.get(k, k), v) for k, v in row]
        messages.append(b"I" + struct.pack(">I", 5) + b"N" + tuple_bytes(swapped))
        messages.append(b"U" + struct.pack(">I", 5) + b"O" + new + b"N" + new)
        # An old row that has the values of the unchanged TOAST columns (filled under FULL).
        filled = tuple_bytes([("b", b"old") if k == "u" else (k, v) for k, v in row])
        messages.append(b"U" + struct.pack(">I", 5) + b"O" + filled + b"N" + new)
        key_image = [c if k else ("n", b"") for c, k in zip(row, keys, strict=True)]
        messages.append(b"D" + struct.pack(">I", 5) + b"K" + tuple_bytes(key_image))
    messages.append(commit(1000))
    slow, fast = both_paths(messages)
    assert fast == slow
    check_keys(fast, {name: key for name, _oid, key in columns})


def test_key_flags_on_every_path() -> None:
    """Key columns carry ``Field.key`` through the compiled layout, the fused path and the
    decoded path alike: binary, text and NULL values, the key flag before or after a NULL."""
    columns = [("id", 20, True), ("v", 25, False), ("k2", 25, True), ("n", 23, False)]
    rows = [
        [("b", b"\0" * 8), ("t", b"text"), ("t", b"k"), ("n", b"")],
        [("b", b"\0" * 8), ("n", b""), ("n", b""), ("b", b"\0\0\0\1")],
        [("t", b"12"), ("b", b"x"), ("b", b""), ("n", b"")],
    ]
    messages = [begin(7), relation(5, columns)]
    for row in rows:
        new = tuple_bytes(row)
        messages += [b"I\0\0\0\5N" + new] * 3 + [b"U\0\0\0\5N" + new] * 3
        key_image = [c if k else ("n", b"") for c, (_n, _o, k) in zip(row, columns, strict=True)]
        messages.append(b"D\0\0\0\5K" + tuple_bytes(key_image))
        messages.append(b"U\0\0\0\5K" + tuple_bytes(key_image) + b"N" + new)
    messages.append(commit(7))
    assembler = ChangeAssembler()
    slow, fast = both_paths(messages, assembler)
    assert fast == slow
    assert assembler._layouts  # the compiled layouts took part
    keys = {name: key for name, _oid, key in columns}
    assert check_keys(fast, keys) > 0
    deletes = [pb.Message.FromString(r.message).change for r in fast if r.seq % 8 == 7]
    only_keys = [("id", True), ("k2", True)]
    assert [[(f.name, f.key) for f in d.old] for d in deletes] == [only_keys] * 3


def test_layouts_follow_relation_changes() -> None:
    """A Relation message (e.g. after ALTER TABLE) replaces the layouts of its relation."""
    row = tuple_bytes([("b", b"\0\0\0\1"), ("b", b"ab")])
    insert = b"I\0\0\0\5N" + row
    messages = [begin(9), relation(5, [("id", 23, True), ("v", 25, False)])]
    messages += [insert] * 3
    messages += [relation(5, [("id", 20, True), ("w", 17, False)])]
    messages += [insert] * 3 + [commit(9)]
    slow, fast = both_paths(messages)
    assert fast == slow
    last = pb.Message.FromString(fast[-2].message).change
    assert [(f.name, f.oid) for f in last.new] == [("id", 20), ("w", 17)]


def test_unchanged_toast_is_absent_and_null_is_unset() -> None:
    columns = [("id", 23, True), ("body", 25, False), ("n", 23, False)]
    row = [("b", b"\0\0\0\1"), ("u", b""), ("n", b"")]
    messages = [begin(99), relation(5, columns), b"U\0\0\0\5N" + tuple_bytes(row), commit(99)]
    for records in both_paths(messages):
        change = pb.Message.FromString(records[1].message).change
        assert [f.name for f in change.new] == ["id", "n"]
        assert change.new[1].WhichOneof("value") is None
        assert [f.key for f in change.new] == [True, False]
        check_keys(records, {"id": True, "body": False, "n": False})
        assert [(r.lsn, r.seq) for r in records] == [(99, 0), (99, 1), (99, 2)]


def test_full_identity_fills_unchanged_toast_from_the_old_row() -> None:
    # under REPLICA IDENTITY FULL the server flags every column as part of the key
    columns = [("id", 23, True), ("body", 25, True), ("n", 23, True)]
    old = tuple_bytes([("b", b"\0\0\0\1"), ("b", b"long text"), ("n", b"")])
    new = tuple_bytes([("b", b"\0\0\0\1"), ("u", b""), ("n", b"")])
    messages = [begin(99), relation(5, columns, "f"), b"U\0\0\0\5O" + old + b"N" + new, commit(99)]
    for records in both_paths(messages):
        change = pb.Message.FromString(records[1].message).change
        assert [(f.name, f.binary) for f in change.new] == [
            ("id", b"\0\0\0\1"),
            ("body", b"long text"),
            ("n", b""),
        ]
        assert all(f.key for f in [*change.new, *change.old])
        assert check_keys(records, {"id": True, "body": True, "n": True}) == 6


def test_malformed_row_raises_the_decoders_error() -> None:
    from pgcapture.errors import DecodeError

    assembler, decoder = ChangeAssembler(), PgOutputDecoder(1)
    assembler.feed_raw(begin(5), decoder.decode)
    assembler.feed_raw(relation(5, [("id", 23, True)]), decoder.decode)
    with pytest.raises(DecodeError):
        assembler.feed_raw(b"I\0\0\0\5N\0\1b\0\0\0\x09\0", decoder.decode)


def test_commit_must_close_the_open_transaction() -> None:
    assembler, decoder = ChangeAssembler(), PgOutputDecoder(1)
    assembler.feed_raw(begin(5), decoder.decode)
    with pytest.raises(ProtocolError, match="does not close the open transaction"):
        assembler.feed_raw(commit(6), decoder.decode)


def test_row_change_outside_a_transaction_is_a_protocol_error() -> None:
    assembler, decoder = ChangeAssembler(), PgOutputDecoder(1)
    assembler.feed_raw(relation(5, [("id", 23, True)]), decoder.decode)
    with pytest.raises(ProtocolError, match="outside a transaction"):
        assembler.feed_raw(b"I\0\0\0\5N" + tuple_bytes([("b", b"1234")]), decoder.decode)
