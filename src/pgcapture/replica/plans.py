"""SQL for applying changes to one replica table, prepared once per row shape.

A row shape is the table, the operation, and the columns present in the change's new and old
images (an unchanged TOASTed column is absent from the new image and left alone). For each
shape a ``Plan`` knows its prepared statement, its parameter types (the replica's column
types), and where each parameter comes from in the change.

Runs of changes to a table with the same shape are sent as one statement wherever the result
cannot differ from applying them one by one:

* inserts: ``INSERT ... SELECT unnest($1), unnest($2), ...`` with one binary array per column,
  built from the values' bytes (no decoding); the rows keep their order. Any number of rows
  takes as many parameters as the table has columns, far below the 65,535 bind-parameter limit.
* updates that keep the key, on a table whose only unique index is that key: one
  ``UPDATE ... FROM unnest(...)`` per run; an update of a row already in the run replaces the
  earlier one (same columns, so the later values win anyway).
* deletes by key: one ``DELETE ... USING unnest(...)``.

Everything else goes row by row: changes carrying a text-format value or an array-typed column
(unnest would flatten it), key changes, and tables without a key, matched on the whole old row
(``IS NOT DISTINCT FROM`` on the values' text forms, one row at a time by ctid, like
PostgreSQL's own apply of REPLICA IDENTITY FULL). Every statement must touch exactly the rows
it was built for, or the batch fails.

A text value (``Field.text``: a type without a binary send function, or any column of a
transaction capture read in text, issue 14) is sent as a text-format parameter of the column's
type, so the replica's input function parses it; whether a field is text is part of the row
shape, so binary and text rows of one table get plans of their own and may alternate freely.
Type OIDs are rewritten (``Column.fixer``) in binary values only.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast

from pgcapture.errors import ReplicaError
from pgcapture.replica.catalog import FIRST_NORMAL_OID, Column, Fixer, Table, quote_ident

_ARRAY_HEAD = struct.Struct(">iiIii")
_I32 = struct.Struct(">i")
_NULL: Final = b"\xff\xff\xff\xff"
_names = (b"pgc_%d" % i for i in itertools.count(1))

Kind = Literal["insert", "update", "delete", "update_row", "delete_row"]
# (field name, source type OID, text format) per field of an image
Shape = tuple[tuple[str, int, bool], ...]


class SchemaMismatch(ReplicaError):
    """A change does not fit the replica's table (a column or type differs)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """One prepared statement and how to fill it from a change's value lists.

    ``take`` lists, per parameter, (0 = new image, 1 = old image, index of the field); for
    batched plans the first ``nkey`` of them identify the row. ``fixes`` are (parameter index,
    fixer) for values whose embedded type OIDs must be rewritten.
    """

    kind: Kind
    table: Table
    name: bytes
    sql: bytes
    types: tuple[int, ...]
    take: tuple[tuple[int, int], ...]
    formats: tuple[int, ...] | None
    batched: bool
    nkey: int = 0
    fixes: tuple[tuple[int, Fixer], ...] = ()
    elem_types: tuple[int, ...] = ()
    key_check: tuple[tuple[int, int], ...] = ()  # (old, new) positions of the key's fields
    direct: bool = False  # the parameters are the new image's values as they are

    def moves_key(self, new: list[bytes | None], old: list[bytes | None]) -> bool:
        """Whether this update changes the row's key (then ``key_changes`` plan applies)."""
        return any(new[n] != old[o] for o, n in self.key_check)

    def params(self, new: list[bytes | None], old: list[bytes | None]) -> list[bytes | None]:
        if self.direct:
            return new
        images = (new, old)
        values = [images[image][index] for image, index in self.take]
        for position, fixer in self.fixes:
            value = values[position]
            if value is not None:
                values[position] = fixer(value)
        return values

    def describe(self) -> str:
        what = {"insert": "insert into", "update": "update of", "delete": "delete from"}
        return f"{what.get(self.kind, self.kind.replace('_row', ' of'))} {self.table.label}"


