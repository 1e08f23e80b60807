"""``pgcapture status`` against real servers: a source captured into its stream, URI consumers,
a replica position and a controller, each also unreachable; the command runs as a process, so
its exit status and output are what a user sees."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import nats as natslib
import psycopg
import pytest
from gateway_helpers import serving
from log_helpers import capturing, current_lsn, poll, run_sql, wait_for_slot
from nats.js import api

from pgcapture.config import Config, load_config
from pgcapture.dump.controller import serve_controller
from pgcapture.local import LocalNats, LocalPostgres
from pgcapture.local.nats import free_port
from pgcapture.log.stream import Tail, read_tail
from pgcapture.lsn import LSN
from pgcapture.proto import pb, pb_grpc
from pgcapture.replica.store import set_position

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SECTIONS = ("sources", "uris", "replicas", "dumps")


@pytest.fixture
def replica_db(pg: LocalPostgres, dbname: str) -> Iterator[str]:
    """An empty database on the session cluster for the replica."""
    name = f"{dbname}_replica"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def toml_text(data: dict[str, Any], prefix: str = "") -> str:
    """``data`` as TOML: plain values first, then one table per nested dict."""
    plain = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = (f"[{prefix}]\n" if prefix and plain else "") + "".join(f"{p}\n" for p in plain)
    for key, value in data.items():
        if isinstance(value, dict):
            text += toml_text(value, f"{prefix}.{key}" if prefix else key)
    return text


def write_config(path: Path, data: dict[str, Any]) -> Config:
    path.write_text(toml_text(data))
    return load_config(path)


def source_settings(dsn: str, **extra: Any) -> dict[str, Any]:
    return {
        "dsn": dsn, "status_interval": 0.2, "lock": {"ttl": 1, "wait": 10},
        "batch": {"max_records": 20, "max_bytes": 16384}, **extra,
    }  # fmt: skip


async def run_status(config: Path, *args: str) -> tuple[int, str, str]:
    """``pgcapture status --config config args``: exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGCAPTURE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", "status", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await run_status(config, "--json", *args)
    assert code in (0, 1), err
    assert out, err
    report: dict[str, Any] = json.loads(out)
    assert report["healthy"] is (code == 0)
    return code, report


async def confirmed_at_least(dsn: str, slot: str, lsn: int) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = await cur.fetchone()
    return row is not None and row[0] is not None and LSN.parse(row[0]) >= lsn


async def capture_then_stop(config: Config, name: str) -> None:
    """Capture ``name``'s writes into its stream, then stop capture and write more, so the
    slot lags behind the WAL."""
    source = config.source(name)
    await run_sql(source.dsn, "CREATE TABLE items (id int PRIMARY KEY, note text)")
    async with capturing(config, name):
        await wait_for_slot(source.dsn, source.slot_name)
        for start in range(0, 200, 50):
            await run_sql(
                source.dsn,
                f"INSERT INTO items SELECT g, 'n' FROM generate_series({start}, {start + 49}) g",
            )
        written = await current_lsn(source.dsn)
        await poll(lambda: confirmed_at_least(source.dsn, source.slot_name, written), 30)
    await run_sql(source.dsn, "INSERT INTO items SELECT g, 'late' FROM generate_series(200, 999) g")


async def consume_two_ack_one(config: Config, name: str, uri: str) -> None:
    """The URI's durable consumer as the gateway makes it; two messages delivered, the first
    acknowledged."""
    source, consumer = config.source(name), config.gateway.uris[uri].consumer_name
    nc = await natslib.connect(config.nats.servers)
    try:
        js = nc.jetstream()
        await js.add_consumer(
            source.stream_name,
            api.ConsumerConfig(
                durable_name=consumer, ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL, filter_subject=source.subject,
                max_deliver=-1, ack_wait=60,
            ),
        )  # fmt: skip
        sub = await js.pull_subscribe_bind(consumer, stream=source.stream_name)
        msgs = await sub.fetch(2, timeout=10)
        assert len(msgs) == 2
        await msgs[0].ack_sync()
        await sub.unsubscribe()
    finally:
        await nc.close()


async def stream_state(config: Config, name: str) -> tuple[api.StreamInfo, Tail]:
    nc = await natslib.connect(config.nats.servers)
    try:
        js = nc.jetstream()
        stream = config.source(name).stream_name
        return await js.stream_info(stream), await read_tail(js, stream)
    finally:
        await nc.close()


async def place_replica(replica: str, name: str, lsn: LSN, commit_time: datetime) -> None:
    """A replica position at ``lsn`` with a commit time, as replicate leaves it."""
    async with await psycopg.AsyncConnection.connect(replica, autocommit=True) as conn:
        await set_position(conn, name, 0, "a test")
        await conn.execute(
            "SELECT pgcapture.advance_source(%s, '0/0', %s, 7, %s)", (name, str(lsn), commit_time)
        )


