"""Central ingest: MQTT -> verify -> one idempotent store write per group -> acknowledge.

The worker is split by job: :mod:`.receive` (paho's thread: queue, never block),
:mod:`.verify` (signatures, chain, readings, forwarded records), :mod:`.write` (the
store, with transient and permanent failures told apart), :mod:`.acknowledge` (PUBACK
after the commit, receipts to the gateways), and :mod:`.worker` (the thread, its
watchdog and the one-worker-per-session claim).
"""

from analytics.ingest.errors import IngestError
from analytics.ingest.worker import IngestWorker

__all__ = ["IngestError", "IngestWorker"]
