"""Type fidelity: every value arrives as the exact bytes the server sends in binary format."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import pq
from slot_helpers import collect, user_changes

from pgcapture.capture.reader import SlotReader

pytestmark = pytest.mark.integration

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (x int, y text);
"""

# column name -> (type, literal values: one per row)
COLUMNS: dict[str, tuple[str, list[str]]] = {
    "c_bool": ("boolean", ["true", "false", "NULL"]),
    "c_int2": ("smallint", ["-32768", "32767", "0"]),
    "c_int4": ("integer", ["-2147483648", "2147483647", "7"]),
    "c_int8": ("bigint", ["-9223372036854775808", "9223372036854775807", "0"]),
    "c_float4": ("real", ["'NaN'", "'Infinity'", "'-Infinity'"]),
    "c_float8": ("double precision", ["'NaN'", "'-Infinity'", "1.5e300"]),
    "c_numeric": ("numeric", ["'NaN'", "123456789012345678901234567890.000001", "-0.5"]),
    "c_money": ("money", ["12.34", "-1", "0"]),
    "c_text": ("text", ["'héllo ✓'", "''", "NULL"]),
    "c_varchar": ("varchar(10)", ["'abc'", "'x'", "NULL"]),
    "c_char": ("char(4)", ["'ab'", "'abcd'", "NULL"]),
    "c_name": ("name", ["'pg_class'", "'x'", "NULL"]),
    "c_bytea": ("bytea", ["'\\x00ff10'", "''", "NULL"]),
    "c_uuid": ("uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "gen_random_uuid()", "NULL"]),
    "c_json": ("json", ["'{\"a\": [1, 2]}'", "'null'", "NULL"]),
    "c_jsonb": ("jsonb", ['\'{"a": [1, 2], "b": {"c": null}}\'', "'[]'", "NULL"]),
    "c_xml": ("xml", ["'<a>1</a>'", "'<b/>'", "NULL"]),
    "c_date": ("date", ["'2024-02-29'", "'infinity'", "'-infinity'"]),
    "c_time": ("time", ["'23:59:59.999999'", "'00:00'", "NULL"]),
    "c_timetz": ("timetz", ["'12:00+05:30'", "'00:00-08'", "NULL"]),
    "c_ts": ("timestamp", ["'2024-01-01 12:34:56.789'", "'infinity'", "'-infinity'"]),
    "c_tstz": ("timestamptz", ["'2024-01-01 12:34:56+02'", "'infinity'", "'-infinity'"]),
    "c_interval": ("interval", ["'1 year 2 mons 3 days 04:05:06.7'", "'-1 day'", "NULL"]),
    "c_inet": ("inet", ["'192.168.0.1/24'", "'::1'", "NULL"]),
    "c_cidr": ("cidr", ["'10.0.0.0/8'", "'2001:db8::/32'", "NULL"]),
    "c_macaddr": ("macaddr", ["'08:00:2b:01:02:03'", "'00:00:00:00:00:00'", "NULL"]),
    "c_macaddr8": ("macaddr8", ["'08:00:2b:01:02:03:04:05'", "NULL", "NULL"]),
    "c_bit": ("bit(4)", ["B'1010'", "B'0000'", "NULL"]),
    "c_varbit": ("varbit", ["B'101'", "B''", "NULL"]),
    "c_tsvector": ("tsvector", ["to_tsvector('english', 'the quick brown fox')", "''", "NULL"]),
    "c_tsquery": ("tsquery", ["to_tsquery('fox & dog')", "NULL", "NULL"]),
    "c_point": ("point", ["'(1.5,2)'", "'(0,0)'", "NULL"]),
    "c_line": ("line", ["'{1,2,3}'", "NULL", "NULL"]),
    "c_lseg": ("lseg", ["'[(0,0),(1,1)]'", "NULL", "NULL"]),
    "c_box": ("box", ["'(1,1),(0,0)'", "NULL", "NULL"]),
    "c_path": ("path", ["'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'", "NULL"]),
    "c_polygon": ("polygon", ["'((0,0),(1,1),(1,0))'", "NULL", "NULL"]),
    "c_circle": ("circle", ["'<(1,1),5>'", "NULL", "NULL"]),
    "c_int4range": ("int4range", ["'[1,10)'", "'empty'", "NULL"]),
    "c_numrange": ("numrange", ["'(1.5,)'", "NULL", "NULL"]),
    "c_tstzrange": ("tstzrange", ["'[2024-01-01,2024-02-01)'", "NULL", "NULL"]),
    "c_daterange": ("daterange", ["'[2024-01-01,infinity)'", "NULL", "NULL"]),
    "c_multirange": ("int4multirange", ["'{[1,3), [5,8)}'", "'{}'", "NULL"]),
    "c_int_array": ("int[]", ["'{1,NULL,3}'", "'{}'", "NULL"]),
    "c_2d_array": ("int[][]", ["'{{1,2},{3,4}}'", "'[0:1][1:1]={{5},{6}}'", "NULL"]),
    "c_text_array": ("text[]", ["ARRAY['a', NULL, 'c d']", "'{}'", "NULL"]),
    "c_enum": ("mood", ["'happy'", "'sad'", "NULL"]),
    "c_enum_array": ("mood[]", ["'{ok,happy}'", "NULL", "NULL"]),
    "c_domain": ("posint", ["42", "1", "NULL"]),
    "c_composite": ("pair", ["ROW(1, 'one')", "ROW(NULL, NULL)", "NULL"]),
    "c_oid": ("oid", ["1259", "0", "NULL"]),
    "c_pg_lsn": ("pg_lsn", ["'16/B374D848'", "'0/0'", "NULL"]),
    "c_qchar": ('"char"', ["'x'", "NULL", "NULL"]),
}


async def test_every_type_family_arrives_as_the_servers_binary_bytes(
    dsn: str, reader: SlotReader
) -> None:
    columns = ", ".join(f"{name} {typ}" for name, (typ, _) in COLUMNS.items())
    rows = len(next(iter(COLUMNS.values()))[1])
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(SETUP)
        await conn.execute(f"CREATE TABLE types (id int PRIMARY KEY, {columns})")
        for i in range(rows):
            values = ", ".join(vals[i] for _, vals in COLUMNS.values())
            await conn.execute(f"INSERT INTO types VALUES ({i}, {values})")
    captured = user_changes(await collect(reader, 2 + rows))
    assert len(captured) == rows

    with psycopg.connect(dsn) as conn:
        res = conn.pgconn.exec_params(
            b"SELECT * FROM types ORDER BY id", [], result_format=pq.Format.BINARY
        )
        assert res.status == pq.ExecStatus.TUPLES_OK
        names = [res.fname(i).decode() for i in range(res.nfields)]
        # The column's declared type: for a domain the domain itself (a SELECT reports the
        # base type instead).
        oids = [
            r[0]
            for r in conn.execute(
                "SELECT atttypid::int FROM pg_attribute WHERE attrelid = 'types'::regclass "
                "AND attnum > 0 ORDER BY attnum"
            )
        ]
        for row, change in enumerate(captured):
            got = {f.name: f for f in change.new}
            assert list(got) == names
            for col, name in enumerate(names):
                field = got[name]
                assert field.oid == oids[col], name
                expected = res.get_value(row, col)
                if expected is None:
                    assert field.WhichOneof("value") is None, name
                else:
                    assert field.WhichOneof("value") == "binary", name
                    assert field.binary == expected, name
