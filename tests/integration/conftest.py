"""Fixtures for integration tests: a slot reader, a replica database next to the source."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import psycopg
import pytest

from pgcapture.capture.reader import SlotReader
from pgcapture.local import LocalPostgres

_slots = itertools.count(1)


@pytest.fixture
def slot_name() -> str:
    return f"s{next(_slots)}"


@pytest.fixture
async def reader(dsn: str, slot_name: str) -> AsyncIterator[SlotReader]:
    r = SlotReader(dsn, slot_name, status_interval=0.5)
    await r.open()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
async def replica_dsn(pg: LocalPostgres, dbname: str) -> AsyncIterator[str]:
    """An empty replica database next to the source's, in the same cluster."""
    name = f"{dbname}_replica"
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg.dsn(name)
    finally:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
