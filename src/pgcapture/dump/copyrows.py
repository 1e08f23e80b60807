"""From PostgreSQL's binary COPY format to serialized ``Change`` messages, incrementally.

``CopyChanges`` is fed the bytes of ``COPY (SELECT ...) TO STDOUT (FORMAT binary)`` in whatever
pieces they arrive (any split works) and appends, for every tuple completed, the wire bytes of
``Change{op: UPDATE, schema, table, new: every column}``: exactly what protobuf's
``SerializeToString()`` of the same message gives. A field carries the column's name and type
OID and its value as the server sent it: binary send format, or text for a column selected as
``::text`` (``Column.text``); NULL leaves the value unset; ``key`` marks the columns of the
replica identity (DESIGN.md, contract 3). Sans-I/O: bytes in, bytes out, no database.

The format (PostgreSQL docs, COPY, "Binary Format"): an 11-byte signature, int32 flags, int32
header extension length and the extension; per tuple an int16 field count, then per field an
int32 length (-1 for NULL) and that many bytes; a field count of -1 ends the data.

Speed: the server sends each tuple in a CopyData message of its own. Such a message goes to a
row encoder compiled for the table, in the spirit of capture's layouts (``capture/layout.py``):
straight-line code without a loop over columns, where one ``struct`` reads each run of
fixed-size columns (their sizes learned from the first rows; the catalog says which types have
a fixed size) together with the length of the variable-size column after it, and one join
builds the change from constant bytes and the values. A row that does not fit (a NULL where a
size was expected) takes column-by-column code inside the same encoder; anything that is not
exactly one tuple (the header, the trailer, pieces split elsewhere) takes the general,
incremental parser. Every path gives the same bytes (``tests/unit/test_dump_copyrows.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from struct import Struct
from struct import error as StructError
from typing import Any, Final, NamedTuple

from pgcapture import wire
from pgcapture.errors import ProtocolError

Data = bytes | memoryview

SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
_HEADER: Final = Struct(">11sii")
_I16: Final = Struct(">h")
_I32: Final = Struct(">i")
_OIDS_FLAG: Final = 1 << 16  # tuples carry an OID field (servers before 12 only)
_SAMPLE_ROWS: Final = 32  # rows sampled for the sizes of fixed-size values
_BINARY: Final = 98  # ord("b"): wire.value_head's kind for Field.binary
_TEXT: Final = 116  # ord("t"): Field.text
_HEAD, _ROWS, _DONE = range(3)  # parser states


class Column(NamedTuple):
    """One selected column: its name and type OID (as the catalog says, so a domain's own),
    whether it belongs to the replica identity, whether it is selected as text, and whether
    its type has a fixed size (a hint for speed only: the sizes are learned from the rows)."""

    name: str
    oid: int
    key: bool = False
    text: bool = False
    fixed: bool = False


RowEncoder = Callable[[Data], "bytes | None"]
_MAX_RUN: Final = 24  # fixed-size columns read by one struct


def _value_code(i: int, key: bool) -> list[str]:
    """Column ``i`` with its length ``n`` read and ``o`` at its value: ``h{i}``, ``v{i}`` (and
    ``s{i}``) for the join."""
    return [
        "if n < 0:",
        "    if n != -1:",
        "        return None",
        f"    h{i} = N{i}",
        f"    v{i} = b''",
        *([f"    s{i} = b''"] if key else []),
        "else:",
        f"    h{i} = G{i}(n) or MAKE({i}, n)",
        f"    v{i} = d[o : o + n]",
        "    o += n",
        *([f"    s{i} = S{i}"] if key else []),
    ]


def _run_code(
    run: list[int], var: bool, keys: tuple[bool, ...], sizes: tuple[int, ...]
) -> list[str]:
    """After a struct read ``l{i}, v{i}`` of the fixed-size columns ``run`` (and ``n``, the
    length of the variable-size column after them, if ``var``): their fields; a length other
    than the expected (a NULL) takes the column-by-column code."""
    skip = sum(4 + sizes[i] for i in run) + (4 if var else 0)
    code = [f"if {' and '.join(f'l{i} == {sizes[i]}' for i in run)}:", f"    o += {skip}"]
    for i in run:
        code += [f"    h{i} = C{i}", *([f"    s{i} = S{i}"] if keys[i] else [])]
    code.append("else:")
    for i in run:
        code += ["    n = U32(d, o)[0]", "    o += 4"]
        code += ["    " + line for line in _value_code(i, keys[i])]
    if var:
        code += ["    n = U32(d, o)[0]", "    o += 4"]
    return code


def _encoder_body(keys: tuple[bool, ...], sizes: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """The statements of a row encoder and the struct formats ``R0``, ``R1``... they use.

    Each struct read takes a run of fixed-size columns (lengths and values) and the length of
    the variable-size column after it; the first one also the field count."""
    body: list[str] = []
    formats: list[str] = []
    i, first = 0, True
    while first or i < len(keys):
        run: list[int] = []
        while i < len(keys) and sizes[i] >= 0 and len(run) < _MAX_RUN:
            run.append(i)
            i += 1
        var = i < len(keys) and sizes[i] < 0
        targets = ["count"] if first else []
        targets += [f"l{j}, v{j}" for j in run] + (["n"] if var else [])
        formats.append(
            (">h" if first else ">") + "".join(f"i{sizes[j]}s" for j in run) + ("i" if var else "")
        )
        body.append(f"{', '.join(targets)}, = R{len(formats) - 1}(d, o)")
        if first:
            body += [f"if count != {len(keys)}:", "    return None", "o = 2"]
            first = False
        if run:
            body += _run_code(run, var, keys, sizes)
        elif var:
            body.append("o += 4")
        if var:
            body += _value_code(i, keys[i])
            i += 1
    return body, formats


def _encoder_source(keys: tuple[bool, ...], sizes: tuple[int, ...]) -> tuple[str, list[str]]:
    """The source of the row encoder factory, and the struct formats of its reads."""
    body, formats = _encoder_body(keys, sizes)
    parts = ["HEAD"]
    for i, key in enumerate(keys):
        parts += (f"h{i}", f"v{i}", f"s{i}") if key else (f"h{i}", f"v{i}")
    names = ["HEAD", "MAKE", "U32", "JOIN", "SHORT"]
    for i in range(len(keys)):
        names += (f"N{i}", f"G{i}", f"S{i}", f"C{i}")
    lines = [
        f"def factory({', '.join(names)}):",
        "    def encode(d):",
        "        o = 0",
        "        try:",
        *("            " + line for line in body),
        "        except SHORT:",
        "            return None",
        "        if o != len(d):",
        "            return None",
        f"        return JOIN(({', '.join(parts)},))",
        "    return encode",
    ]
    return "\n".join(lines), formats


@functools.lru_cache(maxsize=64)
def _encoder_factory(keys: tuple[bool, ...], sizes: tuple[int, ...]) -> Callable[..., RowEncoder]:
    """A factory of row encoders for tables whose columns have these key flags and these
    binary value sizes (-1: variable).

    The encoder it makes reads the one tuple that fills a CopyData message with straight-line
    code, no loop and no indexing of per-column tables: one ``struct`` for each run of
    fixed-size columns, a few operations for each other column. It returns None for anything
    else (the general path then decides). The code depends only on the key flags and sizes; a
    table's constant bytes are the factory's arguments, so most tables cost no compilation.
    """
    source, formats = _encoder_source(keys, sizes)
    namespace: dict[str, Any] = {f"R{k}": Struct(f).unpack_from for k, f in enumerate(formats)}
    exec(compile(source, f"<COPY row encoder, {len(keys)} columns>", "exec"), namespace)
    factory: Callable[..., RowEncoder] = namespace["factory"]
    return factory


class CopyChanges:
    """Turns one binary COPY stream of one table into serialized ``Change`` messages."""

    def __init__(self, schema: str, table: str, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        self.head = wire.change_head(wire.OP_UPDATE, schema, table)
        self.prefixes = tuple(wire.field_prefix(c.name, c.oid) for c in columns)
        self.suffixes = tuple(wire.field_suffix(c.key) for c in columns)
        self.nulls = tuple(
            wire.entry(wire.TAG_NEW, p + s)
            for p, s in zip(self.prefixes, self.suffixes, strict=True)
        )
        self._kinds = tuple(_TEXT if c.text else _BINARY for c in columns)
        self._heads: tuple[dict[int, bytes], ...] = tuple({} for _ in columns)
        self._sizes = (-1,) * len(self.columns)
        self.encode_row = self._row_encoder(self._sizes)
        self._sample: list[list[int]] | None = []  # value lengths of the first rows
        self._state = _HEAD
        self._rest: list[Data] = []  # bytes of an incomplete header or tuple
        self._have = 0  # their total length
        self._need = _HEADER.size  # bytes from the start of _rest needed to make progress
        # What feed tries first: the row encoder once the sample is taken, while whole tuples
        # come one per message; else nothing (the checks of _feed decide).
        self._first: RowEncoder = _nothing

    def _row_encoder(self, sizes: tuple[int, ...]) -> RowEncoder:
        constants: list[object] = [
            self.head, self.entry_head, _I32.unpack_from, b"".join, StructError
        ]  # fmt: skip
        for i, size in enumerate(sizes):
            fixed = self.entry_head(i, size) if size >= 0 else None
            constants += (self.nulls[i], self._heads[i].get, self.suffixes[i], fixed)
        keys = tuple(c.key for c in self.columns)
        return _encoder_factory(keys, sizes)(*constants)

    @property
    def sizes(self) -> tuple[int, ...] | None:
        """The value size of each column the row encoder expects (-1: variable), once the first
        rows have been sampled."""
        return None if self._sample is not None else self._sizes

    def feed(self, data: Data, out: list[bytes]) -> int:
        """Append to ``out`` the changes of the tuples ``data`` completes; return their total
        size in bytes. ``ProtocolError`` if the bytes are not a binary COPY of the columns."""
        change = self._first(data)
        if change is None:
            return self._feed(data, out)
        out.append(change)
        return len(change)

    def _feed(self, data: Data, out: list[bytes]) -> int:
        if self._state == _ROWS and not self._have:
            change = self.encode_row(data)
            if change is not None:
                if self._sample is not None:
                    self._observe(data)
                out.append(change)
                return len(change)
            size = self._parse(data, out)  # not one whole tuple: the trailer, or malformed
        else:
            self._rest.append(data)
            self._have += len(data)
            if self._have < self._need:
                return 0
            joined = b"".join(self._rest)
            self._rest, self._have = [], 0
            size = self._parse(joined, out)
        steady = self._state == _ROWS and not self._have and self._sample is None
        self._first = self.encode_row if steady else _nothing
        return size

    def finish(self) -> None:
        """Check that the stream ended with its trailer and nothing after it."""
        if self._state != _DONE or self._have:
            raise ProtocolError(
                f"the COPY data ended before its trailer ({self._have} bytes of an incomplete "
                "tuple)"
            )

    def entry_head(self, i: int, n: int) -> bytes:
        """Everything of column ``i``'s ``Change.new`` entry before a value of ``n`` bytes."""
        heads = self._heads[i]
        head = heads.get(n)
        if head is None:
            value_head = wire.value_head(self._kinds[i], n)
            size = len(self.prefixes[i]) + len(value_head) + n + len(self.suffixes[i])
            head = wire.TAG_NEW + wire.varint(size) + self.prefixes[i] + value_head
            if len(heads) < 256:
                heads[n] = head
        return head

    def _observe(self, data: Data) -> None:
        """Sample the first rows; then specialize the row encoder for the columns whose values
        all had one size (fixed-size types: they are read a run at a time)."""
        assert self._sample is not None
        self._sample.append(_lengths(data))
        if len(self._sample) < _SAMPLE_ROWS:
            return
        columns = zip(self.columns, zip(*self._sample, strict=True), strict=True)
        sizes = tuple(_one_size(lengths) if c.fixed else -1 for c, lengths in columns)
        self._sample = None
        if any(size >= 0 for size in sizes):
            self._sizes = sizes
            self.encode_row = self._row_encoder(sizes)
        self._first = self.encode_row

    def _parse(self, data: Data, out: list[bytes]) -> int:
        """The general path: every complete tuple of ``data``; an incomplete end is kept."""
        end, off, size = len(data), 0, 0
        if self._state == _HEAD:
            off = self._header(data)
            if off < 0:
                self._keep(data, 0)
                return 0
        while off < end:
            if self._state == _DONE:
                raise ProtocolError(f"{end - off} bytes of COPY data after the trailer")
            change, after = self._tuple(data, off, end)
            if after < 0:
                self._keep(data, off)
                return size
            off = after
            if change is not None:
                out.append(change)
                size += len(change)
        return size

    def _keep(self, data: Data, off: int) -> None:
        rest = data[off:]
        self._rest, self._have = [rest], len(rest)

    def _header(self, data: Data) -> int:
        """The offset of the first tuple, or -1 (with ``_need`` set) when incomplete."""
        if len(data) < _HEADER.size:
            self._need = _HEADER.size
            return -1
        signature, flags, extension = _HEADER.unpack_from(data)
        if signature != SIGNATURE:
            raise ProtocolError(f"not binary COPY data: it starts with {bytes(signature)!r}")
        if flags & _OIDS_FLAG or extension < 0:
            raise ProtocolError(f"unexpected binary COPY header: flags {flags:#x}, {extension=}")
        if len(data) < _HEADER.size + extension:
            self._need = _HEADER.size + extension
            return -1
        self._state = _ROWS
        return int(_HEADER.size + extension)

    def _tuple(self, data: Data, off: int, end: int) -> tuple[bytes | None, int]:
        """The change of the tuple at ``off`` (None for the trailer) and the offset after it;
        offset -1 (with ``_need`` set) when ``data`` ends inside it."""
        start = off
        if end - off < 2:
            self._need = 2
            return None, -1
        (count,) = _I16.unpack_from(data, off)
        if count == -1:
            self._state, self._need = _DONE, 0  # any byte more is an error
            return None, off + 2
        if count != len(self.columns):
            raise ProtocolError(f"a COPY tuple has {count} fields; {len(self.columns)} expected")
        off += 2
        parts: list[Data] = [self.head]
        for i in range(count):
            if end - off < 4:
                self._need = off + 4 - start
                return None, -1
            (n,) = _I32.unpack_from(data, off)
            off += 4
            if n < 0:
                if n != -1:
                    raise ProtocolError(f"a COPY field has length {n}")
                parts.append(self.nulls[i])
                continue
            if end - off < n:
                self._need = off + n - start
                return None, -1
            parts += (self.entry_head(i, n), data[off : off + n], self.suffixes[i])
            off += n
        return b"".join(parts), off


def _nothing(data: Data) -> None:
    return None


def _one_size(lengths: tuple[int, ...]) -> int:
    sizes = {n for n in lengths if n >= 0}
    return sizes.pop() if len(sizes) == 1 else -1


def _lengths(data: Data) -> list[int]:
    """The value lengths (-1 for NULL) of the well-formed tuple that fills ``data``."""
    (count,) = _I16.unpack_from(data, 0)
    off, out = 2, []
    for _ in range(count):
        (n,) = _I32.unpack_from(data, off)
        out.append(n)
        off += 4 + max(n, 0)
    return out
