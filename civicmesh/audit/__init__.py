"""The public audit log: every accepted batch is a leaf of an append-only Merkle tree.

The pieces, each small and free of web frameworks and database drivers:

- :mod:`civicmesh.audit.merkle`: RFC 9162 tree hashing, inclusion and consistency
  proofs (made from a store of complete-subtree hashes) and their verification;
- :mod:`civicmesh.audit.leaf`: the leaf format, committing to a batch's signed bytes;
- :mod:`civicmesh.audit.note`: C2SP signed notes, checkpoints and witness cosignatures;
- :mod:`civicmesh.audit.tiles`: the static mirror layout (C2SP tlog-tiles-like);
- :mod:`civicmesh.audit.witness`: a witness that checks consistency and cosigns;
- :mod:`civicmesh.audit.verify`: ``civicmesh audit verify``, the standalone verifier.
"""

from __future__ import annotations

from civicmesh.errors import CivicmeshError

# MQTT topics of the log: the central publishes the latest checkpoint (retained); each
# witness publishes ``<size>\n<cosignature line>`` on its cosignature topic, and the
# evidence of a split view on its alert topic.
CHECKPOINT_TOPIC = "civicmesh/v1/audit/checkpoint"
COSIGNATURE_FILTER = "civicmesh/v1/audit/cosig/#"
ALERT_FILTER = "civicmesh/v1/audit/alert/#"


def cosignature_topic(witness: str) -> str:
    return "civicmesh/v1/audit/cosig/" + witness.replace("#", "_")


def alert_topic(witness: str) -> str:
    return "civicmesh/v1/audit/alert/" + witness.replace("#", "_")


class AuditError(CivicmeshError):
    """The audit log, a proof or a checkpoint is wrong; ``reason`` names how."""

    reason = "audit"
