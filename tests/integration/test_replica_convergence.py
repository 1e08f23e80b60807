"""``replicate`` keeps a replica equal to its source: every table, column and row, DDL included.

The source and the replica start empty; the slot is made before anything else, so the stream
holds the whole history, schema included, and the replica starts at position 0/0. A randomized
workload (``replica_workload``: keyed and keyless tables, TOAST, key changes and swaps, TRUNCATE,
identity and generated columns, a partitioned table, enums, composites, domains and ranges, a
foreign key with cascades, a trigger, savepoints, two-phase commit, and DDL in the middle of it
all) runs next to pgbench while capture and replicate run. At the end every table of the replica
equals the source's.

The fault test stops ``replicate`` at random moments (SIGKILL, now and then SIGTERM), kills
capture once or twice, crashes the replica's PostgreSQL and kills nats-server. The random seed
is in every failure message, with the processes' logs; PGCAPTURE_SOAK=1 makes the workloads
longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO

import nats as natslib
import psycopg
import pytest
from log_helpers import capturing, make_config, run_sql
from replica_workload import (
    SOAK,
    Workload,
    assert_same_tables,
    run_pgbench,
    summary,
    table_sizes,
    undecided_ddl,
    wait_for_marker,
)

from pgcapture.capture.reader import SlotReader
from pgcapture.config import SourceConfig
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.log.stream import read_tail
from pgcapture.lsn import LSN
from pgcapture.replica.service import replicate
from pgcapture.replica.store import LOCK_KEYS, set_position

pytestmark = pytest.mark.integration

SCHEMAS = ("public", "app")
KILLS = 40 if SOAK else 12
"""SIGKILLs of replicate in the fault test, at least."""
FAULT_SECONDS = 150 if SOAK else 30
"""Seconds the fault test's workload runs while replicate is killed again and again."""
CATCH_UP = 600 if SOAK else 120
"""Seconds the replica may take to apply what is left once the workload is over."""


async def start_from_scratch(dsn: str, source: SourceConfig, replica_dsn: str) -> None:
    """DDL capture, publication and slot on the empty source, before any of the workload; the
    replica (empty too) applies the stream from its first transaction."""
    reader = SlotReader(dsn, source.slot_name)
    await reader.open()
    await reader.close()
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        await set_position(conn, source.name, 0, "an empty source, captured from its start")


def report(seed: int, workload: Workload, *logs: Path) -> str:
    """What a failure message needs: the seed, the workload, and the processes' logs."""
    parts = [f"seed {seed}; workload: {summary(workload.stats)}"]
    if workload.log_file is not None:
        parts.append(f"statements of the workload: {workload.log_file}")
    parts.append(report_logs(*logs))
    return "\n".join(parts)


def report_logs(*logs: Path) -> str:
    parts = []
    for path in logs:
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            parts.append(
                f"--- {path.name} (last 60 lines) ---\n" + "\n".join(text.splitlines()[-60:])
            )
    return "\n".join(parts)


async def check_workload(dsn: str, workload: Workload) -> None:
    """The workload did what the test needs: many transactions and DDL, all of it replayable."""
    assert workload.stats["committed"] > 300, summary(workload.stats)
    assert workload.stats["ddl transactions"] >= 5, summary(workload.stats)
    undecided = await undecided_ddl(dsn)
    assert not undecided, f"seed {workload.seed}: DDL logged with exact = false: {undecided}"


@pytest.mark.timeout(600 if SOAK else 240)
async def test_replica_converges_with_the_source(
    dsn: str, replica_dsn: str, nats: LocalNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = random.randrange(1 << 30)
    name = f"conv{seed}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await start_from_scratch(dsn, source, replica_dsn)
    workload = Workload(dsn, seed, log_file=tmp_path / "workload.sql")
    stop = asyncio.Event()
    started = time.monotonic()
    async with capturing(config, name):
        await wait_for_stream(nats.url, source.stream_name)
        applier = asyncio.create_task(replicate(config, source, replica_dsn, stop))

        def alive() -> str | None:
            if not applier.done():
                return None
            return repr(applier.exception()) if not applier.cancelled() else "cancelled"

        try:
            async with asyncio.timeout(CATCH_UP + 60):
                await workload.run()
                loaded = time.monotonic() - started
                await wait_for_marker(replica_dsn, workload.token, CATCH_UP, alive)
        except BaseException as exc:
            exc.add_note(report(seed, workload))
            raise
        finally:
            stop.set()
            await asyncio.wait_for(applier, 30)
    caught_up = time.monotonic() - started
    await check_workload(dsn, workload)
    try:
        await assert_same_tables(dsn, replica_dsn, SCHEMAS, context=f"seed {seed}")
    except AssertionError as exc:
        exc.add_note(report(seed, workload))
        raise
    # Nothing went wrong, so replicate never had to start a session again.
    restarts = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pgcapture.replicate") and r.levelno >= logging.WARNING
    ]
    assert not restarts, f"seed {seed}: replicate warned without a fault: {restarts}"
    sizes = await table_sizes(dsn, SCHEMAS)
    print(
        f"seed {seed}: workload {loaded:.1f}s, replica caught up at {caught_up:.1f}s; "
        f"{summary(workload.stats)}; {len(sizes)} tables, {sum(sizes.values())} rows"
    )


