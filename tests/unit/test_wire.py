"""The hand-written encoders produce exactly protobuf's serialization."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgcapture import wire
from pgcapture.proto import pb

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
names = st.text(max_size=70)
columns = st.tuples(
    names,
    u32,
    st.one_of(
        st.none(),
        st.tuples(st.just("binary"), st.binary(max_size=300)),
        st.tuples(st.just("text"), st.text(max_size=300)),
    ),
    st.booleans(),  # Field.key
)
Column = tuple[str, int, tuple[str, object] | None, bool]


@given(u64)
def test_varint_matches_protobuf(value: int) -> None:
    expected = pb.Begin(final_lsn=value).SerializeToString()
    assert wire.field_varint(1, value) == expected


def _encode_columns(cols: list[Column]) -> list[bytes]:
    out = []
    for name, oid, value, key in cols:
        prefix, suffix = wire.field_prefix(name, oid), wire.field_suffix(key)
        if value is None:
            out.append(wire.encode_field(prefix, ord("n"), None, suffix))
        elif value[0] == "binary":
            assert isinstance(value[1], bytes)
            out.append(wire.encode_field(prefix, ord("b"), value[1], suffix))
        else:
            assert isinstance(value[1], str)
            out.append(wire.encode_field(prefix, ord("t"), value[1].encode(), suffix))
    return out


def _pb_fields(cols: list[Column]) -> list[pb.Field]:
    fields = []
    for name, oid, value, key in cols:
        f = pb.Field(name=name, oid=oid, key=key)
        if value is not None:
            setattr(f, value[0], value[1])
        fields.append(f)
    return fields


@given(st.sampled_from([0, 1, 2]), names, names, st.lists(columns, max_size=5),
       st.lists(columns, max_size=5))  # fmt: skip
def test_change_message_matches_protobuf(
    op: int,
    schema: str,
    table: str,
    new: list,
    old: list,  # type: ignore[type-arg]
) -> None:
    head = wire.change_head(op, schema, table)
    ours = wire.encode_change_message(head, _encode_columns(new), _encode_columns(old))
    change = pb.Change(op=op, schema=schema, table=table, new=_pb_fields(new), old=_pb_fields(old))
    assert ours == pb.Message(change=change).SerializeToString()


@given(names, u32, columns.map(lambda c: c[2]), st.booleans())
def test_field_matches_protobuf(
    name: str, oid: int, value: tuple[str, object] | None, key: bool
) -> None:
    (ours,) = _encode_columns([(name, oid, value, key)])
    assert ours == _pb_fields([(name, oid, value, key)])[0].SerializeToString()
    if key:  # the flag is the last field, after the value (or the name and oid of a NULL)
        assert ours.endswith(b"\x28\x01")
        assert ours[:-2] == _encode_columns([(name, oid, value, False)])[0]


@given(u64, u64, u32)
def test_begin_message_matches_protobuf(lsn: int, time: int, xid: int) -> None:
    expected = pb.Message(begin=pb.Begin(final_lsn=lsn, commit_time=time, remote_xid=xid))
    assert wire.encode_begin_message(lsn, time, xid) == expected.SerializeToString()


@given(u64, u64, u64)
def test_commit_message_matches_protobuf(lsn: int, end: int, time: int) -> None:
    expected = pb.Message(commit=pb.Commit(commit_lsn=lsn, end_lsn=end, commit_time=time))
    assert wire.encode_commit_message(lsn, end, time) == expected.SerializeToString()


@given(st.lists(st.tuples(names, names), min_size=1, max_size=4), st.booleans(), st.booleans())
def test_truncate_message_matches_protobuf(
    tables: list[tuple[str, str]], cascade: bool, restart: bool
) -> None:
    expected = pb.Message(
        truncate=pb.Truncate(
            tables=[pb.Table(schema=s, table=t) for s, t in tables],
            cascade=cascade,
            restart_identity=restart,
        )
    )
    ours = wire.encode_truncate_message(tables, cascade, restart)
    assert ours == expected.SerializeToString()
