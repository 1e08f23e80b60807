"""A dump into an ordered URI right after its gateway was SIGKILLed holding delivered but
unacknowledged stream messages: the restarted gateway injects no dump row before those messages
come back to it, so the consumer never sees a row's version go backwards.

A restarted gateway waits for the URI's lease while it cannot prove the killed one gone (it ran
in another container, on another host): clients attach and dumps are pulled meanwhile. The
killed gateway's messages are acknowledgement-pending on the URI's consumer, not pending, until
the new gateway holds the lease and restarts delivery after the acknowledged floor; a gateway
that took "nothing pending" for "everything up to the stream's tail is taken" served the rows of
a dump (the replica's newer version) first and the redelivered older changes after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import nats as natslib
import psycopg
import pytest
from dump_helpers import (
    Consumer,
    Materialized,
    dump_config,
    running,
    schedule,
    start_from_scratch,
    wait_equal,
    wait_for_dump,
)
from gateway_helpers import consumer_state, int_of, row_values
from log_helpers import run_sql

from pgcapture.config import Config
from pgcapture.local import LocalNats
from pgcapture.local.nats import free_port
from pgcapture.log.lease import Lease, new_owner_id
from pgcapture.proto import pb, pb_grpc

pytestmark = pytest.mark.integration

ROWS = 50
ACK_WAIT = 30  # longer than the test: the killed gateway's messages never time out meanwhile
DUMP_WAIT = 20  # a chunk waits this long for the stream to reach its position
STANDBY = 5.0  # seconds the restarted gateway waits for the lease, at most


def gateway_toml(
    path: Path, config: Config, nats_url: str, name: str, uri: str, dsn: str, port: int
) -> Path:
    """The gateway of ``config`` as a file for a ``pgcapture gateway`` process: ``uri``
    ordered, from the stream's beginning, with the dumper and the controller."""
    path.write_text(
        f'[nats]\nurl = "{nats_url}"\n[sources.{name}]\ndsn = "{dsn}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\ncontroller = "{config.gateway.controller}"\n'
        f"dump_wait = {DUMP_WAIT}\n"
        "[gateway.tls]\ndisabled = true\n[gateway.auth]\ndisabled = true\n"
        f'[gateway.uris.{uri}]\nsource = "{name}"\ndumper = "{config.dumper.listen}"\n'
        f'start = "beginning"\nordered = true\nack_wait = {ACK_WAIT}\n'
    )
    return path


async def listening(port: int, seconds: float = 30) -> None:
    """Until something accepts connections on ``port``."""
    async with asyncio.timeout(seconds):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            await asyncio.sleep(0.05)


