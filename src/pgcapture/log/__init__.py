"""The durable ordered log of a source on NATS JetStream (DESIGN.md, contracts 1 and 2).

``batch`` cuts records into ``LogBatch`` payloads, ``stream`` creates or checks a source's
stream and reads its tail, ``writer`` publishes batches pipelined and in order, ``lease`` keeps
one writer per source, ``reader`` reads a stream back. The layout of a
stream is documented in docs/protocol.md.
"""

from pgcapture.log.batch import Batch, Batcher, decode_batch
from pgcapture.log.lease import Lease
from pgcapture.log.reader import StoredBatch, read_batches, read_records
from pgcapture.log.stream import (
    HEADER_FIRST,
    HEADER_LAST,
    StreamSettings,
    Tail,
    ensure_stream,
    read_tail,
)
from pgcapture.log.writer import StreamWriter

__all__ = [
    "HEADER_FIRST",
    "HEADER_LAST",
    "Batch",
    "Batcher",
    "Lease",
    "StoredBatch",
    "StreamSettings",
    "StreamWriter",
    "Tail",
    "decode_batch",
    "ensure_stream",
    "read_batches",
    "read_records",
    "read_tail",
]
