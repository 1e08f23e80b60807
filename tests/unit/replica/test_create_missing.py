"""``--create-missing SCHEMA.TABLE``: how the names are written and read, and the DROP TABLE
statements that may go on without a listed table the replica never created."""

from __future__ import annotations

import json
import shlex
import struct

import pytest

from pgcapture.config import validate_config
from pgcapture.errors import ConfigError
from pgcapture.proto import pb
from pgcapture.replica.catalog import parse_table_arg, table_arg
from pgcapture.replica.ddl import decide
from pgcapture.replica.service import _tables


def ddl_row(query: str) -> pb.Change:
    act = {"exact": True, "objects": [], "nested": False}
    return pb.Change(
        schema="pgcapture",
        table="ddl_logs",
        new=[
            pb.Field(name="id", oid=23, binary=struct.pack(">i", 3)),
            pb.Field(name="query", oid=25, binary=query.encode()),
            pb.Field(name="activity", oid=3802, binary=b"\x01" + json.dumps(act).encode()),
        ],
    )


@pytest.mark.parametrize(
    ("schema", "table"),
    [("public", "t"), ("app", "Orders"), ("my.schema", 'odd "name"'), ("s", "it's"), ("a", "$x")],
)
def test_the_fix_in_a_message_reads_back_as_the_table(schema: str, table: str) -> None:
    (word,) = shlex.split(table_arg(schema, table))
    assert parse_table_arg(word) == (schema, table)


def test_plain_names_stay_plain() -> None:
    assert table_arg("public", "orders") == "public.orders"
    assert parse_table_arg("App.Orders") == ("App", "Orders")  # as written, never folded


@pytest.mark.parametrize("text", ["orders", "a.b.c", ".t", "s.", '"s.t"', ""])
def test_a_name_that_is_not_schema_dot_table_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"SCHEMA\.TABLE"):
        parse_table_arg(text)
    with pytest.raises(ConfigError, match=r"create_missing.*SCHEMA\.TABLE"):
        _tables([text], "[sources.app.replica] create_missing")


def test_the_setting_is_a_list_of_names() -> None:
    config = validate_config(
        {"sources": {"app": {"replica": {"create_missing": ["public.t", '"x.y".z']}}}}
    )
    names = config.source("app", need_dsn=False).replica.create_missing
    assert _tables(names, "") == {("public", "t"), ("x.y", "z")}


def test_drop_table_names_its_tables_and_has_an_if_exists_form() -> None:
    ddl = decide(ddl_row('DROP TABLE t, app."K", e CASCADE'))
    assert ddl.sql == 'DROP TABLE t, app."K", e CASCADE'
    assert ddl.drops == ((None, "t"), ("app", "K"), (None, "e"))
    assert ddl.drop_if_exists == 'DROP TABLE IF EXISTS t, app."K", e CASCADE'


@pytest.mark.parametrize(
    "query", ["DROP TABLE IF EXISTS t", "DROP VIEW v", "DROP INDEX i", "DROP TABLE db.s.t"]
)
def test_other_drops_run_as_logged(query: str) -> None:
    ddl = decide(ddl_row(query))
    assert ddl.sql == query
    assert ddl.drops == ()
    assert ddl.drop_if_exists is None
