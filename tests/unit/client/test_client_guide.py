"""The consumer guide's search-index example, run as written against the fake gateway."""

from __future__ import annotations

import asyncio
import re
import struct
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_helpers import GatewayServer, change, int4, text, truncate

from pgcapture.proto import pb

pytestmark = pytest.mark.timeout(60)

GUIDE = Path(__file__).parents[3] / "docs" / "consumer.md"


@pytest.fixture
def example() -> Iterator[dict[str, Any]]:
    """The namespace of the guide's code block under "Example: keeping a search index in
    sync", executed as a module (dataclasses need their module in ``sys.modules``)."""
    section = GUIDE.read_text().split("## Example: keeping a search index in sync", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the example's code block is missing from the guide"
    module = types.ModuleType("guide_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(match.group(1), str(GUIDE), "exec"), module.__dict__)
        yield module.__dict__
    finally:
        del sys.modules[module.__name__]


def numeric(name: str, value: int) -> pb.Field:
    """A small non-negative integer as numeric's binary form (ndigits, weight, sign, dscale)."""
    digits = [value] if value else []
    body = struct.pack(">hhHh", len(digits), 0, 0, 0) + b"".join(
        struct.pack(">h", d) for d in digits
    )
    return pb.Field(name=name, oid=1700, binary=body)


def product(pid: int, name: str, price: int, **more: str) -> list[pb.Field]:
    fields = [int4("id", pid, key=True), text("name", name), numeric("price", price)]
    return fields + [text(k, v) for k, v in more.items()]


async def test_search_index_example_converges(
    gateway: GatewayServer, example: dict[str, Any]
) -> None:
    ns = example
    es = ns["FakeElasticsearch"]()
    update = pb.Change.UPDATE
    gateway.fake.script(
        "search",
        [
            change("products", 1, new=product(1, "lamp", 20, description="bright")),
            change("products", 2, new=product(2, "desk", 90, description="oak")),
            change("products", 3, op=update, new=product(1, "lamp", 25)),  # TOAST unchanged
            change(
                "products",
                4,
                op=update,
                new=product(3, "desk", 95),
                old=[int4("id", 2, key=True)],
            ),
            change("products", 5, op=pb.Change.DELETE, old=[int4("id", 1, key=True)]),
            change("other", 6, new=[int4("id", 1, key=True)]),
            change("products", 7, new=product(4, "chair", 40, description="tall")),
        ],
    )
    consumer = ns["make_consumer"](gateway.target, "search", es)
    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 7)
    consumer.stop()
    await task

    assert es.indices["products"] == {
        "3": {"id": 3, "name": "desk", "price": "95"},
        "4": {"id": 4, "name": "chair", "price": "40", "description": "tall"},
    }
    assert gateway.fake.streams[0].init.parameters.fields["TableRegex"].string_value == "^products$"

    gateway.fake.script("search", [truncate(8, "products")])
    consumer = ns["make_consumer"](gateway.target, "search", es)
    task = asyncio.create_task(consumer.run())
    await gateway.fake.wait_for(lambda: len(gateway.fake.acked) == 8)
    consumer.stop()
    await task
    assert "products" not in es.indices
