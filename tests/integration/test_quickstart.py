"""``pgcapture quickstart``, as a user runs it: the demo exits 0 after showing changes and a
dump and leaves nothing behind; ``--follow --info`` serves a consumer of the user's own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import GoStyleClient

pytestmark = pytest.mark.integration

COMMAND = (sys.executable, "-m", "pgcapture", "quickstart")


def cluster_dirs(text: str) -> list[Path]:
    """The clusters' directories named by the printed DSNs (host=<dir>/run)."""
    return [Path(m) for m in re.findall(r"host=(\S+)/run", text)]


@pytest.mark.timeout(180)
def test_quickstart_shows_changes_and_a_dump_and_leaves_nothing_behind() -> None:
    done = subprocess.run(COMMAND, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in (
        "UPDATE   public.items",
        "DDL      ALTER TABLE items",
        "DELETE   public.items",
        "INSERT   public.orders",
        "TRUNCATE public.orders",
        "DUMP     public.items",
    ):
        assert line in out, out  # fmt: skip
    assert re.search(r"dump \w+: \d+ chunks, 2000 rows, done", out), out
    assert "the replica equal to the source" in done.stderr
    dirs = cluster_dirs(out)
    assert len(dirs) == 2
    assert not any(d.exists() for d in dirs), dirs


@pytest.mark.timeout(180)
async def test_follow_serves_your_own_consumer_until_sigterm(tmp_path: Path) -> None:
    info_file = tmp_path / "endpoints.json"
    log = tmp_path / "quickstart.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 (killed in finally, whatever happens)
            [*COMMAND, "--follow", "--info", str(info_file)], stdout=out, stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            async with asyncio.timeout(90):
                while not info_file.exists() or "keeps running" not in log.read_text():
                    assert process.poll() is None, log.read_text()
                    await asyncio.sleep(0.2)
            info = json.loads(info_file.read_text())
            assert set(info) == {
                "source_dsn", "replica_dsn", "nats_url", "gateway", "controller", "dumper", "uri",
            }  # fmt: skip
            received: list[dict[str, Any]] = []
            client = GoStyleClient(info["gateway"], info["uri"], TableRegex="^mine$")
            reader = asyncio.create_task(client.capture(received.append))
            async with await psycopg.AsyncConnection.connect(
                info["source_dsn"], autocommit=True
            ) as conn:
                await conn.execute("CREATE TABLE mine (id int PRIMARY KEY, note text)")
                await conn.execute("INSERT INTO mine VALUES (1, 'from psql')")
            async with asyncio.timeout(30):
                while not received:
                    await asyncio.sleep(0.1)
            reader.cancel()
            change = received[0]["change"]
            assert (change["table"], change["op"]) == ("mine", 0)
            assert {f.name: f.binary for f in change["new"]}["note"] == b"from psql"
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert "nothing left running" in text
    assert not info_file.exists()
    dirs = cluster_dirs(text)
    assert len(dirs) == 2
    assert not any(d.exists() for d in dirs), dirs
