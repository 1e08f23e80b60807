"""The snapshot store of OfflineDB: physical copies of a source taken with ``pg_basebackup``.

Layout, under ``[offlinedb] store``::

    snapshots/NAME/.take.lock        held while a snapshot of NAME is taken (one at a time)
    snapshots/NAME/ID/               a complete snapshot: a data directory plus snapshot.json
    snapshots/NAME/ID.lock           shared-locked by every holder of snapshot ID (``mark_in_use``)
    snapshots/NAME/ID.partial/       a snapshot being taken; left over only by a crash
    snapshots/NAME/ID.deleting/      a snapshot being removed; left over only by a crash

``take_snapshot`` runs ``pg_basebackup -X stream -c fast --no-password`` against the database's
``snapshot_dsn`` (else its source's ``dsn``) into ``ID.partial``: the WAL needed to make the copy
consistent is streamed into its ``pg_wal`` and no recovery configuration is written, so a copy
of the directory starts as a standalone server (crash recovery from its ``backup_label``). It
then writes ``snapshot.json`` and renames ``ID.partial`` to ``ID``; a crash before the rename
leaves a ``.partial`` that the next run for NAME removes. IDs are UTC start times with
microseconds (``20260121T093012123456Z``), so they sort by age; ``list_snapshots`` returns the
newest first.

The consistent point (``end_lsn``) is the last ``End-LSN`` of the ``WAL-Ranges`` of
``backup_manifest``. ``backup_label`` cannot give it: the server writes that file when the
backup starts, with the start location and checkpoint only; the stop location is known when the
backup ends and is recorded in the manifest, which the server builds last (PostgreSQL docs,
"Backup Manifest Format"). A server started on the copy is consistent once it has replayed to
``end_lsn``; ``pg_wal`` may hold a little WAL beyond it, so a copy that must stop exactly there
is started with ``recovery_target_lsn`` and promoted, and its timeline's switch point is then its
position, as ``pgcapture.replica.bootstrap.bootstrap_physical`` reads it. ``server_version`` is
the copy's ``PG_VERSION`` (the major version whose binaries can start it).

After a snapshot, ``rotate`` keeps the newest ``[offlinedb] keep`` snapshots of NAME and removes
older ones, except those held by ``mark_in_use``: a holder takes a shared ``flock`` on
``ID.lock``; removal takes it exclusively without waiting, renames ``ID`` to ``ID.deleting``
and only then deletes it, so a holder either sees the snapshot whole or learns it is gone
(``SnapshotGone``). Locks die with their process, so a crashed holder protects nothing.

Running as root, ``pg_basebackup`` runs as the server user (as ``pgcapture.local`` does), so
the store's directory of NAME is given to that user and every parent must be searchable by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgcapture.config import Config, OfflineDatabase
from pgcapture.errors import ConfigError, PgCaptureError
from pgcapture.local.postgres import _as_server_user, _chown_to_server_user, find_postgres_bin
from pgcapture.lsn import LSN

log = logging.getLogger("pgcapture.offlinedb")

META: Final = "snapshot.json"
_PARTIAL: Final = ".partial"
_DELETING: Final = ".deleting"
_ID_RE: Final = re.compile(r"^\d{8}T\d{12}Z$")
_STDERR_LIMIT: Final = 1500


class SnapshotError(PgCaptureError):
    """A snapshot could not be taken; nothing was added to the store."""


class SnapshotStoreError(SnapshotError):
    """The store cannot hold the snapshot: not writable by the right user, or full."""


class SnapshotBusy(SnapshotError):
    """Another process is taking a snapshot of the same database."""


class SnapshotGone(SnapshotError):
    """The snapshot was removed (by rotation) before it could be marked in use."""


@dataclass(frozen=True)
class Snapshot:
    """One complete snapshot; ``path`` is its data directory (holding ``snapshot.json``)."""

    id: str
    database: str
    source: str
    server_version: str
    start_lsn: LSN
    end_lsn: LSN  # the consistent point: a copy is usable once replayed to here
    timeline: int
    started_at: datetime  # when pg_basebackup was started (local clock, UTC)
    taken_at: datetime  # when it had written the whole backup (local clock, UTC)
    size: int  # bytes
    path: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "database": self.database, "source": self.source,
            "server_version": self.server_version, "start_lsn": str(self.start_lsn),
            "end_lsn": str(self.end_lsn), "timeline": self.timeline,
            "started_at": self.started_at.isoformat(), "taken_at": self.taken_at.isoformat(),
            "size": self.size,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> Snapshot:
        return cls(
            id=data["id"], database=data["database"], source=data["source"],
            server_version=data["server_version"], start_lsn=LSN.parse(data["start_lsn"]),
            end_lsn=LSN.parse(data["end_lsn"]), timeline=int(data["timeline"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            taken_at=datetime.fromisoformat(data["taken_at"]), size=int(data["size"]), path=path,
        )  # fmt: skip


@dataclass(frozen=True)
class Rotation:
    """What ``rotate`` did: IDs removed, and older IDs kept because they are in use."""

    removed: tuple[str, ...]
    in_use: tuple[str, ...]


@dataclass
class SnapshotHold:
    """A snapshot marked in use by ``holder``; rotation keeps it until ``release``."""

    snapshot: Snapshot
    holder: str
    _fd: int

    def __enter__(self) -> SnapshotHold:
        return self

    def __exit__(self, *exc: object) -> None:
        release(self)


# ---------------------------------------------------------------------------------------------
# Reading the store


def snapshots_dir(config: Config, name: str) -> Path:
    """The directory of database ``name``'s snapshots (absolute)."""
    return (config.offlinedb.store / "snapshots" / name).resolve()


