"""A randomized source workload for replica tests, and a table-by-table comparison of two databases
(imported by plain name, as pytest puts this folder on ``sys.path``).

``Workload`` runs against a source database while capture runs: it creates its schema through DDL
(so a replica that starts empty gets it from the stream), then several clients run many small
transactions at once, pgbench initialises and runs its TPC-B tables next to them, and a last
transaction writes a marker row into ``done``. Every statement carries its values as literals, so
a logged statement is exactly what ran. The generator tracks the schema it made, so each statement
is valid when it runs: a transaction with DDL runs alone (the other clients wait for it), and the
schema it changed is kept only when it commits.

What it covers:

* keys: int, composite, text with quotes and mixed-case names ("Order Items"), a replica identity
  that is a unique index other than the primary key, tables without a key under REPLICA IDENTITY
  FULL (equal rows, NULLs); key changes (id + 100000) and key swaps within a transaction;
* TOAST: updates that leave a 10 kB out-of-line value as it is, with a key and under FULL;
* identity columns (ALWAYS, BY DEFAULT, OVERRIDING SYSTEM VALUE), a stored generated column that
  becomes an ordinary one, a partitioned table (rows move between partitions, a default partition
  is added), a foreign key with ON DELETE/UPDATE CASCADE, a trigger writing another table;
* types: enum (values added while in use), enum arrays (two dimensions, bounds other than 1), a
  composite holding an enum (attributes added and dropped while in use) and arrays of it, a
  domain, a range over the enum, jsonb, numeric (NaN, infinities), float8 (NaN, -0), timestamptz
  (infinity), interval, inet, bytea, uuid, text with quotes, backslashes and non-ASCII;
* TRUNCATE of one or several tables, RESTART IDENTITY, CASCADE, of a partition; bulk statements of
  hundreds of rows; savepoints rolled back or released; PREPARE TRANSACTION with COMMIT PREPARED or
  ROLLBACK PREPARED;
* DDL, also with DML before and after it in the same transaction and in one query string: ADD
  COLUMN (with defaults, two at once), DROP COLUMN, RENAME COLUMN, ALTER COLUMN TYPE (int to bigint,
  varchar(10) to text, numeric(12,2) to numeric, keys included), SET/DROP DEFAULT, CREATE TABLE
  (rows in the same transaction; under a dropped table's name), CREATE TABLE AS and SELECT INTO,
  RENAME TO, SET SCHEMA, DROP TABLE, CREATE INDEX (expressions), CREATE/DROP INDEX CONCURRENTLY,
  ALTER TYPE ... ADD VALUE / ADD ATTRIBUTE / DROP ATTRIBUTE, DDL rolled back to a savepoint; names
  resolved through ``search_path``, with a table of schema app named like one of public.

``assert_same_tables`` compares two databases: the tables of the given schemas, their columns,
indexes, partition bounds and replica identities, the labels of their enums, and the full contents
of every table as a multiset of rows (tables without a key and duplicate rows compare correctly).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgcapture.local.postgres import find_postgres_bin

SOAK = os.environ.get("PGCAPTURE_SOAK") == "1"
"""A longer run: PGCAPTURE_SOAK=1 multiplies the workload's sizes."""

CLIENTS = 3
TRANSACTIONS = 2000 if SOAK else 300
"""Transactions per client."""
PGBENCH_SCALE = 1
PGBENCH_TRANSACTIONS = 3000 if SOAK else 300
"""Transactions per pgbench client (two clients)."""
KEYS = 150
"""Keys per client and table: small enough that most changes hit existing rows."""
BIG = 10_000
"""Characters of a TOASTed text value."""

RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.ForeignKeyViolation,
    psycopg.errors.SerializationFailure,
    psycopg.errors.LockNotAvailable,
)
"""Errors of concurrent transactions: the transaction rolls back and the workload goes on."""

# --- values ----------------------------------------------------------------------------------

TYPES = {
    "int": "int",
    "bigint": "bigint",
    "text": "text",
    "varchar": "varchar(10)",
    "numeric": "numeric(12,2)",
    "decimal": "numeric",
    "float": "float8",
    "jsonb": "jsonb",
    "ts": "timestamptz",
    "bytea": "bytea",
    "mood": "mood",
    "moods": "mood[]",
    "pair": "pair",
    "texts": "text[]",
    "bool": "boolean",
    "date": "date",
    "uuid": "uuid",
    "big": "text",
    "pairs": "pair[]",
    "posint": "posint",
    "moodrange": "moodrange",
    "interval": "interval",
    "inet": "inet",
}
"""Generator kinds and the SQL type of each (DDL spells user types unqualified, on purpose)."""

NEW_COLUMN_KINDS = [k for k in TYPES if k != "big"]
NO_DEFAULT = {"pair", "pairs"}
"""Kinds never given a DEFAULT: a stored ROW(...)::pair would break when pair changes."""
PAIR_KINDS = ["int", "text", "mood", "moods", "bigint", "bool", "numeric"]
"""Kinds of the attributes ALTER TYPE pair ADD ATTRIBUTE adds."""

WIDER = {"int": "bigint", "varchar": "text", "numeric": "decimal"}
"""ALTER COLUMN ... TYPE changes the workload makes."""

_ODD = "'\"\\;,(){}[] \t\n%_$é中😀"
_TEXT = string.ascii_letters + string.digits + "    " + _ODD


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def text_lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def random_text(rng: random.Random, max_len: int = 24) -> str:
    return "".join(rng.choices(_TEXT, k=rng.randint(0, max_len)))


def big_text(rng: random.Random) -> str:
    """Random letters: pglz gains nothing on them, so the value is stored out of line."""
    return "".join(rng.choices(string.ascii_letters + string.digits, k=BIG))


