"""The consumer-facing gRPC gateway: ``pgcapture.DBLogGateway`` over a source's stream.

``resolver`` maps a consumer URI to its stream and delivery settings, ``hub`` delivers one
URI's changes to the client streams attached to it (acknowledgements, requeues, dead letters,
per-key order), ``service`` speaks the gRPC methods, ``security`` checks TLS and tokens and
``server`` runs it all as ``pgcapture gateway`` (docs/gateway.md).
"""
