"""URIs from the configuration, and custom resolvers loaded by ``--resolver module:attr``."""

from __future__ import annotations

import sys
import types

import grpc
import pytest

from pgcapture.config import Config, UriConfig, validate_config
from pgcapture.errors import ConfigError
from pgcapture.gateway.errors import GatewayError
from pgcapture.gateway.resolver import ConfigResolver, Route, load_resolver


def _config() -> Config:
    return validate_config(
        {
            "sources": {"app": {"dsn": "dbname=app"}},
            "gateway": {"uris": {"orders": {"source": "app", "ordered": True}}},
        }
    )


async def test_config_resolver_routes_uris_to_their_source_stream() -> None:
    route = await ConfigResolver(_config()).resolve("orders")
    assert (route.uri, route.stream, route.subject) == ("orders", "PGCAPTURE_APP", "pgcapture.app")
    assert route.settings.ordered
    assert route.settings.consumer_name == "pgcapture_orders"
    assert route.settings.dead_letter_name == "PGCAPTURE_DLQ_ORDERS"
    with pytest.raises(GatewayError) as caught:
        await ConfigResolver(_config()).resolve("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "serves: orders" in caught.value.message


class _Tenants:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config

    async def resolve(self, uri: str) -> Route:
        settings = UriConfig(name=uri, source="app")
        return Route(uri, "PGCAPTURE_" + uri.upper(), "pgcapture." + uri, settings)


@pytest.fixture
def module() -> types.ModuleType:
    mod = types.ModuleType("custom_resolvers")
    mod.instance = _Tenants()  # type: ignore[attr-defined]
    mod.factory = lambda config: _Tenants()  # type: ignore[attr-defined]
    mod.cls = _Tenants  # type: ignore[attr-defined]
    mod.wrong = 42  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


@pytest.mark.parametrize("attr", ["instance", "factory", "cls"])
async def test_custom_resolvers_load_as_object_factory_or_class(
    module: types.ModuleType, attr: str
) -> None:
    resolver = load_resolver(f"custom_resolvers:{attr}", _config())
    route = await resolver.resolve("acme")
    assert route.stream == "PGCAPTURE_ACME"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("custom_resolvers", "write it as module:attribute"),
        ("custom_resolvers:missing", "cannot load it"),
        ("no_such_module_here:x", "cannot load it"),
        ("custom_resolvers:wrong", "has no async resolve"),
    ],
)
def test_bad_resolver_specs_name_the_fix(module: types.ModuleType, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_resolver(spec, _config())