def _json(rng: random.Random, depth: int = 0) -> object:
    pick = rng.random()
    if depth < 2 and pick < 0.3:
        return {random_text(rng, 6): _json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 2 and pick < 0.45:
        return [_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice(
        [
            None,
            True,
            False,
            rng.randint(-(10**12), 10**12),
            rng.uniform(-1e6, 1e6),
            random_text(rng, 12),
            "1.50",
            1.5e300,
        ]
    )


def _labels(labels: Sequence[str]) -> str:
    """An array literal's items: labels may hold spaces."""
    return ",".join('"' + label + '"' for label in labels)


def value(kind: str, rng: random.Random, s: Schema, nulls: float = 0.1) -> str:
    """A random SQL literal of ``kind`` for schema ``s``: NULL with probability ``nulls``."""
    if rng.random() < nulls:
        return "NULL"
    moods = s.moods
    if kind == "int":
        return str(rng.choice([rng.randint(-1000, 1000), rng.randint(-(2**31), 2**31 - 1)]))
    if kind == "bigint":
        return str(rng.choice([rng.randint(-1000, 1000), rng.randint(-(2**63), 2**63 - 1)]))
    if kind == "posint":
        return str(rng.choice([1, rng.randint(1, 2**31 - 1)]))
    if kind == "text":
        return text_lit(random_text(rng))
    if kind == "varchar":
        return text_lit(random_text(rng, 10))
    if kind == "big":
        return text_lit(big_text(rng))
    if kind == "numeric":
        return f"{rng.randint(-(10**9), 10**9)}.{rng.randrange(100):02d}"
    if kind == "decimal":
        return rng.choice(
            [
                f"{rng.randint(-(10**30), 10**30)}.{rng.randrange(10**12):012d}",
                str(rng.randint(-5, 5)),
                "'NaN'::numeric",
                "'Infinity'::numeric",
                "'-Infinity'::numeric",
                "0.000000000000000000001",
            ]
        )
    if kind == "float":
        special = ["'NaN'::float8", "'Infinity'::float8", "'-Infinity'::float8", "'-0'::float8"]
        if rng.random() < 0.15:
            return rng.choice(special)
        return repr(rng.choice([rng.uniform(-1e6, 1e6), 0.1, 1e-300, 123456789.123456789]))
    if kind == "jsonb":
        return text_lit(json.dumps(_json(rng))) + "::jsonb"
    if kind == "ts":
        if rng.random() < 0.05:
            return rng.choice(["'infinity'::timestamptz", "'-infinity'::timestamptz"])
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            microseconds=rng.randrange(80 * 365 * 86400 * 10**6)
        )
        offset = rng.choice(["+00", "+05:30", "-08", "+14"])
        return text_lit(moment.strftime("%Y-%m-%d %H:%M:%S.%f") + offset) + "::timestamptz"
    if kind == "bytea":
        size = rng.choice([0, 1, 16, 40, 3000])
        return f"'\\x{rng.randbytes(size).hex()}'::bytea"
    if kind == "mood":
        return text_lit(rng.choice(moods)) + "::public.mood"
    if kind == "moods":
        shape = rng.random()
        if shape < 0.15:  # two dimensions
            width = rng.randint(1, 3)
            rows = [_labels(rng.choices(moods, k=width)) for _ in range(rng.randint(1, 3))]
            return text_lit("{" + ",".join("{" + r + "}" for r in rows) + "}") + "::public.mood[]"
        if shape < 0.3:  # bounds other than 1
            items = rng.choices(moods, k=rng.randint(1, 3))
            low = rng.randint(-3, 3)
            bounds = f"[{low}:{low + len(items) - 1}]="
            return text_lit(bounds + "{" + _labels(items) + "}") + "::public.mood[]"
        items = [text_lit(m) for m in rng.choices(moods, k=rng.randint(0, 4))]
        if items and rng.random() < 0.3:
            items[0] = "NULL"
        return f"ARRAY[{', '.join(items)}]::public.mood[]"
    if kind == "pair":
        fields = ", ".join(value(k, rng, s) for _, k in s.pair)
        return f"ROW({fields})::public.pair"
    if kind == "pairs":
        items = [value("pair", rng, s, 0.2) for _ in range(rng.randint(0, 3))]
        return f"ARRAY[{', '.join(items)}]::public.pair[]"
    if kind == "moodrange":
        if rng.random() < 0.1:
            return "'empty'::public.moodrange"
        low, high = sorted(rng.choices(range(len(moods)), k=2))
        bounds = rng.choice(["[)", "[]", "(]"]) if low < high else "[]"
        lo, hi = text_lit(moods[low]), text_lit(moods[high])
        return f"public.moodrange({lo}, {hi}, '{bounds}')"
    if kind == "interval":
        y, mo, d = rng.randint(-3, 3), rng.randint(-11, 11), rng.randint(-40, 40)
        h, mi, sec = rng.randint(-30, 30), rng.randint(0, 59), rng.randrange(60_000_000)
        text = f"{y} years {mo} mons {d} days {h} hours {mi} mins {sec / 1e6:.6f} secs"
        return text_lit(text) + "::interval"
    if kind == "inet":
        if rng.random() < 0.5:
            octets = ".".join(str(rng.randrange(256)) for _ in range(4))
            return text_lit(f"{octets}/{rng.randint(8, 32)}") + "::inet"
        groups = ":".join(f"{rng.randrange(65536):x}" for _ in range(8))
        return text_lit(f"{groups}/{rng.randint(16, 128)}") + "::inet"
    if kind == "texts":
        items = [value("text", rng, s, nulls=0.2) for _ in range(rng.randint(0, 4))]
        return f"ARRAY[{', '.join(items)}]::text[]"
    if kind == "bool":
        return rng.choice(["true", "false"])
    if kind == "date":
        return text_lit(str(datetime(2000, 1, 1).date() + timedelta(rng.randint(-9000, 9000))))
    if kind == "uuid":
        return text_lit(str(uuid.UUID(bytes=rng.randbytes(16)))) + "::uuid"
    raise AssertionError(f"unknown kind {kind}")


# --- schema ----------------------------------------------------------------------------------


@dataclass
class Column:
    name: str
    kind: str
    role: str = ""
    """What the generator uses the column for ("" is a plain value column). A column with a
    role is never dropped; its name may change."""
    retype: bool = True


@dataclass
class Table:
    schema: str
    name: str
    style: str
    columns: list[Column]
    created: bool = False
    """Made during the workload, so it may also be dropped."""

    @property
    def ref(self) -> str:
        return f"{ident(self.schema)}.{ident(self.name)}"

    def col(self, role: str) -> str:
        return ident(next(c.name for c in self.columns if c.role == role))

    def plain(self) -> list[Column]:
        return [c for c in self.columns if not c.role]


@dataclass
class Schema:
    tables: list[Table]
    moods: list[str] = field(default_factory=lambda: ["sad", "ok", "happy"])
    """The labels of enum mood, in their sort order (ADD VALUE appends)."""
    pair: list[tuple[str, str]] = field(
        default_factory=lambda: [("a", "int"), ("b", "text"), ("m", "mood")]
    )
    """The attributes of composite type pair, and their kinds."""
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """Tables dropped during the workload: a new table may take a name again."""
    two_phase: bool = False
    """The source allows PREPARE TRANSACTION."""
    regions: int = 100
    """Values of ``measurements.region`` that have a partition: 150 once the default exists."""
    counter: int = 0

    def next(self) -> int:
        self.counter += 1
        return self.counter

    def table(self, schema: str, name: str) -> Table:
        return next(t for t in self.tables if (t.schema, t.name) == (schema, name))


def _cols(spec: str, role: str = "") -> list[Column]:
    """Columns from "name:kind name:kind"; a kind ending in '!' gets ``role`` = name."""
    out = []
    for item in spec.split():
        name, kind = item.rsplit(":", 1)
        keyed = kind.endswith("!")
        kind = kind.rstrip("!")
        out.append(Column(name, kind, role=name if keyed else role))
    return out


SETUP = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE pair AS (a int, b text, m mood)",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE TYPE moodrange AS RANGE (subtype = mood)",
    "CREATE SCHEMA app",
    "CREATE TABLE accounts (id int PRIMARY KEY, name varchar(10), balance numeric(12,2), "
    "mood mood, moods mood[], meta jsonb, created timestamptz, blob bytea, score float8, "
    "pair pair, tags text[], flag boolean, day date, uid uuid, pairs pair[])",
    'CREATE TABLE "Order Items" ("Order Id" int, "Line No" int, "Qty" int, "Note" text, '
    'PRIMARY KEY ("Order Id", "Line No"))',
    # A trigger that writes another table on the source; the replica must not run it again.
    "CREATE TABLE audit (op text, tbl text, item jsonb)",
    "CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
    "  IF TG_OP = 'DELETE' THEN\n"
    "    INSERT INTO public.audit VALUES (TG_OP, TG_TABLE_NAME, to_jsonb(OLD));\n"
    "  ELSE\n"
    "    INSERT INTO public.audit VALUES (TG_OP, TG_TABLE_NAME, to_jsonb(NEW));\n"
    "  END IF;\n  RETURN NULL;\nEND\n$$",
    'CREATE TRIGGER order_items_audit AFTER INSERT OR UPDATE OR DELETE ON "Order Items" '
    "FOR EACH ROW EXECUTE FUNCTION audit_row()",
    # The replica identity is a unique index that is not the primary key.
    "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, score posint, "
    "span moodrange, addr inet, wait interval)",
    "CREATE UNIQUE INDEX users_email ON users (email)",
    "ALTER TABLE users REPLICA IDENTITY USING INDEX users_email",
    # A foreign key with cascades: the source sends the cascaded changes, the replica must not
    # cascade them again (nor check the key while a transaction is half applied).
    "CREATE TABLE orders (id int PRIMARY KEY, total numeric(12,2), note text)",
    "CREATE TABLE order_lines (order_id int REFERENCES orders ON DELETE CASCADE "
    "ON UPDATE CASCADE, n int, qty int, PRIMARY KEY (order_id, n))",
    'CREATE TABLE "Tags" ("Name" text PRIMARY KEY, weight float8, "Pair" pair, labels text[])',
    "CREATE TABLE events (kind text, payload text, n int, at timestamptz, moods mood[], "
    "price numeric(12,2))",
    "ALTER TABLE events REPLICA IDENTITY FULL",
    "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, version int)",
    "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
    "CREATE TABLE docs_full (k int, body text, v int, note varchar(10))",
    "ALTER TABLE docs_full REPLICA IDENTITY FULL",
    "CREATE TABLE ids_always (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, "
    "vlen int GENERATED ALWAYS AS (length(v)) STORED, extra int)",
    "CREATE TABLE ids_default (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v int, "
    "w numeric)",
    "CREATE TABLE measurements (id int, region int, value numeric, at timestamptz, "
    "PRIMARY KEY (id, region)) PARTITION BY RANGE (region)",
    "CREATE TABLE measurements_low PARTITION OF measurements FOR VALUES FROM (0) TO (50)",
    "CREATE TABLE measurements_high PARTITION OF measurements FOR VALUES FROM (50) TO (100)",
    # A table of schema app named like one of public, made through search_path: a replica that
    # ignores the logged search_path changes the wrong table.
    "SET search_path = app, public",
    "CREATE TABLE accounts (id int PRIMARY KEY, note text, mood mood)",
    "RESET search_path",
    "CREATE TABLE done (token text PRIMARY KEY)",
)
"""The starting schema, created through DDL while capture runs."""


