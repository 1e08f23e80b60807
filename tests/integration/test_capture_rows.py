"""Row shapes through a real slot: keys, identities, partitions, TOAST, TRUNCATE, checkpoints."""

from __future__ import annotations

import os

import psycopg
import pytest
from slot_helpers import Captured, collect, fields, user_changes

from pgcapture.capture.reader import SlotReader
from pgcapture.proto import pb

pytestmark = pytest.mark.integration

INSERT, UPDATE, DELETE = pb.Change.INSERT, pb.Change.UPDATE, pb.Change.DELETE


def int8(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def int4(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


async def run(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


async def test_checkpoints_order_every_transaction(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE t (id int PRIMARY KEY)",
        "INSERT INTO t SELECT generate_series(1, 3)",
        "BEGIN; INSERT INTO t VALUES (4); UPDATE t SET id = 5 WHERE id = 4; COMMIT",
    )
    captured = await collect(reader, 3)
    transactions: list[list[Captured]] = [[]]
    for c in captured:
        transactions[-1].append(c)
        if c.kind == "commit":
            transactions.append([])
    transactions.pop()
    previous = (0, 0)
    for tx in transactions:
        begin, commit = tx[0].message.begin, tx[-1].message.commit
        assert tx[0].kind == "begin"
        assert tx[-1].kind == "commit"
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert [c.record.seq for c in tx] == list(range(len(tx)))
        assert {c.record.lsn for c in tx} == {begin.final_lsn}
        assert (tx[0].record.lsn, 0) > previous
        previous = (tx[-1].record.lsn, tx[-1].record.seq)
        assert tx[-1].record.end_lsn == commit.end_lsn
    assert [c.op for c in user_changes(captured)] == [INSERT] * 4 + [UPDATE]


async def test_primary_key_table_insert_update_delete(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE pk (id bigint PRIMARY KEY, v text)",
        "INSERT INTO pk VALUES (1, 'a'), (2, NULL)",
        "UPDATE pk SET v = 'b' WHERE id = 1",
        "UPDATE pk SET id = 10 WHERE id = 2",
        "DELETE FROM pk WHERE id = 1",
    )
    rows = user_changes(await collect(reader, 5))
    assert [c.op for c in rows] == [INSERT, INSERT, UPDATE, UPDATE, DELETE]
    assert all((c.schema, c.table) == ("public", "pk") for c in rows)
    first = fields(rows[0].new)
    assert first["id"].oid == 20
    assert first["id"].binary == int8(1)
    assert first["v"].binary == b"a"
    null = fields(rows[1].new)["v"]
    assert null.WhichOneof("value") is None
    assert not rows[2].old  # key unchanged: no old image
    assert [f.name for f in rows[3].old] == ["id"]
    assert rows[3].old[0].binary == int8(2)
    assert fields(rows[3].new)["id"].binary == int8(10)
    assert [(f.name, f.binary) for f in rows[4].old] == [("id", int8(1))]
    assert not rows[4].new


async def test_composite_key_old_image_has_only_key_columns(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE ck (a int, b text, v int, PRIMARY KEY (a, b))",
        "INSERT INTO ck VALUES (1, 'x', 7)",
        "UPDATE ck SET b = 'y' WHERE a = 1",
        "DELETE FROM ck",
    )
    rows = user_changes(await collect(reader, 4))
    assert [f.name for f in rows[1].old] == ["a", "b"]
    assert [f.name for f in rows[2].old] == ["a", "b"]
    assert rows[2].old[1].binary == b"y"


async def test_no_key_tables_with_identity_full_and_default(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE nk_full (a int, b text)",
        "ALTER TABLE nk_full REPLICA IDENTITY FULL",
        "CREATE TABLE nk_default (a int, b text)",
        "INSERT INTO nk_full VALUES (1, NULL)",
        "UPDATE nk_full SET b = 'z'",
        "DELETE FROM nk_full",
        "INSERT INTO nk_default VALUES (1, 'q')",
    )
    rows = user_changes(await collect(reader, 7))
    full_update, full_delete = rows[1], rows[2]
    assert full_update.op == UPDATE
    old = fields(full_update.old)
    assert old["a"].binary == int4(1)
    assert old["b"].WhichOneof("value") is None  # NULL kept in a full old image
    assert fields(full_update.new)["b"].binary == b"z"
    assert {f.name: f.binary for f in full_delete.old} == {"a": int4(1), "b": b"z"}
    assert rows[3].table == "nk_default"
    assert rows[3].op == INSERT
    # UPDATE/DELETE of a no-key table with REPLICA IDENTITY DEFAULT is refused by the server
    # (not our choice): the publication publishes updates and deletes.
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        await run(dsn, "UPDATE nk_default SET b = 'r'")


async def test_partitioned_table_changes_name_the_partition(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)",
        "CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (100)",
        "CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (100) TO (200)",
        "INSERT INTO parted VALUES (1, 'a'), (150, 'b')",
        "UPDATE parted SET v = 'c' WHERE id = 150",
        "DELETE FROM parted WHERE id = 1",
        "TRUNCATE parted",
    )
    captured = await collect(reader, 7)
    rows = user_changes(captured)
    assert [(c.op, c.table) for c in rows] == [
        (INSERT, "parted_low"),
        (INSERT, "parted_high"),
        (UPDATE, "parted_high"),
        (DELETE, "parted_low"),
    ]
    truncates = [c.message.truncate for c in captured if c.kind == "truncate"]
    assert len(truncates) == 1
    assert {t.table for t in truncates[0].tables} == {"parted_low", "parted_high"}


async def test_truncate_is_carried_with_its_options(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE parent (id int PRIMARY KEY)",
        "CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent)",
        "CREATE TABLE solo (id serial PRIMARY KEY)",
        "TRUNCATE solo RESTART IDENTITY",
        "TRUNCATE parent CASCADE",
    )
    captured = await collect(reader, 5)
    truncates = [c for c in captured if c.kind == "truncate"]
    assert len(truncates) == 2
    solo, cascade = (t.message.truncate for t in truncates)
    assert [(t.schema, t.table) for t in solo.tables] == [("public", "solo")]
    assert solo.restart_identity
    assert not solo.cascade
    assert {t.table for t in cascade.tables} == {"parent", "child"}
    assert cascade.cascade
    assert truncates[0].record.seq == 1


async def test_toasted_column_unchanged_null_and_changed(dsn: str, reader: SlotReader) -> None:
    big = os.urandom(6000).hex()  # incompressible: stored out of line
    await run(
        dsn,
        "CREATE TABLE doc (id int PRIMARY KEY, body text, n int)",
        f"INSERT INTO doc VALUES (1, '{big}', 0)",
        "UPDATE doc SET n = 1",
        "UPDATE doc SET body = NULL",
        f"UPDATE doc SET body = '{big[::-1]}'",
    )
    rows = user_changes(await collect(reader, 5))
    assert fields(rows[0].new)["body"].binary == big.encode()
    unchanged = fields(rows[1].new)
    assert "body" not in unchanged  # unchanged TOAST: absent
    assert unchanged["n"].binary == int4(1)
    nulled = fields(rows[2].new)["body"]
    assert nulled.WhichOneof("value") is None  # present, unset: NULL
    assert fields(rows[3].new)["body"].binary == big[::-1].encode()


async def test_unchanged_toast_is_filled_from_full_old_image(dsn: str, reader: SlotReader) -> None:
    big = os.urandom(6000).hex()
    await run(
        dsn,
        "CREATE TABLE docf (id int PRIMARY KEY, body text, n int)",
        "ALTER TABLE docf REPLICA IDENTITY FULL",
        f"INSERT INTO docf VALUES (1, '{big}', 0)",
        "UPDATE docf SET n = 1",
    )
    rows = user_changes(await collect(reader, 4))
    update = rows[1]
    assert fields(update.new)["body"].binary == big.encode()
    assert fields(update.old)["body"].binary == big.encode()


async def test_a_large_transaction_streams_in_order(dsn: str, reader: SlotReader) -> None:
    await run(
        dsn,
        "CREATE TABLE many (id int PRIMARY KEY)",
        "INSERT INTO many SELECT generate_series(1, 20000)",
    )
    captured = await collect(reader, 2)
    rows = user_changes(captured)
    assert [int.from_bytes(c.new[0].binary, "big") for c in rows] == list(range(1, 20001))
    seqs = [c.record.seq for c in captured if c.record.lsn == captured[-1].record.lsn]
    assert seqs == list(range(len(seqs)))


def keys_of(row: list[pb.Field] | object) -> dict[str, bool]:
    return {f.name: f.key for f in row}  # type: ignore[attr-defined]


async def test_fields_of_replica_identity_columns_are_flagged_key(
    dsn: str, reader: SlotReader
) -> None:
    statements = (
        "CREATE TABLE kpk (a int, b text, v int, PRIMARY KEY (b, a))",
        "CREATE TABLE kidx (id int PRIMARY KEY, u1 int NOT NULL, u2 text NOT NULL, v text)",
        "CREATE UNIQUE INDEX kidx_u ON kidx (u2, u1)",
        "ALTER TABLE kidx REPLICA IDENTITY USING INDEX kidx_u",
        "CREATE TABLE kfull (id int PRIMARY KEY, v text, n int)",
        "ALTER TABLE kfull REPLICA IDENTITY FULL",
        "CREATE TABLE knone (id int PRIMARY KEY, v text)",
        "ALTER TABLE knone REPLICA IDENTITY NOTHING",
        "CREATE TABLE knokey (a int, b text)",
        "INSERT INTO kpk VALUES (1, 'x', 7)",
        "UPDATE kpk SET v = 8",
        "UPDATE kpk SET b = 'y'",
        "DELETE FROM kpk",
        "INSERT INTO kidx VALUES (1, 2, 'u', 'v')",
        "UPDATE kidx SET v = NULL",
        "UPDATE kidx SET u1 = 3",
        "DELETE FROM kidx",
        "INSERT INTO kfull VALUES (1, 'a', NULL)",
        "UPDATE kfull SET v = 'b'",
        "DELETE FROM kfull",
        # rows of one byte shape: encoded by a compiled layout after the first two
        "INSERT INTO kfull SELECT g, 'c', NULL FROM generate_series(2, 7) g",
        "INSERT INTO knone VALUES (1, 'a')",
        "INSERT INTO knokey VALUES (1, 'a')",
        # a new identity: the changes after it carry the new flags
        "ALTER TABLE knokey REPLICA IDENTITY FULL",
        "INSERT INTO knokey VALUES (2, NULL)",
    )
    await run(dsn, *statements)
    captured = await collect(reader, len(statements))  # one transaction each
    rows = user_changes(captured)
    by_table: dict[str, list[pb.Change]] = {}
    for change in rows:
        by_table.setdefault(change.table, []).append(change)

    pk = by_table["kpk"]
    assert [c.op for c in pk] == [INSERT, UPDATE, UPDATE, DELETE]
    assert keys_of(pk[0].new) == {"a": True, "b": True, "v": False}
    assert keys_of(pk[1].new) == {"a": True, "b": True, "v": False}
    assert keys_of(pk[2].old) == {"a": True, "b": True}  # the key changed: its old values
    assert keys_of(pk[3].old) == {"a": True, "b": True}

    idx = by_table["kidx"]
    assert [c.op for c in idx] == [INSERT, UPDATE, UPDATE, DELETE]
    index_keys = {"id": False, "u1": True, "u2": True, "v": False}
    for change in idx[:3]:
        assert keys_of(change.new) == index_keys
    assert fields(idx[1].new)["v"].WhichOneof("value") is None
    assert keys_of(idx[2].old) == {"u1": True, "u2": True}
    assert keys_of(idx[3].old) == {"u1": True, "u2": True}

    full = by_table["kfull"]
    assert [c.op for c in full] == [INSERT, UPDATE, DELETE] + [INSERT] * 6
    every = {"id": True, "v": True, "n": True}
    assert keys_of(full[0].new) == every
    assert fields(full[0].new)["n"].WhichOneof("value") is None  # a NULL key field
    assert keys_of(full[1].new) == every
    assert keys_of(full[1].old) == every
    assert keys_of(full[2].old) == every
    for change in full[3:]:
        assert keys_of(change.new) == every
        assert fields(change.new)["n"].WhichOneof("value") is None

    assert keys_of(by_table["knone"][0].new) == {"id": False, "v": False}
    before, after = by_table["knokey"]
    assert keys_of(before.new) == {"a": False, "b": False}
    assert keys_of(after.new) == {"a": True, "b": True}

    # byte for byte what protobuf writes for the same message
    for c in captured:
        assert c.message.SerializeToString() == c.record.message