def binary_array(elem_oid: int, values: Sequence[bytes | None]) -> bytes:
    """A one-dimensional array in binary send format, from element values in send format."""
    count = len(values)
    if None in values:
        head = _ARRAY_HEAD.pack(1, 1, elem_oid, count, 1)
        pack = _I32.pack
        return head + b"".join([_NULL if v is None else pack(len(v)) + v for v in values])
    head = _ARRAY_HEAD.pack(1, 0, elem_oid, count, 1)
    present = cast("Sequence[bytes]", values)
    if count and len(set(map(len, present))) == 1:  # fixed width: one length for all
        sep = _I32.pack(len(present[0]))
        return head + sep + sep.join(present)
    pack = _I32.pack
    return head + b"".join([pack(len(v)) + v for v in present])


def _columns(table: Table, shape: Shape, what: str) -> list[Column]:
    out = []
    for name, oid, _text in shape:
        column = table.columns.get(name)
        if column is None:
            raise SchemaMismatch(
                f"the source sends column {name!r} of {table.label}, which the replica's table "
                "does not have: the replica's schema differs from the source's (a DDL statement "
                "was not replayed, or the table was changed on the replica). Make the table "
                "match the source, then restart replicate"
            )
        if oid < FIRST_NORMAL_OID and column.type_oid < FIRST_NORMAL_OID and oid != column.type_oid:
            raise SchemaMismatch(
                f"column {name!r} of {table.label} has type OID {column.type_oid} on the replica "
                f"but the source sends type OID {oid} in its {what}: the column types differ "
                "(an ALTER COLUMN TYPE was not replayed?). Make the table match the source"
            )
        out.append(column)
    return out


def _fixes(
    columns: Sequence[Column], fields: Sequence[tuple[str, int, bool]] | None = None
) -> tuple[tuple[int, Fixer], ...]:
    """The parameters whose binary values carry type OIDs to rewrite; a text value (``fields``
    says which) names no OID and goes to the column type's input function as it is."""
    text = [t for _n, _o, t in fields] if fields is not None else [False] * len(columns)
    return tuple((i, c.fixer) for i, c in enumerate(columns) if c.fixer is not None and not text[i])


def _can_batch(columns: Sequence[Column], shapes: Sequence[Shape]) -> bool:
    return all(not c.is_array and c.array_oid and not c.text_only for c in columns) and not any(
        text for shape in shapes for _n, _o, text in shape
    )


def _formats(fields: Sequence[tuple[str, int, bool]], columns: Sequence[Column]) -> tuple[int, ...]:
    """Per parameter, 0 (text) or 1 (binary). A column type without a binary receive function
    takes text even for NULL: the server looks the function up for every binary parameter."""
    pairs = zip(fields, columns, strict=True)
    return tuple(0 if text or c.text_only else 1 for (_n, _o, text), c in pairs)


def insert_plan(table: Table, new: Shape) -> Plan:
    columns = _columns(table, new, "new row")
    keep = [i for i, c in enumerate(columns) if not c.generated]
    cols = [columns[i] for i in keep]
    target = table.qualified
    if not cols:
        sql = f"INSERT INTO {target} DEFAULT VALUES"
        return Plan("insert", table, next(_names), sql.encode(), (), (), None, False)
    names = ", ".join(quote_ident(c.name) for c in cols)
    overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity_always for c in cols) else ""
    take = tuple((0, i) for i in keep)
    fields = [new[i] for i in keep]
    if _can_batch(cols, [tuple(fields)]):
        values = ", ".join(f"unnest(${n})" for n in range(1, len(cols) + 1))
        sql = f"INSERT INTO {target} ({names}){overriding} SELECT {values}"
        fixes = _fixes(cols)
        direct = not fixes and take == tuple((0, i) for i in range(len(new)))
        return Plan(
            "insert", table, next(_names), sql.encode(), tuple(c.array_oid for c in cols),
            take, None, True, fixes=fixes, elem_types=tuple(c.type_oid for c in cols),
            direct=direct,
        )  # fmt: skip
    values = ", ".join(f"${n}" for n in range(1, len(cols) + 1))
    sql = f"INSERT INTO {target} ({names}){overriding} VALUES ({values})"
    return Plan(
        "insert", table, next(_names), sql.encode(), tuple(c.type_oid for c in cols),
        take, _formats(fields, cols), False, fixes=_fixes(cols, fields),
    )  # fmt: skip


