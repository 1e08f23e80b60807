"""A replica replays the whole statement of the client's string, even from a row that a capture
before issue 14 cut short at a semicolon inside the statement."""

from __future__ import annotations

import json
import struct

from pgcapture.proto import pb
from pgcapture.replica.ddl import decide

RULE = "create rule r as on insert to t do instead (delete from t; delete from t)"


def ddl_row(query: str, **activity: object) -> pb.Change:
    act = {"exact": True, "objects": [], "nested": False, **activity}
    return pb.Change(
        schema="pgcapture",
        table="ddl_logs",
        new=[
            pb.Field(name="id", oid=23, binary=struct.pack(">i", 3)),
            pb.Field(name="query", oid=25, binary=query.encode()),
            pb.Field(name="activity", oid=3802, binary=b"\x01" + json.dumps(act).encode()),
        ],
    )


def test_a_statement_cut_at_an_inner_semicolon_is_replayed_whole() -> None:
    top = f"create table t (a int); {RULE}; insert into t values (1)"
    cut = "create rule r as on insert to t do instead (delete from t"
    assert decide(ddl_row(cut, top_level_query=top)).sql == RULE


def test_a_statement_of_the_string_is_replayed_as_logged() -> None:
    # an earlier statement that starts with the same text is not taken for it
    top = "create table a (x int) partition by list (x); create table a (x int)"
    row = ddl_row("create table a (x int)", top_level_query=top)
    assert decide(row).sql == "create table a (x int)"


def test_rows_the_string_cannot_judge_are_replayed_as_logged() -> None:
    cut = "create rule r as on insert to t do instead (delete from t"
    top = f"{RULE}; {RULE.replace(' r ', ' r2 ')}"
    ambiguous = "create rule r"
    for row in (
        ddl_row(cut, top_level_query=f"{RULE}; select 'unterminated"),  # does not parse
        ddl_row(cut, top_level_query=RULE, nested=True),
        ddl_row(cut, top_level_query=RULE, settings={"standard_conforming_strings": "off"}),
        ddl_row(ambiguous, top_level_query=top),  # two statements start with it
    ):
        assert decide(row).sql == row.new[1].binary.decode()


def test_a_row_read_in_text_is_decided_like_a_binary_one() -> None:
    # capture reads a transaction with binary off when one of its values has no binary form
    act = {"exact": True, "objects": [], "search_path": "app"}
    change = pb.Change(
        schema="pgcapture",
        table="ddl_logs",
        new=[
            pb.Field(name="id", oid=23, text="78"),
            pb.Field(name="query", oid=25, text="ALTER TABLE t ADD c int"),
            pb.Field(name="activity", oid=3802, text=json.dumps(act)),
        ],
    )
    ddl = decide(change)
    assert (ddl.id, ddl.sql, ddl.search_path) == (78, "ALTER TABLE t ADD c int", "app")
