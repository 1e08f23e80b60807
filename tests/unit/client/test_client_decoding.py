"""Decoding against real values: the bytes PostgreSQL sends for a SELECT in binary (and text)
format, decoded by ``ValueDecoder``, equal what psycopg returns for the same SELECT."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from client_helpers import raw_value
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.enum import EnumInfo, register_enum
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import Range, RangeInfo, register_range

from pgcapture.client import RawValue, TypeLookupError, TypeResolver, ValueDecoder, ValueFormat
from pgcapture.proto import pb

pytestmark = pytest.mark.timeout(120)

# One expression per value; together they cover every type family the consumer decodes.
BUILTIN = [
    "1::int2", "'-2147483648'::int4", "9223372036854775807::int8", "1259::oid",
    "1.5::float4", "'-Infinity'::float8", "'NaN'::float8", "1.5e300::float8",
    "123456789012345678901234567890.000001::numeric", "'NaN'::numeric", "'Infinity'::numeric",
    "'-Infinity'::numeric", "-0.5::numeric", "0::numeric",
    "'héllo ✓'::text", "'abc'::varchar(10)", "'ab'::char(4)", "'pg_class'::name", "''::text",
    "true", "false",
    "'\\x00ff10'::bytea", "''::bytea",
    "'{\"a\": [1, 2]}'::json", "'{\"a\": [1, 2], \"b\": {\"c\": null}}'::jsonb", "'[]'::jsonb",
    "'2024-02-29'::date", "'23:59:59.999999'::time", "'12:00+05:30'::timetz",
    "'2024-01-01 12:34:56.789'::timestamp", "'2024-01-01 12:34:56+02'::timestamptz",
    "'1 year 2 mons 3 days 04:05:06.7'::interval", "'-1 day'::interval",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
    "'192.168.0.1/24'::inet", "'::1'::inet", "'10.0.0.0/8'::cidr", "'2001:db8::/32'::cidr",
    "'{1,NULL,3}'::int[]", "'{{1,2},{3,4}}'::int[]", "'[0:1][1:1]={{5},{6}}'::int[]",
    "ARRAY['a', NULL, 'c d']::text[]", "'{}'::text[]", "ARRAY[1.5, 'NaN']::numeric[]",
    "ARRAY['{\"a\": 1}'::jsonb]", "ARRAY['::1'::inet]", "ARRAY[true, NULL]",
    "ARRAY['\\x01'::bytea]", "ARRAY['2024-01-01'::date]", "ARRAY['1 day'::interval]",
    "ARRAY['2024-01-01 00:00+00'::timestamptz]",
    "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
    "'[1,10)'::int4range", "'empty'::int4range", "'(1.5,)'::numrange", "'[,5]'::int8range",
    "'[2024-01-01,2024-02-01)'::tstzrange", "'[2024-01-01,2024-02-01)'::daterange",
    "'[2024-01-01 10:00,)'::tsrange",
    "'{[1,3), [5,8)}'::int4multirange", "'{}'::int4multirange", "'{[2024-01-01,)}'::datemultirange",
    "ARRAY['[1,2)'::int4range]",
]  # fmt: skip

INFINITIES = {
    "'infinity'::date": date.max,
    "'-infinity'::date": date.min,
    "'infinity'::timestamp": datetime.max,
    "'-infinity'::timestamp": datetime.min,
    "'infinity'::timestamptz": datetime.max.replace(tzinfo=UTC),
    "'-infinity'::timestamptz": datetime.min.replace(tzinfo=UTC),
    "ARRAY['infinity'::date, '2024-01-01']": [date.max, date(2024, 1, 1)],
    "'[2024-01-01,infinity)'::daterange": Range(date(2024, 1, 1), date.max, "[)"),
}


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN, also inside lists and ranges."""
    if isinstance(a, float | Decimal) and isinstance(b, float | Decimal):
        nan = math.isnan if isinstance(a, float) else Decimal.is_nan
        if nan(a) or nan(b):  # type: ignore[operator]
            return type(a) is type(b) and bool(nan(a) and nan(b))  # type: ignore[operator]
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def fetch(conn: psycopg.Connection[Any], expr: str, binary: bool = True) -> tuple[int, bytes, Any]:
    """``raw_value`` and the value psycopg loads from the same SELECT."""
    oid, raw = raw_value(conn, expr, binary)
    row = conn.cursor(binary=binary).execute(f"SELECT {expr}").fetchone()
    assert row is not None
    return oid, raw, row[0]