# --- processes -------------------------------------------------------------------------------


class Proc:
    """A pgcapture command in a subprocess, its stdout and stderr in a file of its own."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self._out: IO[bytes] | None = None

    async def start(self) -> Proc:
        self._out = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgcapture", *self.args, stdout=self._out, stderr=self._out
        )
        return self

    @property
    def returncode(self) -> int | None:
        assert self.proc is not None
        return self.proc.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, needle: str, timeout: float = 30, after: int = 0) -> None:
        """Until the log holds ``needle`` (more than ``after`` times); the process ending
        first is a failure."""
        try:
            async with asyncio.timeout(timeout):
                while self.text().count(needle) <= after:
                    if self.returncode is not None:
                        raise AssertionError(
                            f"{self.args[0]} exited with {self.returncode} before {needle!r}:\n"
                            + self.text()[-5000:]
                        )
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(
                f"{self.args[0]} did not log {needle!r} within {timeout}s:\n{self.text()[-5000:]}"
            ) from None

    async def exit_code(self, timeout: float = 30) -> int:
        """The exit status of a process that ends by itself."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.args[0]} still runs after {timeout}s:\n{self.text()[-5000:]}"
            ) from None

    async def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Send ``sig`` and return the exit status; not exiting within ``timeout`` fails."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.args[0]} did not exit within {timeout}s of {signal.Signals(sig).name}:\n"
                + self.text()[-5000:]
            ) from None
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._out is not None:
                self._out.close()


@contextlib.asynccontextmanager
async def stopping(procs: list[Proc]) -> AsyncIterator[list[Proc]]:
    """Every process still running at the end is killed."""
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.proc is not None:
                await proc.kill(signal.SIGKILL, 10)


def capture_args(dsn: str, url: str, name: str) -> tuple[str, ...]:
    return (
        "capture", "--dsn", dsn, "--nats", url, "--source", name, "--lock-wait", "20",
        "--log-format", "text",
        "--set", f"sources.{name}.lock.ttl=1",
        "--set", f"sources.{name}.status_interval=0.2",
        "--set", f"sources.{name}.batch.max_records=200",
        "--set", f"sources.{name}.batch.max_bytes=64KiB",
    )  # fmt: skip


def replicate_args(replica_dsn: str, url: str, name: str) -> tuple[str, ...]:
    return ("replicate", "--nats", url, "--source", name, "--dsn", replica_dsn,
            "--log-format", "text")  # fmt: skip


async def replica_lsn(replica_dsn: str, name: str) -> str:
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT lsn::text FROM pgcapture.sources WHERE id = %s", (name,))
        row = await cur.fetchone()
    return str(row[0]) if row else "none"


async def wait_for_stream(url: str, stream: str, timeout: float = 30) -> None:
    """Until capture has made the source's stream (replicate needs it to exist)."""
    nc = await natslib.connect(url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(natslib.js.errors.NotFoundError):
                    await nc.jetstream().stream_info(stream)
                    return
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def stream_end(url: str, stream: str) -> str:
    """The commit LSN of the stream's last record (or what kept it from being read)."""
    try:
        nc = await natslib.connect(url, allow_reconnect=False)
    except (natslib.errors.Error, OSError) as exc:
        return repr(exc)
    try:
        tail = await read_tail(nc.jetstream(), stream)
    except natslib.errors.Error as exc:
        return repr(exc)
    finally:
        await nc.close()
    return tail.checkpoint.lsn_text if tail.checkpoint else "empty"


async def resumes(
    proc: Proc, replica_dsn: str, name: str, url: str, stream: str, sessions: int
) -> None:
    """After a fault, the running replicate applies again: its position passes where it
    was, or reaches the stream's end (an idle replicate may not notice a fault at all)."""
    before: LSN | None = None
    seen = ""
    try:
        async with asyncio.timeout(60):
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"replicate exited with {proc.returncode}")
                with contextlib.suppress(psycopg.OperationalError):
                    now = LSN.parse(await replica_lsn(replica_dsn, name))
                    end = await stream_end(url, stream)
                    seen = f"replica at {now}, stream ends at {end}"
                    if before is None:
                        before = now
                    elif now > before or str(now) == end:
                        return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(
            f"replicate made no progress for 60s after the fault ({seen}; "
            f"{proc.text().count('replicating ') - sessions} new sessions):\n" + proc.text()[-5000:]
        ) from None


