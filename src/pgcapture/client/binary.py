"""Structure checks of self-describing binary forms, before psycopg's C loaders see them.

psycopg's loaders trust the server: given bytes of another shape, its C array loader can read
past the end of the buffer (and crash the process) and fixed-width loaders read their width
whatever the length. Values the gateway forwards come from PostgreSQL and are well formed; a
``RawValue`` read as an array or a record because a model declared it so may be anything.
These checks walk the structure (``array_send`` / ``record_send`` in PostgreSQL's
``arrayfuncs.c`` / ``rowtypes.c``) and raise ``ValueError`` unless it fits the bytes exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

_I32: Final = struct.Struct(">i")
_MAXDIM: Final = 6  # PostgreSQL's MAXDIM


def _int32(data: bytes, offset: int, what: str) -> int:
    if offset + 4 > len(data):
        raise ValueError(f"not a binary {what}: {len(data)} bytes end inside its header")
    value: int = _I32.unpack_from(data, offset)[0]
    return value


def _items(data: bytes, offset: int, oid_of: list[int], sizes: Mapping[int, int], what: str) -> int:
    """Walk length-prefixed items (``oid_of[i]`` is item i's type OID); the end offset."""
    for oid in oid_of:
        length = _int32(data, offset, what)
        offset += 4
        if length == -1:
            continue
        if length < 0 or offset + length > len(data):
            raise ValueError(f"not a binary {what}: an item of {length} bytes overruns it")
        size = sizes.get(oid)
        if size is not None and length != size:
            raise ValueError(f"not a binary {what}: a {length}-byte item of oid {oid} ({size})")
        offset += length
    return offset


def check_array(data: bytes, sizes: Mapping[int, int]) -> None:
    """Raise ``ValueError`` unless ``data`` is exactly one binary array."""
    ndim = _int32(data, 0, "array")
    flags = _int32(data, 4, "array")
    elem = _int32(data, 8, "array") & 0xFFFFFFFF
    if not 0 <= ndim <= _MAXDIM or flags not in (0, 1):
        raise ValueError(f"not a binary array: {ndim} dimensions, flags {flags}")
    count = 1 if ndim else 0
    for d in range(ndim):
        dim = _int32(data, 12 + 8 * d, "array")
        if dim < 0:
            raise ValueError(f"not a binary array: dimension of size {dim}")
        count *= dim
    if count * 4 > len(data):
        raise ValueError(f"not a binary array: {count} elements cannot fit {len(data)} bytes")
    end = _items(data, 12 + 8 * ndim, [elem] * count, sizes, "array")
    if end != len(data):
        raise ValueError(f"not a binary array: {len(data) - end} bytes after its elements")


def check_record(data: bytes, sizes: Mapping[int, int]) -> None:
    """Raise ``ValueError`` unless ``data`` is exactly one binary record (composite)."""
    count = _int32(data, 0, "record")
    if count < 0 or count * 8 > len(data):
        raise ValueError(f"not a binary record: {count} fields cannot fit {len(data)} bytes")
    offset = 4
    for _ in range(count):
        oid = _int32(data, offset, "record") & 0xFFFFFFFF
        offset = _items(data, offset + 4, [oid], sizes, "record")
    if offset != len(data):
        raise ValueError(f"not a binary record: {len(data) - offset} bytes after its fields")
