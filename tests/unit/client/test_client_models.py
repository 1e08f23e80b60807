"""Models: table and column mapping, UNCHANGED, keys, and fitting values to declared types."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple

import psycopg
import pydantic
import pytest
from client_helpers import change, db_field, int4, text, truncate

from pgcapture.checkpoint import Checkpoint
from pgcapture.client import (
    UNCHANGED,
    Change,
    ChangeDecodeError,
    Column,
    Op,
    RawValue,
    Row,
    TableName,
    Truncate,
    TypeResolver,
    Unchanged,
    ValueDecoder,
    ValueFormat,
    table,
)
from pgcapture.client.build import EventBuilder
from pgcapture.client.change import Ticket
from pgcapture.client.models import ModelSpec, model_spec
from pgcapture.errors import ConfigError
from pgcapture.proto import pb

pytestmark = pytest.mark.timeout(60)


@table("public.users")
@dataclass
class User:
    id: int
    name: Annotated[str, Column("full_name")]
    bio: str | Unchanged | None = UNCHANGED
    email: str | None = field(default=None, metadata={"column": "mail"})


class Account(pydantic.BaseModel):
    __table__ = "billing.accounts"
    id: int
    owner: Annotated[str, Column("owner_name")]
    note: str | Unchanged | None = UNCHANGED


def build(
    message: pb.CaptureMessage, *models: type[Any], decoder: ValueDecoder | None = None
) -> Any:
    specs: dict[tuple[str, str], ModelSpec] = {}
    for model in models:
        spec = model_spec(model)
        specs[(spec.schema, spec.table)] = spec
    return EventBuilder(decoder or ValueDecoder(), specs).build(message, Ticket())


def test_dataclass_maps_table_columns_and_overrides() -> None:
    spec = model_spec(User)
    assert (spec.schema, spec.table) == ("public", "users")
    assert [(f.attr, f.column) for f in spec.fields] == [
        ("id", "id"),
        ("name", "full_name"),
        ("bio", "bio"),
        ("email", "mail"),
    ]


def test_insert_builds_model_with_unchanged_for_absent_columns() -> None:
    message = change(
        "users",
        10,
        3,
        new=[int4("id", 1, key=True), text("full_name", "Ann"), text("mail", None), int4("x", 5)],
    )
    event = build(message, User)
    assert isinstance(event, Change)
    assert event.op is Op.INSERT
    assert event.checkpoint == Checkpoint(10, 3)
    assert event.new == User(id=1, name="Ann", bio=UNCHANGED, email=None)
    assert event.new.bio is UNCHANGED
    assert event.new.email is None
    assert event.old is None
    assert event.key == Row({"id": 1})
    assert event.old_key is None


def test_update_with_key_change_has_old_key_and_new_key() -> None:
    message = change(
        "users",
        11,
        op=pb.Change.UPDATE,
        new=[int4("id", 2, key=True), text("full_name", "Ann"), text("bio", "hi")],
        old=[int4("id", 1, key=True)],
    )
    event = build(message, User)
    assert event.op is Op.UPDATE
    assert event.key == {"id": 2}
    assert event.old_key == {"id": 1}
    assert event.old == User(id=1, name=UNCHANGED, bio=UNCHANGED, email=UNCHANGED)  # type: ignore[arg-type]


def test_delete_key_comes_from_old() -> None:
    message = change("users", 12, op=pb.Change.DELETE, old=[int4("id", 7, key=True)])
    event = build(message, User)
    assert event.op is Op.DELETE
    assert event.new is None
    assert event.key == {"id": 7}


def test_pydantic_model_in_another_schema() -> None:
    message = change(
        "accounts", 1, schema="billing", new=[int4("id", 3, key=True), text("owner_name", "Bo")]
    )
    event = build(message, Account)
    assert event.new == Account.model_construct(id=3, owner="Bo", note=UNCHANGED)
    assert event.new.note is UNCHANGED


def test_tables_without_model_give_rows_and_ddl_is_flagged() -> None:
    message = change(
        "ddl_logs", 5, schema="pgcapture", new=[int4("id", 1, key=True), text("query", "x")]
    )
    event = build(message, User)
    assert isinstance(event.new, Row)
    assert dict(event.new) == {"id": 1, "query": "x"}
    assert event.is_ddl


def test_truncate_event() -> None:
    event = build(truncate(9, "a", "b"))
    assert isinstance(event, Truncate)
    assert event.tables == (TableName("public", "a"), TableName("public", "b"))
    assert event.checkpoint == Checkpoint(9, 1)


def test_undecodable_value_names_table_column_and_oid() -> None:
    bad = pb.Field(name="full_name", oid=25, binary=b"\xff\xfe")
    message = change("users", 1, new=[int4("id", 1, key=True), bad])
    with pytest.raises(ChangeDecodeError) as caught:
        build(message, User)
    assert str(caught.value).startswith(
        "cannot decode public.users.full_name (type oid 25): UnicodeDecodeError:"
    )
    assert "RawValue" in str(caught.value)


@table("users")
@dataclass
class LenientUser:
    id: int
    full_name: str | RawValue


def test_field_that_accepts_raw_value_gets_undecodable_bytes() -> None:
    bad = pb.Field(name="full_name", oid=25, binary=b"\xff")
    event = build(change("users", 1, new=[int4("id", 1, key=True), bad]), LenientUser)
    assert event.new.full_name == RawValue(25, b"\xff", ValueFormat.BINARY)


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (
            type("Plain", (), {"__annotations__": {"id": int}, "__table__": "t"}),
            "neither a dataclass",
        ),
        (dataclass(type("NoTable2", (), {"__annotations__": {"id": int}})), "names no table"),
        (
            dataclass(type("Bad", (), {"__annotations__": {"id": int}, "__table__": "a.b.c"})),
            "not of the form",
        ),
    ],
)
def test_model_mistakes_are_config_errors(model: type[Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        model_spec(model)


def test_table_decorator_defaults_to_public_and_checks_the_name() -> None:
    assert table("users")(type("T", (), {})).__table__ == "public.users"  # type: ignore[attr-defined]
    assert table("t", schema="app")(type("T", (), {})).__table__ == "app.t"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"'schema\.table' or 'table'"):
        table("a.b.c")


def test_two_fields_on_one_column_is_a_config_error() -> None:
    @table("t")
    @dataclass
    class Twice:
        a: int
        b: Annotated[int, Column("a")]

    with pytest.raises(ConfigError, match="both map to column 'a'"):
        model_spec(Twice)


# -- user types without a dsn, fitted by declared types --------------------------------------


class Mood(Enum):
    SAD = "sad"
    OK = "ok"
    HAPPY = "happy"


class Pair(NamedTuple):
    x: int | None
    y: str | None


@table("feelings")
@dataclass
class Feeling:
    id: int
    label: Literal["sad", "ok", "happy"]
    mood: Mood
    moods: list[Mood]
    pair: Pair
    pairs: list[Pair | None]
    tags: tuple[Any, ...] | None
    small: int


@pytest.fixture(scope="module")
def types_conn(types_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(types_dsn, autocommit=True) as conn:
        yield conn


def feeling_message(conn: psycopg.Connection[Any], small: str = "5::posint") -> pb.CaptureMessage:
    return change(
        "feelings",
        1,
        new=[
            int4("id", 1, key=True),
            db_field(conn, "label", "'happy'::mood"),
            db_field(conn, "mood", "'ok'::mood"),
            db_field(conn, "moods", "'{sad,happy}'::mood[]"),
            db_field(conn, "pair", "ROW(1, 'one')::pair"),
            db_field(conn, "pairs", "ARRAY[ROW(2, 'two')::pair, NULL]"),
            db_field(conn, "tags", "ROW(3, 'x')::pair"),
            db_field(conn, "small", small),
        ],
    )


def test_without_dsn_declared_types_decode_enums_and_composites(
    types_conn: psycopg.Connection[Any],
) -> None:
    message = feeling_message(types_conn, small="7")
    event = build(message, Feeling)
    assert event.new == Feeling(
        id=1,
        label="happy",
        mood=Mood.OK,
        moods=[Mood.SAD, Mood.HAPPY],
        pair=Pair(1, "one"),
        pairs=[Pair(2, "two"), None],
        tags=(3, "x"),
        small=7,
    )


def test_without_dsn_a_domain_declared_int_is_a_decode_error_naming_dsn(
    types_conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(ChangeDecodeError, match=r"public\.feelings\.small .*pass dsn="):
        build(feeling_message(types_conn), Feeling)


async def test_with_dsn_the_same_model_gets_the_same_values(
    types_conn: psycopg.Connection[Any], types_dsn: str
) -> None:
    message = feeling_message(types_conn)
    decoder = ValueDecoder()
    resolver = TypeResolver(decoder, types_dsn)
    await resolver.prepare({f.oid for f in message.change.new})
    await resolver.close()
    event = build(message, Feeling, decoder=decoder)
    assert event.new.mood is Mood.OK
    assert event.new.label == "happy"
    assert event.new.pair == Pair(1, "one")
    assert type(event.new.pair) is Pair
    assert event.new.pairs == [Pair(2, "two"), None]
    assert event.new.small == 5


def test_rows_keep_raw_values_without_dsn(types_conn: psycopg.Connection[Any]) -> None:
    event = build(feeling_message(types_conn))
    assert isinstance(event.new["mood"], RawValue)
    assert event.new["mood"].as_text() == "ok"
