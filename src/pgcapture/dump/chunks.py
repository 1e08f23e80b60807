"""What a dump chunk is, shared by the controller, the dumper and the gateway.

A chunk (``DumpInfoResponse``) names a table and either a range of its heap pages
(``page_begin``..``page_end``, inclusive) or, with ``keys``, the rows with given key values.
Rows of a chunk reach a client with checkpoint ``lsn = 0`` and ``seq = dump_id(chunk)``, the
Go project's identity: CRC-32 of schema, table and the big-endian page numbers (for a key
chunk, of schema, table and the keys).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from pgcapture.proto import pb

LAST_PAGE: Final = 0xFFFFFFFF  # page_end of a table's last chunk: whatever the table holds then


def dump_id(chunk: pb.DumpInfoResponse) -> int:
    """The ``seq`` of the checkpoint every row of ``chunk`` carries."""
    head = chunk.schema.encode() + chunk.table.encode()
    if chunk.keys:
        return zlib.crc32(head + "\n".join(chunk.keys).encode())
    return zlib.crc32(head + struct.pack(">II", chunk.page_begin, chunk.page_end))


def describe(chunk: pb.DumpInfoResponse) -> str:
    """``schema.table pages 0-127`` or ``schema.table, 3 keys``, for logs and errors."""
    name = f"{chunk.schema}.{chunk.table}"
    if chunk.keys:
        return f"{name}, {len(chunk.keys)} key{'s' if len(chunk.keys) != 1 else ''}"
    end = "end" if chunk.page_end == LAST_PAGE else str(chunk.page_end)
    return f"{name} pages {chunk.page_begin}-{end}"