def _key_positions(table: Table, shape: Shape, what: str) -> list[int]:
    names = [name for name, _o, _t in shape]
    try:
        return [names.index(k) for k in table.key]
    except ValueError:
        missing = [k for k in table.key if k not in names]
        raise SchemaMismatch(
            f"the {what} of a change to {table.label} lacks key column(s) "
            f"{', '.join(map(repr, missing))} of the replica's key ({', '.join(table.key)}): "
            "the replica's primary key or replica identity differs from the source's"
        ) from None


def update_plan(table: Table, new: Shape, old: Shape, key_changes: bool) -> Plan:
    """An update matched on the key (from the old image when there is one), setting the new
    image's columns. ``key_changes``: the key itself moves, so it is set too (row by row)."""
    if not table.key:
        return _full_row_plan("update_row", table, new, old)
    new_cols = _columns(table, new, "new row")
    key_image, key_shape = (1, old) if old else (0, new)
    key_pos = _key_positions(table, key_shape, "old key" if old else "new row")
    key_cols = [table.columns[k] for k in table.key]
    set_idx = [
        i for i, c in enumerate(new_cols)
        if not c.generated and not c.identity_always and (key_changes or c.name not in table.key)
    ]  # fmt: skip
    set_cols = [new_cols[i] for i in set_idx]
    target = table.qualified
    take = tuple((key_image, i) for i in key_pos) + tuple((0, i) for i in set_idx)
    all_cols = key_cols + set_cols
    fields = [key_shape[i] for i in key_pos] + [new[i] for i in set_idx]
    nkey = len(key_cols)
    key_check: tuple[tuple[int, int], ...] = ()
    if old and not key_changes:
        new_index = {name: i for i, (name, _o, _t) in enumerate(new)}
        key_check = tuple((i, new_index[old[i][0]]) for i in key_pos if old[i][0] in new_index)
    if not key_changes and not table.other_unique and _can_batch(all_cols, [tuple(fields)]):
        aliases = [f"p{n}" for n in range(1, len(all_cols) + 1)]
        sets = (
            ", ".join(
                f"{quote_ident(c.name)} = v.{a}"
                for c, a in zip(set_cols, aliases[nkey:], strict=True)
            )
            or f"{quote_ident(key_cols[0].name)} = t.{quote_ident(key_cols[0].name)}"
        )
        source = ", ".join(f"unnest(${n}) AS {a}" for n, a in enumerate(aliases, 1))
        match = " AND ".join(
            f"t.{quote_ident(c.name)} = v.{a}" for c, a in zip(key_cols, aliases, strict=False)
        )
        sql = f"UPDATE ONLY {target} AS t SET {sets} FROM (SELECT {source}) AS v WHERE {match}"
        return Plan(
            "update", table, next(_names), sql.encode(), tuple(c.array_oid for c in all_cols),
            take, None, True, nkey, _fixes(all_cols), tuple(c.type_oid for c in all_cols),
            key_check,
        )  # fmt: skip
    n_set = len(set_cols)
    sets = (
        ", ".join(f"{quote_ident(c.name)} = ${n}" for n, c in enumerate(set_cols, nkey + 1))
        or f"{quote_ident(key_cols[0].name)} = {quote_ident(key_cols[0].name)}"
    )
    match = " AND ".join(f"{quote_ident(c.name)} = ${n}" for n, c in enumerate(key_cols, 1))
    sql = f"UPDATE ONLY {target} SET {sets} WHERE {match}"
    assert len(take) == nkey + n_set
    return Plan(
        "update_row", table, next(_names), sql.encode(), tuple(c.type_oid for c in all_cols),
        take, _formats(fields, all_cols), False, nkey, _fixes(all_cols, fields),
        key_check=key_check,
    )  # fmt: skip