def replicate_logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("replicate-*.log"))


def ended(proc: Proc) -> Callable[[], str | None]:
    def check() -> str | None:
        if proc.returncode is None:
            return None
        return f"{proc.args[0]} exited with {proc.returncode}:\n{proc.text()[-5000:]}"

    return check


@pytest.fixture
def own_nats() -> Iterator[LocalNats]:
    """A nats-server of the test's own, so that restarting it disturbs no other test."""
    server = LocalNats()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def replica_pg() -> AsyncIterator[LocalPostgres]:
    """A cluster of its own for the replica (its OIDs differ from the source's), with an empty
    database ``replica``; crashing it disturbs no other test."""
    cluster = LocalPostgres.create()
    try:
        await asyncio.to_thread(cluster.start)
        await run_sql(cluster.dsn(), "CREATE DATABASE replica")
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


def fault_plan(rng: random.Random) -> dict[int, str]:
    """Which replicate runs see another fault before they are stopped: capture killed (once or
    twice), the replica's PostgreSQL crashed, nats-server killed."""
    faults = ["capture", "replica crash", "nats restart"]
    if rng.random() < 0.5:
        faults.append("capture")
    return dict(zip(rng.sample(range(1, KILLS), len(faults)), faults, strict=True))


@pytest.mark.timeout(900 if SOAK else 280)
async def test_replica_converges_through_kills_and_crashes(
    dsn: str, replica_pg: LocalPostgres, own_nats: LocalNats, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"kill{seed}"
    url = own_nats.url
    replica_dsn = replica_pg.dsn("replica")
    source = make_config(dsn, url, name).source(name)
    await start_from_scratch(dsn, source, replica_dsn)
    workload = Workload(
        dsn, seed, pace=0.05, seconds=FAULT_SECONDS, log_file=tmp_path / "workload.sql"
    )
    plan = fault_plan(rng)
    logs = [tmp_path / "capture.log"]
    procs: list[Proc] = []
    kills: list[str] = []  # the replica's position after each stop of replicate
    timeline: list[str] = []
    behind = 0  # stops while the stream held changes the replica had not committed
    stops = 0  # of them by SIGTERM, not SIGKILL

    def note(line: str) -> None:
        timeline.append(f"{time.strftime('%H:%M:%S')} {line}")

    async def start_capture() -> Proc:
        capture = await Proc(logs[0], *capture_args(dsn, url, name)).start()
        procs.append(capture)
        await capture.wait_for("capturing source", 60)
        return capture

    started = time.monotonic()
    try:
        async with stopping(procs), asyncio.timeout(CATCH_UP + 150):
            capture = await start_capture()
            load = asyncio.create_task(workload.run())
            try:
                while not load.done() or len(kills) < KILLS:
                    number = len(kills)
                    log = tmp_path / f"replicate-{number:02d}.log"
                    proc = await Proc(log, *replicate_args(replica_dsn, url, name)).start()
                    procs.append(proc)
                    fault = plan.get(number)
                    started_up = fault is not None or rng.random() < 0.75  # else at start-up
                    if started_up:
                        await proc.wait_for("replicating ")
                    if fault == "capture":
                        await capture.kill()
                        note(f"capture killed during run {number}")
                        capture = await start_capture()
                    elif fault in ("replica crash", "nats restart"):
                        sessions = proc.text().count("replicating ")
                        if fault == "replica crash":  # immediate shutdown: no checkpoint
                            await asyncio.to_thread(replica_pg.kill)
                            await asyncio.sleep(rng.uniform(0, 2))
                            await asyncio.to_thread(replica_pg.start)
                        else:
                            await asyncio.to_thread(own_nats.restart, signal.SIGKILL)
                        note(f"{fault} during run {number}")
                        # The same replicate goes on (in a new session once it notices).
                        await resumes(proc, replica_dsn, name, url, source.stream_name, sessions)
                    stuck = len(kills) >= 2 and kills[-1] == kills[-2] and not load.done()
                    # After two stops without progress (a large transaction takes longer to
                    # apply than the usual interval), one that gives it the time. Otherwise
                    # 0.05 to 1.5 s, short ones more often: the replica catches up soon after
                    # it starts, and a stop should often come while it applies.
                    pause = rng.uniform(2, 6) if stuck else 0.05 + 1.45 * rng.random() ** 2
                    await asyncio.sleep(pause)
                    if proc.returncode is not None:
                        raise AssertionError(f"replicate exited by itself:\n{proc.text()[-5000:]}")
                    how = "SIGKILL"
                    if started_up and rng.random() < 0.25:  # a clean stop now and then
                        how = "SIGTERM"
                        code = await proc.kill(signal.SIGTERM)
                        assert code == 0, f"SIGTERM: exit {code}\n{proc.text()[-5000:]}"
                        stops += 1
                    else:
                        await proc.kill()
                    kills.append(await replica_lsn(replica_dsn, name))
                    end = await stream_end(url, source.stream_name)
                    behind += kills[-1] != end
                    note(
                        f"run {number} stopped by {how} after {pause:.2f}s: "
                        f"replica at {kills[-1]}, stream ends at {end}"
                    )
            finally:
                if not load.done():
                    load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            loaded = time.monotonic() - started
            last = tmp_path / "replicate-last.log"
            logs.append(last)
            final = await Proc(last, *replicate_args(replica_dsn, url, name)).start()
            procs.append(final)
            await final.wait_for("replicating ")
            await wait_for_marker(replica_dsn, workload.token, CATCH_UP, ended(final))
            assert await final.kill(signal.SIGTERM) == 0, final.text()[-5000:]
        caught_up = time.monotonic() - started
        await check_workload(dsn, workload)
        assert behind >= KILLS // 3, f"only {behind} stops came while changes were left"
        await assert_same_tables(dsn, replica_dsn, SCHEMAS, context=f"seed {seed}")
    except BaseException as exc:
        exc.add_note("\n".join(timeline))
        exc.add_note(report(seed, workload, logs[0], *replicate_logs(tmp_path)[-3:]))
        raise
    print("\n".join(timeline))
    print(
        f"seed {seed}: {len(kills)} stops of replicate ({stops} by SIGTERM); stops done at "
        f"{loaded:.1f}s, caught up at {caught_up:.1f}s; {summary(workload.stats)}"
    )


# --- one replicate per replica -----------------------------------------------------------------


async def advisory_holder(replica_dsn: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(replica_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = %s AND objid = %s",
            (LOCK_KEYS[0] & 0xFFFFFFFF, LOCK_KEYS[1]),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else None


@pytest.mark.timeout(120)
async def test_a_second_replicate_with_no_lock_wait_fails_clearly(
    dsn: str, replica_dsn: str, nats: LocalNats, tmp_path: Path
) -> None:
    name = f"twice{os.getpid()}"
    await start_from_scratch(dsn, make_config(dsn, nats.url, name).source(name), replica_dsn)
    procs: list[Proc] = []
    logs = [tmp_path / n for n in ("capture.log", "first.log", "second.log")]
    try:
        async with stopping(procs), asyncio.timeout(100):
            capture = await Proc(logs[0], *capture_args(dsn, nats.url, name)).start()
            procs.append(capture)
            await capture.wait_for("capturing source")
            await run_sql(
                dsn, "CREATE TABLE done (token text PRIMARY KEY)", "INSERT INTO done VALUES ('a')"
            )
            first = await Proc(logs[1], *replicate_args(replica_dsn, nats.url, name)).start()
            procs.append(first)
            await wait_for_marker(replica_dsn, "a", 30, ended(first))
            holder = await advisory_holder(replica_dsn)
            assert holder is not None, "the first replicate holds no lock"
            second = await Proc(
                logs[2], *replicate_args(replica_dsn, nats.url, name),
                "--set", f"sources.{name}.replica.lock_wait=0",
            ).start()  # fmt: skip
            procs.append(second)
            code = await second.exit_code(30)
            message = second.text()
            assert code not in (0, None), message
            assert "another pgcapture replicate" in message, message
            assert "lock" in message, message
            assert str(holder) in message, message
            assert first.returncode is None, "the first replicate stopped"
            # The first one still applies changes, and stops cleanly.
            await run_sql(dsn, "INSERT INTO done VALUES ('b')")
            await wait_for_marker(replica_dsn, "b", 30, ended(first))
            assert await first.kill(signal.SIGTERM) == 0, "the first replicate's exit status"
    except BaseException as exc:
        exc.add_note(report_logs(*logs))
        raise


# --- stopping while catching up -----------------------------------------------------------------

SIGTERMS = 6
"""SIGTERMs in the catch-up test, each a moment after replicate starts applying a backlog."""


@pytest.mark.timeout(180)
async def test_sigterm_stops_replicate_promptly_while_it_catches_up(
    pg: LocalPostgres, dsn: str, dbname: str, nats: LocalNats, tmp_path: Path
) -> None:
    """While replicate works through a backlog (pgbench's 100000 rows), SIGTERM stops it in
    moments, whenever it comes; the next replicate carries on from where it stopped."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"term{seed}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    reader = SlotReader(dsn, source.slot_name)
    await reader.open()
    await reader.close()
    replicas = [f"{dbname}_term{i}" for i in range(SIGTERMS)]
    procs: list[Proc] = []
    try:
        async with capturing(config, name), stopping(procs), asyncio.timeout(150):
            await wait_for_stream(nats.url, source.stream_name)
            await run_pgbench(dsn, "-i", "-q", "-s", "1")
            await run_sql(dsn, "CREATE TABLE done (token text)", "INSERT INTO done VALUES ('x')")
            for i, replica in enumerate(replicas):
                await run_sql(pg.dsn(), f'CREATE DATABASE "{replica}"')
                async with await psycopg.AsyncConnection.connect(
                    pg.dsn(replica), autocommit=True
                ) as conn:
                    await set_position(conn, name, 0, "an empty source, captured from its start")
                log = tmp_path / f"replicate-{i}.log"
                proc = await Proc(log, *replicate_args(pg.dsn(replica), nats.url, name)).start()
                procs.append(proc)
                await proc.wait_for("replicating ")
                await asyncio.sleep(rng.uniform(0.01, 0.15))
                code = await proc.kill(signal.SIGTERM, timeout=20)
                assert code == 0, f"seed {seed}: {proc.text()[-3000:]}"
            # The last replica is completed by a replicate that runs to the end.
            last = pg.dsn(replicas[-1])
            final = await Proc(
                tmp_path / "final.log", *replicate_args(last, nats.url, name)
            ).start()
            procs.append(final)
            await wait_for_marker(last, "x", 60, ended(final))
            assert await final.kill(signal.SIGTERM) == 0, final.text()[-3000:]
        await assert_same_tables(dsn, last)
    finally:
        for replica in replicas:
            await run_sql(pg.dsn(), f'DROP DATABASE IF EXISTS "{replica}" WITH (FORCE)')


# --- DDL replayed as it ran on the source ------------------------------------------------------

SESSION_DDL = (
    "CREATE TABLE settings (id int PRIMARY KEY, d date)",
    "INSERT INTO settings SELECT g, DATE '2020-01-01' + g FROM generate_series(1, 3) g",
    "SET TimeZone = 'Asia/Tokyo'",
    "SET DateStyle = 'ISO, DMY'",
    "SET IntervalStyle = 'sql_standard'",
    "SET standard_conforming_strings = off",
    # The values that existing rows get, and the defaults, depend on the session's settings.
    "ALTER TABLE settings ADD COLUMN at timestamptz DEFAULT '2020-01-01 00:00'",
    "ALTER TABLE settings ADD COLUMN day date DEFAULT '01/02/2020'",
    "ALTER TABLE settings ADD COLUMN span interval DEFAULT '-1 2:03:04'",
    "ALTER TABLE settings ADD COLUMN s text DEFAULT 'a\\tb'",
    "ALTER TABLE settings ALTER COLUMN d TYPE timestamptz",
    "RESET ALL",
    "INSERT INTO settings (id) VALUES (4)",
    "CREATE TABLE done (token text PRIMARY KEY)",
    "INSERT INTO done VALUES ('settings')",
)


@pytest.mark.timeout(120)
async def test_ddl_runs_on_the_replica_with_the_source_sessions_settings(
    dsn: str, replica_dsn: str, nats: LocalNats
) -> None:
    name = f"settings{os.getpid()}"
    config = make_config(dsn, nats.url, name)
    source = config.source(name)
    await start_from_scratch(dsn, source, replica_dsn)
    stop = asyncio.Event()
    async with capturing(config, name):
        await wait_for_stream(nats.url, source.stream_name)
        applier = asyncio.create_task(replicate(config, source, replica_dsn, stop))
        try:
            async with asyncio.timeout(60):
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    for stmt in SESSION_DDL:  # one session: the SETs hold for what follows
                        await conn.execute(stmt)
                await wait_for_marker(replica_dsn, "settings", 30, lambda: None)
        finally:
            stop.set()
            await asyncio.wait_for(applier, 30)
    await assert_same_tables(dsn, replica_dsn)
