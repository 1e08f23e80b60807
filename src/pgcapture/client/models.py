"""Models: plain dataclasses or pydantic models mapped to a table and its columns.

A model names its table with ``@table("schema.table")`` (or a ``__table__`` class attribute;
the schema defaults to ``public``). Each field maps to the column of the same name, or to the
one named by ``Annotated[T, Column("name")]`` (or, for dataclasses,
``field(metadata={"column": "name"})``)::

    @table("public.users")
    @dataclass
    class User:
        id: int
        name: Annotated[str, Column("full_name")]
        bio: str | Unchanged | None = UNCHANGED

Columns the change does not carry get ``UNCHANGED``; columns the model does not declare are
ignored, so a column added by DDL does not break a consumer. Models are not validated:
pydantic models are built with ``model_construct``, like dataclasses with their constructor,
from the decoded values fitted to the declared types (``coerce``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pgcapture.client.coerce import Converter, converter_for
from pgcapture.errors import ConfigError

T = TypeVar("T")

DEFAULT_SCHEMA = "public"


@dataclass(frozen=True, slots=True)
class Column:
    """Maps a model field to a column of another name: ``Annotated[str, Column("full_name")]``."""

    name: str


def table(name: str, *, schema: str | None = None) -> Callable[[type[T]], type[T]]:
    """Class decorator mapping a model to ``"schema.table"`` (or ``"table"`` in ``public``).

    >>> @table("app.orders")
    ... class Order: ...
    >>> Order.__table__
    'app.orders'
    """
    qualified = split_table(name if schema is None else f"{schema}.{name}", f"@table({name!r})")

    def mark(cls: type[T]) -> type[T]:
        cls.__table__ = f"{qualified[0]}.{qualified[1]}"  # type: ignore[attr-defined]
        return cls

    return mark


def split_table(name: str, where: str) -> tuple[str, str]:
    parts = name.split(".")
    if len(parts) == 1 and parts[0]:
        return DEFAULT_SCHEMA, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ConfigError(f"{where}: table name {name!r} is not of the form 'schema.table' or 'table'")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One model field: its attribute, its column, and how decoded values fit its type."""

    attr: str
    column: str
    convert: Converter


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """How to build instances of one model class from the columns of a change."""

    model: type[Any]
    schema: str
    table: str
    fields: tuple[FieldSpec, ...]
    construct: Callable[[dict[str, Any]], Any]

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(f.column for f in self.fields)


def _column_of(attr: str, hint: Any, metadata: Mapping[str, Any]) -> str:
    for extra in getattr(hint, "__metadata__", ()):
        if isinstance(extra, Column):
            return extra.name
    column = metadata.get("column", attr)
    if not isinstance(column, str) or not column:
        raise ConfigError(f"field {attr}: metadata 'column' must be a column name, got {column!r}")
    return column


def _is_pydantic(cls: type[Any]) -> bool:
    return hasattr(cls, "model_fields") and hasattr(cls, "model_construct")


def _field_metadata(cls: type[Any]) -> dict[str, Mapping[str, Any]]:
    """Field name -> dataclass field metadata (empty for pydantic models)."""
    if dataclasses.is_dataclass(cls):
        return {f.name: f.metadata for f in dataclasses.fields(cls) if f.init}
    if _is_pydantic(cls):
        return {name: {} for name in cls.model_fields}
    raise ConfigError(
        f"model {cls.__qualname__} is neither a dataclass nor a pydantic model; "
        "decorate it with @dataclass (or derive it from pydantic.BaseModel)"
    )


def _table_of(cls: type[Any]) -> tuple[str, str]:
    name = getattr(cls, "__table__", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"model {cls.__qualname__} names no table; decorate it with "
            "@table('schema.table') or set __table__ = 'schema.table'"
        )
    return split_table(name, f"model {cls.__qualname__}")


_specs: weakref.WeakKeyDictionary[type[Any], ModelSpec] = weakref.WeakKeyDictionary()


def model_spec(cls: type[Any]) -> ModelSpec:
    """The ``ModelSpec`` of a model class (computed once per class)."""
    spec = _specs.get(cls)
    if spec is None:
        spec = _specs[cls] = _build_spec(cls)
    return spec


def _build_spec(cls: type[Any]) -> ModelSpec:
    schema, name = _table_of(cls)
    metadata = _field_metadata(cls)
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError) as exc:
        raise ConfigError(
            f"model {cls.__qualname__}: cannot resolve its annotations: {exc}"
        ) from exc
    fields = tuple(
        FieldSpec(
            attr, _column_of(attr, hints.get(attr, Any), meta), converter_for(hints.get(attr, Any))
        )
        for attr, meta in metadata.items()
    )
    seen: dict[str, str] = {}
    for f in fields:
        if f.column in seen:
            raise ConfigError(
                f"model {cls.__qualname__}: fields {seen[f.column]} and {f.attr} both map to "
                f"column {f.column!r}; give one of them another Column(...)"
            )
        seen[f.column] = f.attr
    if not fields:
        raise ConfigError(f"model {cls.__qualname__} has no fields to map to columns")
    construct: Callable[[dict[str, Any]], Any]
    if _is_pydantic(cls):
        construct = functools.partial(_construct_pydantic, cls)
    else:
        construct = functools.partial(_construct_dataclass, cls)
    return ModelSpec(cls, schema, name, fields, construct)


def _construct_dataclass(cls: type[Any], values: dict[str, Any]) -> Any:
    return cls(**values)


def _construct_pydantic(cls: Any, values: dict[str, Any]) -> Any:
    return cls.model_construct(**values)
