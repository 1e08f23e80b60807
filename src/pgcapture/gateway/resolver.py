"""Which stream a consumer URI reads, and how its changes are delivered.

A URI names a source's stream, a durable JetStream consumer (the URI's position, kept by the
server across gateway restarts and shared by every client of the URI) and the delivery settings
of ``[gateway.uris.URI]``. ``ConfigResolver`` reads them from the deployment's configuration.
A custom resolver is any object with ``async def resolve(self, uri: str) -> Route`` that raises
``GatewayError(NOT_FOUND, ...)`` for a URI it does not know; ``pgcapture gateway --resolver
module:attribute`` loads one, where the attribute is such an object or a callable that takes the
``Config`` and returns one (docs/gateway.md, "Custom resolvers").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pgcapture.config import Config, UriConfig
from pgcapture.errors import ConfigError
from pgcapture.gateway.errors import unknown_uri


@dataclass(frozen=True, slots=True)
class Route:
    """Where URI ``uri`` reads from: the JetStream ``stream`` and its ``subject``."""

    uri: str
    stream: str
    subject: str
    settings: UriConfig


@runtime_checkable
class Resolver(Protocol):
    async def resolve(self, uri: str) -> Route: ...


class ConfigResolver:
    """URIs from ``[gateway.uris]``; each reads the stream of its ``source``."""

    def __init__(self, config: Config) -> None:
        self._routes = {
            name: Route(
                name,
                config.sources[uri.source].stream_name,
                config.sources[uri.source].subject,
                uri,
            )
            for name, uri in config.gateway.uris.items()
        }

    async def resolve(self, uri: str) -> Route:
        try:
            return self._routes[uri]
        except KeyError:
            raise unknown_uri(uri, list(self._routes)) from None


def load_resolver(spec: str, config: Config) -> Resolver:
    """The resolver named by ``module:attribute`` (an object, or a factory taking ``config``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"--resolver {spec!r}: write it as module:attribute, e.g. myapp.cdc:resolver"
        )
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--resolver {spec!r}: cannot load it ({exc}); check the module path"
        ) from None
    is_object = isinstance(target, Resolver) and not isinstance(target, type)
    resolver = target if is_object or not callable(target) else target(config)
    if not isinstance(resolver, Resolver):
        raise ConfigError(
            f"--resolver {spec!r}: {type(resolver).__name__} has no async resolve(uri) method"
        )
    return resolver
