"""Fixtures of the consumer tests: a fake gateway server and a database of user types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from client_helpers import FakeGateway, GatewayServer

from pgcapture.local import LocalPostgres

TYPES_SQL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SCHEMA "My Schema";
CREATE TYPE "My Schema"."Color" AS ENUM ('red', 'green');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN shorttext AS text CHECK (length(VALUE) < 10);
CREATE DOMAIN moodish AS mood;
CREATE DOMAIN intlist AS int[];
CREATE TYPE pair AS (x int, y text);
CREATE TYPE feeling AS (who text, how mood, tags text[]);
CREATE TYPE floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
"""


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayServer]:
    server = GatewayServer(FakeGateway())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def types_dsn(pg: LocalPostgres) -> Iterator[str]:
    """A database with user-defined types, shared by a module's decoding tests."""
    name = "client_types"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
            conn.execute(TYPES_SQL)
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
