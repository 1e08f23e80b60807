"""OfflineDB snapshots: complete data directories of the source, with sane positions, that start
as standalone servers; rotation keeps the newest, removes leftovers and spares snapshots in use.

pg_basebackup connects to the session cluster over its Unix socket; the cluster's pg_hba.conf
(initdb's default) trusts local replication connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgcapture.config import Config, validate_config
from pgcapture.errors import ConfigError
from pgcapture.local import LocalPostgres
from pgcapture.local.postgres import free_port
from pgcapture.lsn import LSN
from pgcapture.offlinedb.snapshots import (
    SnapshotError,
    SnapshotGone,
    list_snapshots,
    mark_in_use,
    newest,
    release,
    rotate,
    snapshots_dir,
    take_snapshot,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def store() -> Iterator[Path]:
    """A store directory the server user can reach (pytest's own temporary directories are
    private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="pgcapture-offlinedb-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(store: Path, dsn: str, keep: int = 3, snapshot_dsn: str = "") -> Config:
    return validate_config(
        {
            "sources": {"src": {"dsn": dsn}},
            "offlinedb": {
                "store": str(store),
                "keep": keep,
                "databases": {"app": {"source": "src", "snapshot_dsn": snapshot_dsn}},
            },
        }
    )


def fill(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g")


def current_lsn(dsn: str) -> LSN:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return LSN.parse(row[0])


def start_copy(data: Path) -> LocalPostgres:
    """A throw-away server on a copy of the data directory ``data``."""
    server = LocalPostgres.create()
    shutil.copytree(data, server.data_dir, symlinks=True)
    server.socket_dir.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(server.base_dir)], check=True)
    server.add_settings(
        {
            "port": str(server.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{server.socket_dir}'",
        }
    )
    server.start()
    return server


async def test_snapshot_is_a_complete_data_directory_with_sane_positions(
    store: Path, dsn: str
) -> None:
    fill(dsn)
    config = make_config(store, dsn)
    snap = await take_snapshot(config, "app")
    assert snap.path == snapshots_dir(config, "app") / snap.id
    for name in ("PG_VERSION", "global/pg_control", "backup_label", "backup_manifest"):
        assert (snap.path / name).is_file(), name
    assert any((snap.path / "pg_wal").iterdir())
    assert not (snap.path / "standby.signal").exists()
    assert not (snap.path / "recovery.signal").exists()
    assert snap.start_lsn <= snap.end_lsn <= current_lsn(dsn)
    assert snap.timeline == 1
    assert snap.size > 1 << 20
    assert snap.started_at <= snap.taken_at
    assert list_snapshots(config, "app") == [snap]
    assert newest(config, "app") == snap
    assert not list(snap.path.parent.glob("*.partial"))


async def test_a_server_started_on_a_copy_of_the_snapshot_shows_the_rows(
    store: Path, dsn: str, dbname: str
) -> None:
    fill(dsn)
    snap = await take_snapshot(make_config(store, dsn), "app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1000, 'after the snapshot')")
    server = start_copy(snap.path)
    try:
        with psycopg.connect(server.dsn(dbname)) as conn:
            row = conn.execute("SELECT count(*), max(id) FROM items").fetchone()
            recovering = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    finally:
        server.destroy()
    assert row == (100, 100)
    assert recovering == (False,)


async def test_rotation_keeps_the_newest_removes_leftovers_and_spares_those_in_use(
    store: Path, dsn: str
) -> None:
    config = make_config(store, dsn, keep=2)
    first = await take_snapshot(config, "app")
    hold = mark_in_use(first, "copy-1")
    leftover = snapshots_dir(config, "app") / "20000101T000000000000Z.partial"
    leftover.mkdir()
    second = await take_snapshot(config, "app")
    third = await take_snapshot(config, "app")
    assert not leftover.exists()
    assert [s.id for s in list_snapshots(config, "app")] == [third.id, second.id, first.id]
    release(hold)
    rotation = await rotate(config, "app")
    assert rotation.removed == (first.id,)
    assert rotation.in_use == ()
    assert list_snapshots(config, "app") == [third, second]
    assert not first.path.exists()
    with pytest.raises(SnapshotGone, match="removed by rotation"):
        mark_in_use(first, "copy-2")


async def test_a_rotation_while_in_use_reports_the_snapshot_kept(store: Path, dsn: str) -> None:
    config = make_config(store, dsn, keep=1)
    first = await take_snapshot(config, "app")
    with mark_in_use(first, "copy-1"):
        await take_snapshot(config, "app", rotate_after=False)
        rotation = await rotate(config, "app")
    assert rotation == type(rotation)(removed=(), in_use=(first.id,))
    assert (await rotate(config, "app")).removed == (first.id,)


async def test_an_unknown_database_name_names_the_configured_ones(store: Path, dsn: str) -> None:
    with pytest.raises(ConfigError, match=r"'nope' is not configured \(configured: app\)"):
        await take_snapshot(make_config(store, dsn), "nope")


async def test_an_unreachable_server_fails_clearly_and_leaves_nothing(
    store: Path, dsn: str
) -> None:
    unreachable = f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=5"
    config = make_config(store, dsn, snapshot_dsn=unreachable)
    with pytest.raises(SnapshotError, match=r"server is unreachable: check offlinedb\.databases"):
        await take_snapshot(config, "app")
    assert list(snapshots_dir(config, "app").iterdir()) == [
        snapshots_dir(config, "app") / ".take.lock"
    ]


def write_config(store: Path, dsn: str, keep: int) -> Path:
    path = store / "pgcapture.toml"
    path.write_text(
        f"[sources.src]\ndsn = {dsn!r}\n\n[offlinedb]\nstore = {str(store)!r}\nkeep = {keep}\n"
        '\n[offlinedb.databases.app]\nsource = "src"\n'
    )
    return path


def run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgcapture", "offlinedb", "snapshot", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_the_command_prints_the_snapshot_and_the_rotation(store: Path, dsn: str) -> None:
    proc = run_cli("--config", str(write_config(store, dsn, keep=1)), "app")
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 0, err
    snap = newest(make_config(store, dsn), "app")
    assert snap is not None
    assert f"snapshot  {snap.id} of 'app'" in out
    assert f"lsn       {snap.end_lsn} (start {snap.start_lsn}, timeline 1)" in out
    assert f"size      {snap.size} bytes" in out
    assert "rotation  removed nothing" in out


def test_every_takes_one_per_period_until_sigterm(store: Path, dsn: str) -> None:
    proc = run_cli("--config", str(write_config(store, dsn, keep=2)), "--every", "1s", "app")
    config = make_config(store, dsn)
    deadline = time.monotonic() + 40
    try:
        while len(list_snapshots(config, "app")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.count("rotation  removed") >= 2
    assert len(list_snapshots(config, "app")) == 2
    assert not list(snapshots_dir(config, "app").glob("*.partial"))


def test_the_command_fails_with_one_line_for_an_unknown_name(store: Path, dsn: str) -> None:
    proc = run_cli("--config", str(write_config(store, dsn, keep=1)), "nope")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.startswith("error: offlinedb database 'nope' is not configured")
