"""Errors of the consumer library, under ``pgcapture.errors.PgCaptureError``::

    PgCaptureError
    ├── ConfigError              bad arguments to Consumer / models; nothing was started
    ├── ConnectionLost
    │   └── GatewayUnavailable   the gateway (or its broker) is unreachable: run() retries
    └── ConsumerError
        ├── GatewayRefused       the gateway refused the stream for good: run() ends with it
        │   ├── UnknownUri           NOT_FOUND
        │   ├── InvalidRequest       INVALID_ARGUMENT (bad regex, bad parameter, bad request)
        │   ├── AccessDenied         UNAUTHENTICATED, PERMISSION_DENIED (token)
        │   ├── StreamRejected       FAILED_PRECONDITION (an acknowledgement the gateway refused)
        │   └── MethodUnsupported    UNIMPLEMENTED (a gateway without CaptureBatched)
        ├── ChangeDecodeError    a value of a change cannot be decoded into its model
        └── TypeLookupError      user types cannot be looked up on the ``dsn`` database

Every message is one line naming the problem, the value and the fix (DESIGN.md, contract 8).
"""

from __future__ import annotations

from pgcapture.errors import ConnectionLost, PgCaptureError


class ConsumerError(PgCaptureError):
    """Base of the errors raised by the consumer library itself."""


class GatewayUnavailable(ConnectionLost):
    """The gateway could not be reached or ended the stream; ``Consumer.run`` reconnects.

    ``code`` is the gRPC status code name (``"UNAVAILABLE"``, ...) or ``"EOF"`` when the
    gateway closed the stream without an error.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class GatewayRefused(ConsumerError):
    """The gateway refused the stream; retrying the same request cannot succeed.

    ``code`` is the gRPC status code name, ``details`` the gateway's own message.
    """

    def __init__(self, message: str, code: str, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class UnknownUri(GatewayRefused):
    """NOT_FOUND: the gateway serves no such consumer URI."""


class InvalidRequest(GatewayRefused):
    """INVALID_ARGUMENT: a bad TableRegex, parameter or request."""


class AccessDenied(GatewayRefused):
    """UNAUTHENTICATED or PERMISSION_DENIED: the token is missing, wrong or not allowed."""


class StreamRejected(GatewayRefused):
    """FAILED_PRECONDITION: the gateway refused what this stream sent (e.g. an acknowledgement)."""


class MethodUnsupported(GatewayRefused):
    """UNIMPLEMENTED: the gateway lacks the method (``CaptureBatched`` on an older gateway)."""


class ChangeDecodeError(ConsumerError):
    """A value of a change cannot be decoded, or cannot be put into its model's field.

    ``column`` is empty when the problem is not one column's (e.g. a model constructor failed).
    """

    def __init__(
        self, schema: str, table: str, column: str, oid: int, problem: str, fix: str
    ) -> None:
        where = f"{schema}.{table}.{column}" if column else f"{schema}.{table}"
        type_part = f" (type oid {oid})" if oid else ""
        super().__init__(f"cannot decode {where}{type_part}: {problem}; {fix}")
        self.schema = schema
        self.table = table
        self.column = column
        self.oid = oid
        self.problem = problem


class TypeLookupError(ConsumerError):
    """The ``dsn`` database could not be asked about user-defined types."""
