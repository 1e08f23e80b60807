"""The server-side splitter against PostgreSQL's parser, over generated statement forms.

``pgcapture.split_statements`` (PL/pgSQL, run by the event triggers) must cut a query string
where the server's grammar does; pglast (the server's parser) is the reference. The generator
builds query strings from the forms that hold semicolons or look like they end a statement:
CREATE RULE with several actions in parentheses, BEGIN ATOMIC bodies (nested, with CASE ...
END, ``end`` as a column label or after a dot), dollar quotes with tags, nested comments,
E'' and U&'' strings, string continuation across lines, quoted identifiers.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcapture.capture.ddl import install_ddl_capture, split_statements

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_LEAVES = [
    "1",
    "x",
    "t.end",
    "t.case",
    "'a;b'",
    "'it''s; end'",
    "E'x\\';'",
    "E'a'\n'\\';'",  # the continued part of an E'' string takes backslash escapes too
    "'a' -- c;\n  'b;'",
    "$$;$$",
    "$t$ $$ ; end; $t$",
    '"q;""x"',
    "U&'\\0041;'",
    'U&"a;"',
    "B'101'",
    "X'1F'",
    "/* c; /* n; */ end; */ 2",
    "3 -- c; end\n",
    "$1",
    "'é;ü'",
]


def _expressions() -> st.SearchStrategy[str]:
    return st.recursive(
        st.sampled_from(_LEAVES),
        lambda inner: st.one_of(
            st.builds("({})".format, inner),
            st.builds("{} + {}".format, inner, inner),
            st.builds("case when {} > 0 then {} else {} end".format, inner, inner, inner),
            st.builds("case {} when 1 then {} end".format, inner, inner),
            st.builds("coalesce({}, {})".format, inner, inner),
            st.builds("(select {} as end)".format, inner),
        ),
        max_leaves=6,
    )


_LABELS = ["", " as end", " end", " as case", ' as "x;"', " as begin", " case"]


def _plain(expr: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Statements a rule action or a function body may hold."""
    return st.one_of(
        st.builds("select {}{}".format, expr, st.sampled_from(_LABELS)),
        st.builds("select {}{} from t".format, expr, st.sampled_from(_LABELS)),
        st.builds("insert into t values ({})".format, expr),
        st.builds("update t set a = {} where a = {}".format, expr, expr),
        st.builds("delete from t where a = {}".format, expr),
        st.just("notify c, 'x;y'"),
    )


def _rule(expr: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    actions = st.lists(st.one_of(_plain(expr), st.just("")), min_size=1, max_size=4)
    return st.one_of(
        st.builds(
            "create rule r as on {} to t do instead ({})".format,
            st.sampled_from(["insert", "update", "delete"]),
            actions.map("; ".join),
        ),
        st.builds("create or replace rule r as on insert to t do also {}".format, _plain(expr)),
        st.just("create rule r as on delete to t do instead nothing"),
    )


def _routine(body: st.SearchStrategy[str], expr: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    head = st.sampled_from(
        [
            "create function f() returns int language sql",
            "CREATE OR REPLACE FUNCTION f(a int default 1) RETURNS int LANGUAGE sql",
            "create procedure p() language sql",
            'create function "begin"() returns int language sql set search_path = begin',
        ]
    )
    stmts = st.lists(st.builds("{};".format, body), max_size=4).map(" ".join)
    return st.one_of(
        st.builds("{} begin atomic {} end".format, head, stmts),
        st.builds("{} BEGIN\n ATOMIC {} END".format, head, stmts),
        st.builds("{} return {}".format, head, expr),
        st.builds(
            "{} as $body$ select 1; begin atomic; end $body$".format,
            head,
        ),
    )


def _statements() -> st.SearchStrategy[str]:
    expr = _expressions()
    body = st.recursive(
        st.one_of(_plain(expr), _rule(expr), st.builds("return {}".format, expr)),
        lambda inner: _routine(inner, expr),
        max_leaves=3,
    )
    return st.one_of(
        _plain(expr),
        _rule(expr),
        _routine(body, expr),
        st.builds('create table t (a int default {}, "b;" text)'.format, expr),
        st.builds("do $do$ begin perform {}; end $do$".format, expr),
        st.just("begin"),
        st.just("end"),
        st.just("commit"),
    )


_SEPARATORS = [";", " ;", ";\n", "; /* between; */ ", ";; ", "; -- line;\n", ";\t"]


@pytest.fixture
def source(dsn: str) -> str:
    async def install() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await install_ddl_capture(conn)

    asyncio.run(install())
    return dsn


@pytest.mark.timeout(90)
def test_the_server_splitter_cuts_generated_query_strings_like_the_parser(source: str) -> None:
    disagreements: list[tuple[str, list[str], list[str]]] = []
    checked = 0
    deadline = time.monotonic() + 40  # keeps the test bounded on a slow machine

    with psycopg.connect(source) as conn:

        @settings(
            max_examples=600, deadline=None, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large],
        )  # fmt: skip
        @given(
            head=st.sampled_from(["", " ", "\n-- header;\n", "/* c; */ "]),
            body=st.lists(
                st.tuples(_statements(), st.sampled_from(_SEPARATORS)), min_size=1, max_size=4
            ),
            last=st.one_of(_statements(), st.just("")),
        )
        def check(head: str, body: list[tuple[str, str]], last: str) -> None:
            nonlocal checked
            if time.monotonic() > deadline:
                return
            sql = head + "".join(stmt + sep for stmt, sep in body) + last
            expected = split_statements(sql)
            row = conn.execute("SELECT pgcapture.split_statements(%s)", (sql,)).fetchone()
            assert row is not None
            checked += 1
            if list(row[0]) != expected:
                disagreements.append((sql, expected, list(row[0])))

        check()
    assert checked >= 100
    assert disagreements[:3] == []
