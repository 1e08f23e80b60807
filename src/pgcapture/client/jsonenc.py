"""Models as JSON documents, e.g. for a search index.

``to_dict(model)`` gives a dict of JSON values (keys: field names; for a ``Row``, column
names) **without the fields that are ``UNCHANGED``**, so a partial update never overwrites a
stored value with nothing. ``to_json(model)`` is the same as a compact JSON string.

=========================================  ===============================================
Python value                               JSON
=========================================  ===============================================
``None``, ``bool``, ``int``, ``str``       null, true/false, number, string
``float``                                  number; NaN / ±Infinity as ``"NaN"``,
                                           ``"Infinity"``, ``"-Infinity"``
``Decimal``                                string, exact (``"12.50"``, ``"NaN"``)
``datetime``, ``date``, ``time``           ISO 8601 string (``date.max`` etc. for infinity)
``timedelta``                              number of seconds
``UUID``, IP addresses and networks        string
``bytes``                                  base64 string
``Enum``                                   its value if a string, else its name (the label)
``Range``                                  ``{"gte"|"gt": lower, "lte"|"lt": upper}``, a side
                                           omitted when unbounded; ``{"empty": true}``
``Multirange``                             list of ranges as above
named tuple (composite)                    object of its fields
``list``, ``tuple``                        array
``dict`` (json / jsonb)                    object
``RawValue``                               ``{"oid": n, "format": "binary", "base64": "..."}``
dataclass / pydantic model                 object of its fields
=========================================  ===============================================
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import math
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from pgcapture.client.values import RawValue, Unchanged

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

_IP = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)


def to_dict(model: Any) -> dict[str, JSONValue]:
    """The JSON-ready fields of a model instance, ``Row`` or mapping, without UNCHANGED ones.

    >>> from pgcapture.client import Row
    >>> to_dict(Row({"id": 1, "price": Decimal("9.90")}))
    {'id': 1, 'price': '9.90'}
    """
    return {
        name: _encode(value, name)
        for name, value in _items(model)
        if not isinstance(value, Unchanged)
    }


def to_json(model: Any) -> str:
    """``to_dict(model)`` as a compact JSON string (UTF-8 characters are kept as they are)."""
    return json.dumps(to_dict(model), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _items(model: Any) -> list[tuple[str, Any]]:
    if isinstance(model, Mapping):
        return [(str(k), v) for k, v in model.items()]
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        return [(f.name, getattr(model, f.name)) for f in dataclasses.fields(model)]
    fields = getattr(type(model), "model_fields", None)
    if isinstance(fields, Mapping):
        return [(name, getattr(model, name)) for name in fields]
    raise TypeError(
        f"to_dict takes a dataclass or pydantic model instance, a Row or a mapping, "
        f"not {type(model).__qualname__}"
    )


def _float(value: float) -> JSONValue:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _range(value: Range[Any], where: str) -> JSONValue:
    if value.isempty:
        return {"empty": True}
    out: dict[str, JSONValue] = {}
    if value.lower is not None:
        out["gte" if value.lower_inc else "gt"] = _encode(value.lower, where)
    if value.upper is not None:
        out["lte" if value.upper_inc else "lt"] = _encode(value.upper, where)
    return out


def _encode(value: Any, where: str) -> JSONValue:
    """One value as JSON; ``where`` names the field for the error message."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (UUID, *_IP)):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Enum):
        return value.value if isinstance(value.value, str) else value.name
    if isinstance(value, Range):
        return _range(value, where)
    if isinstance(value, Multirange):
        return [_range(r, where) for r in value]
    if isinstance(value, RawValue):
        return {
            "oid": value.oid,
            "format": value.format.value,
            "base64": base64.b64encode(value.data).decode("ascii"),
        }
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {str(k): _encode(v, where) for k, v in zip(value._fields, value, strict=True)}
    if isinstance(value, list | tuple):
        return [_encode(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, where) for k, v in value.items()}
    if dataclasses.is_dataclass(value) or hasattr(type(value), "model_fields"):
        return to_dict(value)
    raise TypeError(
        f"field {where}: no JSON encoding for {type(value).__qualname__} value {value!r}"
    )
