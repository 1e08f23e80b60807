"""Fixtures for integration tests that read a slot."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from pgcapture.capture.reader import SlotReader

_slots = itertools.count(1)


@pytest.fixture
def slot_name() -> str:
    return f"s{next(_slots)}"


@pytest.fixture
async def reader(dsn: str, slot_name: str) -> AsyncIterator[SlotReader]:
    r = SlotReader(dsn, slot_name, status_interval=0.5)
    await r.open()
    try:
        yield r
    finally:
        await r.close()