def pick(part: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: part[key] for key in keys}


def check_slot(slot: dict[str, Any]) -> None:
    """An inactive slot behind the WAL, within metrics.slot_lag_warn: healthy."""
    assert pick(slot, "state", "reason", "exists", "active", "active_pid") == {
        "state": "ok", "reason": None, "exists": True, "active": False, "active_pid": None,
    }  # fmt: skip
    current, confirmed = LSN.parse(slot["current_wal_lsn"]), LSN.parse(slot["confirmed_flush_lsn"])
    assert slot["lag_bytes"] == current - confirmed > 0
    assert slot["wal_status"] in ("reserved", "extended")


def check_stream(stream: dict[str, Any], info: api.StreamInfo, tail: Tail) -> None:
    assert tail.checkpoint is not None
    assert pick(stream, "state", "exists", "messages", "bytes", "first_seq", "last_seq") == {
        "state": "ok", "exists": True, "messages": info.state.messages,
        "bytes": info.state.bytes, "first_seq": 1, "last_seq": tail.seq,
    }  # fmt: skip
    assert stream["messages"] > 2
    assert stream["last_checkpoint"] == {
        "lsn": tail.checkpoint.lsn_text,
        "seq": tail.checkpoint.seq,
    }
    assert 0 <= stream["last_commit_age_seconds"] < 60


def check_uris(uris: dict[str, dict[str, Any]], last_seq: int) -> None:
    """``search``: two of ``last_seq`` messages delivered, the first acknowledged; ``later``:
    no consumer yet, which is healthy."""
    counts = ("num_pending", "num_ack_pending", "ack_floor_seq", "delivered_seq")
    assert pick(uris["search"], "state", "reason", "exists", *counts) == {
        "state": "ok", "reason": None, "exists": True, "num_pending": last_seq - 2,
        "num_ack_pending": 1, "ack_floor_seq": 1, "delivered_seq": 2,
    }  # fmt: skip
    assert pick(uris["later"], "state", "exists") == {"state": "ok", "exists": False}
    assert "not created yet" in uris["later"]["reason"]


async def test_reports_slot_stream_consumers_and_replica(
    tmp_path: Path, dsn: str, dbname: str, replica_db: str, nats: LocalNats
) -> None:
    name = f"status_{dbname}"
    path = tmp_path / "pgcapture.toml"
    config = write_config(path, {
        "nats": {"url": nats.url},
        "sources": {name: source_settings(dsn, replica={"dsn": replica_db})},
        "gateway": {"uris": {"search": {"source": name}, "later": {"source": name}}},
    })  # fmt: skip
    await capture_then_stop(config, name)
    await consume_two_ack_one(config, name, "search")
    info, tail = await stream_state(config, name)
    assert tail.checkpoint is not None
    applied_time = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    await place_replica(replica_db, name, LSN(tail.checkpoint.lsn - 1000), applied_time)

    code, report = await status_json(path)

    assert code == 0, report
    [source] = report["sources"]
    check_slot(source["slot"])
    check_stream(source["stream"], info, tail)
    check_uris({u["uri"]: u for u in report["uris"]}, tail.seq)
    [replica] = report["replicas"]
    assert pick(replica, "state", "reason", "lsn", "lag_bytes", "stream_seq", "origin") == {
        "state": "ok", "reason": None, "lsn": str(LSN(tail.checkpoint.lsn - 1000)),
        "lag_bytes": 1000, "stream_seq": 7, "origin": "a test",
    }  # fmt: skip
    assert datetime.fromisoformat(replica["commit_time"]) == applied_time
    newest = datetime.fromisoformat(source["stream"]["last_commit_time"])
    assert replica["lag_seconds"] == pytest.approx((newest - applied_time).total_seconds())
    assert replica["apply_time"] is not None
    assert report["dumps"] == {
        "controller": None, "state": "ok", "reason": "no controller configured", "dumps": [],
    }  # fmt: skip

    code, out, _ = await run_status(path)
    assert code == 0
    for section in SECTIONS:
        assert section in out
    assert "no controller configured (--controller, gateway.controller or [controller])" in out
    assert "everything reachable and healthy" in out

    code, report = await status_json(path, "--set", "metrics.slot_lag_warn=1")
    assert code == 1
    assert report["sources"][0]["slot"]["state"] == "unhealthy"
    assert "inactive" in report["sources"][0]["slot"]["reason"]


