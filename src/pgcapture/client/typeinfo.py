"""User-defined types, looked up once per OID in the catalog of the ``dsn`` database.

Wire values carry the source database's type OIDs. An OID of a user-defined type (enum,
composite, domain, range, multirange, an array of any of them) means nothing without that
database's catalog, so the consumer may be given a connection (``dsn=``) to **the source
database or a physical copy of it** (a streaming standby, a restored base backup): OIDs are
only equal there. A logical replica, a ``pg_dump`` restore or another database has other OIDs,
and a lookup there would decode values as the wrong types.

Each unknown OID is asked about once (``pg_type``), then psycopg's own ``EnumInfo`` /
``CompositeInfo`` / ``RangeInfo`` / ``MultirangeInfo`` / ``TypeInfo`` ``fetch`` and ``register_*``
functions install loaders on the decoder's private ``AdaptersMap``; types a value depends on
(composite fields, range subtypes, array elements, domain base types) are resolved first.
A domain decodes as its base type. OIDs the catalog does not know, and base types psycopg has
no loader for, stay ``RawValue``; they are not asked about again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from psycopg.types import TypeInfo
from psycopg.types.array import register_array
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.enum import EnumInfo, register_enum
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import RangeInfo, register_range

from pgcapture.client.errors import TypeLookupError
from pgcapture.client.values import ValueDecoder

log = logging.getLogger("pgcapture.client")

_MAX_DEPTH: Final = 16
_QUERY: Final = """
SELECT t.oid, t.typname AS name, t.oid::regtype::text AS regtype, t.typtype AS kind,
       t.typcategory AS category, t.typelem AS elem, coalesce(e.typname, '') AS elem_name,
       t.typbasetype AS base, t.typarray AS array_oid, t.typdelim AS delimiter
FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem
WHERE t.oid = ANY(%s)
"""


@dataclass(frozen=True, slots=True)
class _PgType:
    oid: int
    name: str
    regtype: str
    kind: str
    category: str
    elem: int
    elem_name: str
    base: int
    array_oid: int
    delimiter: str


class TypeResolver:
    """Registers the types of unknown OIDs on a ``ValueDecoder``'s adapters.

    ``dsn`` is a connection string or an open ``psycopg.AsyncConnection`` (used as it is and
    never closed here; it should be in autocommit mode).
    """

    def __init__(self, decoder: ValueDecoder, dsn: str | psycopg.AsyncConnection[Any]) -> None:
        self._decoder = decoder
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._asked: set[int] = set()

    def pending(self, oids: Iterable[int]) -> set[int]:
        """The OIDs of ``oids`` that still need a lookup."""
        decoder, asked = self._decoder, self._asked
        return {oid for oid in oids if oid not in asked and not decoder.knows(oid)}

    async def prepare(self, oids: Iterable[int]) -> None:
        """Look up every OID of ``oids`` not known yet; raise ``TypeLookupError`` on failure."""
        todo = self.pending(oids)
        if not todo:
            return
        asked = set(self._asked)
        try:
            conn = await self._connection()
            await self._resolve(conn, todo, 0)
        except psycopg.Error as exc:
            self._asked = asked  # ask again next time: this lookup did not complete
            await self._drop_connection()
            raise TypeLookupError(
                f"cannot look up type oids {sorted(todo)} on the dsn database: "
                f"{' '.join(str(exc).split())}; check that dsn= reaches the source database"
            ) from exc
        finally:
            self._decoder.refresh()

    async def close(self) -> None:
        if not isinstance(self._dsn, psycopg.AsyncConnection):
            await self._drop_connection()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if isinstance(self._dsn, psycopg.AsyncConnection):
            return self._dsn
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not isinstance(self._dsn, psycopg.AsyncConnection):
            await conn.close()

    async def _resolve(
        self, conn: psycopg.AsyncConnection[Any], oids: set[int], depth: int
    ) -> None:
        todo = self.pending(oids)
        if not todo:
            return
        if depth > _MAX_DEPTH:
            raise TypeLookupError(
                f"types nest deeper than {_MAX_DEPTH} levels at oids {sorted(todo)}; "
                "declare those fields as RawValue"
            )
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_QUERY, (sorted(todo),))
            rows = [_PgType(**row) for row in await cur.fetchall()]
        self._asked |= todo
        for missing in todo - {row.oid for row in rows}:
            log.warning(
                "type oid %d is not in the dsn database's catalog; its values stay "
                "RawValue (is dsn= the source database?)",
                missing,
            )
        for row in rows:
            await self._register(conn, row, depth)

    async def _register(self, conn: psycopg.AsyncConnection[Any], t: _PgType, depth: int) -> None:
        amap = self._decoder.adapters
        if t.kind == "d":  # first: a domain over an array has the array's category
            await self._register_domain(conn, t, depth)
        elif t.category == "A" and t.elem:
            # Registering the element type registers its array too; an array of a type psycopg
            # cannot load still gets the generic array loaders (elements become RawValue).
            await self._resolve(conn, {t.elem}, depth + 1)
            if not self._decoder.knows(t.oid):
                register_array(TypeInfo(t.elem_name, t.elem, t.oid, delimiter=t.delimiter), amap)
        elif t.kind == "e":
            enum_info = await EnumInfo.fetch(conn, t.regtype)
            if enum_info is not None:
                register_enum(enum_info, amap)
        elif t.kind == "c":
            composite = await CompositeInfo.fetch(conn, t.regtype)
            if composite is not None:
                await self._resolve(conn, set(composite.field_types), depth + 1)
                register_composite(composite, amap)
        elif t.kind == "r":
            range_info = await RangeInfo.fetch(conn, t.regtype)
            if range_info is not None:
                await self._resolve(conn, {range_info.subtype_oid}, depth + 1)
                register_range(range_info, amap)
        elif t.kind == "m":
            multi = await MultirangeInfo.fetch(conn, t.regtype)
            if multi is not None:
                await self._resolve(conn, {multi.range_oid, multi.subtype_oid}, depth + 1)
                register_multirange(multi, amap)
        else:
            log.info(
                "type %s (oid %d) has no psycopg loader; its values stay RawValue", t.regtype, t.oid
            )

    async def _register_domain(
        self, conn: psycopg.AsyncConnection[Any], t: _PgType, depth: int
    ) -> None:
        """A domain's values are its base type's: register the base type's loaders for it."""
        await self._resolve(conn, {t.base}, depth + 1)
        amap = self._decoder.adapters
        for fmt in (pq.Format.BINARY, pq.Format.TEXT):
            loader = amap.get_loader(t.base, fmt)
            if loader is not None:
                amap.register_loader(t.oid, loader)
        if (size := self._decoder.fixed_sizes.get(t.base)) is not None:
            self._decoder.fixed_sizes[t.oid] = size
        # TypeInfo.register also registers the array of the domain, if the catalog has one.
        TypeInfo(t.name, t.oid, t.array_oid, regtype=t.regtype, delimiter=t.delimiter).register(
            amap
        )
