"""The decoder on hand-built messages: every tag, version rules, stream state, and errors."""

from __future__ import annotations

from dataclasses import replace
from struct import pack

import pytest
from pgoutput_testlib import encode, load, tup

from pgcapture.errors import ConfigError, DecodeError
from pgcapture.pgoutput import (
    MESSAGE_TYPES,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputDecoder,
    PgOutputMessage,
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

ROW = tup(("t", b"1"), ("n", None), ("u", None), ("b", b"\x00\x01"))
RELATION = Relation(
    None, 16384, "public", "t", "d",
    (Column(1, "id", 23, -1), Column(0, "naïve", 1043, 24)),
)  # fmt: skip

# One sample of every message of the protocol (PostgreSQL docs, "Logical Replication Message
# Formats"), keyed by tag, with the protocol version it needs and whether it is written
# inside a stream block.
SAMPLES: dict[str, tuple[int, bool, PgOutputMessage]] = {
    "B": (1, False, Begin(0x1_0000_0010, 760_000_000_000_000, 731)),
    "C": (1, False, Commit(0, 0x1_0000_0010, 0x1_0000_0040, 760_000_000_000_000)),
    "O": (1, False, Origin(0x2_0000_0000, "upstream")),
    "R": (1, False, RELATION),
    "Y": (1, False, Type(None, 16390, "app", "mood")),
    "I": (1, False, Insert(None, 16384, ROW)),
    "U": (1, False, Update(None, 16384, "O", ROW, ROW)),
    "D": (1, False, Delete(None, 16384, "K", tup(("t", b"1"), ("n", None)))),
    "T": (1, False, Truncate(None, 3, (16384, 16390))),
    "M": (1, False, LogicalMessage(None, True, 0x1234, "pfx", b"\x00body")),
    "S": (2, False, StreamStart(900, True)),
    "E": (2, True, StreamStop()),
    "c": (2, False, StreamCommit(900, 0, 0x100, 0x140, 760_000_000_000_001)),
    "A": (2, False, StreamAbort(900, 901, None, None)),
    "b": (3, False, BeginPrepare(0x200, 0x240, 760_000_000_000_002, 902, "gid-1")),
    "P": (3, False, Prepare(0, 0x200, 0x240, 760_000_000_000_002, 902, "gid-1")),
    "K": (3, False, CommitPrepared(0, 0x300, 0x340, 760_000_000_000_003, 902, "gid-1")),
    "r": (3, False, RollbackPrepared(0, 0x240, 0x380, 1, 2, 903, "gid-2")),
    "p": (3, False, StreamPrepare(0, 0x400, 0x440, 760_000_000_000_004, 904, "gid-3")),
}
PROTOCOL_TAGS = "BCORYIUDTMSEcAbPKrp"  # every tag the documentation lists, versions 1 to 4


def decoder_for(version: int, in_stream: bool = False) -> PgOutputDecoder:
    decoder = PgOutputDecoder(version)
    decoder.in_stream = in_stream
    return decoder


def error(decoder: PgOutputDecoder, data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decoder.decode(data)
    return info.value


# -- every tag --------------------------------------------------------------------------------


def test_every_protocol_tag_has_a_decode_path() -> None:
    assert sorted(MESSAGE_TYPES) == sorted(PROTOCOL_TAGS) == sorted(SAMPLES)
    for tag in PROTOCOL_TAGS:
        version, in_stream, message = SAMPLES[tag]
        data = encode(message)
        assert data[:1] == tag.encode()
        decoded = decoder_for(version, in_stream).decode(data)
        assert type(decoded) is MESSAGE_TYPES[tag]
        assert decoded == message


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_trailing_bytes_are_rejected(tag: str) -> None:
    version, in_stream, message = SAMPLES[tag]
    data = encode(message)
    err = error(decoder_for(version, in_stream), data + b"\x00\x00")
    assert (err.tag, err.offset, err.problem) == (tag, len(data), "2 trailing bytes")


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_every_truncation_is_a_decode_error(tag: str) -> None:
    version, in_stream, message = SAMPLES[tag]
    data = encode(message)
    for cut in range(1, len(data)):
        err = error(decoder_for(version, in_stream), data[:cut])
        assert err.tag == tag
        assert 0 <= err.offset <= cut


def test_data_messages_inside_a_stream_block_carry_an_xid() -> None:
    decoder = PgOutputDecoder(2)
    assert decoder.decode(encode(StreamStart(77, False))) == StreamStart(77, False)
    assert decoder.in_stream
    inside: list[PgOutputMessage] = [
        replace(RELATION, xid=78),
        Type(78, 16390, "app", "mood"),
        Insert(78, 16384, ROW),
        Update(79, 16384, None, None, ROW),
        Delete(78, 16384, "O", ROW),
        Truncate(78, 0, (16384,)),
        LogicalMessage(77, False, 5, "p", b""),
    ]
    for message in inside:
        assert decoder.decode(encode(message)) == message
    assert decoder.decode(b"E") == StreamStop()
    assert not decoder.in_stream
    assert decoder.decode(encode(Insert(None, 16384, ROW))) == Insert(None, 16384, ROW)


# -- protocol versions ------------------------------------------------------------------------


@pytest.mark.parametrize(("tag", "needs"), [(t, SAMPLES[t][0]) for t in "SEcAbPKrp"])
def test_messages_need_their_protocol_version(tag: str, needs: int) -> None:
    _, in_stream, message = SAMPLES[tag]
    err = error(decoder_for(needs - 1, in_stream), encode(message))
    assert (err.tag, err.offset) == (tag, 0)
    assert f"needs protocol version {needs}" in err.problem


def test_stream_abort_v4_parallel_carries_abort_lsn_and_time() -> None:
    # PostgreSQL 15 cannot send protocol 4, so these bytes are built by hand from the
    # documentation: Stream Abort + abort LSN + abort timestamp (PostgreSQL 16+, sent only
    # when the stream was started with streaming = parallel).
    data = b"A" + pack(">IIQq", 900, 901, 0x1_2345_6789, 770_000_000_123_456)
    decoded = PgOutputDecoder(4, parallel_streaming=True).decode(data)
    assert decoded == StreamAbort(900, 901, 0x1_2345_6789, 770_000_000_123_456)
    short = data[:9]
    assert PgOutputDecoder(4).decode(short) == StreamAbort(900, 901, None, None)
    err = error(PgOutputDecoder(4, parallel_streaming=True), short)
    assert (err.tag, err.offset) == ("A", 9)
    assert "abort lsn" in err.problem
    assert error(PgOutputDecoder(4), data).problem == "16 trailing bytes"


def test_constructor_validates_its_configuration() -> None:
    with pytest.raises(ConfigError, match="protocol version 5"):
        PgOutputDecoder(5)
    with pytest.raises(ConfigError, match="protocol version 0"):
        PgOutputDecoder(0)
    with pytest.raises(ConfigError, match="parallel streaming needs pgoutput protocol version 4"):
        PgOutputDecoder(3, parallel_streaming=True)
    relations: dict[int, Relation] = {}
    decoder = PgOutputDecoder(4, relations, parallel_streaming=True)
    assert decoder.relations is relations
    assert not decoder.in_stream


# -- state ------------------------------------------------------------------------------------


def test_relation_messages_update_the_cache_it_was_handed() -> None:
    relations: dict[int, Relation] = {1: RELATION}
    decoder = PgOutputDecoder(1, relations)
    renamed = Relation(None, RELATION.relid, "public", "t2", "f", RELATION.columns)
    decoder.decode(encode(RELATION))
    decoder.decode(encode(renamed))
    assert relations == {1: RELATION, RELATION.relid: renamed}


def test_failed_messages_leave_the_state_alone() -> None:
    decoder = PgOutputDecoder(2)
    error(decoder, encode(RELATION) + b"x")
    assert decoder.relations == {}
    error(decoder, encode(StreamStart(1, True)) + b"x")
    assert not decoder.in_stream
    decoder.decode(encode(StreamStart(1, True)))
    error(decoder, b"E!")
    assert decoder.in_stream


def test_stream_blocks_do_not_nest() -> None:
    decoder = PgOutputDecoder(2)
    err = error(decoder, b"E")
    assert (err.tag, err.offset, err.problem) == ("E", 0, "stream stop outside a stream block")
    decoder.decode(encode(StreamStart(1, True)))
    err = error(decoder, encode(StreamStart(2, True)))
    assert (err.tag, err.problem) == ("S", "stream start inside a stream block")


# -- errors -----------------------------------------------------------------------------------


def test_empty_and_unknown() -> None:
    err = error(PgOutputDecoder(), b"")
    assert (err.tag, err.offset, err.problem) == ("?", 0, "empty message")
    err = error(PgOutputDecoder(), b"Z\x00")
    assert (err.tag, err.offset, err.problem) == ("Z", 0, "unknown message tag 0x5a")
    err = error(PgOutputDecoder(), b"\xff")
    assert (err.tag, err.offset) == ("\xff", 0)
    assert str(err) == "pgoutput message 'ÿ': unknown message tag 0xff at offset 0"


def test_truncated_fixed_fields_name_the_missing_field() -> None:
    data = encode(SAMPLES["B"][2])
    err = error(PgOutputDecoder(), data[:12])
    assert (err.tag, err.offset) == ("B", 9)
    assert err.problem == "truncated: commit time needs 8 bytes, 3 left"


def test_tuple_value_lengths_are_checked() -> None:
    head = b"I" + pack(">I", 16384) + b"N" + pack(">H", 2) + b"t" + pack(">i", 1) + b"1"
    err = error(PgOutputDecoder(), head + b"t" + pack(">i", -1))
    assert (err.tag, err.offset, err.problem) == ("I", 15, "negative value length -1")
    err = error(PgOutputDecoder(), head + b"b" + pack(">i", 5) + b"abcd")
    assert (err.tag, err.offset) == ("I", 15)
    assert err.problem == "value length 5 runs past the end (4 bytes left)"
    err = error(PgOutputDecoder(), head + b"t\x00\x00")
    assert (err.tag, err.offset) == ("I", 15)
    err = error(PgOutputDecoder(), head)
    assert (err.tag, err.offset, err.problem) == ("I", 14, "truncated: tuple column kind missing")
    err = error(PgOutputDecoder(), head + b"x")
    assert (err.tag, err.offset, err.problem) == ("I", 14, "unknown tuple column kind 0x78")


def test_tuple_markers_are_checked() -> None:
    relid = pack(">I", 1)
    empty = pack(">H", 0)
    assert error(PgOutputDecoder(), b"I" + relid + b"K" + empty).offset == 5
    assert error(PgOutputDecoder(), b"D" + relid + b"N" + empty).offset == 5
    err = error(PgOutputDecoder(), b"U" + relid + b"K" + empty + b"K" + empty)
    assert (err.tag, err.offset) == ("U", 8)
    assert PgOutputDecoder().decode(b"U" + relid + b"K" + empty + b"N" + empty) == Update(
        None, 1, "K", TupleData(b"", ()), TupleData(b"", ())
    )


def test_strings_must_be_terminated_utf8() -> None:
    good = encode(Type(None, 7, "app", "mood"))
    err = error(PgOutputDecoder(), good[:-1])
    assert (err.tag, err.offset, err.problem) == (
        "Y",
        9,
        "truncated: type name has no NUL terminator",
    )
    bad = good.replace(b"mood", b"m\xffod")
    err = error(PgOutputDecoder(), bad)
    assert (err.tag, err.offset, err.problem) == ("Y", 10, "type name is not valid UTF-8")


def test_enumerated_bytes_are_checked() -> None:
    relation = bytearray(encode(RELATION))
    relation[relation.index(b"\x00t\x00") + 3] = ord("x")  # replica identity
    assert "unknown replica identity 0x78" in error(PgOutputDecoder(), bytes(relation)).problem
    start = encode(StreamStart(1, True))[:-1] + b"\x02"
    assert error(PgOutputDecoder(2), start).offset == 5
    message = bytearray(encode(SAMPLES["M"][2]))
    message[1] = 3
    err = error(PgOutputDecoder(), bytes(message))
    assert (err.offset, err.problem) == (1, "flags must be 0 or 1 (transactional), not 3")


def test_truncate_relation_count_is_checked() -> None:
    data = b"T" + pack(">IB", 0x4000_0000, 0) + pack(">I", 1)
    err = error(PgOutputDecoder(), data)
    assert (err.tag, err.offset) == ("T", 6)
    assert err.problem.startswith("truncated: 1073741824 relation oids need")


def test_message_content_length_is_checked() -> None:
    data = encode(LogicalMessage(None, False, 1, "p", b"abc"))
    assert error(PgOutputDecoder(), data[:-1]).problem == (
        "value length 3 runs past the end (2 bytes left)"
    )
    negative = data[:-7] + pack(">i", -3)
    assert error(PgOutputDecoder(), negative).problem == "negative value length -3"


def test_accepts_any_bytes_like_input() -> None:
    data = encode(SAMPLES["I"][2])
    expected = SAMPLES["I"][2]
    assert PgOutputDecoder().decode(bytearray(data)) == expected  # type: ignore[arg-type]
    assert PgOutputDecoder().decode(memoryview(data)) == expected  # type: ignore[arg-type]
    decoded = PgOutputDecoder().decode(memoryview(data))  # type: ignore[arg-type]
    assert isinstance(decoded, Insert)
    assert all(type(v) is bytes for v in decoded.new.values if v is not None)


# -- repeated row shapes ----------------------------------------------------------------------


def test_repeated_and_same_sized_rows_decode_alike() -> None:
    """Rows of one relation and size take a compiled layout from their third sighting on; rows
    of the same size but another shape must still decode column by column."""
    decoder = PgOutputDecoder()
    shapes = [
        tup(("t", b"1"), ("t", b"abc")),
        tup(("t", b"abc"), ("t", b"1")),
        tup(("t", b"12"), ("n", None), ("t", b"x")),
        tup(("b", b"1"), ("t", b"abc")),
        tup(("t", b"1"), ("u", None), ("n", None)),
        tup(("n", None)),
        tup(("u", None)),
        tup(),
    ]
    for _ in range(4):
        for row in shapes:
            for message in (
                Insert(None, 99, row),
                Update(None, 99, "K", row, row),
                Delete(None, 99, "O", row),
            ):
                assert decoder.decode(encode(message)) == message


def test_row_messages_are_ordinary_dataclasses() -> None:
    golden = load("dml_binary")
    decoder = PgOutputDecoder()
    insert = next(r.data for r in golden.rows if r.data[:1] == b"I")
    first, second, third = (decoder.decode(insert) for _ in range(3))
    assert first == second == third
    assert hash(first) == hash(third)
    assert isinstance(third, Insert)
    assert third == Insert(third.xid, third.relid, TupleData(third.new.kinds, third.new.values))
    with pytest.raises(AttributeError):
        third.relid = 1  # type: ignore[misc]
