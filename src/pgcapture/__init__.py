"""pgcapture: change data capture for PostgreSQL."""

from pgcapture.checkpoint import Checkpoint
from pgcapture.lsn import LSN

__version__ = "0.1.0"

__all__ = ["LSN", "Checkpoint", "__version__"]
