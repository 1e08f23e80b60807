"""The fixtures start real servers and configure them for logical replication."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgcapture.local import LocalNats, LocalPostgres

pytestmark = pytest.mark.integration


def test_cluster_is_configured_for_logical_replication(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        row = conn.execute("SHOW max_replication_slots").fetchone()
        assert row is not None
        assert int(row[0]) >= 10


def test_cluster_accepts_tcp_connections(pg: LocalPostgres) -> None:
    with psycopg.connect(pg.tcp_dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_nats_server_accepts_connections(nats: LocalNats) -> None:
    host, port = nats.url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    info = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    assert info.startswith(b"INFO ")
    assert b'"jetstream":true' in info
