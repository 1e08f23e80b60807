"""Binding a gRPC server's listen address, the same way for the gateway, the controller and the
dumper: ``HOST:PORT``, ``:PORT`` for every interface, ``unix:PATH``, port 0 for a free port."""

from __future__ import annotations

import grpc

from pgcapture.errors import ConfigError


def bind(
    server: grpc.aio.Server,
    listen: str,
    setting: str,
    example: str,
    credentials: grpc.ServerCredentials | None = None,
) -> str:
    """Bind ``listen`` (the value of ``setting``); the bound address, port 0 resolved. A
    refusal names the setting and an ``example`` value."""
    target = "[::]" + listen if listen.startswith(":") else listen
    try:
        if credentials is None:
            port = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError:
        port = 0
    if not port:
        what = setting.split(".")[0]
        raise ConfigError(
            f"cannot listen on {listen!r} for the {what} (in use, not a local address, or not "
            f'HOST:PORT); choose another {setting}, e.g. "{example}", or --listen'
        )
    if target.startswith("unix:"):
        return target
    return f"{target.rpartition(':')[0]}:{port}"
