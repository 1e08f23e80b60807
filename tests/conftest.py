"""Shared fixtures: real PostgreSQL and nats-server processes, always stopped afterwards."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest

from pgcapture.local import LocalNats, LocalPostgres

_names = itertools.count(1)


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalPostgres]:
    """The session's source cluster (PostgreSQL with wal_level=logical)."""
    cluster = LocalPostgres.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def dbname(pg: LocalPostgres) -> Iterator[str]:
    """A fresh database per test; its slots are dropped before the database is."""
    name = f"t{next(_names)}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (name,),
            )
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(pg: LocalPostgres, dbname: str) -> str:
    return pg.dsn(dbname)


@pytest.fixture(scope="session")
def nats() -> Iterator[LocalNats]:
    server = LocalNats()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
