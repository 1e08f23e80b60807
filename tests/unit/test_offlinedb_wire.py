"""The startup phase of the wire protocol, without sockets: packets in, events out."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcapture.errors import ProtocolError
from pgcapture.offlinedb.wire import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    BackendKey,
    BackendKeyScanner,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupError,
    StartupMessage,
    StartupReader,
    cancel_request,
    error_response,
)


def packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def startup(version: int = PROTOCOL_3_0, **params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    return packet(version, body + b"\0")


def message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", 4 + len(body)) + body


def read_all(data: bytes, chunk: int | None = None) -> tuple[list[object], StartupReader]:
    reader = StartupReader()
    events: list[object] = []
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        reader.receive_data(data[i : i + step])
        while (event := reader.next_event()) is not None:
            events.append(event)
            if isinstance(event, CancelRequest | StartupMessage):
                return events, reader
    return events, reader


def test_ssl_request_then_startup_message_are_both_read() -> None:
    data = packet(SSL_REQUEST_CODE) + startup(user="alice", database="shop")
    events, _ = read_all(data)
    assert events[0] == SSLRequest()
    assert isinstance(events[1], StartupMessage)
    assert events[1].parameters == {"user": "alice", "database": "shop"}
    assert (events[1].major, events[1].minor) == (3, 0)
    assert events[1].packet == data[8:]


def test_gssenc_then_ssl_then_startup_message() -> None:
    data = packet(GSSENC_REQUEST_CODE) + packet(SSL_REQUEST_CODE) + startup(user="bob")
    events, _ = read_all(data)
    assert events[:2] == [GSSENCRequest(), SSLRequest()]
    assert isinstance(events[2], StartupMessage)


def test_database_defaults_to_the_user_name() -> None:
    events, _ = read_all(startup(user="carol", application_name="psql"))
    message = events[0]
    assert isinstance(message, StartupMessage)
    assert (message.database, message.user) == ("carol", "carol")


def test_cancel_request_is_read_with_its_key() -> None:
    body = struct.pack("!i", 4242) + b"\x01\x02\x03\x04"
    events, _ = read_all(packet(CANCEL_REQUEST_CODE, body))
    assert events == [CancelRequest(4242, b"\x01\x02\x03\x04")]


def test_cancel_request_with_a_protocol_3_2_long_secret() -> None:
    secret = bytes(range(32))
    events, _ = read_all(cancel_request(7, secret))
    assert events == [CancelRequest(7, secret)]


def test_cancel_request_round_trips() -> None:
    assert cancel_request(99, b"abcd") == packet(
        CANCEL_REQUEST_CODE, struct.pack("!i", 99) + b"abcd"
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 13])
def test_packets_split_across_reads_are_the_same(chunk: int) -> None:
    data = packet(SSL_REQUEST_CODE) + startup(user="dave", database="db", options="-c x=1")
    assert read_all(data, chunk)[0] == read_all(data)[0]


def test_bytes_after_the_startup_message_are_kept_as_trailing() -> None:
    data = startup(user="erin") + b"Q\0\0\0\x0dselect 1\0"
    reader = StartupReader()
    reader.receive_data(data)
    assert isinstance(reader.next_event(), StartupMessage)
    assert reader.trailing == b"Q\0\0\0\x0dselect 1\0"


def test_nothing_is_read_after_the_startup_message() -> None:
    reader = StartupReader()
    reader.receive_data(startup(user="x"))
    reader.next_event()
    with pytest.raises(StartupError):
        reader.next_event()


def test_protocol_3_2_is_accepted_for_the_server_to_negotiate() -> None:
    events, _ = read_all(startup(version=3 << 16 | 2, user="x"))
    assert isinstance(events[0], StartupMessage)
    assert events[0].minor == 2


@pytest.mark.parametrize(
    ("data", "sqlstate", "words"),
    [
        (struct.pack("!i", 4) + b"\0" * 4, "08P01", "invalid length of startup packet: 4"),
        (struct.pack("!i", 10001), "08P01", "invalid length of startup packet: 10001"),
        (struct.pack("!i", -1), "08P01", "invalid length"),
        (startup(version=2 << 16, user="x"), "0A000", "unsupported frontend protocol 2.0"),
        (startup(version=4 << 16, user="x"), "0A000", "unsupported frontend protocol 4.0"),
        (startup(database="d"), "28000", "no PostgreSQL user name"),
        (startup(user=""), "28000", "no PostgreSQL user name"),
        (packet(PROTOCOL_3_0, b"user\0x\0"), "08P01", "expected terminator"),
        (packet(PROTOCOL_3_0, b"user\0x\0orphan\0\0"), "08P01", "has no value"),
        (packet(PROTOCOL_3_0, b"user\0\xff\0\0"), "08P01", "not valid UTF-8"),
        (packet(SSL_REQUEST_CODE, b"junk"), "08P01", "invalid length"),
        (packet(CANCEL_REQUEST_CODE, b"\0\0\0\1"), "08P01", "cancel request"),
        (packet(CANCEL_REQUEST_CODE, b"\0" * 300), "08P01", "cancel request"),
        (packet(SSL_REQUEST_CODE) * 2, "08P01", "SSL negotiation asked for twice"),
        (packet(GSSENC_REQUEST_CODE) * 2, "08P01", "GSSAPI negotiation asked for twice"),
    ],
)
def test_malformed_startup_packets_are_refused(data: bytes, sqlstate: str, words: str) -> None:
    with pytest.raises(StartupError) as caught:
        read_all(data)
    assert caught.value.sqlstate == sqlstate
    assert words in caught.value.message


def test_an_incomplete_packet_waits_for_more_bytes() -> None:
    reader = StartupReader()
    reader.receive_data(startup(user="x")[:-1])
    assert reader.next_event() is None
    assert reader.trailing == b""


def test_error_response_bytes() -> None:
    data = error_response("3D000", 'database "nope" does not exist', hint="ask for it")
    body = b'SFATAL\0VFATAL\0C3D000\0Mdatabase "nope" does not exist\0Hask for it\0\0'
    assert data == b"E" + struct.pack("!i", 4 + len(body)) + body


def test_error_response_with_detail_and_severity() -> None:
    data = error_response("57014", "canceled", detail="why", severity="ERROR")
    assert data[5:] == b"SERROR\0VERROR\0C57014\0Mcanceled\0Dwhy\0\0"


def server_stream(pid: int, secret: bytes) -> bytes:
    return b"".join(
        [
            message(b"R", struct.pack("!i", 0)),
            message(b"S", b"server_version\x0015.1\0"),
            message(b"S", b"x" * 5000 + b"\0y\0"),
            message(b"K", struct.pack("!i", pid) + secret),
            message(b"Z", b"I"),
            message(b"K", struct.pack("!i", 1) + b"late"),
        ]
    )


def scan(data: bytes, cuts: list[int]) -> tuple[list[BackendKey], BackendKeyScanner]:
    scanner = BackendKeyScanner()
    found = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        key = scanner.receive_data(data[start:end])
        if key is not None:
            found.append(key)
    return found, scanner


@given(
    pid=st.integers(min_value=1, max_value=2**31 - 1),
    secret=st.binary(min_size=4, max_size=256),
    cuts=st.lists(st.integers(min_value=0, max_value=5200), max_size=12),
)
def test_backend_key_is_found_however_the_stream_is_split(
    pid: int, secret: bytes, cuts: list[int]
) -> None:
    data = server_stream(pid, secret)
    found, scanner = scan(data, [c for c in cuts if c <= len(data)])
    assert found == [BackendKey(pid, secret)]
    assert scanner.done


def test_scanning_stops_at_an_error_response() -> None:
    data = message(b"E", b"SFATAL\0\0") + message(b"K", struct.pack("!i", 1) + b"abcd")
    found, scanner = scan(data, [])
    assert (found, scanner.done, scanner.key) == ([], True, None)


@pytest.mark.parametrize(
    "data",
    [
        b"R" + struct.pack("!i", 3),
        message(b"K", struct.pack("!i", 1) + b"ab"),
        message(b"K", struct.pack("!i", 1) + b"a" * 257),
    ],
)
def test_malformed_server_messages_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        BackendKeyScanner().receive_data(data)