@pytest.fixture(scope="module")
def conn(types_dsn: str) -> Any:
    with psycopg.connect(types_dsn, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        yield c


@pytest.mark.parametrize("expr", BUILTIN)
def test_builtin_binary_values_decode_as_psycopg_loads_them(
    conn: psycopg.Connection[Any], expr: str
) -> None:
    oid, raw, expected = fetch(conn, expr)
    decoded = ValueDecoder().decode(oid, raw)
    assert same(decoded, expected), (expr, decoded, expected)


@pytest.mark.parametrize("expr", BUILTIN)
def test_builtin_text_values_decode_as_psycopg_loads_them(
    conn: psycopg.Connection[Any], expr: str
) -> None:
    oid, raw, expected = fetch(conn, expr, binary=False)
    field = pb.Field(name="v", oid=oid, text=raw.decode())
    decoded = ValueDecoder().decode_field(field)
    assert same(decoded, expected), (expr, decoded, expected)


@pytest.mark.parametrize(("expr", "expected"), INFINITIES.items())
@pytest.mark.parametrize("binary", [True, False])
def test_infinite_dates_and_timestamps_map_to_python_limits(
    conn: psycopg.Connection[Any], expr: str, expected: Any, binary: bool
) -> None:
    oid, raw = raw_value(conn, expr, binary)
    fmt = ValueFormat.BINARY if binary else ValueFormat.TEXT
    assert ValueDecoder().decode(oid, raw, fmt) == expected
    with pytest.raises(psycopg.DataError):  # psycopg itself refuses these values
        conn.cursor(binary=binary).execute(f"SELECT {expr}").fetchone()


def test_null_decodes_to_none() -> None:
    assert ValueDecoder().decode_field(pb.Field(name="v", oid=23)) is None


def test_unknown_oid_is_raw_and_fixed_width_lengths_are_checked() -> None:
    decoder = ValueDecoder()
    assert decoder.decode(987654, b"\x01\x02") == RawValue(987654, b"\x01\x02", ValueFormat.BINARY)
    assert decoder.decode(987654, b"x", ValueFormat.TEXT) == RawValue(
        987654, b"x", ValueFormat.TEXT
    )
    with pytest.raises(ValueError, match="2 bytes where the binary form has 4"):
        decoder.decode(23, b"\x00\x01")


# -- user-defined types ------------------------------------------------------------------

USER_TYPES = [
    "'happy'::mood",
    '\'green\'::"My Schema"."Color"',
    "'{ok,happy}'::mood[]",
    "ROW(1, 'one')::pair",
    "ROW(NULL, NULL)::pair",
    "ARRAY[ROW(1, 'a')::pair, NULL]",
    "ROW('me', 'ok', ARRAY['x', 'y'])::feeling",
    "42::posint",
    "ARRAY[5::posint, 6::posint]",
    "'short'::shorttext",
    "'sad'::moodish",
    "ARRAY['sad'::moodish, NULL]",
    "'{1,2}'::intlist",
    "'[1.5,2.5)'::floatrange",
    "'{[1.5,2.5), [3,4]}'::floatmultirange",
]


def register_all(conn: psycopg.Connection[Any]) -> None:
    """Register the test types on ``conn`` the usual psycopg way, to compare with."""
    for name in ("mood", '"My Schema"."Color"'):
        info = EnumInfo.fetch(conn, name)
        assert info is not None
        register_enum(info, conn)
    for name in ("pair", "feeling"):
        cinfo = CompositeInfo.fetch(conn, name)
        assert cinfo is not None
        register_composite(cinfo, conn)
    rinfo = RangeInfo.fetch(conn, "floatrange")
    minfo = MultirangeInfo.fetch(conn, "floatmultirange")
    assert rinfo is not None
    assert minfo is not None
    register_range(rinfo, conn)
    register_multirange(minfo, conn)


@pytest.fixture(scope="module")
def registered(types_dsn: str) -> Any:
    with psycopg.connect(types_dsn, autocommit=True) as c:
        register_all(c)
        yield c


async def decoder_with_dsn(dsn: str | psycopg.AsyncConnection[Any], oids: set[int]) -> ValueDecoder:
    decoder = ValueDecoder()
    resolver = TypeResolver(decoder, dsn)
    try:
        await resolver.prepare(oids)
    finally:
        await resolver.close()
    return decoder


# psycopg has no registration for domains: it decodes a domain's value only because a result
# set names the base type. For an array of a domain (whose OID it does not know), the value
# to compare with is the same array cast to the base type's array.
SAME_AS = {
    "ARRAY[5::posint, 6::posint]": "ARRAY[5, 6]::int[]",
    "ARRAY['sad'::moodish, NULL]": "ARRAY['sad'::mood, NULL]",
}


@pytest.mark.parametrize("expr", USER_TYPES)
async def test_user_types_with_dsn_decode_as_registered_psycopg_loads_them(
    registered: psycopg.Connection[Any], types_dsn: str, expr: str
) -> None:
    oid, raw, expected = fetch(registered, expr)
    if expr in SAME_AS:
        expected = fetch(registered, SAME_AS[expr])[2]
    decoder = await decoder_with_dsn(types_dsn, {oid})
    decoded = decoder.decode(oid, raw)
    assert decoded == expected, (expr, decoded, expected)
    assert type(decoded) is type(expected)


async def test_domains_decode_as_their_base_type(types_dsn: str) -> None:
    with psycopg.connect(types_dsn) as c:
        oid, raw, value = fetch(c, "42::posint")
    assert (
        value == 42
    )  # psycopg sees the base type's OID in a result set; pgoutput sends the domain's
    assert oid != 23
    assert ValueDecoder().decode(oid, raw) == RawValue(oid, raw, ValueFormat.BINARY)
    assert (await decoder_with_dsn(types_dsn, {oid})).decode(oid, raw) == 42


async def test_user_types_without_dsn_are_raw_values_that_describe_themselves(
    registered: psycopg.Connection[Any],
) -> None:
    decoder = ValueDecoder()
    enum_oid, enum_raw, _ = fetch(registered, "'happy'::mood")
    assert decoder.decode(enum_oid, enum_raw) == RawValue(enum_oid, b"happy", ValueFormat.BINARY)
    assert decoder.decode(enum_oid, enum_raw).as_text() == "happy"

    oid, raw, _ = fetch(registered, "ROW(1, 'one')::pair")
    value = decoder.decode(oid, raw)
    assert isinstance(value, RawValue)
    assert value.as_record() == (1, "one")

    oid, raw, _ = fetch(registered, "ROW('me', 'ok', ARRAY['x'])::feeling")
    who, how, tags = decoder.decode(oid, raw).as_record()
    assert (who, tags) == ("me", ["x"])
    assert how == RawValue(enum_oid, b"ok", ValueFormat.BINARY)  # the field of unknown type

    oid, raw, _ = fetch(registered, "'{ok,happy}'::mood[]")
    items = decoder.decode(oid, raw).as_array()
    assert [i.as_text() for i in items] == ["ok", "happy"]

    oid, raw, _ = fetch(registered, "'[1.5,2.5)'::floatrange")
    assert isinstance(decoder.decode(oid, raw), RawValue)


async def test_resolver_accepts_an_open_async_connection(
    registered: psycopg.Connection[Any], types_dsn: str
) -> None:
    oid, raw, expected = fetch(registered, "ARRAY[ROW(1, 'a')::pair, NULL]")
    async with await psycopg.AsyncConnection.connect(types_dsn, autocommit=True) as aconn:
        decoder = await decoder_with_dsn(aconn, {oid})
        assert not aconn.closed  # a connection given by the caller stays the caller's
    assert decoder.decode(oid, raw) == expected


async def test_oids_missing_from_the_catalog_stay_raw(types_dsn: str) -> None:
    decoder = await decoder_with_dsn(types_dsn, {4_000_000_000})
    assert isinstance(decoder.decode(4_000_000_000, b"x"), RawValue)


async def test_unreachable_dsn_raises_type_lookup_error_naming_the_fix() -> None:
    resolver = TypeResolver(ValueDecoder(), "host=127.0.0.1 port=1 connect_timeout=2")
    with pytest.raises(TypeLookupError, match=r"type oids \[16999\].*check that dsn="):
        await resolver.prepare({16999})
