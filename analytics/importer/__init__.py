"""``civicmesh import``: archives of readings brought in through the signed pipeline.

Each source station gets its own importer identity (an Ed25519 key kept under the import
state directory, registered with kind ``import`` and a back-dated valid-from); its
readings are sealed into signed, hash-chained batches with the shared protocol code and
written through ingest's own verify and write steps straight into the store (no broker).
"""

from analytics.importer.errors import ArchiveError

__all__ = ["ArchiveError"]
