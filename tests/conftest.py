"""Fixtures for real brokers and databases; see tests/support/ for the machinery.

Integration tests never skip because a service is missing: they fail and say how to get
it (``./scripts/test.sh`` starts PostgreSQL and Mosquitto), so a green run means they ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from support import (
    MosquittoError,
    MosquittoProcess,
    PostgresUnavailable,
    create_database,
    drop_database,
    port_accepts,
    tsdb_admin_url,
)

if TYPE_CHECKING:
    from analytics.broker import EmbeddedBroker

SYSTEM_MQTT_URL = "mqtt://127.0.0.1:1883"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto on a free port (shipped dev config), stopped afterwards.

    Its config, persistence file and log stay in ``tmp_path/mosquitto`` for post-mortems.
    """
    broker = MosquittoProcess(workdir=tmp_path / "mosquitto")
    try:
        broker.start()
    except MosquittoError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def system_mqtt_url() -> str:
    """The shared broker on 127.0.0.1:1883 (or ``CIVICMESH_TEST_MQTT_URL``)."""
    url = os.environ.get("CIVICMESH_TEST_MQTT_URL") or SYSTEM_MQTT_URL
    parts = urlsplit(url)
    if not port_accepts(parts.port or 1883, parts.hostname or "127.0.0.1"):
        pytest.fail(
            f"no MQTT broker at {url}; run the suite with ./scripts/test.sh (it starts "
            "Mosquitto on 127.0.0.1:1883) or set CIVICMESH_TEST_MQTT_URL",
            pytrace=False,
        )
    return url


@pytest.fixture
def pg_database() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped (WITH (FORCE)) afterwards."""
    try:
        url = create_database()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def tsdb_database() -> Iterator[str]:
    """URL of a fresh, empty database on the TimescaleDB test server (fails, saying how
    to get one, when the run has none)."""
    try:
        server = tsdb_admin_url()
        url = create_database(server)
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        drop_database(url, server)


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The in-process amqtt broker (MQTT 3.1.1) on a free loopback port."""
    from analytics.broker import EmbeddedBroker

    broker = EmbeddedBroker(host="127.0.0.1", port=0)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
