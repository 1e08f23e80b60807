"""``pgcapture offlinedb serve``: the proxy and the copies behind it, as one service.

Clients connect to ``[offlinedb] listen`` with any PostgreSQL client; the database name they
ask for selects ``[offlinedb.databases.NAME]`` (``copies.Copies``), whose copy is started on
demand, masked and kept fresh. The copies' state is written to ``<store>/status.json`` every
few seconds for ``pgcapture offlinedb status``. On stop, every copy is stopped and removed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgcapture.config import Config
from pgcapture.offlinedb.copies import Copies
from pgcapture.offlinedb.proxy import Proxy


def status_file(config: Config) -> Path:
    return config.offlinedb.store / "status.json"


async def serve_offlinedb(
    config: Config, stop: asyncio.Event, *, ready: Callable[[str], None] | None = None
) -> None:
    """Serve until ``stop``; ``ready`` gets the bound address."""
    copies = Copies(config)
    keeper = asyncio.create_task(copies.run(stop, status_file(config)), name="offlinedb copies")
    try:
        await Proxy(copies, config.offlinedb.listen).serve(stop, ready)
    finally:
        stop.set()
        await keeper


def read_status(config: Config) -> dict[str, Any] | None:
    """The serving process's last status, or None when it never ran here."""
    try:
        data: dict[str, Any] = json.loads(status_file(config).read_text())
    except FileNotFoundError:
        return None
    return data
