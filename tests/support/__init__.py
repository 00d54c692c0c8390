"""Test infrastructure shared by the whole suite: ports, private brokers, databases.

Importable from any test module as ``support`` (pytest puts ``tests/`` on ``sys.path``
for test modules without an ``__init__.py``); the fixtures live in ``tests/conftest.py``.
"""

from .apiserver import serve_app
from .batches import relayed_batch
from .mosquitto import DEV_CONFIG, MosquittoError, MosquittoProcess, mosquitto_binary
from .net import free_port, port_accepts, wait_for_port
from .postgres import (
    DEFAULT_ADMIN_URL,
    PostgresUnavailable,
    TimescaleUnavailable,
    admin_url,
    create_database,
    database_url,
    drop_database,
    quiet_policy,
    tsdb_admin_url,
    tsdb_nopreload_admin_url,
)

__all__ = [
    "DEFAULT_ADMIN_URL",
    "DEV_CONFIG",
    "MosquittoError",
    "MosquittoProcess",
    "PostgresUnavailable",
    "TimescaleUnavailable",
    "admin_url",
    "create_database",
    "database_url",
    "drop_database",
    "free_port",
    "mosquitto_binary",
    "port_accepts",
    "quiet_policy",
    "relayed_batch",
    "serve_app",
    "tsdb_admin_url",
    "tsdb_nopreload_admin_url",
    "wait_for_port",
]
