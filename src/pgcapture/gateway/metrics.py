"""The gateway's Prometheus metrics, labelled by consumer URI."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewayMetrics:
    """Counters and gauges per URI (a registry of its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ns, uri = "pgcapture_gateway", ["uri"]
        self.clients = Gauge(f"{ns}_clients", "Client streams attached", uri, registry=r)
        self.delivered = Counter(
            f"{ns}_delivered", "Changes sent to clients (redeliveries included)", uri, registry=r
        )
        self.acked = Counter(f"{ns}_acked", "Changes acknowledged by clients", uri, registry=r)
        self.requeued = Counter(
            f"{ns}_requeued", "Changes a client asked to redeliver later", uri, registry=r
        )
        self.dead_lettered = Counter(
            f"{ns}_dead_lettered",
            "Changes moved to the URI's dead-letter stream after their last delivery",
            uri,
            registry=r,
        )
        self.skipped = Counter(
            f"{ns}_skipped",
            "Records acknowledged by the gateway itself (Begin/Commit, filtered tables)",
            uri,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{ns}_in_flight", "Changes sent and not yet acknowledged", uri, registry=r
        )
        self.lag_messages = Gauge(
            f"{ns}_lag_messages",
            "Stream messages the URI's consumer has not received yet",
            uri,
            registry=r,
        )
        self.lag_seconds = Gauge(
            f"{ns}_lag_seconds",
            "Seconds between now and the commit of the last change acknowledged",
            uri,
            registry=r,
        )
        self.dump_rows = Counter(
            f"{ns}_dump_rows", "Dump rows acknowledged by clients", uri, registry=r
        )
        self.dump_chunks = Counter(
            f"{ns}_dump_chunks",
            "Dump chunks finished, by outcome (done, requeued)",
            ["uri", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            f"{ns}_errors", "Client streams ended by an error", ["uri", "code"], registry=r
        )
