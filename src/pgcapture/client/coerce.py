"""Fitting decoded values to the type a model field declares.

Decoding never guesses from bytes: an OID the decoder has no loader for gives a ``RawValue``.
A model field's declared type is what may turn it into a value, because it is the model's
author who says what the column is:

- ``RawValue``, ``Any``, ``object``: the ``RawValue`` itself;
- ``str``, or a ``Literal`` of strings: its text (``RawValue.as_text``), e.g. an enum label;
- an ``Enum`` subclass: the member whose value, else name, is the label;
- ``tuple`` or a NamedTuple: the record's fields (``RawValue.as_record``), as that class;
- ``list[X]``: the array's elements (``RawValue.as_array``), each fitted to ``X``;
- anything else: ``NotRepresentable`` (a ``ChangeDecodeError`` naming ``dsn=``).

Decoded values are fitted the same way where a field asks for it: an enum (psycopg's generated
``Enum``, with a ``dsn``) becomes ``str`` or the declared ``Enum``; a composite (a namedtuple)
becomes the declared NamedTuple; list elements follow ``list[X]``. Other values are left as
decoded: models are not validated.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from pgcapture.client.values import RawValue, Unchanged

Converter = Callable[[Any], Any]


class NotRepresentable(ValueError):
    """A value cannot take the declared type; the message says why."""


class _Skip(Enum):
    SKIP = "SKIP"


_SKIP: Final = _Skip.SKIP  # "this converter does not apply to this value"
_PASS_THROUGH: Final = frozenset({Any, object, RawValue})
_IGNORED: Final = frozenset({type(None), Unchanged})


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly ``Annotated``, ``Optional``, union) annotation."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [] if annotation in _IGNORED else [annotation]


def _to_str(value: Any) -> Any:
    if isinstance(value, RawValue):
        return value.as_text()
    if isinstance(value, Enum):
        return value.name
    return _SKIP


def _to_enum(cls: type[Enum]) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, RawValue):
            label = value.as_text()
        elif isinstance(value, Enum):
            label = value.name
        elif isinstance(value, str):
            label = value
        else:
            return _SKIP
        try:
            return cls(label)
        except ValueError:
            pass
        try:
            return cls[label]
        except KeyError:
            raise NotRepresentable(
                f"label {label!r} is neither a value nor a name of {cls.__qualname__}"
            ) from None

    return convert


def _to_tuple(cls: type[tuple[Any, ...]]) -> Converter:
    named = cls is not tuple

    def convert(value: Any) -> Any:
        if isinstance(value, RawValue):
            value = value.as_record()
        elif not isinstance(value, tuple):
            return _SKIP
        if named and not isinstance(value, cls):
            return cls(*value)
        return value

    return convert


def _to_list(element: Converter) -> Converter:
    def convert_item(item: Any) -> Any:
        if item is None:
            return None
        if isinstance(item, list):
            return [convert_item(i) for i in item]
        converted = element(item)
        return item if converted is _SKIP else converted

    def convert(value: Any) -> Any:
        if isinstance(value, RawValue):
            value = value.as_array()
        elif not isinstance(value, list):
            return _SKIP
        return [convert_item(i) for i in value]

    return convert


def _converter_of(target: Any) -> Converter | None:
    """The converter for one alternative, ``None`` when that type takes no part in fitting."""
    origin = get_origin(target) or target
    if target is str or (origin is Literal and all(isinstance(a, str) for a in get_args(target))):
        return _to_str
    if isinstance(target, type) and issubclass(target, Enum):
        return _to_enum(target)
    if isinstance(origin, type) and issubclass(origin, tuple):
        return _to_tuple(origin)
    if origin is list:
        args = get_args(target)
        return _to_list(converter_for(args[0]) if args else _skip_all)
    return None


def _passes_through(member: Any) -> bool:
    try:
        return member in _PASS_THROUGH
    except TypeError:  # an unhashable annotation object: not one of them
        return False


def _skip_all(value: Any) -> Any:
    return _SKIP


def _identity(value: Any) -> Any:
    return value


def converter_for(annotation: Any) -> Converter:
    """The function fitting decoded values to ``annotation`` (see the module docstring).

    ``None`` and ``UNCHANGED`` always pass; a ``RawValue`` that no alternative can take raises
    ``NotRepresentable``.
    """
    members = _members(annotation)
    keep_raw = not members or any(_passes_through(m) for m in members)
    converters = [c for m in members if (c := _converter_of(m)) is not None]
    if keep_raw and not converters:
        return _identity

    def convert(value: Any) -> Any:
        if value is None or isinstance(value, Unchanged):
            return value
        if keep_raw and isinstance(value, RawValue):
            return value
        problem: NotRepresentable | None = None
        for conv in converters:
            try:
                converted = conv(value)
            except ValueError as exc:  # NotRepresentable, or bytes that are not what was declared
                problem = NotRepresentable(str(exc))
                continue
            if converted is not _SKIP:
                return converted
        if problem is not None:
            raise problem
        if isinstance(value, RawValue):
            raise NotRepresentable("no decoder is known for this type")
        return value

    return convert
