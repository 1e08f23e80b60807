"""Bad setups end in one clear error that names the fix, and change nothing."""

from __future__ import annotations

import psycopg
import pytest

from pgcapture.capture.reader import SlotReader
from pgcapture.capture.retry import is_transient
from pgcapture.errors import ConfigError, PermissionDenied, SlotInUse, SlotLost, UnsupportedServer
from pgcapture.local import LocalPostgres

pytestmark = pytest.mark.integration


async def test_wal_level_replica_is_refused_with_the_fix() -> None:
    with LocalPostgres.create(settings={"wal_level": "replica"}) as cluster:
        reader = SlotReader(cluster.dsn(), "s")
        with pytest.raises(UnsupportedServer, match=r'wal_level is "replica".*wal_level=logical'):
            await reader.open()
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def _make_role(pg: LocalPostgres, dbname: str, name: str, options: str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        conn.execute(f'CREATE ROLE "{name}" LOGIN {options}')
        conn.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO "{name}"')


async def test_role_without_replication_privilege(pg: LocalPostgres, dbname: str) -> None:
    role = f"plain_{dbname}"
    _make_role(pg, dbname, role, "")
    reader = SlotReader(pg.dsn(dbname, user=role), "s")
    with pytest.raises(PermissionDenied, match=rf'role "{role}" lacks the REPLICATION.*ALTER ROLE'):
        await reader.open()


async def test_role_that_cannot_create_event_triggers(pg: LocalPostgres, dbname: str) -> None:
    role = f"repl_{dbname}"
    _make_role(pg, dbname, role, "REPLICATION")
    reader = SlotReader(pg.dsn(dbname, user=role), "s")
    with pytest.raises(PermissionDenied, match=r"(?i)event trigger.*superuser"):
        await reader.open()


async def test_replication_role_after_setup_by_a_superuser(
    pg: LocalPostgres, dbname: str, dsn: str
) -> None:
    """Once a superuser set up a slot and publication, a REPLICATION role can capture from
    them; creating publications itself needs more, and the errors say what."""
    role = f"cdc_{dbname}"
    _make_role(pg, dbname, role, "REPLICATION")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE owned (id int PRIMARY KEY); ALTER TABLE owned OWNER TO "{role}"'
        )
    setup = SlotReader(dsn, "by_superuser", tables=["owned"])
    await setup.open()
    await setup.close()
    as_role = pg.dsn(dbname, user=role)
    everything = SlotReader(as_role, "all_tables")
    with pytest.raises(PermissionDenied, match=r"FOR ALL TABLES needs a superuser.*--tables"):
        await everything.open()
    listed = SlotReader(as_role, "listed", tables=["owned"])
    with pytest.raises(PermissionDenied, match=r"pgcapture.ddl_logs included.*superuser"):
        await listed.open()
    same = SlotReader(as_role, "by_superuser", tables=["owned"])
    await same.open()
    await same.close()


async def test_slot_active_in_another_process(dsn: str, slot_name: str) -> None:
    first = SlotReader(dsn, slot_name)
    await first.open()
    try:
        second = SlotReader(dsn, slot_name)
        with pytest.raises(SlotInUse, match=rf"slot '{slot_name}' is active for PID \d+"):
            await second.open()
    finally:
        await first.close()


async def test_an_invalidated_slot_is_a_permanent_error_naming_the_recovery() -> None:
    settings = {"max_slot_wal_keep_size": "1MB", "min_wal_size": "32MB", "max_wal_size": "64MB"}
    with LocalPostgres.create(settings=settings) as cluster:
        reader = SlotReader(cluster.dsn(), "lost")
        await reader.open()
        await reader.close()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE filler (v text)")
            for _ in range(4):  # WAL well past what the slot may keep, then a checkpoint
                conn.execute(
                    "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)"
                )
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            status = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'lost'"
            ).fetchone()
            assert status == ("lost",)
        reader = SlotReader(cluster.dsn(), "lost")
        with pytest.raises(
            SlotLost, match=r"invalidated.*pg_drop_replication_slot\('lost'\)"
        ) as err:
            await reader.open()
        await reader.close()
        assert not is_transient(err.value)  # capture stops with it instead of retrying


async def test_missing_table_in_table_list(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE present (id int PRIMARY KEY)")
    reader = SlotReader(dsn, "s", tables=["present", "public.absent"])
    with pytest.raises(ConfigError, match=r"table 'public.absent' in --tables does not exist"):
        await reader.open()
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 's'"
        ).fetchone() == (0,)
