"""The gateway's hand-built bytes equal protobuf's, and its reading of a change's head and keys
agrees with protobuf's decoding."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pgcapture.gateway.records import (
    CHANGE,
    TRUNCATE,
    capture_message,
    change_keys,
    lsn_field,
    read_head,
)
from pgcapture.proto import pb

names = st.text(min_size=0, max_size=70)
values = st.one_of(st.none(), st.binary(max_size=20_000), st.text(max_size=30))


@st.composite
def fields(draw: st.DrawFn) -> pb.Field:
    value = draw(values)
    field = pb.Field(name=draw(names), oid=draw(st.integers(0, 2**32 - 1)), key=draw(st.booleans()))
    if isinstance(value, bytes):
        field.binary = value
    elif isinstance(value, str):
        field.text = value
    return field


@st.composite
def changes(draw: st.DrawFn) -> pb.Change:
    return pb.Change(
        op=draw(st.sampled_from([pb.Change.INSERT, pb.Change.UPDATE, pb.Change.DELETE])),
        schema=draw(names),
        table=draw(names),
        new=draw(st.lists(fields(), max_size=4)),
        old=draw(st.lists(fields(), max_size=3)),
    )


@settings(max_examples=300, deadline=None)
@given(changes(), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_capture_message_bytes_equal_protobufs(change: pb.Change, lsn: int, seq: int) -> None:
    message = pb.Message(change=change).SerializeToString()
    head = read_head(message)
    assert head.kind == CHANGE
    assert head.tables == ((change.schema, change.table),)
    expected = pb.CaptureMessage(checkpoint=pb.Checkpoint(lsn=lsn, seq=seq), change=change)
    assert capture_message(lsn_field(lsn), seq, message, head) == expected.SerializeToString()


def test_truncate_heads_name_every_table() -> None:
    truncate = pb.Truncate(
        tables=[pb.Table(schema="public", table="a"), pb.Table(schema="s", table="b")],
        cascade=True,
    )
    message = pb.Message(truncate=truncate).SerializeToString()
    head = read_head(message)
    assert head.kind == TRUNCATE
    assert head.tables == (("public", "a"), ("s", "b"))
    expected = pb.CaptureMessage(checkpoint=pb.Checkpoint(lsn=9, seq=2), truncate=truncate)
    assert capture_message(lsn_field(9), 2, message, head) == expected.SerializeToString()


def _field(name: str, value: bytes | None, key: bool = True) -> pb.Field:
    field = pb.Field(name=name, oid=23, key=key)
    if value is not None:
        field.binary = value
    return field


def _keys(change: pb.Change) -> tuple[object, ...]:
    message = pb.Message(change=change).SerializeToString()
    return change_keys(message, read_head(message).body)


def test_keys_of_inserts_updates_and_deletes() -> None:
    new = [_field("id", b"1"), _field("v", b"x", key=False)]
    assert _keys(pb.Change(schema="s", table="t", new=new)) == (("s", "t", (("id", b"1"),)),)
    moved = pb.Change(op=pb.Change.UPDATE, schema="s", table="t", new=new, old=[_field("id", b"0")])
    assert _keys(moved) == (("s", "t", (("id", b"1"),)), ("s", "t", (("id", b"0"),)))
    gone = pb.Change(op=pb.Change.DELETE, schema="s", table="t", old=[_field("id", b"0")])
    assert _keys(gone) == (("s", "t", (("id", b"0"),)),)


def test_a_key_column_missing_from_new_takes_the_old_value() -> None:
    """REPLICA IDENTITY FULL with an unchanged TOASTed column: the new row's identity is whole."""
    change = pb.Change(
        op=pb.Change.UPDATE, schema="s", table="t",
        new=[_field("id", b"1")], old=[_field("id", b"1"), _field("big", b"zz")],
    )  # fmt: skip
    keys = _keys(change)
    assert keys[0] == ("s", "t", (("big", b"zz"), ("id", b"1")))


def test_rows_without_key_columns_are_keyed_by_their_table() -> None:
    change = pb.Change(schema="s", table="t", new=[_field("v", b"1", key=False)])
    assert _keys(change) == (("s", "t", ()),)


@settings(max_examples=50, deadline=None)
@given(st.lists(changes(), min_size=1, max_size=5), st.integers(1, 2**40))
def test_batches_equal_protobufs(batch: list[pb.Change], first_id: int) -> None:
    from types import SimpleNamespace

    from pgcapture.gateway.service import encode_batch

    messages = [
        pb.CaptureMessage(checkpoint=pb.Checkpoint(lsn=5, seq=i + 1), change=change)
        for i, change in enumerate(batch)
    ]
    items: list[Any] = [SimpleNamespace(payload=m.SerializeToString()) for m in messages]
    expected = pb.CaptureBatch(first_id=first_id, messages=messages).SerializeToString()
    assert encode_batch(first_id, items) == expected