def initial_schema() -> Schema:
    accounts = _cols(
        "name:varchar balance:numeric mood:mood moods:moods meta:jsonb created:ts blob:bytea "
        "score:float pair:pair tags:texts flag:bool day:date uid:uuid pairs:pairs"
    )
    return Schema(
        [
            Table("public", "accounts", "int_key", [Column("id", "int", "id"), *accounts]),
            Table(
                "public",
                "Order Items",
                "composite",
                [
                    Column("Order Id", "int", "order"),
                    Column("Line No", "int", "line"),
                    *_cols("Qty:int Note:text"),
                ],
            ),
            Table(
                "public",
                "Tags",
                "text_key",
                [Column("Name", "text", "name"), *_cols("weight:float Pair:pair labels:texts")],
            ),
            Table(
                "public",
                "events",
                "keyless",
                [
                    Column("kind", "text", "kind", retype=False),
                    Column("payload", "text"),
                    Column("n", "int", "n"),
                    *_cols("at:ts moods:moods price:numeric"),
                ],
            ),
            Table(
                "public",
                "docs",
                "toast_key",
                [
                    Column("id", "int", "id"),
                    Column("title", "text"),
                    Column("body", "big", "body", retype=False),
                    Column("version", "int", "version"),
                ],
            ),
            Table(
                "public",
                "docs_full",
                "toast_full",
                [
                    Column("k", "int", "k", retype=False),
                    Column("body", "big", "body", retype=False),
                    Column("v", "int", "v"),
                    Column("note", "varchar"),
                ],
            ),
            Table(
                "public",
                "ids_always",
                "identity_always",
                [
                    Column("id", "int", "id", retype=False),
                    Column("v", "text", "v", retype=False),
                    Column("vlen", "int", "generated", retype=False),
                    Column("extra", "int"),
                ],
            ),
            Table(
                "public",
                "ids_default",
                "identity_default",
                [Column("id", "bigint", "id", retype=False), *_cols("v:int w:decimal")],
            ),
            Table(
                "public",
                "measurements",
                "partitioned",
                [
                    Column("id", "int", "id", retype=False),
                    Column("region", "int", "region", retype=False),
                    Column("value", "decimal"),
                    Column("at", "ts"),
                ],
            ),
            Table(
                "app",
                "accounts",
                "int_key",
                [Column("id", "int", "id"), *_cols("note:text mood:mood")],
            ),
            Table(
                "public",
                "users",
                "ident_index",
                [
                    Column("id", "int", "id"),
                    Column("email", "text", "email", retype=False),
                    *_cols("name:text score:posint span:moodrange addr:inet wait:interval"),
                ],
            ),
            Table(
                "public",
                "orders",
                "fk_parent",
                [Column("id", "int", "id", retype=False), *_cols("total:numeric note:text")],
            ),
            Table(
                "public",
                "order_lines",
                "fk_child",
                [
                    Column("order_id", "int", "order", retype=False),
                    Column("n", "int", "line", retype=False),
                    Column("qty", "int"),
                ],
            ),
        ]
    )


# --- transactions ----------------------------------------------------------------------------


