"""Shared fixtures: real PostgreSQL and nats-server processes, always stopped afterwards."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import settings

from pgcapture.local import LocalNats, LocalPostgres

# Property tests check results, not speed: on a loaded 2-core machine one example can take
# longer than hypothesis's default 200 ms deadline, which would fail a correct test.
settings.register_profile("pgcapture", deadline=None)
settings.load_profile("pgcapture")

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
            _drop_slots(conn, name)
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _drop_slots(conn: psycopg.Connection[tuple[object, ...]], database: str) -> None:
    """Drop the database's slots; a walsender that is still closing holds its slot for a
    moment after its client left, so wait for it (bounded) rather than fail."""
    deadline = time.monotonic() + 15
    while True:
        active = conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (database,),
        ).fetchall()
        if not active or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
        (database,),
    )


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
