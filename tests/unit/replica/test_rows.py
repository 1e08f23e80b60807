"""The wire scanner of the apply hot path agrees with protobuf on every change capture writes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgcapture.proto import pb
from pgcapture.replica.apply import _image
from pgcapture.replica.rows import Frame, Layout, read_head, read_values, scan_change
from pgcapture.wire import (
    change_head,
    encode_change_message,
    encode_field,
    field_prefix,
    field_suffix,
)

names = st.text(alphabet='abcXYZ_" é', min_size=1, max_size=20)
values = st.one_of(
    st.none(),
    st.tuples(st.just(ord("b")), st.binary(max_size=300)),
    st.tuples(st.just(ord("t")), st.text(max_size=50).map(str.encode)),
)
# (name, oid, value, key): key fields end with Field.key = true, after the value
fields = st.lists(
    st.tuples(names, st.integers(0, (1 << 32) - 1), values, st.booleans()), max_size=12
)
Item = tuple[str, int, tuple[int, bytes] | None, bool]


def _encode(items: list[Item]) -> list[bytes]:
    out = []
    for name, oid, value, key in items:
        kind, data = value if value is not None else (0, None)
        out.append(encode_field(field_prefix(name, oid), kind, data, field_suffix(key)))
    return out


def _pb(items: list[Item]) -> list[pb.Field]:
    out = []
    for name, oid, value, key in items:
        f = pb.Field(name=name, oid=oid, key=key)
        if value is not None:
            if value[0] == ord("b"):
                f.binary = value[1]
            else:
                f.text = value[1].decode()
        out.append(f)
    return out


@given(st.sampled_from([0, 1, 2]), names, names, fields, fields)
def test_scan_matches_protobuf(op: int, schema: str, table: str, new: list, old: list) -> None:  # type: ignore[type-arg]
    msg = encode_change_message(change_head(op, schema, table), _encode(new), _encode(old))
    expected = pb.Change(op=op, schema=schema, table=table, new=_pb(new), old=_pb(old))
    assert msg == pb.Message(change=expected).SerializeToString()
    row = scan_change(msg)
    change = pb.Message.FromString(msg).change
    assert row is not None
    new_shape, new_values = _image(change.new)
    old_shape, old_values = _image(change.old)
    assert row.new == new_values
    assert row.old == old_values
    assert row.keys == tuple(f.key for f in [*change.new, *change.old])
    # same shape key for rows that differ only in values, NULL counting as a binary value
    blank = [(n, o, (v[0], b"") if v else (ord("b"), b""), k) for n, o, v, k in new]
    blank_old = [(n, o, (v[0], b"") if v else (ord("b"), b""), k) for n, o, v, k in old]
    other = scan_change(
        encode_change_message(change_head(op, schema, table), _encode(blank), _encode(blank_old))
    )
    assert other is not None
    assert (other.head, other.shape, len(other.new)) == (row.head, row.shape, len(row.new))
    assert len(new_shape) == len(row.new)
    assert len(old_shape) == len(row.old)


def test_shapes_differ_by_column_type_and_format() -> None:
    def shape(name: str, oid: int, kind: int, key: bool = False) -> bytes:
        field = encode_field(field_prefix(name, oid), kind, b"x", field_suffix(key))
        row = scan_change(encode_change_message(change_head(0, "s", "t"), [field], []))
        assert row is not None
        return row.shape

    assert shape("a", 23, ord("b")) != shape("a", 20, ord("b"))
    assert shape("a", 23, ord("b")) != shape("b", 23, ord("b"))
    assert shape("a", 23, ord("b")) != shape("a", 23, ord("t"))
    assert shape("a", 23, ord("b")) != shape("a", 23, ord("b"), key=True)


def _one(items: list[Item]) -> bytes:
    return encode_change_message(change_head(1, "s", "t"), _encode(items), [])


def test_a_null_key_field_has_the_shape_of_a_binary_one() -> None:
    """A NULL is planned like a binary value of its column, key flag included, and a layout
    learnt from either reads the other."""
    value = _one([("id", 20, (ord("b"), b"\0" * 8), True), ("v", 25, None, True)])
    null = _one([("id", 20, None, True), ("v", 25, (ord("b"), b"x"), True)])
    first, second = scan_change(value), scan_change(null)
    assert first is not None
    assert second is not None
    assert first.shape == second.shape
    assert first.keys == second.keys == (True, True)
    for layout, msg, row in ((Layout.of(first), null, second), (Layout.of(second), value, first)):
        found = read_head(msg)
        assert found is not None
        assert read_values(msg, found[1], layout) == (row.new, row.old)


def test_read_values_refuses_another_key_flag_or_a_null_text() -> None:
    """A layout reads only fields that end as it expects: a key flag is never taken for the
    end of a value (nor the reverse), and a NULL never for a value read past its field."""
    cases = [
        # learnt, then read: same columns, another key flag
        ([("v", 17, (ord("b"), b"abc"), False)], [("v", 17, (ord("b"), b"a"), True)]),
        ([("v", 17, (ord("b"), b"a"), True)], [("v", 17, (ord("b"), b"a(\x01"), False)]),
        ([("v", 17, None, False)], [("v", 17, None, True)]),
        # a text column NULL before another new field: the next entry's tag is the text tag
        (
            [("v", 25, (ord("t"), b"x"), False), ("w", 25, None, False)],
            [("v", 25, None, False), ("w", 25, None, False)],
        ),
    ]
    for learnt, read in cases:
        first = scan_change(_one(learnt))
        msg = _one(read)
        second = scan_change(msg)
        assert first is not None
        assert second is not None
        found = read_head(msg)
        assert found is not None
        got = read_values(msg, found[1], Layout.of(first))
        assert got is None or got == (second.new, second.old), (learnt, read)
        assert second.new == [v[1] if v else None for _n, _o, v, _k in read]


def test_unexpected_fields_after_the_value_are_left_to_protobuf() -> None:
    field = pb.Field(name="a", oid=23, binary=b"x", key=True).SerializeToString()
    for tail in (b"\x28\x00", b"\x28\x02", b"\x30\x01", b"\x28"):
        body = change_head(0, "s", "t") + b"\x22" + bytes([len(field) - 2 + len(tail)])
        body += field[:-2] + tail
        msg = b"\x1a" + bytes([len(body)]) + body
        assert scan_change(msg) is None, tail
    null = pb.Field(name="a", oid=23, key=True).SerializeToString()
    assert null.endswith(b"\x28\x01")


def test_other_layouts_are_left_to_protobuf() -> None:
    begin = pb.Message(begin=pb.Begin(final_lsn=1)).SerializeToString()
    assert scan_change(begin) is None
    # the same change with fields in another order than capture writes them
    change = pb.Change(schema="s", table="t", new=[pb.Field(name="a", oid=23, binary=b"x")])
    body = change.SerializeToString()
    reordered = (
        b"\x22" + bytes([len(b"\x1a\x01x\x0a\x01a\x10\x17")]) + b"\x1a\x01x\x0a\x01a\x10\x17"
    )
    msg = b"\x1a" + bytes([len(body[: body.index(b"\x22")]) + len(reordered)])
    msg += body[: body.index(b"\x22")] + reordered
    assert scan_change(msg) is None
    assert scan_change(b"\x1a\x05\x12") is None  # truncated


@given(st.sampled_from([0, 1, 2]), names, names, fields, fields, fields, fields)
def test_read_values_only_for_the_same_shape(
    op: int,
    schema: str,
    table: str,
    new: list,
    old: list,
    new2: list,
    old2: list,  # type: ignore[type-arg]
) -> None:
    head = change_head(op, schema, table)
    first = scan_change(encode_change_message(head, _encode(new), _encode(old)))
    msg = encode_change_message(head, _encode(new2), _encode(old2))
    second = scan_change(msg)
    assert first is not None
    assert second is not None
    found = read_head(msg)
    assert found is not None
    assert found[0] == second.head
    values = read_values(msg, found[1], Layout.of(first))
    same = (first.shape, len(first.new)) == (second.shape, len(second.new))
    if same:
        assert values == (second.new, second.old)
    else:
        assert values is None or values == (second.new, second.old)


@given(st.sampled_from([0, 1, 2]), names, fields, fields, st.data())
def test_frames_take_only_rows_of_their_exact_layout(
    op: int,
    table: str,
    new: list,
    old: list,
    data: st.DataObject,  # type: ignore[type-arg]
) -> None:
    head = change_head(op, "public", table)
    msg = encode_change_message(head, _encode(new), _encode(old))
    row = scan_change(msg)
    assert row is not None
    frame = Frame(msg, row)
    assert frame.values(msg) == row.new + row.old

    # same columns with other values of the same lengths (NULLs where there were NULLs)
    def same_size(value: tuple[int, bytes] | None) -> tuple[int, bytes] | None:
        if value is None:
            return None
        return value[0], data.draw(st.binary(min_size=len(value[1]), max_size=len(value[1])))

    new2 = [(n, o, same_size(v), k) for n, o, v, k in new]
    old2 = [(n, o, same_size(v), k) for n, o, v, k in old]
    other = encode_change_message(head, _encode(new2), _encode(old2))
    second = scan_change(other)
    assert second is not None
    assert frame.values(other) == second.new + second.old
    # and anything else of that size: the frame answers for it only if the bytes agree
    changed = data.draw(
        st.lists(st.tuples(names, st.integers(0, 5000), values, st.booleans()), max_size=6)
    )
    third = encode_change_message(head, _encode(changed), [])
    got = frame.values(third)
    if got is not None:
        parsed = scan_change(third)
        assert parsed is not None
        assert got == parsed.new + parsed.old
