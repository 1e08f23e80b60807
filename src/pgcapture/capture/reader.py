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

Values that name database objects (``regclass``, ``regtype``, ``regproc``, ``regprocedure``,
``regoper``, ``regoperator``, ``regnamespace``, ``regrole``, ``regconfig``, ``regdictionary``,
``regcollation``; arrays, domains, ranges and composites of them) are OIDs in binary, and OIDs
of user objects differ on a replica. In text the walsender writes the object's name as it was
when the row was written (its output functions run under the historic catalog snapshot), with
``search_path`` empty so that every object outside ``pg_catalog`` is schema-qualified: the
replica's input functions find the same object by that name. So the transaction of such a
change is read again in text, as above:

* in binary, every relation is held when its Relation message comes (``ChangeAssembler(hold=
  True)``); at its first change the reader looks at its column types, from a cache by type OID
  filled by one catalog query for the types not seen yet, on a connection of its own, and
  releases it, which leaves the row path as it was, unless a column is or holds such a type
  (or a type since dropped, or a composite with a dropped attribute, which might have held
  one); that change then starts the text reading of its transaction;
* a composite type can gain an attribute while a column uses it, with no new Relation message:
  each change of ``pgcapture.ddl_logs`` (every DDL statement) puts the relations whose answer
  came through a user composite back on hold, and drops those answers from the cache;
* each transaction read so is logged and reported to ``on_text_fallback`` with the type found.

With a temporary slot such values go out in binary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from pgcapture.capture.changes import ChangeAssembler, Record, RelationHeld
from pgcapture.capture.setup import DDL_TABLE, prepare_source
from pgcapture.errors import ConnectionLost, NoBinaryOutput, SlotInUse
from pgcapture.lsn import format_lsn
from pgcapture.pgoutput import PgOutputDecoder
from pgcapture.proto import pb
from pgcapture.replication import ReplicationStream
from pgcapture.typewalk import held_types

PROTOCOL_VERSION: Final = 1
_SLOT_RELEASE: Final = 10.0  # seconds a closed stream's walsender may hold the slot
log = logging.getLogger("pgcapture.capture")

NO_BINARY_SEND: Final = "no binary send function"
NAMES_OBJECTS: Final = "its values name database objects"
DROPPED: Final = "(dropped)"  # the type found when a type or attribute was dropped since

# The types whose values are OIDs of database objects, by OID (equal on every server).
OBJECT_NAME_TYPES: Final = {
    24: "regproc", 2202: "regprocedure", 2203: "regoper", 2204: "regoperator",
    2205: "regclass", 2206: "regtype", 3734: "regconfig", 3769: "regdictionary",
    4089: "regnamespace", 4096: "regrole", 4191: "regcollation",
}  # fmt: skip
# For each type of ``oids``: the first type naming database objects it is or holds (array
# elements, domain base types, range subtypes, composite attributes, at any depth), whether
# something it holds is gone (a dropped type or composite attribute: OID 0 or none), and
# whether it holds a user composite type, which can change.
_TYPE_QUERY: Final = f"""
WITH RECURSIVE {held_types("pg_catalog.unnest(%(oids)s::pg_catalog.oid[]) AS x(r)")}
SELECT h.root,
       pg_catalog.min(h.typ::pg_catalog.int8)
           FILTER (WHERE h.typ = ANY(%(names)s::pg_catalog.oid[])),
       pg_catalog.bool_or(t.oid IS NULL),
       pg_catalog.bool_or(t.typtype = 'c' AND t.oid >= 16384)
FROM held AS h LEFT JOIN pg_catalog.pg_type AS t ON t.oid = h.typ
GROUP BY h.root
"""


@dataclass(frozen=True, slots=True)
class _TypeInfo:
    """What a type OID holds: the type naming objects found (or ``DROPPED``, or None), and
    whether the answer came through a user composite type (which can change)."""

    names: str | None
    mutable: bool


@dataclass(frozen=True, slots=True)
class TextFallback:
    """A transaction read with text values: its commit LSN, its xid, and the type without a
    binary send function that the walsender failed on."""

    lsn: int
    xid: int
    type_name: str
    reason: str = NO_BINARY_SEND  # or NAMES_OBJECTS: the type's values name database objects


