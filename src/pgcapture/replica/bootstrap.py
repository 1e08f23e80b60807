"""Giving a new replica its first position: from a physical copy, or from a consistent snapshot.

``replicate`` applies a source's stream after the replica's position (``pgcapture.sources``,
see ``pgcapture.replica.store``): every source transaction whose commit LSN is at or below it
must already be in the replica, and none after it. The stream identifies a transaction by the LSN
where its commit record starts, so a bootstrap has to find the exact WAL point where the
replica's copy of the data was cut. Two ways give one:

* ``bootstrap_physical``: the replica is a physical copy of the source (``pg_basebackup``, a
  standby, a point-in-time recovery) that has been promoted. Promotion starts a new timeline
  whose history file records the switch point S: the end of the last WAL record replayed from
  the source. A commit record that starts before S ended at or before S and was replayed; one
  that starts at or after S was not. The position is S - 1.
* ``bootstrap_snapshot``: the replica is an empty database. A temporary logical slot created on
  the source exports a snapshot at its consistent point C; ``pg_dump`` of that snapshot is piped
  into ``pg_restore`` on the replica in one transaction. Logical decoding skips exactly the
  transactions whose commit record starts before C (they are in the snapshot) and decodes those
  at or after C, so the position is C - 1. The capture slot must exist and be consistent before
  the snapshot is taken, so that the stream holds every transaction at or after C.

Both record the position with ``set_position``; an existing position is kept unless
``replace``. docs/replica.md ("Bootstrapping a replica") is the operator's guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgcapture.config import SourceConfig
from pgcapture.errors import (
    ConfigError,
    ConnectionLost,
    PermissionDenied,
    PgCaptureError,
    SourceError,
)
from pgcapture.local.postgres import find_postgres_bin
from pgcapture.lsn import LSN
from pgcapture.replica.store import Position, read_position, set_position
from pgcapture.replication import ReplicationStream

log = logging.getLogger("pgcapture.bootstrap")

_PIPE_CHUNK: Final = 1 << 16
_STDERR_LIMIT: Final = 2000
# One line of ``pg_restore -l``: "<dump id>; <catalog oid> <object oid> <type> <rest>".
_TOC_LINE: Final = re.compile(r"^\s*(\d+);\s+(\d+)\s+(\d+)\s+EVENT TRIGGER\s")
_PROMOTE_FIX: Final = (
    "promote it first (`pg_ctl promote -D <data directory>`, or `SELECT pg_promote()`), then "
    "run the bootstrap again before it takes any write"
)


class BootstrapError(PgCaptureError):
    """The replica cannot be given a position as asked; nothing was recorded."""


# ---------------------------------------------------------------------------------------------
# From a physical copy


async def bootstrap_physical(
    replica_dsn: str,
    source: str,
    source_dsn: str | None = None,
    replace: bool = False,
) -> Position:
    """Record the position of a promoted physical copy of the source: the switch point of its
    newest timeline, minus one. With ``source_dsn``, first check that the replica really is a
    copy of that source (same system identifier, same database, branched from its timeline)."""
    async with _connect(replica_dsn, "the replica") as conn:
        timeline, parent, switch = await _switch_point(conn)
        if source_dsn is not None:
            await _check_same_system(conn, source_dsn, parent, switch)
        await _check_no_prepared(conn)
        origin = f"physical copy, timeline {timeline} switch point {switch}"
        position = await set_position(conn, source, LSN(switch - 1), origin, replace)
    log.info(
        "replica position recorded",
        extra={"source": source, "lsn": str(position.lsn), "origin": origin},
    )
    return position


async def _switch_point(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int, LSN]:
    """The replica's timeline, the timeline it branched from and the switch point."""
    row = await _one(conn, "SELECT pg_is_in_recovery()")
    if row[0]:
        raise BootstrapError(
            f"database {conn.info.dbname!r} is still in recovery (a standby, or a copy still "
            f"replaying WAL): it has not left the source's history yet; {_PROMOTE_FIX}"
        )
    row = await _one(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    timeline = int(row[0][:8], 16)
    if timeline <= 1:
        raise BootstrapError(
            f"the server of database {conn.info.dbname!r} runs on timeline 1: it was never "
            "promoted from recovery, so there is no exact point where its data left the "
            "source's history. Make the copy as a standby or with pg_basebackup -R, let it "
            "catch up, and promote it (`pg_ctl promote` / `SELECT pg_promote()`), or bootstrap "
            "an empty database with --from snapshot"
        )
    name = f"{timeline:08X}.history"
    try:
        row = await _one(conn, "SELECT pg_read_file(%s)", (f"pg_wal/{name}",))
    except pg_errors.InsufficientPrivilege as exc:
        raise PermissionDenied(
            f"cannot read the timeline history file pg_wal/{name}: {_first_line(exc)}; run "
            "`GRANT pg_read_server_files TO <role>` (or `GRANT EXECUTE ON FUNCTION "
            "pg_read_file(text) TO <role>`) as a superuser, or bootstrap as a superuser"
        ) from exc
    except pg_errors.UndefinedFile as exc:
        raise BootstrapError(
            f"the replica runs on timeline {timeline} but has no pg_wal/{name}: "
            f"{_first_line(exc)}; the switch point cannot be found (was the file removed?)"
        ) from exc
    lines = [line for line in str(row[0]).splitlines() if line.strip() and not line.startswith("#")]
    fields = lines[-1].split("\t") if lines else []
    try:
        parent, switch = int(fields[0]), LSN.parse(fields[1])
    except (IndexError, ValueError, ConfigError):
        raise BootstrapError(
            f"pg_wal/{name} does not end with a '<timeline>\\t<switch point>\\t<reason>' line "
            f"(got {lines[-1] if lines else 'an empty file'!r})"
        ) from None
    return timeline, parent, switch


async def _check_same_system(
    conn: psycopg.AsyncConnection[Any], source_dsn: str, parent: int, switch: LSN
) -> None:
    query = (
        "SELECT system_identifier::text, (SELECT oid::bigint FROM pg_database "
        "WHERE datname = current_database()) FROM pg_control_system()"
    )
    replica_id, replica_db = await _one(conn, query)
    async with _connect(source_dsn, "the source") as src:
        source_name = src.info.dbname
        source_id, source_db = await _one(src, query)
        walfile, current = await _one(
            src,
            "SELECT CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) "
            "END, CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_lsn() END::text",
        )
    if replica_id != source_id:
        raise BootstrapError(
            f"the replica is not a physical copy of the source: its system identifier is "
            f"{replica_id}, the source's is {source_id}; bootstrap an empty database with "
            "--from snapshot instead, or point --source-dsn at the right source"
        )
    if replica_db != source_db:
        raise BootstrapError(
            f"replica database {conn.info.dbname!r} is not the copy of source database "
            f"{source_name!r} (database OIDs {replica_db} and {source_db}); connect to the "
            "copy of the source's database"
        )
    source_timeline = int(walfile[:8], 16) if walfile else None
    if source_timeline is not None and source_timeline != parent:
        raise BootstrapError(
            f"the replica branched from timeline {parent}, but the source runs on timeline "
            f"{source_timeline}: its switch point {switch} is not a position in the history "
            "the source's stream follows; make a new copy of the source"
        )
    if current is not None and switch > LSN.parse(current):
        raise BootstrapError(
            f"the replica's switch point {switch} is beyond the source's current WAL position "
            f"{current}: it did not branch from this source's history; make a new copy"
        )


async def _check_no_prepared(conn: psycopg.AsyncConnection[Any]) -> None:
    cur = await conn.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid"
    )
    gids = [row[0] for row in await cur.fetchall()]
    if gids:
        commands = "; ".join(f"ROLLBACK PREPARED '{g.replace(chr(39), chr(39) * 2)}'" for g in gids)
        raise BootstrapError(
            f"the copy holds {len(gids)} prepared transaction(s) that the source had not "
            "committed at the switch point; the stream delivers those the source commits later, "
            f"so roll them back on the replica first: {commands}"
        )


