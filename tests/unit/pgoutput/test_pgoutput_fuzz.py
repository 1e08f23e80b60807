"""Fuzzing: whatever the bytes, decode returns a message or raises DecodeError, nothing else.

A message that decodes must also encode back to exactly its bytes, which checks that every
field was read from the right place (the compiled-layout fast path included: the golden rows
repeat, so their layouts are compiled early in these runs).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgoutput_testlib import encode, golden_messages

from pgcapture.errors import DecodeError
from pgcapture.pgoutput import PgOutputDecoder, PgOutputMessage

GOLDEN = golden_messages()
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (protocol version, parallel streaming, in a stream block)
CONFIGS = [(v, False, s) for v in (1, 2, 3, 4) for s in (False, True) if v >= 2 or not s]
CONFIGS += [(4, True, False), (4, True, True)]
TAGS = b"BCORYIUDTMSEcAbPKrp"


def decode_or_error(config: tuple[int, bool, bool], data: bytes) -> PgOutputMessage | None:
    version, parallel, in_stream = config
    decoder = PgOutputDecoder(version, parallel_streaming=parallel)
    decoder.in_stream = in_stream
    try:
        message = decoder.decode(data)
    except DecodeError as err:
        check_error(err, data)
        return None
    assert encode(message) == data
    return message


def check_error(err: DecodeError, data: bytes) -> None:
    assert err.tag == (chr(data[0]) if data else "?")
    assert 0 <= err.offset <= len(data)
    assert err.problem


@FUZZ
@given(config=st.sampled_from(CONFIGS), data=st.binary(max_size=64))
def test_arbitrary_bytes(config: tuple[int, bool, bool], data: bytes) -> None:
    decode_or_error(config, data)


@FUZZ
@given(
    config=st.sampled_from(CONFIGS),
    tag=st.sampled_from(TAGS),
    body=st.binary(max_size=80),
)
def test_arbitrary_bodies_behind_real_tags(
    config: tuple[int, bool, bool], tag: int, body: bytes
) -> None:
    decode_or_error(config, bytes([tag]) + body)


@FUZZ
@given(message=st.sampled_from(GOLDEN), data=st.data())
def test_truncated_golden_messages_fail_cleanly(
    message: tuple[int, bool, bytes], data: st.DataObject
) -> None:
    version, in_stream, raw = message
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    assert decode_or_error((version, False, in_stream), raw[:cut]) is None


@FUZZ
@given(
    message=st.sampled_from(GOLDEN),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_golden_messages_with_flipped_bytes(
    message: tuple[int, bool, bytes], flips: list[tuple[int, int]]
) -> None:
    version, in_stream, raw = message
    mutated = bytearray(raw)
    for position, mask in flips:
        mutated[position % len(raw)] ^= mask
    decode_or_error((version, False, in_stream), bytes(mutated))


@FUZZ
@given(message=st.sampled_from(GOLDEN), extra=st.binary(min_size=1, max_size=8))
def test_golden_messages_with_trailing_bytes(
    message: tuple[int, bool, bytes], extra: bytes
) -> None:
    version, in_stream, raw = message
    assert decode_or_error((version, False, in_stream), raw + extra) is None


def test_golden_messages_decode_in_their_stream_state() -> None:
    for version, in_stream, raw in GOLDEN:
        assert decode_or_error((version, False, in_stream), raw) is not None