async def never_acknowledging(address: str, uri: str, received: list[pb.CaptureMessage]) -> None:
    """A client of ``uri`` that keeps every message it receives and acknowledges none."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = pb_grpc.DBLogGatewayStub(channel).CaptureBatched(wait_for_ready=True)
        await stream.write(pb.CaptureRequest(init=pb.CaptureInit(uri=uri)))
        async for batch in stream:
            received.extend(batch.messages)


@contextlib.asynccontextmanager
async def lease_held(nats_url: str, uri: str) -> AsyncIterator[Lease]:
    """The ordered URI's lease, taken over from the killed gateway by this (live) process: to
    a restarted gateway, a holder it cannot prove gone, as a gateway killed in another
    container is. Released at the latest when the block ends."""
    nc = await natslib.connect(nats_url)
    try:
        lease = Lease(nc.jetstream(), "pgcapture_locks", f"gateway.{uri}", new_owner_id(), ttl=30)
        assert await lease.acquire(wait=0)
        try:
            yield lease
        finally:
            await lease.release()
    finally:
        await nc.close()


async def replica_versions(replica_dsn: str) -> list[tuple[int, int]]:
    with contextlib.suppress(psycopg.errors.UndefinedTable):
        async with await psycopg.AsyncConnection.connect(replica_dsn) as conn:
            cur = await conn.execute("SELECT version, count(*) FROM items GROUP BY 1 ORDER BY 1")
            return [(v, n) for v, n in await cur.fetchall()]
    return []


@pytest.mark.timeout(120)
async def test_no_dump_row_overtakes_the_changes_a_killed_gateway_left_unacknowledged(
    dsn: str, replica_dsn: str, nats: LocalNats, dbname: str, tmp_path: Path
) -> None:
    name, uri = f"src_{dbname}", f"app_{dbname}"  # the URI names the lease: one per test
    settings = {"start": "beginning", "ordered": True, "ack_wait": ACK_WAIT}
    config = dump_config(dsn, replica_dsn, nats.url, name, **{uri: settings})
    stream = config.source(name).stream_name
    port = free_port()
    address = f"127.0.0.1:{port}"
    toml = gateway_toml(tmp_path / "pgcapture.toml", config, nats.url, name, uri, dsn, port)
    log_path = tmp_path / "gateway.log"
    log = log_path.open("ab")
    command = [sys.executable, "-m", "pgcapture", "gateway", "--config", str(toml)]
    env = {**os.environ, "PGCAPTURE_LOG__LEVEL": "info"}

    def gateway() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, stdout=log, stderr=log, env=env)

    await start_from_scratch(config)
    process = gateway()
    received: list[pb.CaptureMessage] = []
    state = Materialized()
    try:
        async with running(config, "replicate", "dumper", "controller"), asyncio.timeout(100):
            await run_sql(
                dsn,
                "CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL, payload text)",
                f"INSERT INTO items SELECT g, 1, md5(g::text) FROM generate_series(1, {ROWS}) g",
                "UPDATE items SET version = 2, payload = 'second'",
            )
            # The first gateway is delivered every stream message of the URI; its client
            # receives the inserts (the updates wait behind them: the URI is ordered) and
            # acknowledges nothing.
            first = asyncio.create_task(never_acknowledging(address, uri, received))
            try:
                info = None
                try:
                    async with asyncio.timeout(30):
                        while True:
                            inserts = [m for m in received if m.change.table == "items"]
                            if len(inserts) == ROWS:
                                info = await consumer_state(nats.url, stream, f"pgcapture_{uri}")
                                if not info.num_pending and info.num_ack_pending:
                                    break
                            assert not first.done(), first
                            assert process.poll() is None, "the first gateway ended"
                            await asyncio.sleep(0.05)
                except TimeoutError:
                    kinds = [(m.change.op, m.change.table) for m in received]
                    raise AssertionError(f"first client: {kinds}, consumer {info}") from None
                assert {m.change.op for m in inserts} == {pb.Change.INSERT}
                assert {int_of(row_values(m.change.new)["version"]) for m in inserts} == {1}
                async with asyncio.timeout(30):
                    while await replica_versions(replica_dsn) != [(2, ROWS)]:
                        await asyncio.sleep(0.05)
                process.send_signal(signal.SIGKILL)  # holding them all
                process.wait(10)
            finally:
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await first
            async with lease_held(nats.url, uri) as lease:
                # A new gateway at once, a consumer and a dump right away, while the new
                # gateway stands by for the lease.
                process = gateway()
                await listening(port)
                assert process.poll() is None, "the second gateway ended"
                consumer = Consumer(address, uri, state, TableRegex="^items$").start()
                try:
                    dump = await schedule(config, uri, "public.items")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(STANDBY):
                            while state.dump_rows.get("items", 0) < ROWS:
                                assert consumer.task is not None
                                assert not consumer.task.done(), consumer.task
                                await asyncio.sleep(0.05)
                    await lease.release()  # the new gateway takes the URI over
                    status = await wait_for_dump(config, uri, dump, seconds=40)
                    # The killed gateway's changes come back before or after the rows.
                    while state.stream_changes < 2 * ROWS:
                        assert consumer.task is not None
                        assert not consumer.task.done(), consumer.task
                        await asyncio.sleep(0.05)
                    await wait_equal(dsn, "items", state, seconds=30)
                finally:
                    await consumer.stop()
    except BaseException as exc:
        log.flush()
        exc.add_note("gateway log:\n" + log_path.read_text()[-8000:])
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
    assert status.chunks_done == status.chunks_total >= 1
    assert state.dump_rows.get("items") == ROWS, state.dump_rows
    assert state.backwards == [], state.backwards[:10]