# ---------------------------------------------------------------------------------------------
# From an empty database and a consistent snapshot


async def bootstrap_snapshot(
    source: SourceConfig, replica_dsn: str, replace: bool = False
) -> Position:
    """Copy the source database (``source.dsn``) into the empty database ``replica_dsn`` from
    a snapshot consistent with the capture slot (``source.slot_name``), and record its position.

    The replica must hold no table outside the system schemas and ``pgcapture``; with
    ``replace``, ``pg_restore --clean`` drops and recreates the objects of the dump instead and
    the position is overwritten. Owners and privileges are kept, so the roles they name must
    exist on the replica's server.
    """
    programs = (_client_program("pg_dump"), _client_program("pg_restore"))
    async with _connect(replica_dsn, "the replica") as conn:
        await _check_replica_empty(conn, source.name, replace)
    async with _connect(source.dsn, "the source") as src:
        await _check_capture_slot(src, source)
    async with _exported_snapshot(source.dsn) as (consistent, snapshot):
        log.info(
            "copying the source from a snapshot",
            extra={"source": source.name, "consistent_point": str(consistent)},
        )
        skip = await _pgcapture_event_triggers(source.dsn, snapshot)
        await _dump_and_restore(programs, source.dsn, replica_dsn, snapshot, skip, replace)
    origin = f"snapshot at {consistent}"
    async with _connect(replica_dsn, "the replica") as conn:
        position = await set_position(conn, source.name, LSN(consistent - 1), origin, replace)
    log.info(
        "replica position recorded",
        extra={"source": source.name, "lsn": str(position.lsn), "origin": origin},
    )
    return position


