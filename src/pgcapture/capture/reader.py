"""Reading a source's slot as a stream of checkpointed records.

``SlotReader`` ties the pieces together: ``prepare_source`` (checks, DDL capture, publication,
slot), a ``ReplicationStream`` started at the slot's confirmed position (never at the server's
WAL end, which would skip transactions committed in between), the pgoutput decoder and the
``ChangeAssembler``. The caller ``confirm``s the ``end_lsn`` of Commit records once it has made
them durable; only that is reported to the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import psycopg

from pgcapture.capture.changes import ChangeAssembler, Record
from pgcapture.capture.setup import prepare_source
from pgcapture.pgoutput import PgOutputDecoder
from pgcapture.replication import ReplicationStream

PROTOCOL_VERSION: Final = 1


class SlotReader:
    """One logical slot of one database, read as ``Record`` batches."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        publication: str | None = None,
        tables: Sequence[str] | None = None,
        temporary: bool = False,
        status_interval: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication or slot
        self.tables = list(tables) if tables else None
        self.temporary = temporary
        self.status_interval = status_interval
        self.start_lsn = 0
        self._stream: ReplicationStream | None = None
        self._decoder = PgOutputDecoder(PROTOCOL_VERSION)
        self._assembler = ChangeAssembler()

    async def open(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            slot_lsn = await prepare_source(
                conn, self.slot, self.publication, self.tables, create=not self.temporary
            )
        stream = await ReplicationStream.connect(self.dsn, self.status_interval)
        try:
            if self.temporary:
                self.start_lsn = await stream.create_slot(self.slot, temporary=True)
            else:
                assert slot_lsn is not None
                self.start_lsn = slot_lsn
            # Binary values wherever the type has a binary send function; the server falls
            # back to text per column otherwise (contract 3).
            options = {
                "proto_version": str(PROTOCOL_VERSION),
                "publication_names": self.publication,
                "binary": "true",
            }
            await stream.start(self.slot, self.start_lsn, options)
        except BaseException:
            await stream.close()
            raise
        self._stream = stream

    @property
    def stream(self) -> ReplicationStream:
        if self._stream is None:
            raise RuntimeError("SlotReader.open() was not called")
        return self._stream

    async def read(self) -> list[Record]:
        """The next records (at least one); keepalives and status updates happen inside."""
        decode = self._decoder.decode
        feed = self._assembler.feed_raw
        out: list[Record] = []
        while not out:
            for payload in await self.stream.read():
                record = feed(payload, decode)
                if record is not None:
                    out.append(record)
        return out

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` (a Commit record's ``end_lsn``) is durable downstream."""
        self.stream.confirm(lsn)

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
