"""What the replica knows about a table: its columns and their types, by name, and its key.

Values arrive with the source's type OIDs. Built-in types have the same OID everywhere, but a
replica made from an empty database has its own OIDs for enums, domains, composite types and
their arrays. So parameters are always typed with the replica's column type, found by column
name, and the source's OID is only checked where it must agree (built-in types). Two binary
formats embed type OIDs: arrays (their element type) and composite values (each field's type);
for those the OIDs inside the value are rewritten to the replica's (``fixer``).

A table's key is its replica identity index when it has one, else its primary key: the columns
updates and deletes are matched on, the same the source sends in old key images. Tables without
one are matched on their whole old row (REPLICA IDENTITY FULL on the source).
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pgcapture.replica.pipeline import Expect, Pipeline

FIRST_NORMAL_OID: Final = 16384  # OIDs below are built in, equal on every server
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")

Fixer = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    array_oid: int  # the column type's array type (0: none)
    is_array: bool  # an array (or a domain over one): unnest cannot carry it
    generated: bool  # stored generated: never written
    identity_always: bool  # GENERATED ALWAYS AS IDENTITY: needs OVERRIDING SYSTEM VALUE
    fixer: Fixer | None  # rewrites type OIDs embedded in a binary value
    # no binary receive function (aclitem, arrays and domains of it): values and NULLs are
    # sent in text format, never in a binary array
    text_only: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    schema: str
    name: str
    columns: dict[str, Column]
    key: tuple[str, ...]  # replica identity index or primary key columns; () = none
    other_unique: bool  # unique or exclusion constraints besides the key

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_PLAIN: Final = re.compile(r"[a-z_][a-z0-9_$]*")
_PART: Final = r'(?:"((?:[^"]|"")+)"|([^".]+))'
_QUALIFIED: Final = re.compile(rf"{_PART}\.{_PART}")


def table_arg(schema: str, name: str) -> str:
    """``SCHEMA.TABLE`` as ``--create-missing`` takes it, quoted for a shell where needed."""
    text = ".".join(p if _PLAIN.fullmatch(p) else quote_ident(p) for p in (schema, name))
    return shlex.quote(text)


def parse_table_arg(text: str) -> tuple[str, str]:
    """``SCHEMA.TABLE`` (either part in double quotes when it holds a dot or a quote) as
    (schema, table), names taken as written; ValueError when it is not one."""
    found = _QUALIFIED.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not SCHEMA.TABLE")
    q1, p1, q2, p2 = found.groups()
    schema = q1.replace('""', '"') if q1 is not None else p1
    table = q2.replace('""', '"') if q2 is not None else p2
    return schema, table


_TABLE_SQL: Final = b"""
SELECT json_build_object(
  'key', (SELECT json_agg(a.attname ORDER BY k.n)
          FROM (SELECT i.indkey FROM pg_index i
                WHERE i.indrelid = c.oid AND i.indisvalid
                  AND (i.indisreplident OR (i.indisprimary AND c.relreplident <> 'i'))
                ORDER BY i.indisreplident DESC LIMIT 1) AS ix
          CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum),
  'uniques', (SELECT count(*) FROM pg_index i
              WHERE i.indrelid = c.oid AND (i.indisunique OR i.indisexclusion)),
  'columns', (SELECT json_agg(json_build_array(
                  a.attname, a.atttypid::int8, t.typarray::int8,
                  coalesce(b.typcategory, t.typcategory) = 'A',
                  a.attgenerated <> '', a.attidentity = 'a',
                  -- no binary receive function in the type, its domains' base types or its
                  -- array elements (a domain looks its base type's function up even for NULL)
                  (WITH RECURSIVE held(typ) AS (
                       SELECT a.atttypid
                     UNION
                       SELECT s.typ FROM held AS h JOIN pg_type AS u ON u.oid = h.typ
                       CROSS JOIN LATERAL (
                           SELECT u.typelem WHERE u.typelem <> 0
                         UNION ALL
                           SELECT u.typbasetype WHERE u.typbasetype <> 0) AS s(typ))
                   SELECT coalesce(bool_or(u.typreceive::oid = 0), false)
                   FROM held AS h JOIN pg_type AS u ON u.oid = h.typ))
                  ORDER BY a.attnum)
              FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              LEFT JOIN pg_type b ON b.oid = t.typbasetype AND t.typtype = 'd'
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
"""

_TYPES_SQL: Final = b"""
SELECT t.oid, t.typtype, t.typelem, t.typbasetype, t.typcategory = 'A',
       (SELECT coalesce(json_agg(a.atttypid::int8 ORDER BY a.attnum), '[]')
        FROM pg_attribute a
        WHERE a.attrelid = t.typrelid AND t.typtype = 'c' AND a.attnum > 0
          AND NOT a.attisdropped)
FROM pg_type t WHERE t.oid = ANY($1::oid[])
"""


@dataclass(frozen=True, slots=True)
class _Type:
    oid: int
    typtype: str
    elem: int
    base: int
    is_array: bool
    fields: tuple[int, ...]


class Catalog:
    """Tables and types of the replica, loaded on first use and forgotten after DDL."""

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], Table | None] = {}
        self._types: dict[int, _Type] = {}
        self._fixers: dict[int, Fixer | None] = {}

    def forget(self, schema: str, name: str) -> None:
        """Read the table again on next use (replicate created it)."""
        self._tables.pop((schema, name), None)

    def clear(self) -> None:
        self._tables.clear()
        self._types.clear()
        self._fixers.clear()

    async def table(self, pipe: Pipeline, schema: str, name: str) -> Table | None:
        key = (schema, name)
        if key in self._tables:
            return self._tables[key]
        expect = pipe.query(
            _TABLE_SQL, [schema.encode(), name.encode()], None,
            Expect(f"reading the columns of {schema}.{name}", keep=True),
        )  # fmt: skip
        await pipe.sync()
        res = expect.result
        table = None
        if res is not None and res.ntuples:
            info = json.loads(res.get_value(0, 0) or b"{}")
            columns = {}
            for col in info["columns"] or ():
                name_, type_oid, array_oid, is_array, generated, always, text_only = col
                fixer = await self._fixer(pipe, type_oid)
                columns[name_] = Column(
                    name_, type_oid, array_oid, is_array, generated, always, fixer, text_only
                )
            key_cols = tuple(info["key"] or ())
            uniques = int(info["uniques"])
            table = Table(schema, name, columns, key_cols, uniques > (1 if key_cols else 0))
        self._tables[key] = table
        return table

    async def _load_types(self, pipe: Pipeline, oids: set[int]) -> None:
        missing = sorted(o for o in oids if o not in self._types)
        if not missing:
            return
        array = "{" + ",".join(map(str, missing)) + "}"
        expect = pipe.query(_TYPES_SQL, [array.encode()], None, Expect("reading types", keep=True))
        await pipe.sync()
        res = expect.result
        assert res is not None
        for row in range(res.ntuples):
            values = [res.get_value(row, col) or b"" for col in range(6)]
            typ = _Type(
                int(values[0]), values[1].decode(), int(values[2]), int(values[3]),
                values[4] == b"t", tuple(json.loads(values[5])),
            )  # fmt: skip
            self._types[typ.oid] = typ

    async def _fixer(self, pipe: Pipeline, oid: int) -> Fixer | None:
        """How to rewrite the OIDs inside a binary value of type ``oid`` (None: nothing to do)."""
        if oid in self._fixers:
            return self._fixers[oid]
        self._fixers[oid] = None  # a composite type may contain itself through an array
        await self._load_types(pipe, {oid})
        typ = self._types.get(oid)
        fixer: Fixer | None = None
        if typ is None:
            pass
        elif typ.typtype == "d":
            fixer = await self._fixer(pipe, typ.base)
        elif typ.is_array and typ.elem:
            # array_send writes the element type itself (a domain's own OID for a domain[])
            inner = await self._fixer(pipe, typ.elem)
            if typ.elem >= FIRST_NORMAL_OID or inner is not None:
                fixer = _array_fixer(typ.elem, inner)
        elif typ.typtype == "c":
            fields = [(f, await self._fixer(pipe, f)) for f in typ.fields]
            if any(f >= FIRST_NORMAL_OID or fx is not None for f, fx in fields):
                fixer = _record_fixer(fields)
        self._fixers[oid] = fixer
        return fixer


def _array_fixer(elem_oid: int, inner: Fixer | None) -> Fixer:
    oid_bytes = _U32.pack(elem_oid)

    def fix(value: bytes) -> bytes:
        if len(value) < 12:
            return value
        if inner is None:
            return value[:8] + oid_bytes + value[12:]
        ndim = _I32.unpack_from(value, 0)[0]
        pos = 12 + 8 * ndim
        out = [value[:8], oid_bytes, value[12:pos]]
        while pos < len(value):
            size = _I32.unpack_from(value, pos)[0]
            pos += 4
            if size < 0:
                out.append(value[pos - 4 : pos])
                continue
            element = inner(value[pos : pos + size])
            out.append(_I32.pack(len(element)) + element)
            pos += size
        return b"".join(out)

    return fix


def _record_fixer(fields: list[tuple[int, Fixer | None]]) -> Fixer:
    def fix(value: bytes) -> bytes:
        count = _I32.unpack_from(value, 0)[0]
        out = [value[:4]]
        pos = 4
        for index in range(count):
            oid, fixer = fields[index] if index < len(fields) else (None, None)
            size = _I32.unpack_from(value, pos + 4)[0]
            head = _U32.pack(oid) if oid is not None else value[pos : pos + 4]
            pos += 8
            if size < 0:
                out.append(head + _I32.pack(size))
                continue
            data = value[pos : pos + size]
            if fixer is not None:
                data = fixer(data)
            out.append(head + _I32.pack(len(data)) + data)
            pos += size
        return b"".join(out)

    return fix
