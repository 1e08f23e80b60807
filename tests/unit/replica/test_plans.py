"""SQL and parameters of replica plans, binary arrays, OID rewriting and the DDL replay rules."""

from __future__ import annotations

import json
import struct

import pytest

from pgcapture.proto import pb
from pgcapture.replica.catalog import Column, Table, _array_fixer, _record_fixer
from pgcapture.replica.ddl import DdlNotReplayable, decide
from pgcapture.replica.plans import (
    SchemaMismatch,
    binary_array,
    delete_plan,
    insert_plan,
    update_plan,
)


def _col(name: str, oid: int = 23, array: int = 1007, **kw: bool) -> Column:
    return Column(
        name, oid, array, kw.get("is_array", False), kw.get("generated", False),
        kw.get("always", False), None,
    )  # fmt: skip


ITEMS = Table(
    "public",
    'Mixed "Case"',
    {c.name: c for c in (_col("id"), _col("Val", 25, 1009), _col("g", generated=True))},
    ("id",),
    False,
)


def test_insert_runs_use_unnest_with_quoted_names() -> None:
    plan = insert_plan(ITEMS, (("id", 23, False), ("Val", 25, False), ("g", 23, False)))
    assert plan.batched
    assert plan.sql == (
        b'INSERT INTO "public"."Mixed ""Case""" ("id", "Val") SELECT unnest($1), unnest($2)'
    )
    assert plan.types == (1007, 1009)
    assert plan.params([b"1", b"x", b"2"], []) == [b"1", b"x"]


def test_text_values_and_arrays_go_row_by_row() -> None:
    text = insert_plan(ITEMS, (("id", 23, False), ("Val", 25, True)))
    assert not text.batched
    assert text.formats == (1, 0)
    assert b"VALUES ($1, $2)" in text.sql
    arrays = Table("s", "t", {"a": _col("a", 1007, 0, is_array=True)}, (), False)
    assert not insert_plan(arrays, (("a", 1007, False),)).batched


def test_update_and_delete_by_key() -> None:
    upd = update_plan(ITEMS, (("id", 23, False), ("Val", 25, False)), (), False)
    assert upd.batched
    assert upd.nkey == 1
    assert b'SET "Val" = v.p2' in upd.sql
    assert b't."id" = v.p1' in upd.sql
    moved = update_plan(ITEMS, (("id", 23, False), ("Val", 25, False)), (("id", 23, False),), True)
    assert not moved.batched
    assert (
        moved.sql
        == b'UPDATE ONLY "public"."Mixed ""Case""" SET "id" = $2, "Val" = $3 WHERE "id" = $1'
    )
    assert moved.params([b"2", b"x"], [b"1"]) == [b"1", b"2", b"x"]
    keep = update_plan(ITEMS, (("id", 23, False), ("Val", 25, False)), (("id", 23, False),), False)
    assert keep.moves_key([b"2", b"x"], [b"1"])
    assert not keep.moves_key([b"1", b"x"], [b"1"])
    gone = delete_plan(ITEMS, (("id", 23, False),))
    assert gone.batched
    assert gone.sql.startswith(b'DELETE FROM ONLY "public"."Mixed ""Case""" AS t USING')


def test_tables_without_key_match_the_whole_old_row() -> None:
    nokey = Table("s", "t", {"a": _col("a"), "b": _col("b", 25, 1009)}, (), False)
    plan = delete_plan(nokey, (("a", 23, False), ("b", 25, False)))
    assert plan.sql == (
        b'DELETE FROM ONLY "s"."t" WHERE ctid = (SELECT ctid FROM ONLY "s"."t" WHERE '
        b'"a"::text IS NOT DISTINCT FROM $1::text AND "b"::text IS NOT DISTINCT FROM $2::text '
        b"LIMIT 1)"
    )
    with pytest.raises(SchemaMismatch, match="REPLICA IDENTITY FULL"):
        update_plan(nokey, (("a", 23, False),), (), False)


def test_schema_differences_are_named() -> None:
    with pytest.raises(SchemaMismatch, match="column 'nope'"):
        insert_plan(ITEMS, (("nope", 23, False),))
    with pytest.raises(
        SchemaMismatch, match="type OID 23 on the replica but the source sends type OID 20"
    ):
        insert_plan(ITEMS, (("id", 20, False),))


