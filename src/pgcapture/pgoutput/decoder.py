"""Sans-I/O decoder of pgoutput messages, logical replication protocol versions 1 to 4.

Contract:

* ``PgOutputDecoder.decode(data)`` takes exactly one pgoutput message (the payload of one
  XLogData frame, after its 25-byte header) and returns one typed message from
  :mod:`pgcapture.pgoutput.messages`. It never does I/O.
* Any malformed, truncated or over-long input raises :class:`pgcapture.errors.DecodeError`,
  naming the message tag (``"?"`` for empty input) and the byte offset where decoding failed;
  no other exception escapes. Bytes left after a complete message are an error.
* The decoder's only state is the relation cache it is handed (``relations``, updated by every
  Relation message) and whether it is inside a stream block (``in_stream``: set by Stream Start,
  cleared by Stream Stop), which decides whether data messages carry a leading xid. A message
  that fails to decode leaves that state unchanged. Stream Start inside a block and Stream Stop
  outside one are errors: they mean the decoder and the server disagree about the stream.
* Version-specific messages and fields are explicit: stream messages need protocol 2+,
  two-phase messages protocol 3+. Stream Abort carries an abort LSN and time only when the
  server writes them: protocol 4 *and* ``streaming = parallel`` (PostgreSQL 16+); say so with
  ``parallel_streaming=True``, otherwise those fields are ``None``.
* Strings are NUL-terminated UTF-8 (connect with ``client_encoding`` UTF8). Tuple values are
  returned as raw bytes: text or binary as the server sent them, interpreting them is the
  caller's job.

Each tag has one method, found through a table indexed by the first byte; fixed-size fields
are read with pre-compiled ``struct`` unpackers at offsets. (Capture's hottest rows bypass this
decoder through a fused path in ``pgcapture.capture.changes`` that falls back to it.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from struct import Struct, calcsize, unpack_from
from struct import error as StructError
from typing import Final

from pgcapture.errors import ConfigError, DecodeError
from pgcapture.pgoutput.messages import (
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
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

__all__ = ["MESSAGE_TYPES", "PROTOCOL_VERSIONS", "PgOutputDecoder"]

PROTOCOL_VERSIONS: Final = range(1, 5)
STREAMING_VERSION: Final = 2
TWO_PHASE_VERSION: Final = 3
PARALLEL_STREAMING_VERSION: Final = 4

# Every message of the protocol, by tag.
MESSAGE_TYPES: Final[Mapping[str, type[PgOutputMessage]]] = {
    "B": Begin,
    "C": Commit,
    "O": Origin,
    "R": Relation,
    "Y": Type,
    "I": Insert,
    "U": Update,
    "D": Delete,
    "T": Truncate,
    "M": LogicalMessage,
    "S": StreamStart,
    "E": StreamStop,
    "c": StreamCommit,
    "A": StreamAbort,
    "b": BeginPrepare,
    "P": Prepare,
    "K": CommitPrepared,
    "r": RollbackPrepared,
    "p": StreamPrepare,
}

_REPLICA_IDENTITIES: Final = frozenset(b"dnfi")
_OLD_KEY: Final = ord("K")
_OLD_ROW: Final = ord("O")
_NEW_ROW: Final = ord("N")
_TRANSACTIONAL: Final = 1
_STREAM_STOP: Final = StreamStop()

_unpack_u16 = Struct(">H").unpack_from
_unpack_i32 = Struct(">i").unpack_from


class _Fields:
    """A run of fixed-size big-endian integer fields read with one ``unpack_from``; when the
    message is too short it names the first field that does not fit, and its offset."""

    __slots__ = ("_spans", "_unpack", "size")

    def __init__(self, codes: str, *names: str) -> None:
        self._unpack = Struct(">" + codes).unpack_from
        self.size = calcsize(">" + codes)
        spans = []
        start = 0
        for code, name in zip(codes, names, strict=True):
            width = calcsize(">" + code)
            spans.append((start, width, name))
            start += width
        self._spans = tuple(spans)

    def read(self, tag: str, data: bytes, off: int) -> tuple[int, ...]:
        if off + self.size > len(data):
            raise self._truncated(tag, data, off)
        values: tuple[int, ...] = self._unpack(data, off)
        return values

    def _truncated(self, tag: str, data: bytes, off: int) -> DecodeError:
        for start, width, name in self._spans:
            at = off + start
            if at + width > len(data):
                left = max(0, len(data) - at)
                return DecodeError(tag, at, f"truncated: {name} needs {width} bytes, {left} left")
        raise AssertionError("unreachable: the fields fit")


_XID = _Fields("I", "xid")
_RELID = _Fields("I", "relation oid")
_ROW_HEAD = _Fields("IB", "relation oid", "tuple marker")
_STREAM_ROW_HEAD = _Fields("IIB", "xid", "relation oid", "tuple marker")
_BEGIN = _Fields("QqI", "final lsn", "commit time", "xid")
_COMMIT = _Fields("BQQq", "flags", "commit lsn", "end lsn", "commit time")
_ORIGIN = _Fields("Q", "origin commit lsn")
_RELATION_TAIL = _Fields("BH", "replica identity", "column count")
_COLUMN_FLAGS = _Fields("B", "column flags")
_COLUMN_TYPE = _Fields("Ii", "type oid", "type modifier")
_TYPE_OID = _Fields("I", "type oid")
_TUPLE_MARKER = _Fields("B", "tuple marker")
_TRUNCATE = _Fields("IB", "relation count", "options")
_MESSAGE = _Fields("BQ", "flags", "lsn")
_MESSAGE_LENGTH = _Fields("i", "content length")
_STREAM_START = _Fields("IB", "xid", "first segment")
_STREAM_COMMIT = _Fields("IBQQq", "xid", "flags", "commit lsn", "end lsn", "commit time")
_STREAM_ABORT = _Fields("II", "xid", "subtransaction xid")
_STREAM_ABORT_PARALLEL = _Fields("IIQq", "xid", "subtransaction xid", "abort lsn", "abort time")
_BEGIN_PREPARE = _Fields("QQqI", "prepare lsn", "end lsn", "prepare time", "xid")
_PREPARE = _Fields("BQQqI", "flags", "prepare lsn", "end lsn", "prepare time", "xid")
_COMMIT_PREPARED = _Fields("BQQqI", "flags", "commit lsn", "end lsn", "commit time", "xid")
_ROLLBACK_PREPARED = _Fields(
    "BQQqqI",
    "flags", "prepare end lsn", "rollback end lsn", "prepare time", "rollback time", "xid",
)  # fmt: skip


# -- reading -------------------------------------------------------------------------------


def _finish(tag: str, data: bytes, off: int) -> None:
    """The message must end at ``off``."""
    if off != len(data):
        raise DecodeError(tag, off, f"{len(data) - off} trailing bytes")


def _string(tag: str, data: bytes, off: int, what: str) -> tuple[str, int]:
    """A NUL-terminated UTF-8 string at ``off``, and the offset after its terminator."""
    try:
        end = data.index(b"\0", off)
    except ValueError:
        raise DecodeError(tag, off, f"truncated: {what} has no NUL terminator") from None
    try:
        return data[off:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise DecodeError(tag, off + exc.start, f"{what} is not valid UTF-8") from None


def _tuple(tag: str, data: bytes, off: int) -> tuple[TupleData, int]:
    """TupleData at ``off`` (column count, then per column a kind byte and maybe a value), and
    the offset after it. The hot loop of the decoder: keep it lean."""
    end = len(data)
    if off + 2 > end:
        raise DecodeError(
            tag, off, f"truncated: tuple column count needs 2 bytes, {end - off} left"
        )
    (count,) = _unpack_u16(data, off)
    off += 2
    kinds = bytearray()
    values: list[bytes | None] = []
    add_kind = kinds.append
    add_value = values.append
    unpack_i32 = _unpack_i32
    try:
        for _ in range(count):
            kind = data[off]
            if kind == 116 or kind == 98:  # 't' text, 'b' binary: Int32 length, then bytes
                (length,) = unpack_i32(data, off + 1)
                start = off + 5
                stop = start + length
                if length < 0 or stop > end:
                    raise _bad_length(tag, off + 1, length, end - start)
                add_value(data[start:stop])
                off = stop
            elif kind == 110 or kind == 117:  # 'n' null, 'u' unchanged TOAST: no value
                add_value(None)
                off += 1
            else:
                raise DecodeError(tag, off, f"unknown tuple column kind 0x{kind:02x}")
            add_kind(kind)
    except IndexError:
        raise DecodeError(tag, off, "truncated: tuple column kind missing") from None
    except StructError:
        raise DecodeError(tag, off + 1, "truncated: tuple value length needs 4 bytes") from None
    return TupleData(bytes(kinds), tuple(values)), off


def _bad_length(tag: str, off: int, length: int, left: int) -> DecodeError:
    if length < 0:
        return DecodeError(tag, off, f"negative value length {length}")
    return DecodeError(tag, off, f"value length {length} runs past the end ({left} bytes left)")


def _columns(data: bytes, off: int, count: int) -> tuple[tuple[Column, ...], int]:
    """A Relation message's column descriptions, and the offset after them."""
    columns = []
    for _ in range(count):
        (flags,) = _COLUMN_FLAGS.read("R", data, off)
        name, off = _string("R", data, off + 1, "column name")
        type_oid, type_modifier = _COLUMN_TYPE.read("R", data, off)
        off += _COLUMN_TYPE.size
        columns.append(Column(flags, name, type_oid, type_modifier))
    return tuple(columns), off