def delete_plan(table: Table, old: Shape) -> Plan:
    if not table.key:
        return _full_row_plan("delete_row", table, (), old)
    key_pos = _key_positions(table, old, "old key")
    key_cols = [table.columns[k] for k in table.key]
    _columns(table, tuple(old[i] for i in key_pos), "old key")
    fields = [old[i] for i in key_pos]
    take = tuple((1, i) for i in key_pos)
    target = table.qualified
    if _can_batch(key_cols, [tuple(fields)]):
        aliases = [f"p{n}" for n in range(1, len(key_cols) + 1)]
        source = ", ".join(f"unnest(${n}) AS {a}" for n, a in enumerate(aliases, 1))
        match = " AND ".join(
            f"t.{quote_ident(c.name)} = v.{a}" for c, a in zip(key_cols, aliases, strict=True)
        )
        sql = f"DELETE FROM ONLY {target} AS t USING (SELECT {source}) AS v WHERE {match}"
        return Plan(
            "delete", table, next(_names), sql.encode(), tuple(c.array_oid for c in key_cols),
            take, None, True, len(key_cols), _fixes(key_cols),
            tuple(c.type_oid for c in key_cols),
        )  # fmt: skip
    match = " AND ".join(f"{quote_ident(c.name)} = ${n}" for n, c in enumerate(key_cols, 1))
    sql = f"DELETE FROM ONLY {target} WHERE {match}"
    return Plan(
        "delete_row", table, next(_names), sql.encode(), tuple(c.type_oid for c in key_cols),
        take, _formats(fields, key_cols), False, len(key_cols), _fixes(key_cols, fields),
    )  # fmt: skip


def _full_row_plan(kind: Kind, table: Table, new: Shape, old: Shape) -> Plan:
    """A change to a table without a key: find one row equal to the whole old image."""
    if not old:
        raise SchemaMismatch(
            f"{table.label} has no primary key or replica identity index on the replica, and "
            "the change carries no old row to find the row by: give the table a primary key, "
            "or set REPLICA IDENTITY FULL on the source table"
        )
    old_cols = _columns(table, old, "old row")
    set_idx: list[int] = []
    set_cols: list[Column] = []
    if kind == "update_row":
        new_cols = _columns(table, new, "new row")
        set_idx = [i for i, c in enumerate(new_cols) if not c.generated and not c.identity_always]
        set_cols = [new_cols[i] for i in set_idx]
    target = table.qualified
    n_set = len(set_cols)
    match = " AND ".join(
        f"{quote_ident(c.name)}::text IS NOT DISTINCT FROM ${n}::text"
        for n, c in enumerate(old_cols, n_set + 1)
    )
    locate = f"ctid = (SELECT ctid FROM ONLY {target} WHERE {match} LIMIT 1)"
    if kind == "update_row":
        sets = ", ".join(f"{quote_ident(c.name)} = ${n}" for n, c in enumerate(set_cols, 1))
        if not sets:
            first = old_cols[0].name
            sets = f"{quote_ident(first)} = {quote_ident(first)}"
        sql = f"UPDATE ONLY {target} SET {sets} WHERE {locate}"
    else:
        sql = f"DELETE FROM ONLY {target} WHERE {locate}"
    take = tuple((0, i) for i in set_idx) + tuple((1, i) for i in range(len(old)))
    all_cols = set_cols + old_cols
    fields = [new[i] for i in set_idx] + list(old)
    return Plan(
        kind, table, next(_names), sql.encode(), tuple(c.type_oid for c in all_cols), take,
        _formats(fields, all_cols), False, 0, _fixes(all_cols, fields),
    )  # fmt: skip
