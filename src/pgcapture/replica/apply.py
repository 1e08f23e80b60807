"""Applying a source's stream to the replica, exactly once (DESIGN.md, contract 5).

``Applier`` takes the stream's stored batches in order and keeps one replica transaction open
across several source transactions. It commits, with ``pgcapture.advance_source`` moving the
replica's position to the last source transaction it holds, when the stream has nothing more
waiting, when the transaction holds ``max_changes`` changes or is ``max_delay`` old, and right
after a source transaction with DDL (so that, e.g., an enum value added by one transaction can
be used by the next). Source transactions at or below the position are skipped, so a restart
after a crash at any point applies each of them exactly once.

Within a replica transaction, changes are queued per table and sent as batched statements
(``pgcapture.replica.plans``): a table's changes keep their order, while changes to different
tables may be sent in another order than they were made. Nothing can observe the difference:
other sessions see only the committed result, foreign keys and ordinary triggers do not fire
under ``session_replication_role = replica``, and a DDL statement or a TRUNCATE first sends
everything queued before it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from pgcapture.errors import ProtocolError
from pgcapture.log.reader import StoredBatch
from pgcapture.lsn import format_lsn
from pgcapture.proto import pb
from pgcapture.replica.catalog import FIRST_NORMAL_OID, Catalog, Table, quote_ident, table_arg
from pgcapture.replica.ddl import Ddl, decide
from pgcapture.replica.pipeline import Expect, Pipeline
from pgcapture.replica.plans import (
    Plan,
    SchemaMismatch,
    Shape,
    binary_array,
    delete_plan,
    insert_plan,
    update_plan,
)
from pgcapture.replica.rows import Frame, Layout, Row, read_head, read_values, scan_change
from pgcapture.replica.store import Position

log = logging.getLogger("pgcapture.replicate")

_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_INSERT, _UPDATE, _DELETE = pb.Change.INSERT, pb.Change.UPDATE, pb.Change.DELETE
_CHANGE_TAG: Final = b"\x1a"  # Message.change = 3, length-delimited
_FRAMES_PER_TABLE: Final = 16  # row sizes remembered per table and operation
_ADVANCE: Final = b"SELECT pgcapture.advance_source($1, $2::pg_lsn, $3::pg_lsn, $4, $5)"
_SET_PATH: Final = b"SELECT pg_catalog.set_config('search_path', $1, true)"
_SET_SETTINGS: Final = (
    b"SELECT pg_catalog.set_config(s.key, s.value, true) "
    b"FROM pg_catalog.jsonb_each_text($1::pg_catalog.jsonb) AS s"
)
_RESET_SETTINGS: Final = (  # back to the apply session's own values
    b"SELECT pg_catalog.set_config(p.name, p.reset_val, true) FROM pg_catalog.pg_settings AS p "
    b"WHERE p.name IN (SELECT pg_catalog.lower(k) "
    b"FROM pg_catalog.jsonb_object_keys($1::pg_catalog.jsonb) AS k)"
)
_RESOLVE: Final = (
    b"SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
    b"JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    b"WHERE c.oid = pg_catalog.to_regclass($1)"
)
_TYPE_NAMES: Final = (  # typmod -1, not NULL: NULL names bpchar and bit as char(1) and bit(1)
    b"SELECT pg_catalog.format_type(t.oid, -1) "
    b"FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS t(oid, n) ORDER BY t.n"
)
_MISSING: Final = (  # of the names a DROP TABLE gives, those that name no table on the replica
    b"SELECT pg_catalog.array_to_json(pg_catalog.current_schemas(false))::text, "
    b"(SELECT pg_catalog.json_agg(n.i)::text "
    b"FROM pg_catalog.json_array_elements_text($1::pg_catalog.json) WITH ORDINALITY AS n(name, i) "
    b"WHERE pg_catalog.to_regclass(n.name) IS NULL)"
)


@dataclass(frozen=True, slots=True)
class ApplySettings:
    max_changes: int = 20_000  # changes per replica transaction (at a source commit)
    max_delay: float = 1.0  # seconds a replica transaction may stay open under load
    queue_rows: int = 5_000  # changes queued before they are sent (memory bound)
    skip_ddl: frozenset[int] = frozenset()
    # (schema, table): created from the first change that arrives while it does not exist
    create_missing: frozenset[tuple[str, str]] = frozenset()


@dataclass(slots=True)
class Applied:
    """What one replica commit made durable."""

    lsn: int
    stream_seq: int
    commit_time: int  # source commit time, microseconds since 2000-01-01 UTC
    transactions: int
    changes: int


def source_time(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class _Run:
    """Consecutive changes of one shape to one table, sent as one statement when possible."""

    __slots__ = ("first", "keyed", "last", "plan", "rows")

    def __init__(self, plan: Plan, lsn: int) -> None:
        self.plan = plan
        self.rows: list[list[bytes | None]] = []
        self.keyed: dict[tuple[bytes | None, ...], list[bytes | None]] = {}
        self.first = self.last = lsn

    def add(self, params: list[bytes | None], lsn: int) -> None:
        self.last = lsn
        if self.plan.kind in ("update", "delete"):
            key = tuple(params[: self.plan.nkey])
            self.keyed.pop(key, None)  # a later update of the same row wins
            self.keyed[key] = params
        else:
            self.rows.append(params)

    def __len__(self) -> int:
        return len(self.rows) + len(self.keyed)

    def send(self, pipe: Pipeline) -> None:
        plan = self.plan
        if not pipe.is_prepared(plan.name):
            pipe.prepare(plan.name, plan.sql, plan.types, lambda: f"preparing {plan.describe()}")
        rows = list(self.keyed.values()) if self.keyed else self.rows
        span = (
            f"source transactions {format_lsn(self.first)}..{format_lsn(self.last)}"
            if self.first != self.last
            else f"source transaction {format_lsn(self.first)}"
        )
        if plan.batched:
            arrays = [
                binary_array(elem, [row[i] for row in rows])
                for i, elem in enumerate(plan.elem_types)
            ]
            count = len(rows)
            pipe.execute(
                plan.name, arrays, [1] * len(arrays),
                Expect(lambda: f"{count} x {plan.describe()} ({span})", count),
            )  # fmt: skip
            return
        for row in rows:
            pipe.execute(
                plan.name, row, plan.formats, Expect(lambda: f"{plan.describe()} ({span})", 1)
            )


def _image(fields: object) -> tuple[Shape, list[bytes | None]]:
    shape: list[tuple[str, int, bool]] = []
    values: list[bytes | None] = []
    for f in fields:  # type: ignore[attr-defined]
        kind = f.WhichOneof("value")
        if kind == "binary":
            shape.append((f.name, f.oid, False))
            values.append(f.binary)
        elif kind is None:
            shape.append((f.name, f.oid, False))
            values.append(None)
        else:
            shape.append((f.name, f.oid, True))
            values.append(f.text.encode())
    return tuple(shape), values


class Applier:
    """The apply loop's state on one replica session (``Pipeline`` in pipeline mode)."""

    def __init__(
        self,
        pipe: Pipeline,
        position: Position,
        settings: ApplySettings,
        on_commit: Callable[[Applied], None] | None = None,
        search_path: str = "public",
    ) -> None:
        self._pipe = pipe
        self._catalog = Catalog()
        self._source = position.source
        self._settings = settings
        self._on_commit = on_commit
        self._search_path = search_path
        self.applied: int = position.lsn  # committed on the replica
        self._done: int = position.lsn  # last source transaction fully sent
        self._done_seq = position.stream_seq
        self._done_time = 0
        self._open = False
        self._opened_at = 0.0
        self._transactions = 0
        self._changes = 0
        self._in_tx = False
        self._tx_lsn = 0
        self._tx_ddl = False
        self._creates: set[tuple[str, str]] = set()
        self._queues: dict[tuple[str, str], list[_Run]] = {}
        self._queued = 0
        self._plans: dict[tuple[object, ...], Plan] = {}
        # the fast path: (head, shape, new field count) of scan_change -> plan; head -> table
        self._fast: dict[tuple[bytes, bytes, int], Plan] = {}
        self._heads: dict[bytes, tuple[str, str]] = {}
        # per table and operation, the last row shape seen: read the next rows by comparison
        self._layouts: dict[bytes, tuple[Layout, Plan, tuple[str, str]]] = {}
        # by message size, the frames of rows seen (rows whose values have equal lengths)
        self._frames: dict[int, list[tuple[Frame, Plan, tuple[str, str]]]] = {}
        self._framed: dict[bytes, int] = {}  # frames learnt per head

    @property
    def pending(self) -> bool:
        """Whether source transactions were sent that are not committed yet."""
        return self._transactions > 0

    async def apply(self, batch: StoredBatch, more: bool) -> None:
        """Apply one stored batch; ``more`` says whether the next one is already waiting."""
        for record in batch.records:
            lsn = record.lsn
            if lsn <= self._done:
                continue  # applied before (resuming inside a stored batch)
            message = record.message
            if message[:1] == _CHANGE_TAG:
                if not self._in_tx:
                    raise self._outside(record.lsn, record.seq)
                done, row = self._known(message, lsn)
                if not done:
                    await self._change(pb.Message.FromString(message).change, lsn, row)
                if self._queued >= self._settings.queue_rows:
                    await self._send_queued()
                continue
            msg = pb.Message.FromString(message)
            kind = msg.WhichOneof("type")
            if kind == "begin":
                if self._in_tx:
                    raise ProtocolError(
                        f"stream message {batch.seq}: transaction {format_lsn(lsn)} begins "
                        f"before transaction {format_lsn(self._tx_lsn)} committed"
                    )
                self._begin(lsn)
            elif kind == "commit":
                if not self._in_tx:
                    raise self._outside(record.lsn, record.seq)
                await self._commit_tx(lsn, batch.seq, msg.commit.commit_time)
            elif kind == "truncate":
                if not self._in_tx:
                    raise self._outside(record.lsn, record.seq)
                await self._truncate(msg.truncate)
        if not more:
            await self.idle()

    async def idle(self) -> None:
        """Nothing came for a while: commit what is complete."""
        if not self._in_tx and self._transactions:
            await self.commit()

    def _outside(self, lsn: int, seq: int) -> ProtocolError:
        return ProtocolError(
            f"the stream holds record {format_lsn(lsn)}#{seq} outside any transaction: it starts "
            "inside a transaction whose beginning is no longer stored"
        )

    def _begin(self, lsn: int) -> None:
        self._in_tx = True
        self._tx_lsn = lsn
        self._tx_ddl = False
        if not self._open:
            self._pipe.query(b"BEGIN", expect=Expect("BEGIN"))
            self._open = True
            self._opened_at = time.monotonic()

    async def _commit_tx(self, lsn: int, stream_seq: int, commit_time: int) -> None:
        self._in_tx = False
        self._creates.clear()
        self._done = lsn
        self._done_seq = stream_seq
        self._done_time = commit_time
        self._transactions += 1
        if (
            self._tx_ddl
            or self._changes + self._queued >= self._settings.max_changes
            or time.monotonic() - self._opened_at >= self._settings.max_delay
        ):
            await self.commit()

    async def commit(self) -> None:
        """Send what is queued, move the position and commit; raises if anything failed."""
        if not self._open:
            return
        await self._send_queued()
        when = source_time(self._done_time).isoformat() if self._done_time else None
        self._pipe.query(
            _ADVANCE,
            [
                self._source.encode(), format_lsn(self.applied).encode(),
                format_lsn(self._done).encode(), str(self._done_seq).encode(),
                when.encode() if when else None,
            ],
            expect=Expect("moving the replica position"),
        )  # fmt: skip
        await self._pipe.sync()
        self._pipe.query(b"COMMIT", expect=Expect("COMMIT"))
        await self._pipe.sync()
        applied = Applied(
            self._done, self._done_seq, self._done_time, self._transactions, self._changes
        )
        self.applied = self._done
        self._open = False
        self._transactions = 0
        self._changes = 0
        if self._on_commit is not None:
            self._on_commit(applied)

    # ---- changes -----------------------------------------------------------------------------

    def _known(self, message: bytes, lsn: int) -> tuple[bool, Row | None]:
        """Queue a change whose shape was seen before, reading its values from the bytes.

        Returns (False, row) when the slow path must take it: a new shape (``row``, when the
        bytes could be read), a key change, a CREATE TABLE AS target in this transaction.
        """
        if self._creates:
            return False, None
        candidates = self._frames.get(len(message))
        if candidates:
            for frame, plan, target in candidates:
                values = frame.values(message)
                if values is not None:
                    count = frame.new
                    return self._queue(target, plan, values[:count], values[count:], lsn), None
        found = read_head(message)
        if found is None:
            return False, None
        head, start = found
        learning = self._framed.get(head, 0) < _FRAMES_PER_TABLE
        if not learning and (known := self._layouts.get(head)) is not None:
            images = read_values(message, start, known[0])
            if images is not None:
                _, plan, target = known
                return self._queue(target, plan, *images, lsn), None
        row = scan_change(message)
        if row is None:
            return False, None
        seen = self._fast.get((row.head, row.shape, len(row.new)))
        table = self._heads.get(row.head)
        if seen is None or table is None:
            return False, row
        self._layouts[head] = (Layout.of(row), seen, table)
        if learning:
            self._framed[head] = self._framed.get(head, 0) + 1
            self._frames.setdefault(len(message), []).append((Frame(message, row), seen, table))
        return self._queue(table, seen, row.new, row.old, lsn), row

    def _queue(
        self,
        target: tuple[str, str],
        plan: Plan,
        new: list[bytes | None],
        old: list[bytes | None],
        lsn: int,
    ) -> bool:
        """Queue a change with its plan; False when it moves its row's key, which needs the
        key-change plan (the slow path)."""
        if plan.key_check and plan.moves_key(new, old):
            return False
        params = plan.params(new, old)
        runs = self._queues.get(target)
        if runs is None:
            runs = self._queues[target] = []
        if runs and runs[-1].plan is plan and plan.batched:
            runs[-1].add(params, lsn)
        else:
            run = _Run(plan, lsn)
            run.add(params, lsn)
            runs.append(run)
        self._queued += 1
        return True

    async def _change(self, change: pb.Change, lsn: int, row: Row | None) -> None:
        """A change off the fast path: its plan is new, or its bytes are laid out otherwise."""
        schema, name = change.schema, change.table
        if schema == "pgcapture":
            if name == "ddl_logs" and change.op == _INSERT:
                await self._ddl(decide(change, self._settings.skip_ddl))
            return  # pgcapture's own tables are not replicated
        target = (schema, name)
        if self._creates and target in self._creates:
            # the source's rows of a table made by CREATE TABLE AS replace the replica's own
            self._creates.discard(target)
            await self._send_queued()
            table = await self._table(schema, name)
            self._pipe.query(
                f"DELETE FROM ONLY {table.qualified}".encode(),
                expect=Expect(f"emptying {table.label} for the source's rows"),
            )
        op = change.op
        new_shape, new = _image(change.new)
        old_shape, old = _image(change.old) if len(change.old) else ((), [])
        plan_key: tuple[object, ...] = (schema, name, op, new_shape, old_shape)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = await self._compile(
                plan_key, schema, name, op, new_shape, old_shape, False, change
            )
        if row is not None:
            self._heads[row.head] = target
            self._fast[(row.head, row.shape, len(row.new))] = plan
        if plan.key_check and plan.moves_key(new, old):
            moved = (*plan_key, "key change")
            plan = self._plans.get(moved) or await self._compile(
                moved, schema, name, op, new_shape, old_shape, True
            )
        self._queue(target, plan, new, old, lsn)

    async def _compile(
        self,
        plan_key: tuple[object, ...],
        schema: str,
        name: str,
        op: int,
        new: Shape,
        old: Shape,
        key_changes: bool,
        change: pb.Change | None = None,
    ) -> Plan:
        table = await self._table(schema, name, change)
        if op == _INSERT:
            plan = insert_plan(table, new)
        elif op == _UPDATE:
            plan = update_plan(table, new, old, key_changes)
        elif op == _DELETE:
            plan = delete_plan(table, old)
        else:
            raise ProtocolError(f"change of unknown operation {op} to {schema}.{name}")
        self._plans[plan_key] = plan
        return plan

    async def _table(self, schema: str, name: str, change: pb.Change | None = None) -> Table:
        table = await self._catalog.table(self._pipe, schema, name)
        if table is None and change is not None and (schema, name) in self._settings.create_missing:
            await self._create_table(schema, name, change)
            self._catalog.forget(schema, name)
            table = await self._catalog.table(self._pipe, schema, name)
        if table is None:
            raise SchemaMismatch(
                f"table {schema}.{name} receives changes but does not exist on the replica: "
                "the replica's schema differs from the source's (was it bootstrapped from the "
                "source, and was every DDL statement replayed, or skipped with --skip-ddl?). "
                "Create the table as on the source, then restart replicate; or restart replicate "
                f"with --create-missing {table_arg(schema, name)} to create it from the stream's "
                "changes (columns and key only, see docs/replica.md)"
            )
        return table

    async def _create_table(self, schema: str, name: str, change: pb.Change) -> None:
        """Create a table listed in ``create_missing`` from the change that found it missing: a
        column per field (typed by the source's built-in type OID), a primary key on the key
        fields when some fields are not (under REPLICA IDENTITY FULL every field is key)."""
        label = f"{schema}.{name}"
        fields = list(change.old if change.op == _DELETE else change.new)
        if not fields:
            raise SchemaMismatch(
                f"table {label} does not exist on the replica and the change of source "
                f"transaction {format_lsn(self._tx_lsn)} carries no column to create it from: "
                "create the table by hand as on the source, then restart replicate"
            )
        for f in fields:
            if f.oid >= FIRST_NORMAL_OID or f.oid == 0:
                raise SchemaMismatch(
                    f"cannot create table {label} from the stream: column {f.name!r} has type "
                    f"OID {f.oid} on the source, a type of the source's own (enum, domain, "
                    "composite, extension type) that the replica cannot map from the stream. "
                    "Create the table by hand as on the source, then restart replicate"
                )
        array = "{" + ",".join(str(f.oid) for f in fields) + "}"
        found = self._pipe.query(
            _TYPE_NAMES, [array.encode()],
            expect=Expect(f"naming the column types of {label}", keep=True),
        )  # fmt: skip
        await self._pipe.sync()
        res = found.result
        assert res is not None
        types = [(res.get_value(i, 0) or b"").decode() for i in range(res.ntuples)]
        columns = [f"{quote_ident(f.name)} {t}" for f, t in zip(fields, types, strict=True)]
        key = [f.name for f in fields if f.key]
        if key and len(key) < len(fields):
            columns.append(f"PRIMARY KEY ({', '.join(map(quote_ident, key))})")
        sql = f"CREATE TABLE {quote_ident(schema)}.{quote_ident(name)} ({', '.join(columns)})"
        self._pipe.query(
            sql.encode(),
            expect=Expect(
                f"{sql} (--create-missing, source transaction {format_lsn(self._tx_lsn)}); "
                "create the table by hand as on the source, then restart replicate"
            ),
        )
        await self._pipe.sync()
        log.warning(
            "created table %s on the replica from a change of source transaction %s "
            "(--create-missing): %s. Only column names, base types and the key come from the "
            "stream: type modifiers, constraints, defaults, indexes and columns absent from this "
            "change are not known; make the table match the source when you can",
            label, format_lsn(self._tx_lsn), sql,
            extra={"source": self._source},
        )  # fmt: skip

    async def _send_queued(self) -> None:
        if not self._queued:
            return
        for runs in self._queues.values():
            for run in runs:
                run.send(self._pipe)
        self._queues.clear()
        self._changes += self._queued
        self._queued = 0
        await self._pipe.push()

    # ---- truncate and DDL ----------------------------------------------------------------------

    async def _truncate(self, truncate: pb.Truncate) -> None:
        tables = [t for t in truncate.tables if t.schema != "pgcapture"]
        listed = self._settings.create_missing
        if listed and any((t.schema, t.table) in listed for t in tables):
            # a listed table that does not exist yet has nothing to truncate
            tables = [
                t for t in tables
                if (t.schema, t.table) not in listed
                or await self._catalog.table(self._pipe, t.schema, t.table) is not None
            ]  # fmt: skip
        if not tables:
            return
        await self._send_queued()
        names = ", ".join(f"ONLY {quote_ident(t.schema)}.{quote_ident(t.table)}" for t in tables)
        sql = f"TRUNCATE {names}"
        if truncate.restart_identity:
            sql += " RESTART IDENTITY"
        if truncate.cascade:
            sql += " CASCADE"
        self._pipe.query(sql.encode(), expect=Expect(f"{sql} (transaction {self._tx_lsn:X})"))
        self._changes += 1

    async def _drop_sql(self, ddl: Ddl) -> str:
        """A DROP TABLE whose only tables missing on the replica are listed in
        ``create_missing`` (never created: no change of theirs came) runs with IF EXISTS."""
        assert ddl.sql is not None
        assert ddl.drop_if_exists is not None
        names = [
            f"{quote_ident(s)}.{quote_ident(n)}" if s else quote_ident(n) for s, n in ddl.drops
        ]
        found = self._pipe.query(
            _MISSING,
            [json.dumps(names).encode()],
            expect=Expect("finding the tables to drop", keep=True),
        )
        await self._pipe.sync()
        res = found.result
        assert res is not None
        path = json.loads(res.get_value(0, 0) or b"[]")
        missing = [ddl.drops[i - 1] for i in json.loads(res.get_value(0, 1) or b"null") or ()]
        listed = self._settings.create_missing
        if not missing or not all(
            (s, n) in listed if s else any((p, n) in listed for p in path) for s, n in missing
        ):
            return ddl.sql
        log.info(
            "%s: %s not on the replica (listed in --create-missing, no change of theirs came); "
            "dropping with IF EXISTS",
            ddl.describe(), ", ".join(f"{s}.{n}" if s else n for s, n in missing),
        )  # fmt: skip
        return ddl.drop_if_exists

    async def _ddl(self, ddl: Ddl) -> None:
        if ddl.sql is None:
            log.info("skipped %s: %s", ddl.describe(), ddl.skip)
            return
        await self._send_queued()
        pipe = self._pipe
        if ddl.search_path is not None:
            pipe.query(_SET_PATH, [ddl.search_path.encode()], expect=Expect("setting search_path"))
        if ddl.settings is not None:
            pipe.query(
                _SET_SETTINGS,
                [ddl.settings.encode()],
                expect=Expect("setting the source's settings"),
            )
        sql = ddl.sql
        if ddl.drops and ddl.drop_if_exists and self._settings.create_missing:
            sql = await self._drop_sql(ddl)
        pipe.query(
            sql.encode(),
            expect=Expect(
                lambda: (
                    f"{ddl.describe()}; if the replica cannot run it, apply its effect by "
                    f"hand and restart replicate with --skip-ddl {ddl.id}"
                )
            ),
        )
        if ddl.creates is not None:
            schema, rel = ddl.creates
            name = f"{quote_ident(schema)}.{quote_ident(rel)}" if schema else quote_ident(rel)
            found = pipe.query(
                _RESOLVE, [name.encode()], expect=Expect("finding the new table", keep=True)
            )
            await pipe.sync()
            res = found.result
            if res is not None and res.ntuples:
                self._creates.add(
                    ((res.get_value(0, 0) or b"").decode(), (res.get_value(0, 1) or b"").decode())
                )
        pipe.query(_SET_PATH, [self._search_path.encode()], expect=Expect("resetting search_path"))
        if ddl.settings is not None:
            pipe.query(
                _RESET_SETTINGS, [ddl.settings.encode()], expect=Expect("resetting the settings")
            )
        pipe.query(b"DEALLOCATE ALL", expect=Expect("DEALLOCATE ALL"))
        pipe.forget_prepared()
        self._catalog.clear()
        self._plans.clear()
        self._fast.clear()
        self._layouts.clear()
        self._frames.clear()
        self._framed.clear()
        self._tx_ddl = True
        self._changes += 1
        log.info("replayed %s", ddl.describe())
