"""Copies of snapshots, started on demand, masked, kept fresh, removed when idle.

``Copies`` is the proxy's ``Backends``: a client asking for database NAME (a section
``[offlinedb.databases.NAME]``) is sent to the running copy of NAME, and when there is none a
copy is made from NAME's newest snapshot first:

1. the snapshot's data directory is copied (the snapshot is held meanwhile, so rotation keeps
   it) into ``<store>/copies/<NAME>-<snapshot>-<token>`` and started as a standby that replays
   the WAL the snapshot holds, then promoted: the promotion's timeline switch marks exactly
   which source transactions the copy holds (``pgcapture.replica.bootstrap``), and that is the
   copy's position in the change log;
2. ``masking.mask_copy`` runs the masks and scripts; a copy whose masking fails is destroyed at
   once and every client asking for it gets the reason (for ``retry_failed`` seconds, then a
   new copy is tried);
3. ``pgcapture replicate`` runs against the copy from its position, so it follows the source
   within seconds; the masks' triggers mask what it writes;
4. only then is the copy served. Clients reach it on 127.0.0.1 and authenticate against the
   copy's own roles and ``pg_hba.conf``, which are the source's.

A copy with no client for ``idle_timeout`` is stopped and its directory removed. At most
``max_copies`` run, and a new one is refused while the copies' disk use exceeds ``max_disk``.
``status()`` describes every copy (``pgcapture offlinedb status`` reads it from the file the
server keeps up to date).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgcapture.config import Config, OfflineDatabase
from pgcapture.local.postgres import LocalPostgres
from pgcapture.offlinedb.masking import MaskingFailed, mask_copy
from pgcapture.offlinedb.proxy import Backend, Refused
from pgcapture.offlinedb.snapshots import Snapshot, mark_in_use, newest
from pgcapture.replica.bootstrap import bootstrap_physical
from pgcapture.replica.service import replicate

log = logging.getLogger("pgcapture.offlinedb")

UNKNOWN_DATABASE: Final = "3D000"  # invalid_catalog_name
NO_CAPACITY: Final = "53000"  # insufficient_resources
NOT_READY: Final = "55000"  # object_not_in_prerequisite_state
REAP_EVERY: Final = 2.0
SOURCE_HBA: Final = "pg_hba.conf.source"
MASKING_HBA: Final = (
    "local all all trust\nhost all all 0.0.0.0/0 reject\nhost all all ::/0 reject\n"
)


@dataclass(eq=False)
class Copy:
    """One running (or starting) copy."""

    name: str
    snapshot: Snapshot
    server: LocalPostgres
    database: str  # the database name on the copy (the source's)
    state: str = "starting"  # starting, ready, failed, stopping
    error: str = ""
    connections: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    follower: asyncio.Task[None] | None = None
    starting: asyncio.Task[None] | None = None

    def backend(self) -> CopyBackend:
        return CopyBackend(
            host="127.0.0.1", port=self.server.port, database=self.database, copy=self
        )

    def disk(self) -> int:
        return sum(f.stat().st_size for f in self.server.base_dir.rglob("*") if f.is_file())

    def describe(self) -> dict[str, Any]:
        return {
            "database": self.name, "state": self.state, "error": self.error or None,
            "snapshot": self.snapshot.id, "snapshot_lsn": str(self.snapshot.end_lsn),
            "port": self.server.port, "connections": self.connections,
            "idle_seconds": round(time.monotonic() - self.last_activity, 1)
            if not self.connections else 0.0,
            "started_at": self.started_at,
        }  # fmt: skip


@dataclass(frozen=True)
class CopyBackend(Backend):
    """The proxy's view of a copy; counts its connections and activity."""

    copy: Copy | None = None

    def opened(self) -> None:
        if self.copy is not None:
            self.copy.connections += 1
            self.copy.last_activity = time.monotonic()

    def closed(self) -> None:
        if self.copy is not None:
            self.copy.connections -= 1
            self.copy.last_activity = time.monotonic()