async def _check_replica_empty(
    conn: psycopg.AsyncConnection[Any], source: str, replace: bool
) -> None:
    if replace:
        return
    cur = await conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcapture') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
        "ORDER BY 1, 2 LIMIT 4"
    )
    rows = await cur.fetchall()
    if rows:
        names = ", ".join(f"{s}.{t}" for s, t in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise BootstrapError(
            f"replica database {conn.info.dbname!r} is not empty (it holds {names}); a snapshot "
            "bootstrap restores the whole source database into an empty one: create a fresh "
            "database (CREATE DATABASE ... TEMPLATE template0), or replace the objects of the "
            "source on purpose"
        )
    cur = await conn.execute("SELECT to_regclass('pgcapture.sources') IS NOT NULL")
    row = await cur.fetchone()
    if row and row[0]:
        position = await read_position(conn, source)
        if position is not None:
            raise ConfigError(
                f"the replica already has a position for source {source!r}: {position.lsn} "
                f"(from {position.origin}); bootstrapping again would apply changes twice or "
                "skip some. Use a fresh database, or replace the position on purpose"
            )


async def _check_capture_slot(conn: psycopg.AsyncConnection[Any], source: SourceConfig) -> None:
    slot = source.slot_name
    start = (
        f"start `pgcapture capture --source {source.name}` first (and keep it running) so that "
        "its stream holds every change after the snapshot"
    )
    cur = await conn.execute(
        "SELECT plugin, database, confirmed_flush_lsn::text, current_database() "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    row = await cur.fetchone()
    if row is None:
        raise BootstrapError(
            f"the source has no replication slot {slot!r}, so nothing captures its changes; {start}"
        )
    plugin, database, confirmed, current = row
    if plugin != "pgoutput" or database != current:
        raise BootstrapError(
            f"replication slot {slot!r} is a {plugin or 'physical'} slot of database "
            f"{database!r}, not capture's pgoutput slot of {current!r}; check the source's dsn "
            "and slot name"
        )
    if confirmed is None:
        raise BootstrapError(
            f"replication slot {slot!r} is not consistent yet (it is still waiting for "
            f"transactions that were running when it was created to end); {start}, and wait "
            "for it to start streaming"
        )


@contextlib.asynccontextmanager
async def _exported_snapshot(dsn: str) -> AsyncIterator[tuple[LSN, str]]:
    """A temporary logical slot's consistent point and exported snapshot, valid while this
    context is open; the slot goes away with the connection."""
    stream = await ReplicationStream.connect(dsn)
    try:
        try:
            exported = await stream.export_snapshot(f"pgcapture_bootstrap_{secrets.token_hex(6)}")
        except SourceError as exc:
            raise BootstrapError(
                f"cannot create a temporary slot on the source to export a snapshot: {exc}"
            ) from exc
        yield exported
    finally:
        await stream.close()


async def _pgcapture_event_triggers(dsn: str, snapshot: str) -> set[int]:
    """OIDs of the event triggers that run pgcapture's own functions (DDL capture), as of the
    snapshot: ``--exclude-schema=pgcapture`` leaves them in the dump, but not their
    functions."""
    async with _connect(dsn, "the source") as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        cur = await conn.execute(
            "SELECT e.oid::bigint FROM pg_event_trigger e JOIN pg_proc p ON p.oid = e.evtfoid "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgcapture'"
        )
        return {int(row[0]) for row in await cur.fetchall()}


async def _dump_and_restore(
    programs: tuple[str, str],
    source_dsn: str,
    replica_dsn: str,
    snapshot: str,
    skip_event_triggers: set[int],
    replace: bool,
) -> None:
    """``pg_dump`` of the snapshot piped into ``pg_restore`` in one transaction.

    The custom format writes its table of contents first, so the head of the dump goes through
    ``pg_restore --list`` (which stops after the table of contents) while it is kept in memory;
    the list without pgcapture's event triggers then drives ``pg_restore --use-list``, fed that
    head and the rest of the dump as it comes. The dump is never written to disk.
    """
    pg_dump, pg_restore = programs
    source_args, source_env = _dsn_args(source_dsn)
    replica_args, replica_env = _dsn_args(replica_dsn)
    dump_cmd = [
        pg_dump, f"--snapshot={snapshot}", "--format=custom", "--no-publications",
        "--no-subscriptions", "--exclude-schema=pgcapture", *source_args,
    ]  # fmt: skip
    async with _Processes() as procs:
        dump = await procs.spawn(dump_cmd, source_env, stdin=False)
        head, listing = await _read_toc(procs, pg_restore, dump)
        if listing is None:
            dump_code = await dump.wait() if _at_eof(dump) else 0
            if dump_code != 0:
                raise _dump_failed(dump_code, await procs.stderr(dump))
            raise BootstrapError(
                "pg_restore --list cannot read the table of contents of the dump: "
                f"{_tail(await procs.stderr(procs.last))}"
            )
        with tempfile.TemporaryDirectory(prefix="pgcapture-bootstrap-") as tmp:
            use_list = Path(tmp) / "restore.list"
            use_list.write_text(_filter_toc(listing, skip_event_triggers))
            restore_cmd = [
                pg_restore, "--exit-on-error", "--single-transaction", f"--use-list={use_list}",
                *(["--clean", "--if-exists"] if replace else []), *replica_args,
            ]  # fmt: skip
            restore = await procs.spawn(restore_cmd, replica_env, stdin=True, stdout=False)
            restore_quit = await _pump(head, dump, restore)
            restore_code = await restore.wait()
            dump_code = await dump.wait()
        if dump_code != 0 and not restore_quit:
            raise _dump_failed(dump_code, await procs.stderr(dump))
        if restore_code != 0:
            problem = await procs.stderr(restore)
            raise BootstrapError(
                f"pg_restore into the replica failed (exit status {restore_code}): "
                f"{_tail(problem)}; nothing was committed on the replica{_restore_hint(problem)}"
            )


def _dump_failed(code: int, stderr: str) -> BootstrapError:
    return BootstrapError(
        f"pg_dump of the source failed (exit status {code}): {_tail(stderr)}; nothing was "
        "committed on the replica"
    )


class _Processes:
    """Child processes with their output collected as they run; on leaving, those still
    running are killed and every collector is awaited."""

    def __init__(self) -> None:
        self._procs: list[asyncio.subprocess.Process] = []
        self._tasks: dict[tuple[int, str], asyncio.Task[str]] = {}

    async def __aenter__(self) -> _Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    @property
    def last(self) -> asyncio.subprocess.Process:
        return self._procs[-1]

    async def spawn(
        self,
        cmd: list[str],
        env: dict[str, str],
        stdin: bool,
        stdout: bool = True,
        collect_stdout: bool = False,
    ) -> asyncio.subprocess.Process:
        """Start ``cmd``: stdin a pipe or /dev/null; stdout a pipe (collected as text with
        ``collect_stdout``, else read by the caller) or /dev/null; stderr collected."""
        pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=pipe if stdin else null,
            stdout=pipe if stdout else null,
            stderr=pipe,
            env={**os.environ, **env},
        )
        self._procs.append(proc)
        assert proc.stderr is not None
        self._tasks[proc.pid, "stderr"] = asyncio.ensure_future(_read_text(proc.stderr))
        if collect_stdout:
            assert proc.stdout is not None
            self._tasks[proc.pid, "stdout"] = asyncio.ensure_future(_read_text(proc.stdout))
        return proc

    async def stderr(self, proc: asyncio.subprocess.Process) -> str:
        return await self._tasks[proc.pid, "stderr"]

    async def stdout(self, proc: asyncio.subprocess.Process) -> str:
        return await self._tasks[proc.pid, "stdout"]


async def _read_text(stream: asyncio.StreamReader) -> str:
    return (await stream.read()).decode(errors="replace")


def _at_eof(proc: asyncio.subprocess.Process) -> bool:
    return proc.stdout is None or proc.stdout.at_eof()


async def _read_toc(
    procs: _Processes, pg_restore: str, dump: asyncio.subprocess.Process
) -> tuple[list[bytes], str | None]:
    """Feed the dump to ``pg_restore --list`` until it has listed the table of contents.

    Returns what was read of the dump so far and the listing (None when the listing failed;
    the lister is then ``procs.last``)."""
    assert dump.stdout is not None
    lister = await procs.spawn([pg_restore, "--list"], {}, stdin=True, collect_stdout=True)
    assert lister.stdin is not None
    head: list[bytes] = []
    while chunk := await dump.stdout.read(_PIPE_CHUNK):
        head.append(chunk)
        try:
            lister.stdin.write(chunk)
            await lister.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            break  # it has read the table of contents and exited
    lister.stdin.close()
    if await lister.wait() != 0:
        return head, None
    return head, await procs.stdout(lister)


def _filter_toc(listing: str, skip_event_triggers: set[int]) -> str:
    kept = []
    for line in listing.splitlines():
        match = _TOC_LINE.match(line)
        if match is not None and int(match[3]) in skip_event_triggers:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


async def _pump(
    head: list[bytes], dump: asyncio.subprocess.Process, restore: asyncio.subprocess.Process
) -> bool:
    """Write ``head`` and then the rest of the dump into ``restore``'s stdin. Returns True when
    ``restore`` quit early (on an error); ``dump`` is then stopped."""
    assert dump.stdout is not None
    assert restore.stdin is not None
    try:
        for chunk in head:
            restore.stdin.write(chunk)
            await restore.stdin.drain()
        while chunk := await dump.stdout.read(_PIPE_CHUNK):
            restore.stdin.write(chunk)
            await restore.stdin.drain()
        restore.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        restore.stdin.close()
        if dump.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                dump.terminate()
        return True
    return False


def _restore_hint(stderr: str) -> str:
    if re.search(r'role "[^"]+" does not exist', stderr):
        return (
            "; create the source's roles on the replica's server first, e.g. "
            "`pg_dumpall --roles-only -d <source> | psql -d <replica>`"
        )
    if "already exists" in stderr:
        return "; the replica database is not empty: restore into a fresh database"
    if "extension" in stderr and ("not available" in stderr or "could not open" in stderr):
        return "; install the extensions the source uses on the replica's server"
    return ""


# ---------------------------------------------------------------------------------------------
# Helpers


@contextlib.asynccontextmanager
async def _connect(dsn: str, what: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ConnectionLost(f"cannot connect to {what}: {_first_line(exc)}") from exc
    try:
        yield conn
    finally:
        await conn.close()


async def _one(
    conn: psycopg.AsyncConnection[Any], query: str, params: tuple[Any, ...] | None = None
) -> tuple[Any, ...]:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    if row is None:
        raise BootstrapError(f"{query!r} returned no row")
    return tuple(row)


def _client_program(name: str) -> str:
    """``pg_dump``/``pg_restore`` from the server programs' directory (``$PGCAPTURE_PG_BIN``,
    the newest /usr/lib/postgresql/*/bin), else from ``PATH``."""
    with contextlib.suppress(ConfigError):
        candidate = find_postgres_bin() / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            f"{name} was not found; install the PostgreSQL client programs of the source's "
            "major version or newer (e.g. `apt-get install postgresql-client`), or set "
            "PGCAPTURE_PG_BIN to their directory"
        )
    return found


def _dsn_args(dsn: str) -> tuple[list[str], dict[str, str]]:
    """``--dbname`` for a client program, with the password moved out of the command line
    (where any local user could read it) into its environment."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = {"PGPASSWORD": str(password)} if password is not None else {}
    return ["--dbname", make_conninfo(**{k: str(v) for k, v in params.items()})], env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tail(text: str) -> str:
    """A program's stderr as one line, its end kept when long."""
    flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    flat = flat.rstrip("; ")
    if not flat:
        return "no message"
    return flat if len(flat) <= _STDERR_LIMIT else "..." + flat[-_STDERR_LIMIT:]