def list_snapshots(config: Config, name: str) -> list[Snapshot]:
    """The complete snapshots of database ``name``, newest first."""
    _database(config, name)
    directory = snapshots_dir(config, name)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        meta = path / META
        if _ID_RE.match(path.name) and meta.is_file():
            found.append(Snapshot.from_json(json.loads(meta.read_text()), path))
    return sorted(found, key=lambda s: s.id, reverse=True)


def newest(config: Config, name: str) -> Snapshot | None:
    """The newest complete snapshot of database ``name``, if any."""
    snapshots = list_snapshots(config, name)
    return snapshots[0] if snapshots else None


def _database(config: Config, name: str) -> OfflineDatabase:
    try:
        return config.offlinedb.databases[name]
    except KeyError:
        known = ", ".join(sorted(config.offlinedb.databases)) or "none"
        raise ConfigError(
            f"offlinedb database {name!r} is not configured (configured: {known}); add an "
            f'[offlinedb.databases.{name}] section with source = "<source name>"'
        ) from None


# ---------------------------------------------------------------------------------------------
# Holding a snapshot


def mark_in_use(snapshot: Snapshot, holder: str) -> SnapshotHold:
    """Protect ``snapshot`` from rotation until ``release``. Waits only while a removal that
    already started renames it away, and then raises ``SnapshotGone``."""
    fd = os.open(_lock_path(snapshot.path), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not (snapshot.path / META).is_file():
        os.close(fd)
        raise SnapshotGone(
            f"snapshot {snapshot.id} of {snapshot.database!r} was removed by rotation; "
            "use the newest snapshot instead"
        )
    log.debug("snapshot marked in use", extra={"snapshot": snapshot.id, "holder": holder})
    return SnapshotHold(snapshot, holder, fd)


def release(hold: SnapshotHold) -> None:
    """End ``hold``; releasing twice does nothing."""
    if hold._fd >= 0:
        os.close(hold._fd)  # closing the descriptor drops its flock
        hold._fd = -1


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# ---------------------------------------------------------------------------------------------
# Rotation


async def rotate(config: Config, name: str) -> Rotation:
    """Remove database ``name``'s snapshots older than the newest ``[offlinedb] keep``, except
    those in use."""
    removed, in_use = [], []
    for snapshot in list_snapshots(config, name)[config.offlinedb.keep :]:
        doomed = _detach(snapshot.path)
        if doomed is None:
            in_use.append(snapshot.id)
            continue
        await _remove_tree(doomed)
        removed.append(snapshot.id)
    rotation = Rotation(tuple(removed), tuple(in_use))
    log.info("snapshots rotated", extra={"database": name, **rotation.__dict__})
    return rotation


def _detach(path: Path) -> Path | None:
    """Rename a snapshot out of the way for removal, or None when it is in use."""
    lock = _lock_path(path)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        doomed = path.with_name(path.name + _DELETING)
        os.rename(path, doomed)
        lock.unlink()
    return doomed


async def _remove_tree(path: Path) -> None:
    # A snapshot may be gigabytes: deleting it must not stall the event loop.
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


def _remove_leftovers(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir() and path.name.endswith((_PARTIAL, _DELETING)):
            log.info("removing an unfinished snapshot", extra={"path": str(path)})
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Taking a snapshot


async def take_snapshot(config: Config, name: str, *, rotate_after: bool = True) -> Snapshot:
    """Take a snapshot of database ``name`` ([offlinedb.databases.NAME]) and, with
    ``rotate_after``, ``rotate`` its older ones."""
    database = _database(config, name)
    source = config.source(database.source, need_dsn=not database.snapshot_dsn)
    dsn, dsn_key = database.snapshot_dsn, f"offlinedb.databases.{name}.snapshot_dsn"
    if not dsn:
        dsn, dsn_key = source.dsn, f"sources.{database.source}.dsn"
    program = _pg_basebackup()
    directory = _prepare_store(snapshots_dir(config, name))
    with _take_lock(directory, name):
        _remove_leftovers(directory)
        started = datetime.now(UTC)
        partial = directory / (started.strftime("%Y%m%dT%H%M%S%fZ") + _PARTIAL)
        try:
            await _basebackup(program, dsn, dsn_key, partial)
            snapshot = _finish(partial, name, database.source, started)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log.info(
        "snapshot taken",
        extra={"database": name, "snapshot": snapshot.id, "lsn": str(snapshot.end_lsn)},
    )
    if rotate_after:
        await rotate(config, name)
    return snapshot


def _pg_basebackup() -> str:
    with contextlib.suppress(ConfigError):
        candidate = find_postgres_bin() / "pg_basebackup"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pg_basebackup")
    if found is None:
        raise ConfigError(
            "pg_basebackup was not found; install the PostgreSQL programs of the source's major "
            "version (e.g. `apt-get install postgresql`), or set PGCAPTURE_PG_BIN to their "
            "directory"
        )
    return found


def _prepare_store(directory: Path) -> Path:
    """``directory`` created and, when we are root, given to the server user."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _chown_to_server_user(directory)
    except OSError as exc:
        raise SnapshotStoreError(
            f"cannot create the snapshot directory {str(directory)!r}: {exc.strerror}; make "
            "[offlinedb] store a directory this user may write to"
        ) from exc
    if os.geteuid() != 0 and not os.access(directory, os.W_OK | os.X_OK):
        raise SnapshotStoreError(
            f"the snapshot directory {str(directory)!r} is not writable by this user; fix its "
            "owner or permissions, or point [offlinedb] store elsewhere"
        )
    return directory


@contextlib.contextmanager
def _take_lock(directory: Path, name: str) -> Iterator[None]:
    with open(directory / ".take.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SnapshotBusy(
                f"another process is taking a snapshot of {name!r} (it holds "
                f"{str(directory / '.take.lock')!r}); wait for it to finish"
            ) from None
        yield


async def _basebackup(program: str, dsn: str, dsn_key: str, target: Path) -> None:
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = {**os.environ, **({"PGPASSWORD": str(password)} if password is not None else {})}
    cmd = [
        *_as_server_user(), program, "-D", str(target), "-X", "stream", "-c", "fast",
        "--no-password", "--label", f"pgcapture offlinedb {target.name}",
        "-d", make_conninfo(**{k: str(v) for k, v in params.items()}),
    ]  # fmt: skip
    # From the store: the server user may not enter the caller's working directory.
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=target.parent,
    )  # fmt: skip
    try:
        _, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise _failure(stderr.decode(errors="replace"), dsn_key, target, params)


def _failure(stderr: str, dsn_key: str, target: Path, params: dict[str, Any]) -> SnapshotError:
    """The error for a failed ``pg_basebackup``, with the fix for what its stderr says."""
    problem = " | ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())
    problem = problem[-_STDERR_LIMIT:] or "no message"
    server = f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"
    role = params.get("user", "<role>")
    head = f"pg_basebackup from {server} failed: {problem}; "
    if "No space left on device" in stderr:
        return SnapshotStoreError(
            head + f"the disk of {str(target.parent)!r} is full: free space there, lower "
            "[offlinedb] keep, or move [offlinedb] store to a larger disk"
        )
    if re.search(r"replication role|REPLICATION attribute|permission denied to start", stderr):
        return SnapshotError(
            head + f"give the role replication rights: ALTER ROLE {role} REPLICATION"
        )
    if "pg_hba.conf" in stderr:
        return SnapshotError(
            head + f"allow replication connections of role {role}: add a line such as "
            f"`host replication {role} <client address>/32 scram-sha-256` to the server's "
            "pg_hba.conf and reload it (SELECT pg_reload_conf())"
        )
    if re.search(r"password|authentication failed", stderr):
        return SnapshotError(head + f"put the role's password in {dsn_key} or in ~/.pgpass")
    if "max_wal_senders" in stderr or "replication slots" in stderr:
        return SnapshotError(head + "raise max_wal_senders / max_replication_slots on the server")
    if "Permission denied" in stderr:
        user = "the postgres user" if os.geteuid() == 0 else "this user"
        return SnapshotStoreError(
            head + f"{str(target.parent)!r} must be writable by {user}, and each of its parent "
            "directories searchable by it; fix the permissions or move [offlinedb] store"
        )
    if re.search(r"could not connect|connection to server|could not translate", stderr):
        return SnapshotError(head + f"the server is unreachable: check {dsn_key} and that it runs")
    return SnapshotError(head + f"check {dsn_key} and the server's log")


# ---------------------------------------------------------------------------------------------
# Describing a finished backup


def _finish(partial: Path, name: str, source: str, started_at: datetime) -> Snapshot:
    """Write ``snapshot.json`` into the finished backup and rename it to its final name."""
    start_lsn = _read_label(partial / "backup_label")
    end_lsn, timeline = _read_manifest(partial / "backup_manifest")
    final = partial.with_name(partial.name.removesuffix(_PARTIAL))
    snapshot = Snapshot(
        id=final.name, database=name, source=source,
        server_version=(partial / "PG_VERSION").read_text().strip(),
        start_lsn=start_lsn, end_lsn=end_lsn, timeline=timeline, started_at=started_at,
        taken_at=datetime.now(UTC), size=_size(partial), path=final,
    )  # fmt: skip
    _write_meta(partial, snapshot)
    os.rename(partial, final)
    _fsync_dir(final.parent)
    return snapshot


def _read_label(path: Path) -> LSN:
    """The START WAL LOCATION of a ``backup_label`` ("START WAL LOCATION: 0/2000028 (file
    000000010000000000000002)"): where replay of the copy begins."""
    for line in path.read_text().splitlines():
        key, _, value = line.partition(": ")
        if key == "START WAL LOCATION" and value:
            with contextlib.suppress(ConfigError):
                return LSN.parse(value.split()[0])
    raise SnapshotError(f"{str(path)!r} has no readable START WAL LOCATION line")


def _read_manifest(path: Path) -> tuple[LSN, int]:
    """End-LSN and timeline of the last of the manifest's WAL-Ranges."""
    try:
        ranges = json.loads(path.read_text())["WAL-Ranges"]
        return LSN.parse(ranges[-1]["End-LSN"]), int(ranges[-1]["Timeline"])
    except FileNotFoundError:
        raise SnapshotError(
            "pg_basebackup wrote no backup_manifest, which holds the snapshot's consistent "
            "point; the server must be PostgreSQL 13 or newer, and pg_basebackup too"
        ) from None
    except (KeyError, IndexError, ValueError, ConfigError) as exc:
        raise SnapshotError(f"{str(path)!r} has no readable WAL-Ranges") from exc


def _write_meta(directory: Path, snapshot: Snapshot) -> None:
    temporary = directory / (META + ".tmp")
    with temporary.open("w") as fh:
        json.dump(snapshot.to_json(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    owner = directory.stat()
    os.chown(temporary, owner.st_uid, owner.st_gid)  # the same owner as the data it describes
    os.rename(temporary, directory / META)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total
