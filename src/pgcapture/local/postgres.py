"""Throw-away PostgreSQL clusters made with ``initdb`` and ``pg_ctl``.

A cluster lives in its own directory (data, Unix socket, log), listens on 127.0.0.1 on a free
port and on a socket in that directory, trusts local connections, and is configured for logical
replication. PostgreSQL refuses to run as root; when we are root every server command runs as
the ``postgres`` system user (created by Debian's packages) through ``runuser``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pgcapture.errors import ConfigError

DEFAULT_SETTINGS: Final[Mapping[str, str]] = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_prepared_transactions": "10",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "shared_buffers": "128MB",
    "max_connections": "100",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "wal_sender_timeout": "60s",
    "log_statement": "none",
}

_INSTALL_HINT: Final = (
    "PostgreSQL server programs (initdb, pg_ctl, postgres) were not found; install them, e.g. "
    "`apt-get install postgresql` on Debian/Ubuntu, or set PGCAPTURE_PG_BIN to their directory"
)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


@functools.cache
def find_postgres_bin() -> Path:
    """The directory holding ``initdb``/``pg_ctl``/``postgres``: ``$PGCAPTURE_PG_BIN``, else the
    newest ``/usr/lib/postgresql/*/bin``, else wherever ``pg_ctl`` is on ``PATH``."""
    env = os.environ.get("PGCAPTURE_PG_BIN")
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all((directory / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise ConfigError(_INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_server_user() -> list[str]:
    """Prefix for commands that must not run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise ConfigError("running as root needs `runuser` (util-linux) to start PostgreSQL")
    try:
        subprocess.run(["id", "-u", "postgres"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise ConfigError(
            "running as root needs a `postgres` system user to own throw-away clusters; "
            "install Debian's postgresql package or run as an ordinary user"
        ) from exc
    return ["runuser", "-u", "postgres", "--"]


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user="postgres", group="postgres")


@dataclass
class LocalPostgres:
    """One throw-away cluster. ``start()`` initialises it on first use; ``destroy()`` removes it."""

    base_dir: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    superuser: str = "postgres"
    # Clusters copied from the process's template share its system identifier; a cluster of
    # its own ``initdb`` gets one of its own (slower to make).
    own_system_identifier: bool = False

    @classmethod
    def create(
        cls,
        parent: Path | None = None,
        settings: Mapping[str, str] | None = None,
        own_system_identifier: bool = False,
    ) -> LocalPostgres:
        base = Path(tempfile.mkdtemp(prefix="pgcapture-pg-", dir=parent))
        os.chmod(base, 0o755)
        return cls(
            base_dir=base,
            settings=dict(settings or {}),
            own_system_identifier=own_system_identifier,
        )

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def bin_dir(self) -> Path:
        return find_postgres_bin()

    def dsn(self, dbname: str = "postgres", user: str | None = None, **extra: str) -> str:
        """A libpq connection string over the Unix socket (the fastest local transport)."""
        parts = {"host": str(self.socket_dir), "port": str(self.port), "dbname": dbname}
        parts["user"] = user or self.superuser
        parts.update(extra)
        return " ".join(f"{k}={_quote(v)}" for k, v in parts.items())

    def tcp_dsn(self, dbname: str = "postgres", user: str | None = None, **extra: str) -> str:
        """A libpq connection string over TCP on 127.0.0.1."""
        return self.dsn(dbname, user, **{**extra, "host": "127.0.0.1"})

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*_as_server_user(), *args]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def initdb(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_server_user(self.base_dir)
        _chown_to_server_user(self.socket_dir)
        if self.own_system_identifier:
            _run_initdb(self.bin_dir, self.data_dir)
        else:
            template = _template_cluster(self.bin_dir)
            shutil.copytree(template, self.data_dir, symlinks=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.data_dir)], check=True)
        conf = {**DEFAULT_SETTINGS, **self.settings}
        conf["port"] = str(self.port)
        conf["listen_addresses"] = "'127.0.0.1'"
        conf["unix_socket_directories"] = f"'{self.socket_dir}'"
        lines = [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        with (self.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self) -> None:
        if not self.data_dir.exists():
            self.initdb()
        if not self.log_file.exists():
            self.log_file.touch()
            _chown_to_server_user(self.log_file)
        result = self._run(
            str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", "60",
            "-D", str(self.data_dir), "-l", str(self.log_file), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConfigError(
                f"postgres in {self.data_dir} did not start: {result.stderr.strip()}; "
                f"server log: {self.log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(
            str(self.bin_dir / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode,
            "-D", str(self.data_dir), check=False,
        )  # fmt: skip

    @classmethod
    def standby_of(
        cls,
        primary: LocalPostgres,
        parent: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> LocalPostgres:
        """A new cluster made with ``pg_basebackup -X stream -R`` from the running ``primary``: a
        physical copy that starts as a standby streaming from it (``promote()`` ends that).

        It has its own directory, port and socket; ``settings`` are added to the primary's (for
        example ``recovery_target_lsn``). Not started yet: call ``start()``.
        """
        base = Path(tempfile.mkdtemp(prefix="pgcapture-pg-", dir=parent))
        os.chmod(base, 0o755)
        copy = cls(base_dir=base, settings={**primary.settings, **(settings or {})})
        copy.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_server_user(copy.base_dir)
        _chown_to_server_user(copy.socket_dir)
        result = copy._run(
            str(copy.bin_dir / "pg_basebackup"), "-D", str(copy.data_dir), "-X", "stream", "-R",
            "-c", "fast", "--no-sync", "-d", primary.dsn(), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(base, ignore_errors=True)
            raise ConfigError(
                f"pg_basebackup of the cluster in {primary.data_dir} failed: "
                f"{result.stderr.strip()}"
            )
        # The copy holds the primary's postgresql.auto.conf (and -R's primary_conninfo): later
        # lines win, so the copy's own port, socket and settings go last.
        conf = dict(copy.settings)
        conf["port"] = str(copy.port)
        conf["listen_addresses"] = "'127.0.0.1'"
        conf["unix_socket_directories"] = f"'{copy.socket_dir}'"
        lines = [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        with (copy.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        return copy

    def add_settings(self, settings: Mapping[str, str]) -> None:
        """Append settings to the cluster's postgresql.auto.conf (and to ``self.settings``);
        they take effect at the next start (or reload, for those that allow it)."""
        self.settings = {**self.settings, **settings}
        lines = [f"{k} = {_conf_value(v)}" for k, v in settings.items()]
        with (self.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def promote(self, wait: bool = True) -> None:
        """End recovery (``pg_ctl promote``): the cluster switches to a new timeline and
        accepts writes. With ``wait``, returns once promotion is complete."""
        result = self._run(
            str(self.bin_dir / "pg_ctl"), "promote", "-w" if wait else "-W", "-t", "60",
            "-D", str(self.data_dir), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConfigError(
                f"postgres in {self.data_dir} was not promoted: {result.stderr.strip()}; "
                f"server log: {self.log_tail()}"
            )

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Stop abruptly (immediate shutdown, as after a crash)."""
        self.stop("immediate")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_value(value: str) -> str:
    if value.startswith("'") or re.fullmatch(r"[\w.]+", value):
        return value
    return "'" + value.replace("'", "''") + "'"


@functools.cache
def _template_cluster(bin_dir: Path) -> Path:
    """An ``initdb``'d data directory made once per process and copied for each cluster
    (copying takes a third of the time of ``initdb``)."""
    base = Path(tempfile.mkdtemp(prefix="pgcapture-template-"))
    os.chmod(base, 0o755)
    _chown_to_server_user(base)
    _run_initdb(bin_dir, base / "data")
    _register_cleanup(base)
    return base / "data"


def _run_initdb(bin_dir: Path, data: Path) -> None:
    cmd = [
        *_as_server_user(), str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
        "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ConfigError(f"initdb failed: {result.stderr.strip()}")


def _register_cleanup(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, ignore_errors=True)
