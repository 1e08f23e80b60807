"""CopyChanges: binary COPY bytes become exactly protobuf's bytes of the expected ``Change``,
whatever the split of the input, on the compiled-layout path and on the general path alike."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcapture.dump.copyrows import SIGNATURE, Column, CopyChanges
from pgcapture.errors import ProtocolError
from pgcapture.proto import pb

Value = bytes | None
HEADER = SIGNATURE + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
COLUMNS = [
    Column("id", 20, key=True),
    Column("name", 25),
    Column("acl", 1033, text=True),
    Column("payload", 17),
]


def tuple_bytes(row: list[Value]) -> bytes:
    out = struct.pack(">h", len(row))
    for value in row:
        out += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    return out


def messages(rows: list[list[Value]], extension: bytes = b"") -> list[bytes]:
    """The CopyData messages a server sends: the header with the first tuple, then one tuple
    per message, then the trailer."""
    header = SIGNATURE + struct.pack(">ii", 0, len(extension)) + extension
    tuples = [tuple_bytes(row) for row in rows]
    if not tuples:
        return [header, TRAILER]
    return [header + tuples[0], *tuples[1:], TRAILER]


def expected(columns: list[Column], row: list[Value]) -> pb.Change:
    fields = []
    for column, value in zip(columns, row, strict=True):
        field = pb.Field(name=column.name, oid=column.oid, key=column.key)
        if value is not None and column.text:
            field.text = value.decode()
        elif value is not None:
            field.binary = value
        fields.append(field)
    return pb.Change(op=pb.Change.UPDATE, schema="public", table="things", new=fields)


def run(
    columns: list[Column], pieces: list[bytes], encoder: CopyChanges | None = None
) -> list[bytes]:
    encoder = encoder or CopyChanges("public", "things", columns)
    out: list[bytes] = []
    total = sum(encoder.feed(piece, out) for piece in pieces)
    encoder.finish()
    assert total == sum(len(change) for change in out)
    return out


def check(columns: list[Column], rows: list[list[Value]], out: list[bytes]) -> None:
    assert len(out) == len(rows)
    for change, row in zip(out, rows, strict=True):
        want = expected(columns, row)
        assert pb.Change.FromString(change) == want
        assert change == want.SerializeToString()


ROWS: list[list[Value]] = [
    [struct.pack(">q", 1), b"one", b"=r/postgres", b"\x00\x01"],
    [struct.pack(">q", 2), b"", None, b""],
    [struct.pack(">q", 3), None, b"postgres=arwdDxt/postgres", b"\xff" * 20_000],
    [struct.pack(">q", 4), "héllo ✓".encode(), b"=r/postgres", b"\x00\x02"],
]


def test_each_tuple_becomes_an_update_with_every_column() -> None:
    out = run(COLUMNS, messages(ROWS))
    check(COLUMNS, ROWS, out)
    change = pb.Change.FromString(out[1])
    assert [f.WhichOneof("value") for f in change.new] == ["binary", "binary", None, "binary"]
    assert [f.key for f in change.new] == [True, False, False, False]
    assert pb.Change.FromString(out[0]).new[2].text == "=r/postgres"


FIXED = [
    Column("id", 20, key=True, fixed=True),
    Column("name", 25),
    Column("at", 1184, fixed=True),
    Column("flag", 16, fixed=True),
    Column("note", 25, key=True),
    Column("n", 23, fixed=True),
]


def fixed_row(i: int) -> list[Value]:
    return [
        struct.pack(">q", i), b"name-%d" % i, struct.pack(">q", i * 1000), b"\x01",
        None if i % 5 == 0 else b"x" * (i % 7), struct.pack(">i", i),
    ]  # fmt: skip


def test_the_row_encoder_learns_the_sizes_of_fixed_size_columns() -> None:
    rows = [fixed_row(i) for i in range(1, 80)]
    fast = CopyChanges("public", "things", FIXED)
    by_message = run(FIXED, messages(rows), fast)
    assert fast.sizes == (8, -1, 8, 1, -1, 4)  # columns without the fixed hint stay variable
    general = run(FIXED, [b"".join(messages(rows))])  # one piece: the general parser only
    assert by_message == general
    check(FIXED, rows, by_message)


def test_rows_that_do_not_fit_the_learned_sizes_are_still_right() -> None:
    rows = [fixed_row(i) for i in range(1, 40)]
    odd = [fixed_row(40), fixed_row(41), fixed_row(42), fixed_row(43)]
    odd[0][0] = None  # NULL in a fixed-size column
    odd[1][2] = b"\x00" * 12  # another size (a type the hint got wrong)
    odd[2][5], odd[2][3] = None, None
    odd[3][1] = None
    encoder = CopyChanges("public", "things", FIXED)
    out = run(FIXED, messages(rows + odd + rows), encoder)
    assert encoder.sizes == (8, -1, 8, 1, -1, 4)
    check(FIXED, rows + odd + rows, out)


def test_the_row_encoder_takes_exactly_one_whole_tuple() -> None:
    encoder = CopyChanges("public", "things", COLUMNS)
    for row in ROWS:
        change = encoder.encode_row(tuple_bytes(row))
        assert change == expected(COLUMNS, row).SerializeToString()
    one = tuple_bytes(ROWS[0])
    for other in (one[:-1], one + b"\x00", one + one, TRAILER, HEADER + one, b""):
        assert encoder.encode_row(other) is None
    assert encoder.encode_row(one[:2] + struct.pack(">i", -2) + one[6:]) is None


def test_every_split_point_gives_the_same_changes() -> None:
    data = b"".join(messages(ROWS[:2] + ROWS[3:]))
    want = run(COLUMNS, [data])
    for cut in range(len(data) + 1):
        assert run(COLUMNS, [data[:cut], data[cut:]]) == want, cut
    assert run(COLUMNS, [data[i : i + 1] for i in range(len(data))]) == want


def test_memoryview_pieces_are_read_in_place() -> None:
    pieces = [memoryview(m) for m in messages(ROWS * 3)]
    out: list[bytes] = []
    encoder = CopyChanges("public", "things", COLUMNS)
    for piece in pieces:
        encoder.feed(piece, out)
    encoder.finish()
    check(COLUMNS, ROWS * 3, out)


def test_a_header_extension_is_skipped() -> None:
    check(COLUMNS, ROWS, run(COLUMNS, messages(ROWS, extension=b"future")))


def test_a_table_without_columns_gives_empty_rows() -> None:
    out = run([], messages([[], [], []]))
    assert (
        out
        == [pb.Change(op=pb.Change.UPDATE, schema="public", table="things").SerializeToString()] * 3
    )


def test_an_empty_result_is_just_header_and_trailer() -> None:
    assert run(COLUMNS, messages([])) == []  # run() checks the trailer with finish()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"PGCOPX\n\xff\r\n\x00" + b"\x00" * 8, "not binary COPY data"),
        (SIGNATURE + struct.pack(">ii", 1 << 16, 0), "unexpected binary COPY header"),
        (HEADER + tuple_bytes([b"1"]), "has 1 fields; 4 expected"),
        (HEADER + struct.pack(">hi", 4, -2), "length -2"),
        (HEADER + TRAILER + b"\x00", "after the trailer"),
    ],
)
def test_malformed_data_is_a_protocol_error(data: bytes, problem: str) -> None:
    encoder = CopyChanges("public", "things", COLUMNS)
    with pytest.raises(ProtocolError, match=problem):
        encoder.feed(data, [])


@pytest.mark.parametrize("cut", [0, 5, len(HEADER), len(HEADER) + 7])
def test_data_that_stops_before_the_trailer_is_refused_at_finish(cut: int) -> None:
    data = b"".join(messages(ROWS))[: cut or None]
    encoder = CopyChanges("public", "things", COLUMNS)
    encoder.feed(data[:-2] if not cut else data, [])
    with pytest.raises(ProtocolError, match="ended before its trailer"):
        encoder.finish()


columns_st = st.lists(
    st.builds(
        Column,
        name=st.text(max_size=12),
        oid=st.integers(min_value=0, max_value=(1 << 32) - 1),
        key=st.booleans(),
        text=st.booleans(),
        fixed=st.booleans(),
    ),
    max_size=8,
)


def value_strategy(column: Column, size: int, odd: bool) -> st.SearchStrategy[Value]:
    """Text; bytes of any size (long ones too: 2- and 3-byte varints); for a column of a
    fixed-size type values of ``size`` bytes, or with ``odd`` of other sizes too; NULLs."""
    if column.text:
        return st.none() | st.text(max_size=40).map(str.encode)
    if column.fixed:
        exact = st.binary(min_size=size, max_size=size)
        return st.none() | exact | st.binary(max_size=12) if odd else st.none() | exact
    return st.none() | st.binary(max_size=40) | st.binary(min_size=16_380, max_size=16_390)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Column], list[list[Value]]]:
    """Columns and rows: some rows repeated past the sampled ones (the row encoder learns the
    sizes of fixed-size columns from them), then rows that may not fit, then the first again."""
    columns = draw(columns_st)
    sizes = [draw(st.sampled_from([0, 1, 4, 8, 16])) for _ in columns]

    def shape(odd: bool) -> st.SearchStrategy[list[Value]]:
        values = [value_strategy(c, n, odd) for c, n in zip(columns, sizes, strict=True)]
        return st.tuples(*values).map(list)

    rows = draw(st.lists(shape(False), max_size=12))
    odd = draw(st.lists(shape(True), max_size=6))
    repeat = 40 // len(rows) + 1 if rows and draw(st.booleans()) else 1
    return columns, rows * repeat + odd + rows


@settings(max_examples=250, deadline=None)
@given(tables(), st.data())
def test_random_rows_in_random_pieces_match_protobuf(
    table: tuple[list[Column], list[list[Value]]], data: st.DataObject
) -> None:
    columns, rows = table
    by_message = run(columns, messages(rows))
    check(columns, rows, by_message)
    stream = b"".join(messages(rows))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert run(columns, pieces) == by_message