class Copies:
    """The copies of every configured database (see the module docstring)."""

    def __init__(self, config: Config, retry_failed: float = 30.0) -> None:
        self.config = config
        self.settings = config.offlinedb
        self.copies: dict[str, Copy] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # name -> (when, why)
        self._retry_failed = retry_failed
        self._lock = asyncio.Lock()

    # -- the proxy's Backends -------------------------------------------------------------

    async def resolve(self, database: str, user: str, parameters: dict[str, str]) -> Backend:
        spec = self.settings.databases.get(database)
        if spec is None:
            known = ", ".join(sorted(self.settings.databases)) or "none"
            raise Refused(
                UNKNOWN_DATABASE,
                f'database "{database}" is not served by this OfflineDB proxy',
                f"connect to one of: {known}",
            )
        copy = await self._copy_of(database, spec)
        await copy.ready.wait()
        if copy.state != "ready":
            raise Refused(NOT_READY, f'the copy of "{database}" could not be started: {copy.error}')
        return copy.backend()

    async def _copy_of(self, name: str, spec: OfflineDatabase) -> Copy:
        async with self._lock:
            copy = self.copies.get(name)
            if copy is not None:
                copy.last_activity = time.monotonic()
                return copy
            failed = self._failed.get(name)
            if failed and time.monotonic() - failed[0] < self._retry_failed:
                raise Refused(NOT_READY, f'the copy of "{name}" could not be started: {failed[1]}')
            self._check_capacity(name)
            snapshot = newest(self.config, name)
            if snapshot is None:
                raise Refused(
                    NOT_READY,
                    f'there is no snapshot of "{name}" yet',
                    f"take one with `pgcapture offlinedb snapshot {name}`",
                )
            copy = self._new_copy(name, spec, snapshot)
            self.copies[name] = copy
        copy.starting = asyncio.create_task(self._start(copy, spec), name=f"copy {name}")
        return copy

    def _check_capacity(self, name: str) -> None:
        s = self.settings
        if len(self.copies) >= s.max_copies:
            raise Refused(
                NO_CAPACITY,
                f'no copy of "{name}" can be started: {len(self.copies)} copies run, the most '
                f"allowed (offlinedb.max_copies = {s.max_copies})",
                "wait for an idle copy to be removed, or raise offlinedb.max_copies",
            )
        if not s.max_disk:
            return
        used = sum(c.disk() for c in self.copies.values())  # only with a cap: it walks the trees
        if used >= s.max_disk:
            raise Refused(
                NO_CAPACITY,
                f'no copy of "{name}" can be started: the copies use {used} bytes, '
                f"offlinedb.max_disk is {s.max_disk}",
                "wait for an idle copy to be removed, or raise offlinedb.max_disk",
            )

    def _new_copy(self, name: str, spec: OfflineDatabase, snapshot: Snapshot) -> Copy:
        base = self.settings.store / "copies" / f"{name}-{snapshot.id}-{secrets.token_hex(3)}"
        source = self.config.source(spec.source, need_dsn=False)
        dbname = conninfo_to_dict(spec.snapshot_dsn or source.dsn).get("dbname") or name
        server = LocalPostgres(base_dir=base, settings={"hot_standby": "on"})
        return Copy(name, snapshot, server, str(dbname))

    # -- starting and stopping ------------------------------------------------------------

    async def _start(self, copy: Copy, spec: OfflineDatabase) -> None:
        try:
            await self._make(copy)
            admin = copy.server.dsn(copy.database)
            async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
                await mask_copy(conn, spec.masks, spec.scripts)
                await _open_to_clients(conn, copy.server)
            source = self.config.source(spec.source, need_dsn=False)
            await bootstrap_physical(admin, source.name)
            copy.follower = asyncio.create_task(
                replicate(self.config, source, admin, copy.stop), name=f"replicate {copy.name}"
            )
            copy.state = "ready"
            log.info("copy of %s ready on port %d", copy.name, copy.server.port)
        except Exception as exc:
            why = str(exc) if isinstance(exc, MaskingFailed | Refused) else _first_line(exc)
            log.error("copy of %s failed: %s", copy.name, why)
            copy.state, copy.error = "failed", why
            self._failed[copy.name] = (time.monotonic(), why)
            await self._remove(copy)
        finally:
            copy.ready.set()

    async def _make(self, copy: Copy) -> None:
        """The snapshot's data directory as a promoted server of its own."""
        with mark_in_use(copy.snapshot, f"copy {copy.server.base_dir.name}"):
            await asyncio.to_thread(_copy_tree, copy.snapshot.path, copy.server)
        await asyncio.to_thread(copy.server.start)
        await asyncio.to_thread(copy.server.promote)

    async def _remove(self, copy: Copy) -> None:
        copy.state = "stopping"
        copy.stop.set()
        if copy.follower is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(copy.follower, 30)
        await asyncio.to_thread(copy.server.destroy)
        if self.copies.get(copy.name) is copy:
            del self.copies[copy.name]

    async def run(self, stop: asyncio.Event, status_file: Path | None = None) -> None:
        """Remove idle copies and keep ``status_file`` current until ``stop``; then remove
        every copy."""
        try:
            while not stop.is_set():
                await self._reap()
                if status_file is not None:
                    _write_status(status_file, self.status())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REAP_EVERY)
        finally:
            for copy in list(self.copies.values()):
                await self._remove(copy)
            if status_file is not None:
                _write_status(status_file, self.status())

    async def _reap(self) -> None:
        now = time.monotonic()
        for copy in list(self.copies.values()):
            if copy.follower is not None and copy.follower.done() and copy.state == "ready":
                exc = None if copy.follower.cancelled() else copy.follower.exception()
                copy.error = f"replicate stopped: {exc!r}; the copy no longer follows the source"
            idle = now - copy.last_activity
            if copy.state == "ready" and not copy.connections and idle > self.settings.idle_timeout:
                log.info("copy of %s idle for %.0f s: removed", copy.name, idle)
                await self._remove(copy)

    def status(self) -> dict[str, Any]:
        return {
            "updated_at": time.time(),
            "copies": [c.describe() for c in self.copies.values()],
            "max_copies": self.settings.max_copies,
            "idle_timeout": self.settings.idle_timeout,
        }


