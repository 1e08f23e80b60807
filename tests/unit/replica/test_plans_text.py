"""Plans for text values (issue 14): text parameters, no OID rewriting of text, and columns
whose type has no binary receive function."""

from __future__ import annotations

from pgcapture.replica.catalog import Column, Table
from pgcapture.replica.plans import delete_plan, insert_plan, update_plan

_RECORD_OID = 16500  # a user composite on the replica


def _rewrite(value: bytes) -> bytes:
    return b"rewritten"


def _table() -> Table:
    columns = (
        Column("id", 23, 1007, False, False, False, None),
        Column("pair", _RECORD_OID, 16499, False, False, False, _rewrite),
        Column("acl", 1033, 1034, False, False, False, None, text_only=True),
        Column("n", 23, 1007, False, False, False, None),
    )
    return Table("public", "t", {c.name: c for c in columns}, ("id",), False)


def test_a_text_value_is_a_text_parameter_and_its_oids_are_not_rewritten() -> None:
    table = _table()
    shape = (("id", 23, True), ("pair", 16000, True), ("acl", 1033, True), ("n", 23, True))
    plan = insert_plan(table, shape)
    assert not plan.batched
    assert plan.formats == (0, 0, 0, 0)
    text = [b"1", b"(x,postgres=r/postgres)", b"=r/postgres", b"7"]
    assert plan.params(text, []) == text


def test_binary_values_of_the_same_table_keep_their_own_plan_and_rewriting() -> None:
    table = _table()
    shape = (("id", 23, False), ("pair", 16000, False), ("acl", 1033, False), ("n", 23, False))
    plan = insert_plan(table, shape)
    # the aclitem column cannot be received in binary: text format even for its NULLs, and
    # the row is not put in a binary array
    assert not plan.batched
    assert plan.formats == (1, 1, 0, 1)
    assert plan.params([b"\0\0\0\1", b"record", None, b"\0\0\0\7"], []) == [
        b"\0\0\0\1", b"rewritten", None, b"\0\0\0\7",
    ]  # fmt: skip
    # without such a column, binary rows of a table still go in binary arrays
    plain = Table("public", "u", {c: table.columns[c] for c in ("id", "n")}, ("id",), False)
    assert insert_plan(plain, (("id", 23, False), ("n", 23, False))).batched
    assert not insert_plan(plain, (("id", 23, False), ("n", 23, True))).batched


def test_updates_and_deletes_of_text_rows_use_text_parameters() -> None:
    table = _table()
    new = (("id", 23, True), ("pair", 16000, True), ("acl", 1033, False), ("n", 23, True))
    upd = update_plan(table, new, (), False)
    assert upd.kind == "update_row"
    assert upd.formats == (0, 0, 0, 0)  # key, then pair, acl (NULL, no binary input), n
    assert upd.fixes == ()
    binary_key = update_plan(table, (("id", 23, False), ("n", 23, True)), (), False)
    assert binary_key.formats == (1, 0)
    delete = delete_plan(table, (("id", 23, True),))
    assert delete.kind == "delete_row"
    assert delete.formats == (0,)
