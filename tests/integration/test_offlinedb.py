"""OfflineDB end to end: a PostgreSQL client asks the proxy for a database by name; a masked copy
is started from the newest snapshot, kept fresh from the change log, shared, and removed when
idle; a copy whose masking fails is never served."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from hashlib import md5
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import captured, serving
from log_helpers import run_sql

from pgcapture.config import Config, validate_config
from pgcapture.local import LocalNats
from pgcapture.offlinedb.service import serve_offlinedb, status_file
from pgcapture.offlinedb.snapshots import take_snapshot

pytestmark = pytest.mark.integration


def offline_config(
    dsn: str, nats_url: str, name: str, store: Path, max_copies: int = 4, **databases: Any
) -> Config:
    return validate_config(
        {
            "nats": {"url": nats_url},
            "sources": {name: {"dsn": dsn, "status_interval": 0.2, "lock": {"ttl": 1}}},
            "offlinedb": {
                "listen": "127.0.0.1:0", "store": str(store), "idle_timeout": 3,
                "max_copies": max_copies,
                "databases": {k: {"source": name, **v} for k, v in databases.items()},
            },
        }
    )  # fmt: skip


async def query(address: str, database: str, sql: str) -> list[tuple[Any, ...]]:
    host, port = address.rsplit(":", 1)
    async with await psycopg.AsyncConnection.connect(
        host=host, port=port, dbname=database, user="postgres", connect_timeout=60
    ) as conn:
        return await (await conn.execute(sql)).fetchall()  # type: ignore[arg-type]


async def pgcapture_json(config: Config, *args: str) -> Any:
    """``pgcapture ARGS`` with this configuration (as a file), its stdout parsed as JSON."""
    path = config.offlinedb.store.parent / "pgcapture.toml"
    path.write_text(
        f'[offlinedb]\nstore = "{config.offlinedb.store}"\n'
        + "".join(
            f'[offlinedb.databases.{name}]\nsource = "{db.source}"\n'
            for name, db in config.offlinedb.databases.items()
        )
        + "".join(f"[sources.{name}]\n" for name in config.sources)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcapture", *args, "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def copies(config: Config) -> list[dict[str, Any]]:
    try:
        return list(json.loads(status_file(config).read_text())["copies"])
    except FileNotFoundError:
        return []


@pytest.fixture
async def users(dsn: str) -> str:
    await run_sql(
        dsn,
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, plan text)",
        "INSERT INTO users SELECT g, 'user' || g || '@example.com', 'free' "
        "FROM generate_series(1, 50) g",
    )
    return dsn


@pytest.fixture
def store() -> Iterator[Path]:
    """A store the server user can write (pytest's own temporary directories are private)."""
    path = Path(tempfile.mkdtemp(prefix="pgcapture-offlinedb-"))
    os.chmod(path, 0o755)
    try:
        yield path / "store"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(180)
async def test_a_masked_copy_starts_on_demand_follows_the_source_and_goes_away_when_idle(
    users: str, dbname: str, nats: LocalNats, store: Path
) -> None:
    config = offline_config(
        users, nats.url, f"off_{dbname}", store, max_copies=1,
        shop={"masks": {"public.users.email": "md5(email)"}}, other={},
    )  # fmt: skip
    async with captured(config, f"off_{dbname}"):
        snapshot = await take_snapshot(config, "shop")
        await take_snapshot(config, "other")
        async with serving(serve_offlinedb, config) as address:
            host, port = address.rsplit(":", 1)
            # A client stays connected, so the copy is not idle until it leaves.
            holder = await psycopg.AsyncConnection.connect(
                host=host, port=port, dbname="shop", user="postgres", connect_timeout=60
            )
            rows = await query(address, "shop", "SELECT id, email FROM users ORDER BY id")
            assert len(rows) == 50
            assert rows[0] == (1, md5(b"user1@example.com").hexdigest())  # masked
            async with asyncio.timeout(10):  # the status file, rewritten every 2 s
                while not await copies(config):
                    await asyncio.sleep(0.2)
            [copy] = await copies(config)
            assert (copy["snapshot"], copy["state"]) == (snapshot.id, "ready")
            listed = await pgcapture_json(config, "offlinedb", "status", "--json")
            assert [c["database"] for c in listed["server"]["copies"]] == ["shop"]
            assert listed["snapshots"]["shop"][0]["id"] == snapshot.id
            with pytest.raises(psycopg.OperationalError, match=r"offlinedb\.max_copies = 1"):
                await query(address, "other", "SELECT 1")
            await run_sql(users, "INSERT INTO users VALUES (51, 'new@example.com', 'pro')")
            async with asyncio.timeout(30):  # from the change log, masked as it arrives
                while not await query(address, "shop", "SELECT 1 FROM users WHERE id = 51"):
                    await asyncio.sleep(0.2)
            new = await query(address, "shop", "SELECT email, plan FROM users WHERE id = 51")
            assert new == [(md5(b"new@example.com").hexdigest(), "pro")]
            # Two clients at once share the one copy.
            counts = await asyncio.gather(
                query(address, "shop", "SELECT count(*) FROM users"),
                query(address, "shop", "SELECT count(*) FROM users, pg_sleep(0.5)"),
            )
            assert counts == [[(51,)], [(51,)]]
            assert len(await copies(config)) == 1
            await holder.close()
            copy_dirs = list((store / "copies").iterdir())
            assert len(copy_dirs) == 1
            async with asyncio.timeout(30):  # idle for idle_timeout: stopped and removed
                while await copies(config) or copy_dirs[0].exists():
                    await asyncio.sleep(0.25)
    assert not list((store / "copies").iterdir())


@pytest.mark.timeout(120)
async def test_a_copy_whose_masking_fails_is_never_served(
    users: str, dbname: str, nats: LocalNats, store: Path, tmp_path: Path
) -> None:
    script = tmp_path / "scrub.sql"
    script.write_text("UPDATE users SET plan = NULL;\nSELECT no_such_column FROM users;")
    config = offline_config(
        users, nats.url, f"off_{dbname}", store,
        shop={"masks": {"public.users.email": "md5(email)"}, "scripts": [str(script)]}, later={},
    )  # fmt: skip
    async with captured(config, f"off_{dbname}"):
        await take_snapshot(config, "shop")
        async with serving(serve_offlinedb, config) as address:
            with pytest.raises(psycopg.OperationalError, match=r"masking script scrub\.sql failed"):
                await query(address, "shop", "SELECT email FROM users")
            with pytest.raises(
                psycopg.OperationalError, match=r"(?s)no snapshot of .later.*take one"
            ):
                await query(address, "later", "SELECT 1")
            with pytest.raises(
                psycopg.OperationalError, match=r'(?s)"nope" is not served.*later, shop'
            ):
                await query(address, "nope", "SELECT 1")
            assert await copies(config) == []
            assert not list((store / "copies").iterdir())
