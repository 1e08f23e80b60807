"""The Python statement splitter: PostgreSQL's parser decides where statements end."""

from __future__ import annotations

import pytest
from pglast.parser import ParseError

from pgcapture.capture.ddl import split_statements


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("", []),
        ("   \n\t", []),
        ("-- only a comment", []),
        ("select 1", ["select 1"]),
        ("select 1;", ["select 1"]),
        ("  select 1 ;  \n", ["select 1"]),
        (";;select 1;;;select 2;", ["select 1", "select 2"]),
        ("select 'a;b'; select 2", ["select 'a;b'", "select 2"]),
        ("select 'it''s; fine'", ["select 'it''s; fine'"]),
        (r"select E'\';'; select 2", [r"select E'\';'", "select 2"]),
        ('select 1 as "semi;colon""q"', ['select 1 as "semi;colon""q"']),
        ("select $$a;b$$; select $t$ $$ ; $t$", ["select $$a;b$$", "select $t$ $$ ; $t$"]),
        (
            "select 1 /* a; /* nested; */ still; */; select 2",
            ["select 1 /* a; /* nested; */ still; */", "select 2"],
        ),
        ("select 1 -- a; b\n; select 2", ["select 1 -- a; b", "select 2"]),
        ("select U&'\\0041;'; select 2", ["select U&'\\0041;'", "select 2"]),
        ("select 'é;ü'; select \"ß;\"", ["select 'é;ü'", 'select "ß;"']),
    ],
)
def test_splits_like_the_server(sql: str, expected: list[str]) -> None:
    assert split_statements(sql) == expected


def test_comments_before_a_statement_belong_to_none() -> None:
    sql = "-- header\ncreate table a(x int); /* why */ alter table a add y int /* after */;"
    assert split_statements(sql) == ["create table a(x int)", "alter table a add y int /* after */"]


def test_trailing_comment_stays_with_the_last_statement() -> None:
    assert split_statements("select 1; select 2 -- done") == ["select 1", "select 2 -- done"]


def test_begin_atomic_body_is_one_statement() -> None:
    body = (
        "create function f(x int) returns int language sql begin atomic "
        "select case when x > 0 then 1 else 2 end; select 3; end"
    )
    assert split_statements(f"{body}; select f(1)") == [body, "select f(1)"]


def test_procedure_with_begin_atomic() -> None:
    body = "create procedure p() language sql begin atomic insert into t values (1); end"
    assert split_statements(f"create table t(a int);{body};call p()") == [
        "create table t(a int)",
        body,
        "call p()",
    ]


def test_rule_actions_in_parentheses_are_one_statement() -> None:
    rule = "create rule r as on insert to t do instead (delete from t; ; delete from t)"
    assert split_statements(f"{rule}; select 1") == [rule, "select 1"]


def test_end_as_a_label_does_not_close_a_begin_atomic_body() -> None:
    # END closes the body only right after ATOMIC or a semicolon; elsewhere it ends a CASE
    # or is a column label
    body = (
        "create function f() returns int language sql begin atomic "
        "select 1 end; select t.end, case when true then 1 end end from t; "
        "create function g() returns int language sql begin atomic select 2; end; end"
    )
    assert split_statements(f"{body}; select 3") == [body, "select 3"]


def test_multi_line_statements_keep_inner_newlines() -> None:
    sql = "create table t (\n  a int, -- first\n  b text\n);\ninsert into t values (1, 'x;\ny');"
    assert split_statements(sql) == [
        "create table t (\n  a int, -- first\n  b text\n)",
        "insert into t values (1, 'x;\ny')",
    ]


def test_invalid_sql_raises_parse_error() -> None:
    with pytest.raises(ParseError):
        split_statements("select 'unterminated")
