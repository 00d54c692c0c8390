"""civicmesh shared package: wire protocol, identities, registry, config, MQTT link, CLI.

This package is the single owner of the wire format. The components (``edge``,
``gateway``, ``analytics``, ``firmware_sim``) import it and never each other.
"""

__version__ = "0.1.0"
