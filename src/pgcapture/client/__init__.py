"""pgcapture's consumer library: changes from a pgcapture gateway as typed Python objects.

::

    import asyncio
    from dataclasses import dataclass
    from pgcapture.client import UNCHANGED, Change, Consumer, Unchanged, table

    @table("public.users")
    @dataclass
    class User:
        id: int
        email: str
        bio: str | Unchanged | None = UNCHANGED

    consumer = Consumer("gateway:10000", "users-sync", table_regex="^users$")

    @consumer.handler(User)
    async def on_user(change: Change[User]) -> None:
        print(change.op, change.key, change.new)

    asyncio.run(consumer.run())

See docs/consumer.md for models, types, errors, acknowledgements and concurrency.
"""

from pgcapture.backoff import Backoff
from pgcapture.client.change import Change, Op, Row, TableName, Truncate
from pgcapture.client.consumer import Consumer
from pgcapture.client.errors import (
    AccessDenied,
    ChangeDecodeError,
    ConsumerError,
    GatewayRefused,
    GatewayUnavailable,
    InvalidRequest,
    MethodUnsupported,
    StreamRejected,
    TypeLookupError,
    UnknownUri,
)
from pgcapture.client.gateway import TlsConfig
from pgcapture.client.jsonenc import to_dict, to_json
from pgcapture.client.models import Column, table
from pgcapture.client.routing import ConsumerStats
from pgcapture.client.typeinfo import TypeResolver
from pgcapture.client.values import UNCHANGED, RawValue, Unchanged, ValueDecoder, ValueFormat

__all__ = [
    "UNCHANGED",
    "AccessDenied",
    "Backoff",
    "Change",
    "ChangeDecodeError",
    "Column",
    "Consumer",
    "ConsumerError",
    "ConsumerStats",
    "GatewayRefused",
    "GatewayUnavailable",
    "InvalidRequest",
    "MethodUnsupported",
    "Op",
    "RawValue",
    "Row",
    "StreamRejected",
    "TableName",
    "TlsConfig",
    "Truncate",
    "TypeLookupError",
    "TypeResolver",
    "Unchanged",
    "UnknownUri",
    "ValueDecoder",
    "ValueFormat",
    "table",
    "to_dict",
    "to_json",
]