class Gen:
    """Statements of one client's transactions, valid for ``schema``."""

    def __init__(self, schema: Schema, rng: random.Random, client: int) -> None:
        self.s = schema
        self.rng = rng
        self.client = client

    def val(self, kind: str, nulls: float = 0.1) -> str:
        return value(kind, self.rng, self.s, nulls)

    def key(self) -> int:
        return self.client * 1000 + self.rng.randrange(KEYS)

    def assignments(self, t: Table, most: int = 3) -> str | None:
        cols = t.plain()
        if not cols:
            return None
        chosen = self.rng.sample(cols, self.rng.randint(1, min(most, len(cols))))
        return ", ".join(f"{ident(c.name)} = {self.val(c.kind)}" for c in chosen)

    def row_change(self, t: Table) -> list[str]:
        style: Callable[[Table], list[str]] = getattr(self, "_" + t.style)
        return style(t)

    def _insert(
        self, t: Table, fixed: dict[str, str], rows: int = 1, copies: int = 1
    ) -> tuple[str, list[str]]:
        """``INSERT INTO t (fixed..., some plain columns) VALUES ...`` without a conflict
        clause, and the plain columns it sets; ``copies`` repeats each row."""
        plain = [c for c in t.plain() if self.rng.random() < 0.8]
        if not fixed and not plain:
            plain = t.plain()[:1]
        names = [*fixed, *(ident(c.name) for c in plain)]
        values = []
        for _ in range(rows):
            row = [*fixed.values(), *(self.val(c.kind) for c in plain)]
            values += ["(" + ", ".join(row) + ")"] * copies
        head = f"INSERT INTO {t.ref} ({', '.join(names)}) VALUES {', '.join(values)}"
        return head, [ident(c.name) for c in plain]

    def _shift(self, t: Table, col: str, k: int, where: str = "") -> str:
        """A key change: ``col`` moves by 100000 one way or the other, when the target is free."""
        shift = 100_000 if self.rng.random() < 0.6 else -100_000
        old = k if shift > 0 else k + 100_000
        return (
            f"UPDATE {t.ref} SET {col} = {col} + {shift} WHERE {col} = {old}{where} AND NOT EXISTS "
            f"(SELECT 1 FROM {t.ref} o WHERE o.{col} = {old + shift}"
            + where.replace(" AND ", " AND o.")
            + ")"
        )

    def _int_key(self, t: Table) -> list[str]:
        r, k, ref, id_ = self.rng.random(), self.key(), t.ref, t.col("id")
        if r < 0.35:
            head, plain = self._insert(t, {id_: str(k)})
            if plain and self.rng.random() < 0.6:
                sets = ", ".join(f"{c} = excluded.{c}" for c in plain)
                return [f"{head} ON CONFLICT ({id_}) DO UPDATE SET {sets}"]
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.45:
            ks = sorted({self.key() for _ in range(self.rng.randint(2, 6))})
            rows = ", ".join(f"({x})" for x in ks)
            return [f"INSERT INTO {ref} ({id_}) VALUES {rows} ON CONFLICT DO NOTHING"]
        if r < 0.65:
            sets = self.assignments(t) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {id_} = {k}"]
        if r < 0.72:
            sets = self.assignments(t, 1) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {id_} BETWEEN {k} AND {k + 15}"]
        if r < 0.84:
            return [f"DELETE FROM {ref} WHERE {id_} = {k}"]
        if r < 0.91:
            return [self._shift(t, id_, k)]
        if r < 0.96:  # two rows swap keys through a third value, in one transaction
            tmp, other = -(self.client * 1000 + 999), self.key()
            return [
                f"UPDATE {ref} SET {id_} = {tmp} WHERE {id_} = {k}",
                f"UPDATE {ref} SET {id_} = {k} WHERE {id_} = {other}",
                f"UPDATE {ref} SET {id_} = {other} WHERE {id_} = {tmp}",
            ]
        return [f"UPDATE {ref} SET {id_} = {id_} WHERE {id_} = {k}"]

    def _composite(self, t: Table) -> list[str]:
        r, ref = self.rng.random(), t.ref
        o, line = t.col("order"), t.col("line")
        ok, lk = self.client * 1000 + self.rng.randrange(40), self.rng.randint(1, 6)
        if r < 0.4:
            head, _ = self._insert(t, {o: str(ok), line: str(lk)})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.6:
            sets = self.assignments(t) or f"{o} = {o}"
            return [f"UPDATE {ref} SET {sets} WHERE {o} = {ok}"]
        if r < 0.75:
            return [f"DELETE FROM {ref} WHERE {o} = {ok} AND {line} = {lk}"]
        if r < 0.88:  # one column of the key changes
            return [self._shift(t, o, ok, f" AND {line} = {lk}")]
        return [  # the other one, for every line of an order
            f"UPDATE {ref} SET {line} = {line} + 100 WHERE {o} = {ok} AND {line} < 100 "
            f"AND NOT EXISTS (SELECT 1 FROM {ref} x WHERE x.{o} = {ok} AND x.{line} >= 100)"
        ]

    def _text_key(self, t: Table) -> list[str]:
        r, ref, name = self.rng.random(), t.ref, t.col("name")
        suffixes = ["", " 'q'", ' "dq"', " ü中", " \\b", "\ttab", " ,;()"]

        def key() -> str:
            n = self.rng.randrange(KEYS)
            return text_lit(f"c{self.client}/{n}{suffixes[n % len(suffixes)]}")

        k = key()
        if r < 0.4:
            head, plain = self._insert(t, {name: k})
            if plain:
                sets = ", ".join(f"{c} = excluded.{c}" for c in plain)
                return [f"{head} ON CONFLICT ({name}) DO UPDATE SET {sets}"]
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.65:
            sets = self.assignments(t) or f"{name} = {name}"
            return [f"UPDATE {ref} SET {sets} WHERE {name} = {k}"]
        if r < 0.8:
            return [f"DELETE FROM {ref} WHERE {name} = {k}"]
        new = key()
        return [
            f"UPDATE {ref} SET {name} = {new} WHERE {name} = {k} AND NOT EXISTS "
            f"(SELECT 1 FROM {ref} x WHERE x.{name} = {new})"
        ]

    def _keyless(self, t: Table) -> list[str]:
        r, ref, kind, n = self.rng.random(), t.ref, t.col("kind"), t.col("n")
        k = text_lit(f"c{self.client}k{self.rng.randrange(12)}")
        one = f"(SELECT ctid FROM {ref} WHERE {kind} = {k} LIMIT 1)"
        if r < 0.35:  # sometimes the same row two or three times
            copies = self.rng.choice([1, 1, 2, 3])
            head, _ = self._insert(t, {kind: k, n: self.val("int", 0.3)}, copies=copies)
            return [head]
        if r < 0.42:
            head, _ = self._insert(t, {kind: "NULL", n: "NULL"})
            return [head]
        if r < 0.52:
            return [f"UPDATE {ref} SET {n} = coalesce({n}, 0) + 1 WHERE {kind} = {k}"]
        if r < 0.64:  # one of several equal rows
            sets = self.assignments(t, 2) or f"{n} = NULL"
            return [f"UPDATE {ref} SET {sets} WHERE ctid = {one}"]
        if r < 0.74:
            return [f"DELETE FROM {ref} WHERE ctid = {one}"]
        if r < 0.8:
            return [f"DELETE FROM {ref} WHERE {kind} = {k} AND ({n} IS NULL OR {n} % 2 = 0)"]
        if r < 0.86:
            nul = f"(SELECT ctid FROM {ref} WHERE {kind} IS NULL LIMIT 1)"
            return [f"UPDATE {ref} SET {kind} = {k} WHERE ctid = {nul}"]
        if r < 0.92:  # an update that changes nothing
            return [f"UPDATE {ref} SET {kind} = {kind} WHERE {kind} = {k}"]
        return [
            f"DELETE FROM {ref} WHERE ctid = (SELECT ctid FROM {ref} WHERE {kind} IS NULL LIMIT 1)"
        ]

    def _toast_key(self, t: Table) -> list[str]:
        r, ref, k = self.rng.random(), t.ref, self.key()
        id_, body, version = t.col("id"), t.col("body"), t.col("version")
        if r < 0.25:
            head, _ = self._insert(t, {id_: str(k), body: self.val("big", 0.05), version: "1"})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.55:  # the TOASTed body stays as it is
            sets = self.assignments(t, 2)
            extra = f", {sets}" if sets else ""
            return [f"UPDATE {ref} SET {version} = {version} + 1{extra} WHERE {id_} = {k}"]
        if r < 0.65:
            return [f"UPDATE {ref} SET {body} = {self.val('big', 0.1)} WHERE {id_} = {k}"]
        if r < 0.75:
            return [f"DELETE FROM {ref} WHERE {id_} = {k}"]
        if r < 0.9:  # a key change that leaves the TOASTed body as it is
            return [self._shift(t, id_, k)]
        return [f"UPDATE {ref} SET {version} = {version} + 1 WHERE {id_} BETWEEN {k} AND {k + 10}"]

    def _toast_full(self, t: Table) -> list[str]:
        r, ref = self.rng.random(), t.ref
        kc, body, v = t.col("k"), t.col("body"), t.col("v")
        k = self.client * 1000 + self.rng.randrange(40)
        if r < 0.3:
            head, _ = self._insert(t, {kc: str(k), body: self.val("big", 0.05)})
            return [head]
        if r < 0.65:  # the TOASTed body stays as it is; the old row carries every column
            return [f"UPDATE {ref} SET {v} = coalesce({v}, 0) + 1 WHERE {kc} = {k}"]
        if r < 0.72:
            sets = self.assignments(t, 2) or f"{v} = NULL"
            return [f"UPDATE {ref} SET {sets} WHERE {kc} = {k}"]
        if r < 0.8:
            return [f"UPDATE {ref} SET {body} = {self.val('big', 0.1)} WHERE {kc} = {k}"]
        if r < 0.9:
            one = f"(SELECT ctid FROM {ref} WHERE {kc} = {k} LIMIT 1)"
            return [f"DELETE FROM {ref} WHERE ctid = {one}"]
        return [f"DELETE FROM {ref} WHERE {kc} = {k}"]

    def _ident_index(self, t: Table) -> list[str]:
        """The replica identity is the unique index on email, not the primary key."""
        r, ref, k = self.rng.random(), t.ref, self.key()
        id_, email = t.col("id"), t.col("email")
        if r < 0.35:
            head, _ = self._insert(t, {id_: str(k), email: text_lit(f"c{self.client}-{k}@x.org")})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.55:
            sets = self.assignments(t) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {id_} = {k}"]
        if r < 0.7:  # the identity changes
            tail = text_lit(f"+{self.rng.randrange(1000)}")
            return [
                f"UPDATE {ref} SET {email} = split_part({email}, '+', 1) || {tail} "
                f"WHERE {id_} = {k}"
            ]
        if r < 0.8:
            return [self._shift(t, id_, k)]
        if r < 0.9:  # two rows swap their identities; the last statement changes both
            other = self.key()

            def of(key: int) -> str:
                return f"(SELECT substr({email}, 2) FROM {ref} WHERE {id_} = {key})"

            both = f"{id_} IN ({k}, {other})"
            return [
                f"UPDATE {ref} SET {email} = 'A' || {email} WHERE {id_} = {k}",
                f"UPDATE {ref} SET {email} = 'B' || {email} "
                f"WHERE {id_} = {other} AND {other} <> {k}",
                f"UPDATE {ref} SET {email} = CASE WHEN {id_} = {k} THEN {of(other)} "
                f"ELSE {of(k)} END WHERE {both} AND {k} <> {other} "
                f"AND (SELECT count(*) FROM {ref} WHERE {both}) = 2",
                f"UPDATE {ref} SET {email} = substr({email}, 2) WHERE {both} "
                f"AND left({email}, 1) IN ('A', 'B')",
            ]
        return [f"DELETE FROM {ref} WHERE {id_} = {k}"]

    def _fk_parent(self, t: Table) -> list[str]:
        r, ref, k, id_ = (
            self.rng.random(),
            t.ref,
            self.client * 1000 + self.rng.randrange(50),
            t.col("id"),
        )
        if r < 0.35:
            head, _ = self._insert(t, {id_: str(k)})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.6:
            sets = self.assignments(t) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {id_} = {k}"]
        if r < 0.8:  # the lines follow (ON UPDATE CASCADE)
            return [self._shift(t, id_, k)]
        return [f"DELETE FROM {ref} WHERE {id_} = {k}"]  # and its lines (ON DELETE CASCADE)

    def _fk_child(self, t: Table) -> list[str]:
        parent = next(p for p in self.s.tables if p.style == "fk_parent")
        r, ref, pid = self.rng.random(), t.ref, parent.col("id")
        o, line = t.col("order"), t.col("line")
        k, n = self.client * 1000 + self.rng.randrange(50), self.rng.randint(1, 5)
        if r < 0.5:
            plain = [c for c in t.plain() if self.rng.random() < 0.8]
            names = ", ".join([o, line, *(ident(c.name) for c in plain)])
            values = ", ".join([str(k), str(n), *(self.val(c.kind) for c in plain)])
            return [
                f"INSERT INTO {ref} ({names}) SELECT {values} WHERE EXISTS "
                f"(SELECT 1 FROM {parent.ref} WHERE {pid} = {k}) ON CONFLICT DO NOTHING"
            ]
        if r < 0.8:
            sets = self.assignments(t) or f"{line} = {line}"
            return [f"UPDATE {ref} SET {sets} WHERE {o} = {k}"]
        return [f"DELETE FROM {ref} WHERE {o} = {k} AND {line} = {n}"]

    def _mine(self, t: Table, id_: str, limit: int) -> str:
        """Some of this client's rows of a table whose keys come from a sequence."""
        return (
            f"{id_} IN (SELECT {id_} FROM {t.ref} WHERE {id_} % {CLIENTS} = {self.client} "
            f"ORDER BY random() LIMIT {limit})"
        )

    def _identity_always(self, t: Table) -> list[str]:
        r, ref, id_, v = self.rng.random(), t.ref, t.col("id"), t.col("v")
        if r < 0.35:
            head, _ = self._insert(t, {v: self.val("text", 0.1)}, self.rng.randint(1, 4))
            return [head]
        if r < 0.45:
            k = 1_000_000 + self.client * 10_000 + self.rng.randrange(KEYS)
            return [
                f"INSERT INTO {ref} ({id_}, {v}) OVERRIDING SYSTEM VALUE VALUES "
                f"({k}, {self.val('text')}) ON CONFLICT DO NOTHING"
            ]
        if r < 0.7:
            sets = self.assignments(t)
            extra = f", {sets}" if sets else ""
            return [
                f"UPDATE {ref} SET {v} = {self.val('text')}{extra} WHERE {self._mine(t, id_, 2)}"
            ]
        if r < 0.85:
            return [f"DELETE FROM {ref} WHERE {self._mine(t, id_, 1)}"]
        return [f"UPDATE {ref} SET {v} = {v} || 'x' WHERE {self._mine(t, id_, 3)}"]

    def _identity_default(self, t: Table) -> list[str]:
        r, ref, id_ = self.rng.random(), t.ref, t.col("id")
        if r < 0.3:
            head, _ = self._insert(t, {}, self.rng.randint(1, 3))
            return [head]
        if r < 0.35:
            return [f"INSERT INTO {ref} DEFAULT VALUES"]
        if r < 0.5:
            k = 2_000_000 + self.client * 10_000 + self.rng.randrange(KEYS)
            head, _ = self._insert(t, {id_: str(k)})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.75:
            sets = self.assignments(t) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {self._mine(t, id_, 2)}"]
        return [f"DELETE FROM {ref} WHERE {self._mine(t, id_, 1)}"]

    def _partitioned(self, t: Table) -> list[str]:
        r, ref = self.rng.random(), t.ref
        id_, region = t.col("id"), t.col("region")
        k, reg = self.client * 1000 + self.rng.randrange(60), self.rng.randrange(self.s.regions)
        if r < 0.35:
            head, _ = self._insert(t, {id_: str(k), region: str(reg)})
            return [f"{head} ON CONFLICT DO NOTHING"]
        if r < 0.55:
            sets = self.assignments(t) or f"{id_} = {id_}"
            return [f"UPDATE {ref} SET {sets} WHERE {id_} = {k}"]
        if r < 0.8:  # a row moves to another partition
            return [
                f"UPDATE {ref} SET {region} = {reg} WHERE {id_} = {k} AND {region} = "
                f"(SELECT min({region}) FROM {ref} WHERE {id_} = {k} AND {region} <> {reg}) "
                f"AND NOT EXISTS (SELECT 1 FROM {ref} x WHERE x.{id_} = {k} "
                f"AND x.{region} = {reg})"
            ]
        return [f"DELETE FROM {ref} WHERE {id_} = {k}"]

    def truncate(self) -> list[str]:
        if self.rng.random() < 0.2:  # a single partition
            part = self.rng.choice(["measurements_low", "measurements_high"])
            return [f"TRUNCATE public.{part}"]
        chosen = self.rng.sample(self.s.tables, self.rng.choice([1, 1, 2, 3]))
        restart = " RESTART IDENTITY" if self.rng.random() < 0.5 else ""
        cascade = " CASCADE" if any(t.style == "fk_parent" for t in chosen) else ""
        return [f"TRUNCATE {', '.join(t.ref for t in chosen)}{restart}{cascade}"]

    def bulk(self) -> list[str]:
        """A larger transaction: hundreds of rows of one statement, in a key range of their own
        (ids 500 to 999 of the client's thousand), or many equal rows of a keyless table."""
        r, lo = self.rng.random(), self.client * 1000 + 500
        keyless = [t for t in self.s.tables if t.style == "keyless"]
        if r < 0.3 and keyless:
            t = self.rng.choice(keyless)
            kind, n = t.col("kind"), t.col("n")
            tag = text_lit(f"c{self.client}bulk")
            if r < 0.12:
                return [
                    f"INSERT INTO {t.ref} ({kind}, {n}) SELECT {tag}, g % 5 "
                    f"FROM generate_series(1, {self.rng.randint(20, 300)}) g"
                ]
            if r < 0.22:  # many equal rows change, one after the other
                x = self.rng.randrange(5)
                return [f"UPDATE {t.ref} SET {n} = {n} + 5 WHERE {kind} = {tag} AND {n} = {x}"]
            return [
                f"DELETE FROM {t.ref} WHERE {kind} = {tag} AND {n} % 5 = {self.rng.randrange(5)}"
            ]
        t = self.rng.choice([t for t in self.s.tables if t.style in ("int_key", "toast_key")])
        id_, count = t.col("id"), self.rng.randint(100, 499)
        if r < 0.65:
            if t.style == "toast_key":
                body, version = t.col("body"), t.col("version")
                return [
                    f"INSERT INTO {t.ref} ({id_}, {body}, {version}) SELECT {lo} + g, "
                    f"repeat(md5(g::text), 300), 1 FROM generate_series(0, {count}) g "
                    "ON CONFLICT DO NOTHING"
                ]
            return [
                f"INSERT INTO {t.ref} ({id_}) SELECT {lo} + g FROM generate_series(0, {count}) g "
                "ON CONFLICT DO NOTHING"
            ]
        if r < 0.85:
            sets = self.assignments(t, 1) or f"{id_} = {id_}"
            return [f"UPDATE {t.ref} SET {sets} WHERE {id_} BETWEEN {lo} AND {lo + count}"]
        return [f"DELETE FROM {t.ref} WHERE {id_} BETWEEN {lo} AND {lo + count}"]

    def dml_transaction(self) -> list[str]:
        if self.rng.random() < 0.012:
            return self.truncate()
        if self.rng.random() < 0.04:
            return self.bulk()
        stmts: list[str] = []
        for _ in range(self.rng.choice([1, 1, 2, 3, 5])):
            stmts += self.row_change(self.rng.choice(self.s.tables))
        if self.rng.random() < 0.08:  # changes in a subtransaction, kept or rolled back
            inner = self.row_change(self.rng.choice(self.s.tables))
            end = "ROLLBACK TO SAVEPOINT" if self.rng.random() < 0.6 else "RELEASE SAVEPOINT"
            stmts += ["SAVEPOINT sp", *inner, f"{end} sp"]
            stmts += self.row_change(self.rng.choice(self.s.tables))
        return stmts


