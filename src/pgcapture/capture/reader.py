"""Reading a source's slot as a stream of checkpointed records.

``SlotReader`` ties the pieces together: ``prepare_source`` (checks, DDL capture, publication,
slot), a ``ReplicationStream`` started at the slot's confirmed position (never at the server's
WAL end, which would skip transactions committed in between), the pgoutput decoder and the
``ChangeAssembler``. The caller ``confirm``s the ``end_lsn`` of Commit records once it has made
them durable; only that is reported to the server.

Values are read in binary (pgoutput's ``binary`` option). The walsender then fails on a value
whose type, or an element or field of it, has no binary send function (``aclitem[]``, a
composite holding an ``aclitem``: issue 14): it ends the stream with an error, at the same
place on every attempt. The reader then reads that one transaction again with ``binary`` off,
from the position confirmed so far, so that its values arrive as text (``Field.text``), and
starts a binary stream again just past its Commit:

* the failed transaction is the one open when the error came (its Begin names its commit LSN),
  else the first to commit after the last Commit read;
* what the text reading delivers at or before the last record returned is dropped, so every
  checkpoint is returned once (the caller's own dedup contract, docs/architecture.md contract
  2, holds across the switch); a transaction cut by the error is completed in text;
* the binary stream starts at the Commit's ``end_lsn`` while the slot is only confirmed as far
  as the caller says (``ReplicationStream.start(confirmed=...)``), so a crash in between reads
  the transaction again, and the caller drops what it already stored;
* each transaction read so is logged (xid, commit LSN, type) and reported to
  ``on_text_fallback``.

A temporary slot cannot be read again on another connection: there the error is raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import psycopg

from pgcapture.capture.changes import ChangeAssembler, Record
from pgcapture.capture.setup import prepare_source
from pgcapture.errors import NoBinaryOutput, SlotInUse
from pgcapture.lsn import format_lsn
from pgcapture.pgoutput import PgOutputDecoder
from pgcapture.proto import pb
from pgcapture.replication import ReplicationStream

PROTOCOL_VERSION: Final = 1
_SLOT_RELEASE: Final = 10.0  # seconds a closed stream's walsender may hold the slot
log = logging.getLogger("pgcapture.capture")


@dataclass(frozen=True, slots=True)
class TextFallback:
    """A transaction read with text values: its commit LSN, its xid, and the type without a
    binary send function that the walsender failed on."""

    lsn: int
    xid: int
    type_name: str


@dataclass(slots=True)
class _TextRead:
    """The transaction being read again in text: the first to commit after ``after``."""

    after: int
    type_name: str
    xid: int = 0


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
        on_text_fallback: Callable[[TextFallback], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication or slot
        self.tables = list(tables) if tables else None
        self.temporary = temporary
        self.status_interval = status_interval
        self.on_text_fallback = on_text_fallback
        self.start_lsn = 0
        self._stream: ReplicationStream | None = None
        self._decoder = PgOutputDecoder(PROTOCOL_VERSION)
        self._assembler = ChangeAssembler()
        self._confirmed = 0  # what the caller made durable
        self._last = (0, 0)  # checkpoint of the last record returned
        self._replayed_to: tuple[int, int] | None = None  # drop up to here after a switch
        self._text: _TextRead | None = None  # while reading a transaction in text
        self._binary_from = 0  # the end of a transaction read in text: go back to binary

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
            self._confirmed = self.start_lsn
            await stream.start(self.slot, self.start_lsn, self._options(binary=True))
        except BaseException:
            await stream.close()
            raise
        self._stream = stream

    def _options(self, binary: bool) -> dict[str, str]:
        # Binary values wherever the type has a binary send function; the server falls back
        # to text per column otherwise (contract 3), and fails on arrays and composites of a
        # type without one (then binary is off for one transaction, see the module's doc).
        return {
            "proto_version": str(PROTOCOL_VERSION),
            "publication_names": self.publication,
            "binary": "true" if binary else "false",
        }

    @property
    def stream(self) -> ReplicationStream:
        if self._stream is None:
            raise RuntimeError("SlotReader.open() was not called")
        return self._stream

    async def read(self) -> list[Record]:
        """The next records (at least one); keepalives and status updates happen inside."""
        if self._binary_from:
            await self._switch(binary=True, start_lsn=self._binary_from)
            self._binary_from = 0
        out: list[Record] = []
        while not out:
            try:
                payloads = await self.stream.read()
            except NoBinaryOutput as exc:
                if self._text is not None or self.temporary:
                    raise
                await self._fall_back(exc)
                continue
            if self._replayed_to is None and self._text is None:
                decode = self._decoder.decode
                feed = self._assembler.feed_raw
                for payload in payloads:
                    record = feed(payload, decode)
                    if record is not None:
                        out.append(record)
            else:
                self._replay(payloads, out)
        last = out[-1]
        self._last = (last.lsn, last.seq)
        return out

    def _replay(self, payloads: list[bytes], out: list[Record]) -> None:
        """Records after a switch of streams: drop what was returned before; at the Commit of
        a transaction read in text, stop (the binary stream takes over after it)."""
        decode = self._decoder.decode
        feed = self._assembler.feed_raw
        text = self._text
        for payload in payloads:
            record = feed(payload, decode)
            if record is None:
                continue
            if text is not None and record.seq == 0 and record.lsn > text.after:
                text.xid = pb.Message.FromString(record.message).begin.remote_xid
            replayed = self._replayed_to
            if replayed is not None and (record.lsn, record.seq) <= replayed:
                continue
            self._replayed_to = None
            out.append(record)
            if text is not None and record.is_commit and record.lsn > text.after:
                self._text_done(text, record)
                return  # the rest is read again, in binary

    async def _fall_back(self, exc: NoBinaryOutput) -> None:
        open_lsn = self._assembler.open_lsn
        after = open_lsn - 1 if open_lsn else self._last[0]
        which = f"committing at {format_lsn(open_lsn)}" if open_lsn else "after the last one"
        log.info(
            "the walsender cannot send a value of type %s in binary: reading the transaction "
            "%s again, from %s, with text values",
            exc.type_name, which, format_lsn(self._confirmed),
            extra={"slot": self.slot, "type": exc.type_name},
        )  # fmt: skip
        await self._switch(binary=False)
        self._text = _TextRead(after, exc.type_name)

    def _text_done(self, text: _TextRead, commit: Record) -> None:
        fallback = TextFallback(commit.lsn, text.xid, text.type_name)
        log.warning(
            "transaction %d (commit %s) went through in text format: a value of type %s has no "
            "binary send function; back to binary values after it",
            fallback.xid, format_lsn(fallback.lsn), fallback.type_name,
            extra={"slot": self.slot, "xid": fallback.xid, "lsn": format_lsn(fallback.lsn),
                   "type": fallback.type_name},
        )  # fmt: skip
        self._text = None
        self._binary_from = commit.end_lsn
        if self.on_text_fallback is not None:
            self.on_text_fallback(fallback)

    async def _switch(self, binary: bool, start_lsn: int | None = None) -> None:
        """A new stream from ``start_lsn`` (default: the confirmed position), with a fresh
        decoder and assembler (the server sends every Relation again); the slot stays confirmed
        at what the caller confirmed."""
        old, self._stream = self._stream, None
        if old is not None:
            # an idle slot's position, which it reported, is confirmed too: never report less
            self._confirmed = max(self._confirmed, old.confirmed)
            await old.close()
        self._decoder = PgOutputDecoder(PROTOCOL_VERSION)
        self._assembler = ChangeAssembler()
        self._replayed_to = self._last
        start = self._confirmed if start_lsn is None else start_lsn
        deadline = time.monotonic() + _SLOT_RELEASE
        while True:
            stream = await ReplicationStream.connect(self.dsn, self.status_interval)
            try:
                await stream.start(
                    self.slot, start, self._options(binary), confirmed=self._confirmed
                )
                break
            except SlotInUse:
                # the walsender of the connection just closed has not exited yet
                await stream.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            except BaseException:
                await stream.close()
                raise
        stream.confirm(self._confirmed)  # what was confirmed while it started
        self._stream = stream

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` (a Commit record's ``end_lsn``) is durable downstream."""
        if lsn > self._confirmed:
            self._confirmed = lsn
        if self._stream is not None:
            self._stream.confirm(lsn)

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