async def test_missing_slot_stream_and_replica_position_are_unhealthy(
    tmp_path: Path, dsn: str, dbname: str, replica_db: str, nats: LocalNats
) -> None:
    name = f"status_{dbname}"
    path = tmp_path / "pgcapture.toml"
    write_config(path, {
        "nats": {"url": nats.url},
        "sources": {name: source_settings(dsn, replica={"dsn": replica_db})},
        "gateway": {"uris": {"search": {"source": name}}},
    })  # fmt: skip

    code, report = await status_json(path)

    assert code == 1
    slot, stream = report["sources"][0]["slot"], report["sources"][0]["stream"]
    assert (slot["state"], slot["exists"]) == ("unhealthy", False)
    assert "does not exist" in slot["reason"]
    assert slot["current_wal_lsn"] is not None
    assert (stream["state"], stream["exists"]) == ("unhealthy", False)
    [uri] = report["uris"]
    assert (uri["state"], uri["exists"]) == ("ok", False)
    assert "does not exist yet" in uri["reason"]
    [replica] = report["replicas"]
    assert replica["state"] == "unhealthy"
    assert "no position" in replica["reason"]


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_unreachable_parts_are_named_and_the_others_still_shown(
    tmp_path: Path, dsn: str, dbname: str, nats: LocalNats
) -> None:
    up, down = f"status_{dbname}", f"status_{dbname}_down"
    path = tmp_path / "pgcapture.toml"
    write_config(path, {
        "nats": {"url": f"nats://127.0.0.1:{free_port()}"},
        "sources": {
            up: source_settings(dsn),
            down: source_settings(f"host=127.0.0.1 port={free_port()} dbname=x"),
        },
        "gateway": {"uris": {"search": {"source": up}}, "controller": f"127.0.0.1:{free_port()}"},
    })  # fmt: skip

    code, report = await status_json(path, "--timeout", "3")

    assert code == 1
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name[up]["slot"]["state"] == "unhealthy"  # reached: the slot is missing
    assert by_name[down]["slot"]["state"] == "unreachable"
    assert "connection" in by_name[down]["slot"]["reason"]
    for source in by_name.values():
        assert source["stream"]["state"] == "unreachable"
        assert "NATS" in source["stream"]["reason"]
    assert report["uris"][0]["state"] == "unreachable"
    assert report["dumps"]["state"] == "unreachable"
    assert "cannot reach the controller" in report["dumps"]["reason"]
    assert all("\n" not in part["reason"] for part in _parts(report) if part["reason"])

    code, out, _ = await run_status(path, "--timeout", "3")
    assert code == 1
    for section in SECTIONS:
        assert section in out
    assert "unreachable" in out

    async with silent_server() as port:
        code, report = await status_json(
            path, "--source", up, "--timeout", "1", "--set", f"nats.url=nats://127.0.0.1:{port}"
        )
    assert code == 1
    assert [s["name"] for s in report["sources"]] == [up]
    assert report["sources"][0]["stream"]["state"] == "unreachable"


def _parts(report: dict[str, Any]) -> list[dict[str, Any]]:
    sources = report["sources"]
    return [
        *(s["slot"] for s in sources), *(s["stream"] for s in sources), *report["uris"],
        *report["replicas"], report["dumps"],
    ]  # fmt: skip


def running_controller(config: Config) -> contextlib.AbstractAsyncContextManager[str]:
    return serving(serve_controller, config)


async def test_lists_the_dumps_in_progress_of_the_controller(
    tmp_path: Path, dsn: str, dbname: str, replica_db: str, nats: LocalNats
) -> None:
    name = f"status_{dbname}"
    await run_sql(replica_db, "CREATE TABLE items (id int PRIMARY KEY)")
    await run_sql(replica_db, "INSERT INTO items SELECT generate_series(1, 100)")
    path = tmp_path / "pgcapture.toml"
    config = write_config(path, {
        "nats": {"url": nats.url},
        "sources": {name: source_settings(dsn, replica={"dsn": replica_db})},
        "gateway": {"uris": {"search": {"source": name}}},
        "controller": {"listen": f"127.0.0.1:{free_port()}", "bucket": f"dumps_{name}"},
    })  # fmt: skip
    async with running_controller(config) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            scheduled = await pb_grpc.DBLogControllerStub(channel).ScheduleDump(
                pb.ScheduleDumpRequest(uri="search", tables=["public.items"]), timeout=20
            )
        code, report = await status_json(path)
        _, out, _ = await run_status(path)

    assert code == 1  # nothing was captured: no slot, no stream
    dumps = report["dumps"]
    assert (dumps["controller"], dumps["state"]) == (address, "ok")
    [listed] = dumps["dumps"]
    assert (listed["id"], listed["uri"], listed["tables"]) == (
        scheduled.id,
        "search",
        ["public.items"],
    )
    assert scheduled.id in out
    assert "dumps (controller" in out


async def test_configuration_errors_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "pgcapture.toml"
    path.write_text(toml_text({"sources": {"app": {"dsn": "dbname=x"}}}))

    code, _, err = await run_status(path, "--source", "nope")
    assert code == 2
    assert "source 'nope' is not configured" in err
    code, _, err = await run_status(path, "--set", "sources.app.slot=Bad-Name")
    assert code == 2
    assert "sources.app.slot" in err
    code, _, err = await run_status(tmp_path / "missing.toml")
    assert code == 2
    assert "does not exist" in err