@dataclass(slots=True)
class _TextRead:
    """The transaction being read again in text: the first to commit after ``after``."""

    after: int
    type_name: str
    reason: str = NO_BINARY_SEND
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
        self._assembler = ChangeAssembler(hold=not temporary)
        self._types: dict[int, _TypeInfo] = {}  # by type OID, see _classify
        self._catalog: psycopg.AsyncConnection[Any] | None = None  # for the type lookups
        self._mutable: set[int] = set()  # released relations whose answer may change with DDL
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
                if self.temporary:
                    raise NoBinaryOutput(
                        f"{exc}; a temporary slot is gone with its connection, so it cannot "
                        "be read again in text: use a permanent slot (tail without --temporary)",
                        exc.type_name,
                    ) from exc
                if self._text is not None:
                    raise
                await self._fall_back(exc)
                continue
            at = 0
            while at < len(payloads):
                try:
                    if self._replayed_to is None and self._text is None:
                        self._feed(payloads, at, out)
                    else:
                        self._replay(payloads, at, out)
                    break
                except _Held as held:
                    at = held.at
                    type_name = await self._classify(held.relid)
                    if type_name is not None:
                        if out:  # returned now; the text reading drops them
                            self._last = (out[-1].lsn, out[-1].seq)
                        await self._names_objects(held.relid, type_name)
                        break
        last = out[-1]
        self._last = (last.lsn, last.seq)
        return out

    def _feed(self, payloads: list[bytes], at: int, out: list[Record]) -> None:
        decode = self._decoder.decode
        feed = self._assembler.feed_raw
        append = out.append
        i = at
        try:
            for i, payload in enumerate(payloads if not at else payloads[at:], at):  # noqa: B007
                record = feed(payload, decode)
                if record is not None:
                    append(record)
        except RelationHeld as exc:
            raise _Held(exc.relid, i) from None

    def _replay(self, payloads: list[bytes], at: int, out: list[Record]) -> None:
        """Records after a switch of streams: drop what was returned before; at the Commit of
        a transaction read in text, stop (the binary stream takes over after it)."""
        decode = self._decoder.decode
        feed = self._assembler.feed_raw
        text = self._text
        for i in range(at, len(payloads)):
            try:
                record = feed(payloads[i], decode)
            except RelationHeld as exc:
                raise _Held(exc.relid, i) from None
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

    async def _classify(self, relid: int) -> str | None:
        """Release the held relation ``relid``, or return the type naming database objects
        that one of its columns is or holds (it stays held)."""
        assembler = self._assembler
        rel = assembler.relation(relid)
        unknown = [t for t in set(rel.types) if t not in self._types]
        if unknown:
            await self._look_up(unknown)
        infos = [self._types.get(t, _TypeInfo(DROPPED, False)) for t in rel.types]
        found = next((i.names for i in infos if i.names is not None), None)
        if found is not None:
            return found
        if (rel.schema, rel.table) == DDL_TABLE:
            assembler.watch(relid, self._ddl_seen)
            return None
        assembler.release(relid)
        if any(i.mutable for i in infos):
            self._mutable.add(relid)
        return None

    def _ddl_seen(self) -> None:
        """A DDL statement: composite types may have changed; ask again."""
        if not self._mutable:
            return
        for relid in self._mutable:
            self._assembler.hold(relid)
        self._mutable.clear()
        self._types = {oid: info for oid, info in self._types.items() if not info.mutable}

    async def _look_up(self, oids: list[int]) -> None:
        """Fill the type cache for ``oids``."""
        for attempt in (1, 2):
            conn = self._catalog
            try:
                if conn is None or conn.closed:
                    conn = self._catalog = await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True
                    )
                cur = await conn.execute(
                    _TYPE_QUERY,
                    {"oids": oids, "names": list(OBJECT_NAME_TYPES)},
                    prepare=False,
                )
                rows = await cur.fetchall()
                break
            except psycopg.OperationalError as exc:
                if self._catalog is not None:
                    await self._catalog.close()
                    self._catalog = None
                if attempt == 2:
                    raise ConnectionLost(f"looking up column types on the source: {exc}") from exc
        for root, names, gone, mutable in rows:
            name = OBJECT_NAME_TYPES[int(names)] if names is not None else None
            self._types[int(root)] = _TypeInfo(name or (DROPPED if gone else None), bool(mutable))
        for oid in oids:
            self._types.setdefault(oid, _TypeInfo(DROPPED, False))  # no such type any more

    async def _names_objects(self, relid: int, type_name: str) -> None:
        rel = self._assembler.relation(relid)
        why = (
            f"a column of {rel.schema}.{rel.table} is or holds type {type_name}, whose values "
            "name database objects"
        )
        await self._read_in_text(self._assembler.open_lsn - 1, type_name, NAMES_OBJECTS, why)

    async def _fall_back(self, exc: NoBinaryOutput) -> None:
        open_lsn = self._assembler.open_lsn
        after = open_lsn - 1 if open_lsn else self._last[0]
        why = f"the walsender cannot send a value of type {exc.type_name} in binary"
        await self._read_in_text(after, exc.type_name, NO_BINARY_SEND, why)

    async def _read_in_text(self, after: int, type_name: str, reason: str, why: str) -> None:
        """Read the first transaction committing after ``after`` again, with text values."""
        open_lsn = self._assembler.open_lsn
        which = f"committing at {format_lsn(open_lsn)}" if open_lsn else "after the last one"
        log.info(
            "%s: reading the transaction %s again, from %s, with text values",
            why, which, format_lsn(self._confirmed),
            extra={"slot": self.slot, "type": type_name},
        )  # fmt: skip
        await self._switch(binary=False)
        self._text = _TextRead(after, type_name, reason)

    def _text_done(self, text: _TextRead, commit: Record) -> None:
        fallback = TextFallback(commit.lsn, text.xid, text.type_name, text.reason)
        log.warning(
            "transaction %d (commit %s) went through in text format: type %s, %s; back to "
            "binary values after it",
            fallback.xid, format_lsn(fallback.lsn), fallback.type_name, fallback.reason,
            extra={"slot": self.slot, "xid": fallback.xid, "lsn": format_lsn(fallback.lsn),
                   "type": fallback.type_name, "reason": fallback.reason},
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
        self._assembler = ChangeAssembler(hold=binary and not self.temporary)
        self._mutable.clear()
        self._replayed_to = self._last
        start = self._confirmed if start_lsn is None else start_lsn
        deadline = time.monotonic() + _SLOT_RELEASE
        pause = 0.002
        stream = await ReplicationStream.connect(self.dsn, self.status_interval)
        try:
            while True:
                try:
                    await stream.start(
                        self.slot, start, self._options(binary), confirmed=self._confirmed
                    )
                    break
                except SlotInUse:
                    # the walsender of the connection just closed has not exited yet; the
                    # failed command leaves this connection ready for another try
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
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
        if self._catalog is not None:
            catalog, self._catalog = self._catalog, None
            await catalog.close()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()


class _Held(Exception):
    """The change at ``payloads[at]`` is of the held relation ``relid``: classify, go on."""

    def __init__(self, relid: int, at: int) -> None:
        super().__init__(relid, at)
        self.relid = relid
        self.at = at
