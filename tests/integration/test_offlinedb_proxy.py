"""The OfflineDB proxy in front of the session's real PostgreSQL: libpq clients (psycopg, psql)
connect through it as to any server."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from pgcapture.local import LocalPostgres, find_postgres_bin
from pgcapture.local.postgres import free_port
from pgcapture.offlinedb.proxy import Backend, Proxy, Refused
from pgcapture.offlinedb.wire import cancel_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOPE_HINT = "ask for one of the databases offlinedb serves"


@dataclass(frozen=True)
class CountedBackend(Backend):
    counts: Counter[str] = field(default_factory=Counter, compare=False)

    def opened(self) -> None:
        self.counts["opened"] += 1

    def closed(self) -> None:
        self.counts["closed"] += 1


class ClusterBackends:
    """Every database is on the session cluster (over TCP when application_name is "tcp"),
    except "nope", which does not exist, and "down", whose server is not running."""

    def __init__(self, pg: LocalPostgres) -> None:
        self.pg = pg
        self.counts: Counter[str] = Counter()

    async def resolve(self, database: str, user: str, parameters: dict[str, str]) -> Backend:
        if database == "nope":
            raise Refused("3D000", f'database "nope" is not served (user {user})', NOPE_HINT)
        if database == "down":
            return Backend(host="127.0.0.1", port=free_port())
        if parameters.get("application_name") == "tcp":
            return CountedBackend(host="127.0.0.1", port=self.pg.port, counts=self.counts)
        path = str(self.pg.socket_dir / f".s.PGSQL.{self.pg.port}")
        return CountedBackend(path=path, counts=self.counts)


@pytest.fixture
async def backends(pg: LocalPostgres) -> ClusterBackends:
    return ClusterBackends(pg)


@pytest.fixture
async def address(backends: ClusterBackends) -> AsyncIterator[str]:
    proxy = Proxy(backends, "127.0.0.1:0", startup_timeout=1)
    bound = await proxy.start()
    try:
        yield bound
    finally:
        await proxy.close()


def conninfo(address: str, dbname: str, sslmode: str = "prefer", **extra: str) -> str:
    host, _, port = address.rpartition(":")
    parts = {"host": host, "port": port, "dbname": dbname, "user": "postgres"}
    parts.update(sslmode=sslmode, connect_timeout="10", **extra)
    return " ".join(f"{k}={v}" for k, v in parts.items())


async def connect(info: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(info, autocommit=True)


async def one(conn: psycopg.AsyncConnection[tuple[object, ...]], sql: str) -> object:
    row = await (await conn.execute(sql)).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
async def test_psycopg_runs_queries_through_the_proxy(
    pg: LocalPostgres, address: str, dbname: str, sslmode: str
) -> None:
    async with await connect(conninfo(address, dbname, sslmode)) as conn:
        assert await one(conn, "SELECT current_database()") == dbname
        assert await one(conn, "SHOW port") == str(pg.port)
        assert not conn.pgconn.ssl_in_use


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
async def test_psql_runs_queries_through_the_proxy(address: str, dbname: str, sslmode: str) -> None:
    psql = find_postgres_bin() / "psql"
    process = await asyncio.create_subprocess_exec(
        str(psql), "-X", "-At", "-v", "ON_ERROR_STOP=1",
        "-c", "SELECT current_database(), 6 * 7", "-c", "SELECT 'second'",
        conninfo(address, dbname, sslmode),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines() == [f"{dbname}|42", "second"]


async def test_a_tcp_backend_and_connection_hooks(
    pg: LocalPostgres, address: str, dbname: str, backends: ClusterBackends
) -> None:
    async with await connect(conninfo(address, dbname, application_name="tcp")) as conn:
        assert await one(conn, "SELECT inet_server_port()") == pg.port
        assert backends.counts == Counter(opened=1)
    await wait_for(lambda: backends.counts == Counter(opened=1, closed=1))


async def test_copy_from_stdin_and_to_stdout_pass_through(address: str, dbname: str) -> None:
    rows = [(i, f"row {i} " + "x" * (i % 200)) for i in range(20000)]
    async with await connect(conninfo(address, dbname)) as conn:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        async with conn.cursor() as cur:
            async with cur.copy("COPY t (id, v) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)
            async with cur.copy("COPY (SELECT id, v FROM t ORDER BY id) TO STDOUT") as copy:
                back = [(int(i), v) async for i, v in copy.rows()]
    assert back == [(i, v) for i, v in rows]


async def test_a_server_error_reaches_the_client_as_it_is(address: str, dbname: str) -> None:
    async with await connect(conninfo(address, dbname)) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero) as caught:
            await conn.execute("SELECT 1 / 0")
        assert caught.value.sqlstate == "22012"
        assert caught.value.diag.message_primary == "division by zero"
        assert await one(conn, "SELECT 'still usable'") == "still usable"


async def test_cancel_safe_reaches_the_backend_through_the_proxy(
    pg: LocalPostgres, address: str, dbname: str
) -> None:
    async with await connect(conninfo(address, dbname)) as conn:
        sleeping = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
        await wait_for_sleep(pg, dbname)
        started = time.monotonic()
        await conn.cancel_safe(timeout=10)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(sleeping, 10)
        assert time.monotonic() - started < 5


# The legacy PQcancel holds the interpreter lock while it waits for the server to close the
# cancel connection, so these clients run in processes of their own, not beside the proxy.
CANCEL_SCRIPT = """
import sys, threading, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
done = threading.Event()
def cancel():
    while not done.wait(0.5):
        conn.cancel()
