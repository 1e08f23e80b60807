"""Types without a binary send function (issue 14, item 2): ``aclitem`` and what contains it.

pgoutput's ``binary`` option makes the walsender fail on an array or a composite whose element
has no binary output function (``aclitem[]``, as in ``CREATE TABLE t AS SELECT * FROM
pg_class``). Capture reads that transaction again with ``binary`` off, so its values arrive as
``Field.text``, and goes back to binary for the next one; the replica and the client library
take the text values.
"""

from __future__ import annotations

import psycopg
import pytest
from slot_helpers import Captured, collect, fields, user_changes

from pgcapture.capture.reader import SlotReader, TextFallback
from pgcapture.proto import pb

pytestmark = pytest.mark.integration

ACL_SETUP = (
    "CREATE DOMAIN acl AS aclitem",
    "CREATE TYPE grant_pair AS (who text, what aclitem)",
)


async def run(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


def _transactions(captured: list[Captured]) -> list[list[Captured]]:
    out: list[list[Captured]] = []
    for c in captured:
        if c.kind == "begin":
            out.append([])
        out[-1].append(c)
    return out


def _formats(change: pb.Change) -> set[str]:
    return {str(f.WhichOneof("value")) for f in change.new if f.WhichOneof("value")}


async def test_a_transaction_without_binary_output_arrives_as_text_then_binary_again(
    dsn: str, slot_name: str
) -> None:
    fallbacks: list[TextFallback] = []
    reader = SlotReader(dsn, slot_name, status_interval=0.5, on_text_fallback=fallbacks.append)
    await reader.open()
    try:
        await run(dsn, *ACL_SETUP, "CREATE TABLE plain (id int PRIMARY KEY, v text)")
        await run(
            dsn,
            "BEGIN; INSERT INTO plain VALUES (1, 'before');"
            " CREATE TABLE cls AS SELECT oid, relname, relacl FROM pg_class"
            "  WHERE relacl IS NOT NULL ORDER BY oid;"
            " INSERT INTO plain VALUES (2, 'after'); COMMIT",
            "CREATE TABLE grants (id int PRIMARY KEY, one acl, many aclitem[], pair grant_pair)",
            "INSERT INTO grants VALUES (1, 'postgres=r/postgres', "
            "  '{postgres=arw/postgres,=r/postgres}', ROW('x', 'postgres=w/postgres'))",
            "UPDATE grants SET many = '{=w/postgres}' WHERE id = 1",
            "INSERT INTO plain VALUES (3, 'later')",
        )
        # setup (2 DDL), plain, the CTAS transaction, grants (DDL, insert, update), plain
        captured = await collect(reader, 8)
    finally:
        await reader.close()

    txs = _transactions(captured)
    assert len(txs) == 8
    ctas = txs[3]
    rows = [c.message.change for c in ctas if c.kind == "change"]
    cls = [r for r in rows if r.table == "cls"]
    assert cls, "the CTAS rows are in the stream"
    for change in cls:
        relacl = fields(change.new)["relacl"]
        assert relacl.WhichOneof("value") == "text"
        assert relacl.text.startswith("{")
    # the first insert into plain was sent in binary before the walsender failed; the rest of
    # the transaction, from the failing row on, came in text
    plain = [r for r in rows if r.table == "plain"]
    assert [_formats(r) for r in plain] == [{"binary"}, {"text"}]
    seqs = [c.record.seq for c in ctas]
    assert seqs == list(range(len(ctas)))  # nothing doubled or skipped across the switch

    insert, update = (c.message.change for c in txs[5] + txs[6] if c.kind == "change")
    assert insert.table == update.table == "grants"
    got = fields(insert.new)
    assert got["many"].text == "{postgres=arw/postgres,=r/postgres}"
    assert got["one"].text == "postgres=r/postgres"
    assert got["pair"].text == "(x,postgres=w/postgres)"
    assert fields(update.new)["many"].text == "{=w/postgres}"

    # back to binary for the next transaction
    (later,) = user_changes(txs[7])
    assert _formats(later) == {"binary"}
    assert [f.lsn for f in fallbacks] == [
        txs[3][0].record.lsn,
        txs[5][0].record.lsn,
        txs[6][0].record.lsn,
    ]
    assert all(f.type_name == "aclitem" for f in fallbacks)