SET_APP_PATH = "SET LOCAL search_path = app, public"


AUTOCOMMIT = "-- autocommit"
"""First item of a statement list whose statements run outside a transaction block."""


class DdlGen(Gen):
    """A transaction with DDL, and DML before and after it. DDL names tables the way a user
    would: unqualified where ``search_path`` finds them, the app schema included."""

    def __init__(self, schema: Schema, rng: random.Random, client: int) -> None:
        super().__init__(schema, rng, client)
        self.app_path = False

    def _named(self, t: Table, build: Callable[[str], str]) -> list[str]:
        """``build(name of t)``, after switching search_path to app when that spells it."""
        stmts = []
        if t.schema == "app":
            if not self.app_path and self.rng.random() < 0.7:
                self.app_path = True
                stmts.append(SET_APP_PATH)
            name = ident(t.name) if self.app_path else t.ref
        else:
            shadowed = self.app_path and any(
                o.schema == "app" and o.name == t.name for o in self.s.tables
            )
            if shadowed or self.rng.random() < 0.2:
                name = t.ref
            else:
                name = t.name if t.name.isidentifier() and t.name.islower() else ident(t.name)
        return [*stmts, build(name)]

    def _new_name(self, schema: str, fresh: str) -> str:
        """``fresh``, or the name of a table dropped earlier (a new table under an old name)."""
        taken = {(t.schema, t.name) for t in self.s.tables}
        again = [name for sch, name in self.s.dropped if sch == schema and (sch, name) not in taken]
        return self.rng.choice(again) if again and self.rng.random() < 0.5 else fresh

    def _default(self, kind: str) -> str:
        if kind in NO_DEFAULT or self.rng.random() < 0.4:
            return ""
        return " DEFAULT " + self.val(kind, 0.0).replace("public.", "")

    def ops(self) -> list[tuple[Callable[[], list[str]], int]]:
        return [
            (self.add_column, 14), (self.drop_column, 8), (self.rename_column, 8),
            (self.alter_type, 10), (self.create_table, 10), (self.create_index, 8),
            (self.set_default, 4), (self.add_mood, 2), (self.default_partition, 1),
            (self.drop_table, 3), (self.multi_statement, 4), (self.alter_pair, 3),
            (self.rename_table, 3), (self.set_schema, 2), (self.create_table_as, 2),
            (self.index_concurrently, 2), (self.drop_expression, 1),
        ]  # fmt: skip

    def transaction(self) -> list[str]:
        ops = self.ops()
        op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        if op == self.index_concurrently:
            return op()
        stmts: list[str] = []
        if self.rng.random() < 0.4:
            stmts += self.dml_transaction()
        if self.rng.random() < 0.12:
            stmts += self.rolled_back()
        stmts += op()
        if op != self.add_mood and self.rng.random() < 0.5:
            stmts += self.dml_transaction()
        return stmts

    def rolled_back(self) -> list[str]:
        """DDL and rows in a subtransaction that rolls back: none of it may reach the replica."""
        inner = DdlGen(copy.deepcopy(self.s), self.rng, self.client)
        inner.app_path = self.app_path  # ROLLBACK TO undoes a SET LOCAL made after it
        op = self.rng.choice(
            [inner.add_column, inner.drop_column, inner.rename_column, inner.alter_type,
             inner.create_table, inner.rename_table, inner.alter_pair]
        )  # fmt: skip
        body = op() + inner.dml_transaction()
        return ["SAVEPOINT ddl", *body, "ROLLBACK TO SAVEPOINT ddl"]

    def add_column(self) -> list[str]:
        t = self.rng.choice(self.s.tables)
        adds = []
        for _ in range(self.rng.choice([1, 1, 1, 2])):
            kind = self.rng.choice(NEW_COLUMN_KINDS)
            n = self.s.next()
            name = self.rng.choice([f"c{n}", f"Extra Col {n}", f"MixedCase{n}"])
            t.columns.append(Column(name, kind))
            adds.append(f"ADD COLUMN {ident(name)} {TYPES[kind]}{self._default(kind)}")
        plain = t.plain()
        if len(adds) == 1 and len(plain) > 2 and self.rng.random() < 0.3:
            gone = self.rng.choice(plain[:-1])  # one ALTER TABLE, two subcommands
            t.columns.remove(gone)
            adds.append(f"DROP COLUMN {ident(gone.name)}")
        stmts = self._named(t, lambda r: f"ALTER TABLE {r} {', '.join(adds)}")
        if self.rng.random() < 0.5:  # rows written with the new column in the same transaction
            stmts += self.row_change(t)
        return stmts

    def drop_column(self) -> list[str]:
        choices = [(t, c) for t in self.s.tables for c in t.plain() if len(t.plain()) > 1]
        if not choices:
            return self.add_column()
        t, c = self.rng.choice(choices)
        t.columns.remove(c)
        return self._named(t, lambda r: f"ALTER TABLE {r} DROP COLUMN {ident(c.name)}")

    def rename_column(self) -> list[str]:
        t = self.rng.choice(self.s.tables)
        c = self.rng.choice(t.columns)
        old, n = c.name, self.s.next()
        c.name = f"Renamed {n}" if self.rng.random() < 0.3 else f"{old.split('_r')[0]}_r{n}"
        new = c.name
        return self._named(
            t, lambda r: f"ALTER TABLE {r} RENAME COLUMN {ident(old)} TO {ident(new)}"
        )

    def alter_type(self) -> list[str]:
        choices = [
            (t, c)
            for t in self.s.tables
            for c in t.columns
            if c.kind in WIDER and c.retype and not (t.style == "partitioned" and c.role)
        ]
        if not choices:
            return self.add_column()
        t, c = self.rng.choice(choices)
        c.kind = WIDER[c.kind]
        typ = TYPES[c.kind]
        return self._named(t, lambda r: f"ALTER TABLE {r} ALTER COLUMN {ident(c.name)} TYPE {typ}")

    def set_default(self) -> list[str]:
        t = self.rng.choice(self.s.tables)
        c = self.rng.choice(t.plain())
        default = self._default(c.kind)
        if not default:
            return self._named(
                t, lambda r: f"ALTER TABLE {r} ALTER COLUMN {ident(c.name)} DROP DEFAULT"
            )
        return self._named(
            t, lambda r: f"ALTER TABLE {r} ALTER COLUMN {ident(c.name)} SET{default}"
        )

    def create_table(self, again: tuple[str, str] | None = None) -> list[str]:
        """A new table, with rows in the same transaction; ``again``: under this (dropped)
        schema and name."""
        n = self.s.next()
        if again is not None:
            schema, name = again
        else:
            schema = "app" if self.rng.random() < 0.35 else "public"
            name = self._new_name(schema, self.rng.choice([f"t_new_{n}", f"New Table {n}"]))
        in_app = schema == "app"
        kinds = self.rng.sample(NEW_COLUMN_KINDS, self.rng.randint(1, 4))
        cols = [Column(f"c{i}", k) for i, k in enumerate(kinds)]
        stmts = []
        if in_app and not self.app_path:
            self.app_path = True
            stmts.append(SET_APP_PATH)
        typed = ", ".join(f"{ident(c.name)} {TYPES[c.kind]}" for c in cols)
        bare = ident(name) if (in_app or not self.app_path) else f"public.{ident(name)}"
        if self.rng.random() < 0.3:
            kind, num = Column("kind", "text", "kind", retype=False), Column("n", "int", "n")
            t = Table(schema, name, "keyless", [kind, num, *cols], created=True)
            stmts.append(f"CREATE TABLE {bare} (kind text, n int, {typed})")
            stmts.append(f"ALTER TABLE {bare} REPLICA IDENTITY FULL")
        else:
            t = Table(schema, name, "int_key", [Column("id", "int", "id"), *cols], created=True)
            stmts.append(f"CREATE TABLE {bare} (id int PRIMARY KEY, {typed})")
        self.s.tables.append(t)
        for _ in range(self.rng.randint(0, 4)):  # rows in the same transaction as the CREATE
            stmts += self.row_change(t)
        return stmts

    def create_table_as(self) -> list[str]:
        """CREATE TABLE AS or SELECT INTO: the new table's rows come with its creation."""
        sources = [t for t in self.s.tables if t.style == "int_key"]
        t = self.rng.choice(sources)
        name = self._new_name("public", f"t_copy_{self.s.next()}")
        bare = f"public.{ident(name)}"
        id_, k = t.col("id"), self.key()
        if self.rng.random() < 0.5:
            make = f"CREATE TABLE {bare} AS SELECT * FROM {t.ref} WHERE {id_} <= {k}"
        else:
            make = f"SELECT * INTO {bare} FROM {t.ref} WHERE {id_} <= {k}"
        columns = [Column(c.name, c.kind, c.role) for c in t.columns]
        self.s.tables.append(Table("public", name, "int_key", columns, created=True))
        return [make, f"ALTER TABLE {bare} ADD PRIMARY KEY ({id_})"]

    def _indexable(self, t: Table) -> list[Column]:
        return [c for c in t.columns if c.kind not in ("pair", "pairs")]

    def _index_on(self, c: Column) -> str:
        if c.kind in ("big", "bytea"):  # too large for a btree entry
            return f"(md5({ident(c.name)}))"
        if c.kind in ("text", "varchar") and self.rng.random() < 0.5:
            return f"(lower({ident(c.name)}))"
        return f"({ident(c.name)})"

    def create_index(self) -> list[str]:
        t = self.rng.choice(self.s.tables)
        cols = self._index_on(self.rng.choice(self._indexable(t)))
        named = f" {ident(f'idx {self.s.next()}')}" if self.rng.random() < 0.5 else ""
        return self._named(t, lambda r: f"CREATE INDEX{named} ON {r} {cols}")

    def index_concurrently(self) -> list[str]:
        """CREATE or DROP INDEX CONCURRENTLY: not allowed in a transaction block."""
        tables = [t for t in self.s.tables if t.style != "partitioned"]
        t = self.rng.choice(tables)
        name = f"cic {self.s.next()}"
        cols = self._index_on(self.rng.choice(self._indexable(t)))
        stmts = [AUTOCOMMIT, f"CREATE INDEX CONCURRENTLY {ident(name)} ON {t.ref} {cols}"]
        if self.rng.random() < 0.4:
            stmts.append(f"DROP INDEX CONCURRENTLY {ident(t.schema)}.{ident(name)}")
        return stmts

    def add_mood(self) -> list[str]:
        label = f"mood {self.s.next()}"
        self.s.moods.append(label)  # used once the transaction committed: nothing follows it
        return [f"ALTER TYPE mood ADD VALUE {text_lit(label)}"]

    def alter_pair(self) -> list[str]:
        """The composite type changes under the columns that use it."""
        if len(self.s.pair) > 1 and self.rng.random() < 0.35:
            name, _ = self.rng.choice(self.s.pair)
            self.s.pair = [a for a in self.s.pair if a[0] != name]
            return [f"ALTER TYPE pair DROP ATTRIBUTE {ident(name)}"]
        name, kind = f"f{self.s.next()}", self.rng.choice(PAIR_KINDS)
        self.s.pair = [*self.s.pair, (name, kind)]
        return [f"ALTER TYPE pair ADD ATTRIBUTE {ident(name)} {TYPES[kind]}"]

    def default_partition(self) -> list[str]:
        if self.s.regions != 100:
            return self.create_index()
        self.s.regions = 150
        parent = next(t for t in self.s.tables if t.style == "partitioned")
        return [f"CREATE TABLE public.measurements_rest PARTITION OF {parent.ref} DEFAULT"]

    def drop_expression(self) -> list[str]:
        """A stored generated column becomes an ordinary one."""
        generated = [(t, c) for t in self.s.tables for c in t.columns if c.role == "generated"]
        if not generated:
            return self.set_default()
        t, c = generated[0]
        c.role = ""
        return self._named(
            t, lambda r: f"ALTER TABLE {r} ALTER COLUMN {ident(c.name)} DROP EXPRESSION"
        )

    def drop_table(self) -> list[str]:
        created = [t for t in self.s.tables if t.created]
        if not created:
            return self.create_table()
        t = self.rng.choice(created)
        self.s.tables.remove(t)
        self.s.dropped.append((t.schema, t.name))
        stmts = self._named(t, lambda r: f"DROP TABLE {r}")
        if self.rng.random() < 0.5:  # and a new table under the same name, at once
            stmts += self.create_table(again=(t.schema, t.name))
        return stmts

    def rename_table(self) -> list[str]:
        t = self.rng.choice(self.s.tables)
        new = self.rng.choice([f"renamed_{self.s.next()}", f"Renamed Table {self.s.next()}"])
        stmts = self._named(t, lambda r: f"ALTER TABLE {r} RENAME TO {ident(new)}")
        t.name = new
        return stmts

    def set_schema(self) -> list[str]:
        created = [t for t in self.s.tables if t.created]
        if not created:
            return self.rename_table()
        t = self.rng.choice(created)
        target = "public" if t.schema == "app" else "app"
        if any((o.schema, o.name) == (target, t.name) for o in self.s.tables):
            return self.rename_table()
        stmts = self._named(t, lambda r: f"ALTER TABLE {r} SET SCHEMA {target}")
        t.schema = target
        return stmts

    def multi_statement(self) -> list[str]:
        """DDL and DML in one query string (the simple protocol runs it as one message)."""
        t = self.rng.choice([t for t in self.s.tables if t.style != "partitioned"])
        n = self.s.next()
        t.columns.append(Column(f"m{n}", "int"))
        return [
            f"ALTER TABLE {t.ref} ADD COLUMN m{n} int DEFAULT {n}; "
            f"UPDATE {t.ref} SET m{n} = m{n} + 1 WHERE ctid = (SELECT min(ctid) FROM {t.ref}); "
            f"CREATE INDEX ON {t.ref} (m{n})"
        ]