def _last_tuple(tag: str, data: bytes, off: int) -> TupleData:
    """The tuple that starts at ``off`` and must end the message."""
    row, end = _tuple(tag, data, off)
    _finish(tag, data, end)
    return row


class PgOutputDecoder:
    """Turns pgoutput messages into typed messages; see the module docstring for the contract.

    ``protocol_version`` is the ``proto_version`` the stream was started with (1 to 4).
    ``relations`` is the relation cache to keep up to date, by relation OID (a new dict when
    omitted); the decoder only stores Relation messages in it, it never needs them.
    ``parallel_streaming`` says the stream was started with ``streaming 'parallel'``
    (protocol 4, PostgreSQL 16+), the only case in which Stream Abort carries an abort LSN and
    time; with ``streaming 'on'`` a protocol 4 server sends the short form.
    """

    __slots__ = ("in_stream", "parallel_streaming", "protocol_version", "relations")

    def __init__(
        self,
        protocol_version: int = 1,
        relations: dict[int, Relation] | None = None,
        *,
        parallel_streaming: bool = False,
    ) -> None:
        if protocol_version not in PROTOCOL_VERSIONS:
            raise ConfigError(
                f"pgoutput protocol version {protocol_version} is not supported; use 1 to 4"
            )
        if parallel_streaming and protocol_version < PARALLEL_STREAMING_VERSION:
            raise ConfigError(
                f"parallel streaming needs pgoutput protocol version 4, not {protocol_version}"
            )
        self.protocol_version = protocol_version
        self.parallel_streaming = parallel_streaming
        self.relations: dict[int, Relation] = {} if relations is None else relations
        self.in_stream = False

    def decode(self, data: bytes) -> PgOutputMessage:
        """Decode one message; raises DecodeError if it is malformed, truncated or too long."""
        if type(data) is not bytes:
            data = bytes(data)
        try:
            handler = _DISPATCH[data[0]]
        except IndexError:
            raise DecodeError("?", 0, "empty message") from None
        except KeyError:
            tag = data[0]
            raise DecodeError(chr(tag), 0, f"unknown message tag 0x{tag:02x}") from None
        return handler(self, data)

    # -- helpers -------------------------------------------------------------------------

    def _require(self, tag: str, version: int) -> None:
        if self.protocol_version < version:
            raise DecodeError(
                tag, 0, f"message needs protocol version {version}, "
                f"the decoder is set to {self.protocol_version}",
            )  # fmt: skip

    def _xid(self, tag: str, data: bytes) -> tuple[int | None, int]:
        """The xid that data messages carry inside a stream block, and the offset after it."""
        if not self.in_stream:
            return None, 1
        (xid,) = _XID.read(tag, data, 1)
        return xid, 5

    def _head(self, tag: str, data: bytes) -> tuple[int | None, int, int, int]:
        """Insert/Update/Delete: the stream xid if any, the relation OID, the first tuple
        marker byte ('N', 'K' or 'O') and the offset after it."""
        if self.in_stream:
            xid, relid, marker = _STREAM_ROW_HEAD.read(tag, data, 1)
            return xid, relid, marker, 1 + _STREAM_ROW_HEAD.size
        relid, marker = _ROW_HEAD.read(tag, data, 1)
        return None, relid, marker, 1 + _ROW_HEAD.size

    # -- transactions --------------------------------------------------------------------

    def _begin(self, data: bytes) -> Begin:
        final_lsn, commit_time, xid = _BEGIN.read("B", data, 1)
        _finish("B", data, 1 + _BEGIN.size)
        return Begin(final_lsn, commit_time, xid)

    def _commit(self, data: bytes) -> Commit:
        flags, commit_lsn, end_lsn, commit_time = _COMMIT.read("C", data, 1)
        _finish("C", data, 1 + _COMMIT.size)
        return Commit(flags, commit_lsn, end_lsn, commit_time)

    def _origin(self, data: bytes) -> Origin:
        (commit_lsn,) = _ORIGIN.read("O", data, 1)
        name, off = _string("O", data, 1 + _ORIGIN.size, "origin name")
        _finish("O", data, off)
        return Origin(commit_lsn, name)

    # -- schema --------------------------------------------------------------------------

    def _relation(self, data: bytes) -> Relation:
        xid, off = self._xid("R", data)
        (relid,) = _RELID.read("R", data, off)
        namespace, off = _string("R", data, off + 4, "namespace")
        name, off = _string("R", data, off, "relation name")
        identity, count = _RELATION_TAIL.read("R", data, off)
        if identity not in _REPLICA_IDENTITIES:
            raise DecodeError("R", off, f"unknown replica identity 0x{identity:02x}")
        columns, off = _columns(data, off + _RELATION_TAIL.size, count)
        _finish("R", data, off)
        relation = Relation(xid, relid, namespace, name, chr(identity), columns)
        self.relations[relid] = relation
        return relation

    def _type(self, data: bytes) -> Type:
        xid, off = self._xid("Y", data)
        (oid,) = _TYPE_OID.read("Y", data, off)
        namespace, off = _string("Y", data, off + 4, "namespace")
        name, off = _string("Y", data, off, "type name")
        _finish("Y", data, off)
        return Type(xid, oid, namespace, name)

    # -- row changes ---------------------------------------------------------------------

    def _insert(self, data: bytes) -> Insert:
        xid, relid, marker, off = self._head("I", data)
        if marker != _NEW_ROW:
            raise DecodeError("I", off - 1, f"expected 'N', got 0x{marker:02x}")
        return Insert(xid, relid, _last_tuple("I", data, off))

    def _update(self, data: bytes) -> Update:
        xid, relid, marker, off = self._head("U", data)
        old_kind = old = None
        if marker in (_OLD_KEY, _OLD_ROW):
            old_kind = chr(marker)
            old, off = _tuple("U", data, off)
            (marker,) = _TUPLE_MARKER.read("U", data, off)
            off += 1
        if marker != _NEW_ROW:
            raise DecodeError("U", off - 1, f"expected 'K', 'O' or 'N', got 0x{marker:02x}")
        new = _last_tuple("U", data, off)
        return Update(xid, relid, old_kind, old, new)

    def _delete(self, data: bytes) -> Delete:
        xid, relid, marker, off = self._head("D", data)
        if marker not in (_OLD_KEY, _OLD_ROW):
            raise DecodeError("D", off - 1, f"expected 'K' or 'O', got 0x{marker:02x}")
        return Delete(xid, relid, chr(marker), _last_tuple("D", data, off))

    def _truncate(self, data: bytes) -> Truncate:
        xid, off = self._xid("T", data)
        count, options = _TRUNCATE.read("T", data, off)
        off += _TRUNCATE.size
        left = len(data) - off
        if 4 * count > left:
            raise DecodeError("T", off, f"truncated: {count} relation oids need {4 * count} "
                              f"bytes, {left} left")  # fmt: skip
        relids: tuple[int, ...] = unpack_from(f">{count}I", data, off)
        _finish("T", data, off + 4 * count)
        return Truncate(xid, options, relids)

    def _message(self, data: bytes) -> LogicalMessage:
        xid, off = self._xid("M", data)
        flags, lsn = _MESSAGE.read("M", data, off)
        if flags > _TRANSACTIONAL:  # the dataclass keeps only this bit: refuse to lose others
            raise DecodeError("M", off, f"flags must be 0 or 1 (transactional), not {flags}")
        prefix, off = _string("M", data, off + _MESSAGE.size, "prefix")
        (length,) = _MESSAGE_LENGTH.read("M", data, off)
        start = off + 4
        if length < 0 or start + length > len(data):
            raise _bad_length("M", off, length, len(data) - start)
        _finish("M", data, start + length)
        content = data[start : start + length]
        return LogicalMessage(xid, flags == _TRANSACTIONAL, lsn, prefix, content)

    # -- streaming (protocol 2+) ---------------------------------------------------------

    def _stream_start(self, data: bytes) -> StreamStart:
        self._require("S", STREAMING_VERSION)
        if self.in_stream:
            raise DecodeError("S", 0, "stream start inside a stream block")
        xid, first_segment = _STREAM_START.read("S", data, 1)
        if first_segment > 1:
            raise DecodeError("S", 5, f"first-segment flag must be 0 or 1, not {first_segment}")
        _finish("S", data, 1 + _STREAM_START.size)
        self.in_stream = True
        return StreamStart(xid, first_segment == 1)

    def _stream_stop(self, data: bytes) -> StreamStop:
        self._require("E", STREAMING_VERSION)
        if not self.in_stream:
            raise DecodeError("E", 0, "stream stop outside a stream block")
        _finish("E", data, 1)
        self.in_stream = False
        return _STREAM_STOP

    def _stream_commit(self, data: bytes) -> StreamCommit:
        self._require("c", STREAMING_VERSION)
        xid, flags, commit_lsn, end_lsn, commit_time = _STREAM_COMMIT.read("c", data, 1)
        _finish("c", data, 1 + _STREAM_COMMIT.size)
        return StreamCommit(xid, flags, commit_lsn, end_lsn, commit_time)

    def _stream_abort(self, data: bytes) -> StreamAbort:
        self._require("A", STREAMING_VERSION)
        if self.parallel_streaming:  # implies protocol 4: the server adds abort lsn and time
            xid, subxid, abort_lsn, abort_time = _STREAM_ABORT_PARALLEL.read("A", data, 1)
            _finish("A", data, 1 + _STREAM_ABORT_PARALLEL.size)
            return StreamAbort(xid, subxid, abort_lsn, abort_time)
        xid, subxid = _STREAM_ABORT.read("A", data, 1)
        _finish("A", data, 1 + _STREAM_ABORT.size)
        return StreamAbort(xid, subxid, None, None)

    # -- two-phase commit (protocol 3+) --------------------------------------------------

    def _gid(self, tag: str, data: bytes, off: int) -> str:
        """The global transaction id that ends every two-phase message."""
        gid, off = _string(tag, data, off, "gid")
        _finish(tag, data, off)
        return gid

    def _begin_prepare(self, data: bytes) -> BeginPrepare:
        self._require("b", TWO_PHASE_VERSION)
        prepare_lsn, end_lsn, prepare_time, xid = _BEGIN_PREPARE.read("b", data, 1)
        gid = self._gid("b", data, 1 + _BEGIN_PREPARE.size)
        return BeginPrepare(prepare_lsn, end_lsn, prepare_time, xid, gid)

    def _prepare(self, data: bytes) -> Prepare:
        self._require("P", TWO_PHASE_VERSION)
        flags, prepare_lsn, end_lsn, prepare_time, xid = _PREPARE.read("P", data, 1)
        gid = self._gid("P", data, 1 + _PREPARE.size)
        return Prepare(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)

    def _commit_prepared(self, data: bytes) -> CommitPrepared:
        self._require("K", TWO_PHASE_VERSION)
        flags, commit_lsn, end_lsn, commit_time, xid = _COMMIT_PREPARED.read("K", data, 1)
        gid = self._gid("K", data, 1 + _COMMIT_PREPARED.size)
        return CommitPrepared(flags, commit_lsn, end_lsn, commit_time, xid, gid)

    def _rollback_prepared(self, data: bytes) -> RollbackPrepared:
        self._require("r", TWO_PHASE_VERSION)
        values = _ROLLBACK_PREPARED.read("r", data, 1)
        flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid = values
        gid = self._gid("r", data, 1 + _ROLLBACK_PREPARED.size)
        return RollbackPrepared(
            flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid, gid
        )

    def _stream_prepare(self, data: bytes) -> StreamPrepare:
        self._require("p", TWO_PHASE_VERSION)
        flags, prepare_lsn, end_lsn, prepare_time, xid = _PREPARE.read("p", data, 1)
        gid = self._gid("p", data, 1 + _PREPARE.size)
        return StreamPrepare(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)


_Handler = Callable[[PgOutputDecoder, bytes], PgOutputMessage]

_DISPATCH: Final[dict[int, _Handler]] = {
    ord("B"): PgOutputDecoder._begin,
    ord("C"): PgOutputDecoder._commit,
    ord("O"): PgOutputDecoder._origin,
    ord("R"): PgOutputDecoder._relation,
    ord("Y"): PgOutputDecoder._type,
    ord("I"): PgOutputDecoder._insert,
    ord("U"): PgOutputDecoder._update,
    ord("D"): PgOutputDecoder._delete,
    ord("T"): PgOutputDecoder._truncate,
    ord("M"): PgOutputDecoder._message,
    ord("S"): PgOutputDecoder._stream_start,
    ord("E"): PgOutputDecoder._stream_stop,
    ord("c"): PgOutputDecoder._stream_commit,
    ord("A"): PgOutputDecoder._stream_abort,
    ord("b"): PgOutputDecoder._begin_prepare,
    ord("P"): PgOutputDecoder._prepare,
    ord("K"): PgOutputDecoder._commit_prepared,
    ord("r"): PgOutputDecoder._rollback_prepared,
    ord("p"): PgOutputDecoder._stream_prepare,
}