threading.Thread(target=cancel, daemon=True).start()
started = time.monotonic()
try:
    conn.execute("SELECT pg_sleep(30)")
except psycopg.errors.QueryCanceled:
    print(f"canceled after {time.monotonic() - started:.1f} s")
done.set()
"""


async def test_psycopg_cancel_reaches_the_backend_through_the_proxy(
    address: str, dbname: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CANCEL_SCRIPT, conninfo(address, dbname),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("canceled after"), out.decode()
    assert float(out.split()[2]) < 5


async def test_psql_interrupt_cancels_the_query_through_the_proxy(
    pg: LocalPostgres, address: str, dbname: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(find_postgres_bin() / "psql"), "-X", "-c", "SELECT pg_sleep(30)",
        conninfo(address, dbname),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_sleep(pg, dbname)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "canceling statement due to user request" in err.decode()


async def test_two_clients_run_at_the_same_time(address: str, dbname: str) -> None:
    info = conninfo(address, dbname)
    async with await connect(info) as first, await connect(info) as second:
        started = time.monotonic()
        pids = await asyncio.gather(
            one(first, "SELECT pg_backend_pid() FROM pg_sleep(1)"),
            one(second, "SELECT pg_backend_pid() FROM pg_sleep(1)"),
        )
        assert time.monotonic() - started < 1.9
        assert pids[0] != pids[1]


async def test_an_unknown_database_gets_the_resolvers_error(address: str) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        await connect(conninfo(address, "nope"))
    text = str(caught.value)
    assert 'FATAL:  database "nope" is not served (user postgres)' in text
    assert f"HINT:  {NOPE_HINT}" in text


async def test_a_backend_that_is_down_gets_a_clear_fatal_error(address: str) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        await connect(conninfo(address, "down"))
    text = str(caught.value)
    assert 'FATAL:  cannot reach the server of database "down" at 127.0.0.1:' in text
    assert "HINT:  the database's server is not running" in text


async def test_sslmode_require_is_refused_by_libpq(address: str, dbname: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        await connect(conninfo(address, dbname, "require"))


async def test_a_cancel_request_with_an_unknown_key_is_dropped(address: str) -> None:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(cancel_request(12345, b"\0\1\2\3"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (struct.pack("!ii", 8, 2 << 16), b"C0A000"),
        (struct.pack("!i", 99999), b"C08P01"),
        (b"", b"C08P01"),  # nothing sent: the startup timeout
    ],
    ids=["protocol-2.0", "oversized", "silent"],
)
async def test_a_bad_startup_gets_an_error_response(
    address: str, packet: bytes, sqlstate: bytes
) -> None:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(packet)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer[:1] == b"E"
    assert b"SFATAL\0" in answer
    assert sqlstate in answer


async def test_the_backend_connection_ends_with_the_client(
    pg: LocalPostgres, address: str, dbname: str
) -> None:
    conn = await connect(conninfo(address, dbname))
    pid = await one(conn, "SELECT pg_backend_pid()")
    await conn.close()
    async with await psycopg.AsyncConnection.connect(pg.dsn(dbname), autocommit=True) as admin:
        query = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        await wait_until(lambda: one(admin, query), 0)


async def test_the_client_sees_its_backend_end(
    pg: LocalPostgres, address: str, dbname: str
) -> None:
    async with await connect(conninfo(address, dbname)) as conn:
        pid = await one(conn, "SELECT pg_backend_pid()")
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(conn.execute("SELECT 1"), 10)


async def test_the_proxy_listens_on_a_unix_socket(backends: ClusterBackends, dbname: str) -> None:
    directory = tempfile.mkdtemp(prefix="offlinedb-")
    socket_file = Path(directory) / ".s.PGSQL.6432"
    proxy = Proxy(backends, f"unix:{socket_file}")
    try:
        assert await proxy.start() == f"unix:{socket_file}"
        info = f"host={directory} port=6432 dbname={dbname} user=postgres"
        async with await connect(info) as conn:
            assert await one(conn, "SELECT 1") == 1
    finally:
        await proxy.close()
        left = os.listdir(directory)
        shutil.rmtree(directory)
    assert left == []


async def test_serve_reports_its_address_and_stops(backends: ClusterBackends, dbname: str) -> None:
    stop = asyncio.Event()
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(Proxy(backends, "127.0.0.1:0").serve(stop, bound.set_result))
    address = await asyncio.wait_for(bound, 10)
    async with await connect(conninfo(address, dbname)) as conn:
        assert await one(conn, "SELECT 2") == 2
    stop.set()
    await asyncio.wait_for(serving, 10)
    with pytest.raises(psycopg.OperationalError):
        await connect(conninfo(address, dbname))


async def wait_for_sleep(pg: LocalPostgres, dbname: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'"
        )
        await wait_until(lambda: one(admin, query), 1)


async def wait_until(probe: Callable[[], Awaitable[object]], expected: object) -> None:
    deadline = time.monotonic() + 10
    while await probe() != expected:
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