# --- running it ------------------------------------------------------------------------------


class _RolledBack(Exception):
    """The workload rolled a prepared transaction back on purpose."""


class WorkloadError(AssertionError):
    """A workload statement failed on the source: a bug of the generator (or of the source)."""


class _Gate:
    """DML transactions run side by side; a DDL transaction runs alone."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._active = 0
        self._ddl = False

    @contextlib.asynccontextmanager
    async def dml(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._ddl)
            self._active += 1
        try:
            yield
        finally:
            async with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def ddl(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._ddl)
            self._ddl = True
            await self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._ddl = False
                self._cond.notify_all()


def pgbench_command(dsn: str, *args: str) -> list[str]:
    """pgbench of the server binaries' directory, connecting where ``dsn`` points."""
    params = conninfo_to_dict(dsn)
    cmd = [str(find_postgres_bin() / "pgbench")]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            cmd += [flag, str(params[key])]
    return [*cmd, *args, str(params.get("dbname", "postgres"))]


async def run_pgbench(dsn: str, *args: str, timeout: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(
        *pgbench_command(dsn, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise WorkloadError(f"pgbench {' '.join(args)} failed ({proc.returncode}):\n{text}")
    return text


@dataclass
class Workload:
    """The randomized workload, pgbench next to it, and the marker row at the end."""

    dsn: str
    seed: int
    transactions: int = TRANSACTIONS
    clients: int = CLIENTS
    pgbench_scale: int = PGBENCH_SCALE
    pgbench_transactions: int = PGBENCH_TRANSACTIONS
    pace: float = 0.0
    """Seconds of sleep between a client's transactions, at most (spreads the workload out)."""
    seconds: float = 0.0
    """When set, the clients and pgbench (throttled to ``pgbench_rate``) go on for this long
    instead of stopping after their numbers of transactions."""
    pgbench_rate: int = 100
    log_file: Path | None = None
    """Every statement, with its client and transaction, and the outcome of the transaction."""
    schema: Schema = field(default_factory=initial_schema)
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def token(self) -> str:
        return f"done {self.seed}"

    def _log(self, line: str) -> None:
        if self._out is not None:
            self._out.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    async def setup(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            for stmt in SETUP:
                self._log(f"setup: {stmt};")
                await conn.execute(stmt)
            cur = await conn.execute("SELECT current_setting('max_prepared_transactions')::int")
            row = await cur.fetchone()
            self.schema.two_phase = bool(row and row[0] > 0)

    async def run(self) -> None:
        """Setup, the clients and pgbench side by side, then the marker transaction."""
        self._out = self.log_file.open("w") if self.log_file else None
        self._gate = _Gate()
        self._rng2pc = random.Random(self.seed + 7)
        self._deadline = time.monotonic() + self.seconds
        try:
            await self.setup()
            clients = [self._client(c) for c in range(self.clients)]
            await asyncio.gather(*clients, self._pgbench())
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("INSERT INTO done VALUES (%s)", (self.token,))
            self._log(f"marker: {self.token}")
        finally:
            if self._out is not None:
                self._out.close()

    _out: Any = None
    _deadline = 0.0
    _rng2pc = random.Random(0)

    async def _pgbench(self) -> None:
        if not self.pgbench_scale:
            return
        await run_pgbench(self.dsn, "-i", "-q", "-s", str(self.pgbench_scale))
        self.stats["pgbench init"] += 1
        if self.seconds:
            left = max(1, round(self._deadline - time.monotonic()))
            out = await run_pgbench(
                self.dsn, "-n", "-c", "2", "-j", "1", "-T", str(left),
                "-R", str(self.pgbench_rate), timeout=left + 60,
            )  # fmt: skip
            processed = [line for line in out.splitlines() if "actually processed" in line]
            count = processed[0].split(":")[1].split("/")[0].strip() if processed else "0"
            self.stats["pgbench transactions"] += int(count)
        elif self.pgbench_transactions:
            await run_pgbench(
                self.dsn, "-n", "-c", "2", "-j", "1", "-t", str(self.pgbench_transactions)
            )
            self.stats["pgbench transactions"] += 2 * self.pgbench_transactions

    async def _client(self, client: int) -> None:
        rng = random.Random(self.seed * 1009 + client)
        async with await psycopg.AsyncConnection.connect(self.dsn, prepare_threshold=None) as conn:
            number = 0
            while self._more(number):
                number += 1
                ddl = client == 0 and rng.random() < 0.15
                if ddl:
                    async with self._gate.ddl():
                        work = copy.deepcopy(self.schema)
                        stmts = DdlGen(work, rng, client).transaction()
                        if await self._transaction(conn, client, number, stmts):
                            self.schema = work
                            self.stats["ddl transactions"] += 1
                else:
                    async with self._gate.dml():
                        stmts = Gen(self.schema, rng, client).dml_transaction()
                        await self._transaction(conn, client, number, stmts)
                if self.pace:
                    await asyncio.sleep(rng.uniform(0, self.pace))

    async def _two_phase(
        self, conn: psycopg.AsyncConnection[Any], tag: str, stmts: list[str]
    ) -> None:
        """PREPARE TRANSACTION, then COMMIT PREPARED (or, now and then, ROLLBACK PREPARED)."""
        await conn.tpc_begin(f"w{self.seed}.{tag}")
        try:
            for stmt in stmts:
                self._log(f"{tag}: {stmt};")
                await conn.execute(stmt)
            await conn.tpc_prepare()
        except BaseException:
            await conn.tpc_rollback()
            raise
        if self._rng2pc.random() < 0.25:
            self._log(f"{tag}: rollback prepared")
            await conn.tpc_rollback()
            raise _RolledBack
        self._log(f"{tag}: commit prepared")
        await conn.tpc_commit()

    def _more(self, number: int) -> bool:
        if self.seconds:
            return time.monotonic() < self._deadline
        return number < self.transactions

    async def _transaction(
        self, conn: psycopg.AsyncConnection[Any], client: int, number: int, stmts: list[str]
    ) -> bool:
        stmt = ""
        try:
            if stmts and stmts[0] == AUTOCOMMIT:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as ac:
                    for stmt in stmts[1:]:
                        self._log(f"{client}.{number}: (autocommit) {stmt};")
                        await ac.execute(stmt)
            elif self.schema.two_phase and self._rng2pc.random() < 0.03:
                await self._two_phase(conn, f"{client}.{number}", stmts)
            else:
                async with conn.transaction():
                    for stmt in stmts:
                        self._log(f"{client}.{number}: {stmt};")
                        await conn.execute(stmt)
        except RETRYABLE as exc:
            self._log(f"{client}.{number}: rolled back: {type(exc).__name__}")
            self.stats["rolled back"] += 1
            return False
        except _RolledBack:
            self.stats["rolled back on purpose"] += 1
            return False
        except psycopg.Error as exc:
            raise WorkloadError(
                f"seed {self.seed}: client {client}, transaction {number}: {stmt!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._log(f"{client}.{number}: committed")
        self.stats["committed"] += 1
        self.stats["statements"] += len(stmts)
        return True


# --- checks ----------------------------------------------------------------------------------

_SESSION = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
)


@contextlib.asynccontextmanager
async def _reader(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A read-only connection whose settings make row text comparable across servers."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for stmt in _SESSION:
            await conn.execute(stmt)
        yield conn


async def _rows(
    conn: psycopg.AsyncConnection[Any], query: str, *params: object
) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query, params or None)
    return await cur.fetchall()


_TABLES = """
SELECT n.nspname, c.relname, c.relkind::text, c.relreplident::text,
       coalesce(pg_get_expr(c.relpartbound, c.oid), ''),
       coalesce(pg_get_partkeydef(c.oid), '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p')
ORDER BY 1, 2
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity::text,
       a.attgenerated::text, coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_INDEXES = """
SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s ORDER BY 1
"""

_ENUMS = """
SELECT t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = ANY(%s) GROUP BY 1 ORDER BY 1
"""


def _diff(what: str, source: Sequence[object], replica: Sequence[object]) -> str | None:
    if list(source) == list(replica):
        return None
    only_s = [x for x in source if x not in replica]
    only_r = [x for x in replica if x not in source]
    lines = [f"{what} differ:"]
    lines += [f"  source only:  {x!r}" for x in only_s[:10]]
    lines += [f"  replica only: {x!r}" for x in only_r[:10]]
    if not only_s and not only_r:
        lines += [f"  source order:  {list(source)!r}", f"  replica order: {list(replica)!r}"]
    return "\n".join(lines)


def _hash_query(ref: str) -> str:
    return (
        f"SELECT count(*), md5(string_agg(h, '' ORDER BY h)) FROM "
        f"(SELECT md5(ROW(r.*)::text) AS h FROM {ref} AS r) s"
    )


async def _content_diff(
    src: psycopg.AsyncConnection[Any], rep: psycopg.AsyncConnection[Any], ref: str
) -> str | None:
    """None when the table holds the same multiset of rows on both sides."""
    query = _hash_query(ref)
    if await _rows(src, query) == await _rows(rep, query):
        return None
    per_row = f"SELECT md5(ROW(r.*)::text), count(*) FROM {ref} AS r GROUP BY 1"
    s_counts = Counter({h: n for h, n in await _rows(src, per_row)})
    r_counts = Counter({h: n for h, n in await _rows(rep, per_row)})
    missing, extra = s_counts - r_counts, r_counts - s_counts
    show = (
        f"SELECT DISTINCT ON (h) h, t FROM (SELECT md5(ROW(r.*)::text) AS h, ROW(r.*)::text AS t "
        f"FROM {ref} AS r) s WHERE h = ANY(%s) LIMIT 6"
    )
    lines = [
        f"{ref}: {sum(s_counts.values())} rows on the source, {sum(r_counts.values())} on the "
        f"replica; {sum(missing.values())} missing on the replica, {sum(extra.values())} extra"
    ]
    for label, conn, hashes in (("missing", src, missing), ("extra", rep, extra)):
        for h, row in await _rows(conn, show, list(hashes)):
            lines.append(f"  {label} x{hashes[h]}: {row[:300]}")
    return "\n".join(lines)


async def table_differences(
    source_dsn: str, replica_dsn: str, schemas: Sequence[str] = ("public",)
) -> list[str]:
    """What differs between the two databases' tables of ``schemas`` (empty when nothing)."""
    problems: list[str] = []
    async with _reader(source_dsn) as src, _reader(replica_dsn) as rep:
        s_enums = await _rows(src, _ENUMS, list(schemas))
        r_enums = await _rows(rep, _ENUMS, list(schemas))
        if problem := _diff("enum types", s_enums, r_enums):
            problems.append(problem)
        s_tables = await _rows(src, _TABLES, list(schemas))
        r_tables = await _rows(rep, _TABLES, list(schemas))
        if problem := _diff(
            "tables (schema, name, kind, replica identity, bound, key)", s_tables, r_tables
        ):
            problems.append(problem)
        r_names = {(t[0], t[1]) for t in r_tables}
        for schema, name, kind, *_ in s_tables:
            if (schema, name) not in r_names:
                continue
            ref = f"{ident(schema)}.{ident(name)}"
            s_cols = await _rows(src, _COLUMNS, ref)
            r_cols = await _rows(rep, _COLUMNS, ref)
            if problem := _diff(
                f"{ref} columns (name, type, not null, identity, generated, default)",
                s_cols,
                r_cols,
            ):
                problems.append(problem)
                if [c[:2] for c in s_cols] != [c[:2] for c in r_cols]:
                    continue  # rows of other shapes: comparing them says nothing more
            s_idx = await _rows(src, _INDEXES, schema, name)
            r_idx = await _rows(rep, _INDEXES, schema, name)
            if problem := _diff(f"{ref} indexes", s_idx, r_idx):
                problems.append(problem)
            if kind == "r" and (problem := await _content_diff(src, rep, ref)):
                problems.append(problem)
    return problems


async def assert_same_tables(
    source_dsn: str, replica_dsn: str, schemas: Sequence[str] = ("public",), context: str = ""
) -> None:
    """The replica's tables of ``schemas`` equal the source's: names, columns (names and types,
    in order), indexes, and every row (as a multiset)."""
    problems = await table_differences(source_dsn, replica_dsn, schemas)
    if problems:
        head = f"{context}: " if context else ""
        raise AssertionError(
            f"{head}{len(problems)} differences between source and replica:\n"
            + "\n".join(problems[:20])
        )


async def table_sizes(dsn: str, schemas: Sequence[str] = ("public",)) -> dict[str, int]:
    """Rows per table (leaf tables only), for reports and sanity checks."""
    out = {}
    async with _reader(dsn) as conn:
        for schema, name, kind, *_ in await _rows(conn, _TABLES, list(schemas)):
            if kind == "r":
                ref = f"{ident(schema)}.{ident(name)}"
                ((count,),) = await _rows(conn, f"SELECT count(*) FROM {ref}")
                out[f"{schema}.{name}"] = count
    return out


async def undecided_ddl(source_dsn: str) -> list[tuple[str, str]]:
    """DDL log rows that a replica would not replay (``activity.exact`` false), with reasons."""
    async with _reader(source_dsn) as conn:
        rows = await _rows(
            conn,
            "SELECT query, coalesce(activity->>'reason', '') FROM pgcapture.ddl_logs "
            "WHERE NOT coalesce((activity->>'exact')::boolean, false) ORDER BY id",
        )
    return [(q, r) for q, r in rows]


async def wait_for_marker(
    replica_dsn: str,
    token: str,
    timeout: float,
    alive: Callable[[], str | None] = lambda: None,
) -> float:
    """Wait until the replica holds the workload's marker row; returns the seconds waited.
    ``alive`` says why the applier cannot make progress any more (None while it can)."""
    start = time.monotonic()
    last = ""
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if (dead := alive()) is not None:
                        raise AssertionError(f"the replica stopped before the marker: {dead}")
                    with contextlib.suppress(psycopg.errors.UndefinedTable):
                        cur = await conn.execute("SELECT 1 FROM done WHERE token = %s", (token,))
                        if await cur.fetchone():
                            return time.monotonic() - start
                    with contextlib.suppress(psycopg.errors.UndefinedTable):
                        cur = await conn.execute("SELECT id, lsn::text FROM pgcapture.sources")
                        last = repr(await cur.fetchall())
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(
                f"the replica did not apply the marker {token!r} within {timeout} s; "
                f"its positions: {last}"
            ) from None


def summary(stats: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
