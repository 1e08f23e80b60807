"""Operating pgcapture processes: Prometheus metrics, a health endpoint, structured logs."""

from pgcapture.ops.http import OpsServer, parse_listen
from pgcapture.ops.logs import JsonFormatter, setup_logging
from pgcapture.ops.metrics import CaptureMetrics, MeteredWriter, SlotLagMonitor, commit_time

__all__ = [
    "CaptureMetrics",
    "JsonFormatter",
    "MeteredWriter",
    "OpsServer",
    "SlotLagMonitor",
    "commit_time",
    "parse_listen",
    "setup_logging",
]
