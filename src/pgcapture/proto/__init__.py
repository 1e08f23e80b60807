"""The wire schema (``pgcapture.proto``) and its generated modules.

``pb`` is the generated message module; import messages from here, never from ``gen`` directly.
"""

from pgcapture.proto.gen import pgcapture_pb2 as pb
from pgcapture.proto.gen import pgcapture_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