def test_binary_array_layout() -> None:
    head = struct.Struct(">iiIii")
    fixed = binary_array(23, [b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"])
    assert (
        fixed
        == head.pack(1, 0, 23, 2, 1)
        + b"\x00\x00\x00\x04\x00\x00\x00\x01\x00\x00\x00\x04\x00\x00\x00\x02"
    )
    mixed = binary_array(25, [b"ab", None, b""])
    assert (
        mixed == head.pack(1, 1, 25, 3, 1) + b"\x00\x00\x00\x02ab\xff\xff\xff\xff\x00\x00\x00\x00"
    )


def test_oid_fixers_rewrite_arrays_and_records() -> None:
    array = struct.pack(">iiIii", 1, 0, 99999, 1, 1) + struct.pack(">i", 2) + b"ok"
    fixed = _array_fixer(16500, None)(array)
    assert struct.unpack_from(">I", fixed, 8)[0] == 16500
    assert fixed[12:] == array[12:]
    record = struct.pack(">iIi", 2, 99998, 1) + b"x" + struct.pack(">Ii", 23, -1)
    out = _record_fixer([(16600, None), (23, None)])(record)
    assert out == struct.pack(">iIi", 2, 16600, 1) + b"x" + struct.pack(">Ii", 23, -1)


def _ddl_change(query: str | None, ident: int = 7, **activity: object) -> pb.Change:
    fields = [pb.Field(name="id", oid=23, binary=struct.pack(">i", ident))]
    if query is not None:
        fields.append(pb.Field(name="query", oid=25, binary=query.encode()))
    act = {"exact": True, "objects": [], **activity}
    fields.append(pb.Field(name="activity", oid=3802, binary=b"\x01" + json.dumps(act).encode()))
    return pb.Change(schema="pgcapture", table="ddl_logs", new=fields)


def test_ddl_rules() -> None:
    run = decide(_ddl_change("ALTER TABLE t ADD c int", search_path='"$user", app'))
    assert run.sql == "ALTER TABLE t ADD c int"
    assert run.search_path == '"$user", app'
    assert decide(_ddl_change("REFRESH MATERIALIZED VIEW m")).skip
    assert decide(_ddl_change("ALTER PUBLICATION p ADD TABLE t")).skip
    assert decide(_ddl_change("DROP PUBLICATION p")).skip
    assert (
        decide(_ddl_change("ALTER TABLE t ADD c int"), frozenset({7})).skip
        == "listed in --skip-ddl"
    )
    own = [{"schema_name": "pgcapture", "object_type": "table", "object_identity": "x"}]
    assert decide(_ddl_change("CREATE TABLE pgcapture.x ()", objects=own)).skip
    concurrently = decide(_ddl_change("CREATE INDEX CONCURRENTLY i ON t (a)"))
    assert concurrently.sql == "CREATE INDEX i ON t (a)"
    ctas = decide(_ddl_change("CREATE TABLE s.n AS SELECT 1"))
    assert ctas.creates == ("s", "n")
    assert decide(_ddl_change("SELECT 1 INTO n")).creates == (None, "n")
    with pytest.raises(DdlNotReplayable, match="--skip-ddl 9"):
        decide(_ddl_change("CREATE TABLE a (); CREATE TABLE b ()", 9, exact=False, reason="r"))


def test_detach_concurrently_and_session_settings() -> None:
    detach = decide(_ddl_change("ALTER TABLE p DETACH PARTITION p_a CONCURRENTLY"))
    assert detach.sql == "ALTER TABLE p DETACH PARTITION p_a"
    assert decide(_ddl_change("ALTER TABLE p DETACH PARTITION p_a FINALIZE")).skip
    settings = {"TimeZone": "Asia/Tokyo", "DateStyle": "ISO, DMY"}
    ddl = decide(
        _ddl_change("ALTER TABLE t ADD at timestamptz DEFAULT '1/2/2020'", settings=settings)
    )
    assert ddl.settings is not None
    assert json.loads(ddl.settings) == settings
