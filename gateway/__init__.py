"""Gateway: verifies device batches and chains, countersigns, buffers, relays upstream."""

from civicmesh.errors import CivicmeshError


class GatewayError(CivicmeshError):
    """Base of the gateway's errors."""

    reason = "gateway.error"