def _copy_tree(snapshot: Path, server: LocalPostgres) -> None:
    """A standby's data directory from the snapshot, on the server's own port and socket."""
    server.socket_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(snapshot, server.data_dir, symlinks=True, ignore=_not_data)
    (server.data_dir / "standby.signal").touch()
    settings = {
        "port": str(server.port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{server.socket_dir}'",
        "hot_standby": "on",
        "primary_conninfo": "''",
        "restore_command": "''",
        "recovery_target_timeline": "'latest'",
    }
    with (server.data_dir / "postgresql.auto.conf").open("a") as fh:
        fh.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
    # Until it is masked the copy admits only local socket connections (this service's own);
    # the source's rules come back with ``_open_to_clients``.
    hba = server.data_dir / "pg_hba.conf"
    (server.data_dir / SOURCE_HBA).write_bytes(hba.read_bytes())
    hba.write_text(MASKING_HBA)
    os.chmod(server.data_dir, 0o700)
    if os.geteuid() == 0:  # the server runs as its own user (see pgcapture.local)
        subprocess.run(["chown", "-R", "postgres:postgres", str(server.base_dir)], check=True)


async def _open_to_clients(conn: psycopg.AsyncConnection[Any], server: LocalPostgres) -> None:
    """The source's pg_hba.conf back in place: clients authenticate as on the source. Returns
    once the server has reloaded it (a new session sees a newer configuration load time)."""
    data = server.data_dir
    hba = await asyncio.to_thread((data / SOURCE_HBA).read_bytes)
    await asyncio.to_thread((data / "pg_hba.conf").write_bytes, hba)
    before = await _one(conn, "SELECT pg_conf_load_time()")
    await conn.execute("SELECT pg_reload_conf()")
    async with asyncio.timeout(10):
        while True:
            dsn = server.dsn(conn.info.dbname)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as fresh:
                if await _one(fresh, "SELECT pg_conf_load_time()") > before:
                    return
            await asyncio.sleep(0.05)


async def _one(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    row = await (await conn.execute(query)).fetchone()
    return row[0] if row else None


def _not_data(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("snapshot.json", "postmaster.pid", "postmaster.opts")}


def _write_status(path: Path, status: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(status, indent=2) + "\n")
    partial.replace(path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
