"""Edge agent: drivers -> windows -> durable outbox -> signed batches -> MQTT."""

from civicmesh.errors import CivicmeshError

__version__ = "0.1.0"


class EdgeError(CivicmeshError):
    """Base of the edge agent's errors."""

    reason = "edge.error"
