"""The error tree of pgcapture.

Every error a user can meet is one of these, with a lowercase message that names the problem,
the value involved and the fix (DESIGN.md, contract 8)::

    PgCaptureError
    ├── ConfigError            bad configuration or arguments; nothing was started
    ├── SourceError            the source database refuses what capture needs
    │   ├── UnsupportedServer  server version or wal_level cannot do logical decoding
    │   ├── PermissionDenied   a missing privilege (REPLICATION, CREATE, ownership)
    │   ├── SlotInUse          the replication slot is active in another process
    │   └── NoBinaryOutput     a value's type has no binary send function; capture reads
    │                          that transaction again in text              (capture.reader)
    ├── ProtocolError          the server sent bytes we cannot make sense of
    │   └── DecodeError        malformed or truncated pgoutput message (tag and offset)
    ├── ConnectionLost         a connection dropped; the caller may retry
    ├── ReplicaError           the replica cannot take a change; nothing of the batch is applied
    │   ├── ReplicaBusy        another replicate writes to the database   (replica.store)
    │   ├── ApplyFailed        the replica refused a statement, or a change touched other
    │   │                      rows than it had to                        (replica.pipeline)
    │   ├── SchemaMismatch     a table or column differs from the source  (replica.plans)
    │   └── DdlNotReplayable   a DDL row that must not run automatically  (replica.ddl)
    ├── StreamGap / StreamMissing   the stream lost unapplied changes / does not exist yet
    │                                                                     (log.follow)
    └── BootstrapError         a replica cannot be bootstrapped as asked  (replica.bootstrap)
"""

from __future__ import annotations


class PgCaptureError(Exception):
    """Base of every error raised on purpose by pgcapture."""


class ConfigError(PgCaptureError):
    """Configuration or arguments are wrong; the message names the key and the fix."""


class SourceError(PgCaptureError):
    """The source database cannot serve capture as configured."""


class UnsupportedServer(SourceError):
    """The server's version or settings cannot do what is needed."""


class PermissionDenied(SourceError):
    """The connecting role lacks a privilege."""


class SlotInUse(SourceError):
    """The replication slot is being read by another process."""


class SlotLost(SourceError):
    """The replication slot was invalidated: the source's WAL it needed is gone."""


class NoBinaryOutput(SourceError):
    """The walsender cannot send a value in binary: ``type_name`` (e.g. ``aclitem``, inside an
    array or a composite) has no binary send function. ``SlotReader`` handles it by reading the
    transaction again with pgoutput's ``binary`` option off."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class ProtocolError(PgCaptureError):
    """Bytes from the server do not follow the protocol."""


class DecodeError(ProtocolError):
    """A pgoutput message is malformed or truncated.

    ``tag`` is the message's type byte as a one-character string (``"?"`` when even that is
    missing), ``offset`` the byte offset inside the message where decoding failed.
    """

    def __init__(self, tag: str, offset: int, problem: str) -> None:
        super().__init__(f"pgoutput message {tag!r}: {problem} at offset {offset}")
        self.tag = tag
        self.offset = offset
        self.problem = problem


class ConnectionLost(PgCaptureError):
    """A server connection dropped; retrying later may succeed."""


class ReplicaError(PgCaptureError):
    """The replica cannot take a change as it is; nothing of the failing batch was applied."""
