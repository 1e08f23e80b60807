"""``to_json`` / ``to_dict``: documents without UNCHANGED fields, with exact encodings."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, NamedTuple
from uuid import UUID

import pydantic
import pytest
from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from pgcapture.client import UNCHANGED, RawValue, Row, Unchanged, ValueFormat, to_dict, to_json

pytestmark = pytest.mark.timeout(30)


class Mood(Enum):
    OK = "ok"


class Level(Enum):
    LOW = 1


class Pair(NamedTuple):
    x: int
    y: str


@dataclass
class Doc:
    id: int
    bio: str | Unchanged
    note: str | None


class PDoc(pydantic.BaseModel):
    id: int
    bio: str | Unchanged = UNCHANGED


def test_unchanged_fields_are_omitted_and_none_is_null() -> None:
    assert to_dict(Doc(id=1, bio=UNCHANGED, note=None)) == {"id": 1, "note": None}
    assert to_json(Doc(id=1, bio="hi", note="n")) == '{"id":1,"bio":"hi","note":"n"}'
    assert to_dict(PDoc.model_construct(id=2, bio=UNCHANGED)) == {"id": 2}


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (Decimal("12.50"), "12.50"),
        (Decimal("NaN"), "NaN"),
        (float("inf"), "Infinity"),
        (float("nan"), "NaN"),
        (1.5, 1.5),
        (datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "2024-01-02T03:04:05.000006+00:00"),
        (date.max, "9999-12-31"),
        (time(12, 30), "12:30:00"),
        (timedelta(days=1, seconds=1.5), 86401.5),
        (UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (ipaddress.ip_interface("192.168.0.1/24"), "192.168.0.1/24"),
        (ipaddress.ip_network("10.0.0.0/8"), "10.0.0.0/8"),
        (b"\x00\xff", "AP8="),
        (Mood.OK, "ok"),
        (Level.LOW, "LOW"),
        (Range(1, 10, "[)"), {"gte": 1, "lt": 10}),
        (Range(None, Decimal("2.5"), "(]"), {"lte": "2.5"}),
        (Range(empty=True), {"empty": True}),
        (Multirange([Range(1, 3), Range(5, 8)]), [{"gte": 1, "lt": 3}, {"gte": 5, "lt": 8}]),
        (Pair(1, "a"), {"x": 1, "y": "a"}),
        ((1, "a"), [1, "a"]),
        ([[1, None], [2, 3]], [[1, None], [2, 3]]),
        ({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]}),
        (
            RawValue(16390, b"happy", ValueFormat.BINARY),
            {"oid": 16390, "format": "binary", "base64": "aGFwcHk="},
        ),
    ],
)
def test_value_encodings(value: Any, encoded: Any) -> None:
    assert to_dict(Row({"v": value})) == {"v": encoded}
    json.loads(to_json(Row({"v": value})))  # always valid JSON (no NaN literals)


def test_unknown_types_name_the_field() -> None:
    with pytest.raises(TypeError, match="field v: no JSON encoding for object"):
        to_dict(Row({"v": object()}))


def test_only_models_rows_and_mappings() -> None:
    with pytest.raises(TypeError, match="not int"):
        to_dict(5)
