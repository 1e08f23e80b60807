"""Throw-away servers on this machine: PostgreSQL clusters and nats-server.

Used by the test fixtures, the benchmarks and ``pgcapture quickstart``. Nothing here is meant
for production; it exists so that everything can be tried against real servers in one command.
"""

from pgcapture.local.nats import LocalNats
from pgcapture.local.postgres import LocalPostgres, find_postgres_bin

__all__ = ["LocalNats", "LocalPostgres", "find_postgres_bin"]
