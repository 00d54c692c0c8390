"""Central analytics service: ingest, storage, queries, API."""
