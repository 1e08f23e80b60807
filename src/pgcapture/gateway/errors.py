"""Errors the gateway reports to a client, each with its gRPC status code."""

from __future__ import annotations

import grpc

from pgcapture.errors import PgCaptureError


class GatewayError(PgCaptureError):
    """A request the gateway refuses; ``code`` is the gRPC status the client receives."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unknown_uri(uri: str, known: list[str]) -> GatewayError:
    names = ", ".join(sorted(known)) or "none"
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        f"unknown URI {uri!r} (this gateway serves: {names}); add a [gateway.uris.{uri}] "
        "section to the configuration, or check the client's URI",
    )
