"""The test infrastructure itself: private brokers, the embedded broker, throw-away databases."""

from __future__ import annotations

import queue
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from support import MosquittoProcess, create_database, drop_database, free_port

from analytics.broker import EmbeddedBroker
from civicmesh.mqtt import Message, MqttLink

DELIVERY_TIMEOUT_S = 10.0


class Inbox:
    """Collects messages from a subscription, for assertions with a timeout."""

    def __init__(self) -> None:
        self._messages: queue.Queue[Message] = queue.Queue()

    def __call__(self, message: Message) -> None:
        self._messages.put(message)

    def next(self, timeout: float = DELIVERY_TIMEOUT_S) -> Message:
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message arrived within {timeout} s") from None

    def take(self, count: int, timeout: float = DELIVERY_TIMEOUT_S) -> list[Message]:
        return [self.next(timeout) for _ in range(count)]


def unique_topic() -> str:
    return f"civicmesh-test/{uuid.uuid4().hex}"


@contextmanager
def subscriber(url: str, client_id: str, topic: str, inbox: Inbox) -> Iterator[MqttLink]:
    """A persistent-session subscriber; subscribing before connect catches queued messages."""
    link = MqttLink(url, client_id, persistent=True)
    link.subscribe(topic, inbox, qos=1)
    link.connect()
    try:
        yield link
    finally:
        link.close()


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.integration
def test_private_mosquitto_is_loopback_only_and_uses_the_shipped_settings(
    mosquitto: MosquittoProcess,
) -> None:
    config = (mosquitto.workdir / "mosquitto.conf").read_text()
    assert f"listener {mosquitto.port} 127.0.0.1" in config
    assert "max_queued_messages 100000" in config
    # the shipped listener line was replaced, not added to (the free port may contain 1883)
    assert not re.search(r"listener 1883\b", config)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"


@pytest.mark.integration
def test_restart_keeps_queued_qos1_message_of_persistent_session(
    mosquitto: MosquittoProcess,
) -> None:
    topic, inbox = unique_topic(), Inbox()
    with subscriber(mosquitto.url, "ingest-restart", topic, inbox) as link:
        assert link.protocol_version == 5
    with MqttLink(mosquitto.url, "publisher") as publisher:
        publisher.publish(topic, b"queued while away", qos=1)

    mosquitto.restart()  # SIGTERM: mosquitto saves the queued message to disk

    with subscriber(mosquitto.url, "ingest-restart", topic, inbox):
        message = inbox.next()
    assert (message.topic, message.payload, message.qos) == (topic, b"queued while away", 1)


@pytest.mark.integration
def test_shipped_config_queues_more_than_mosquittos_default_1000(
    mosquitto: MosquittoProcess,
) -> None:
    topic, inbox = unique_topic(), Inbox()
    with subscriber(mosquitto.url, "ingest-backlog", topic, inbox):
        pass
    payloads = [f"batch {i}".encode() for i in range(1500)]
    with MqttLink(mosquitto.url, "publisher") as publisher:
        assert publisher.publish_many([(topic, p) for p in payloads]) == len(payloads)

    with subscriber(mosquitto.url, "ingest-backlog", topic, inbox):
        received = [m.payload for m in inbox.take(len(payloads))]
    assert received == payloads


@pytest.mark.integration
def test_killed_mosquitto_comes_back_on_the_same_port(mosquitto: MosquittoProcess) -> None:
    port = mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.port == port
    topic, inbox = unique_topic(), Inbox()
    with subscriber(mosquitto.url, "after-crash", topic, inbox) as link:
        link.publish(topic, b"alive", qos=1)
        assert inbox.next().payload == b"alive"


@pytest.mark.integration
def test_system_broker_round_trip(system_mqtt_url: str) -> None:
    topic, inbox = unique_topic(), Inbox()
    with subscriber(system_mqtt_url, f"support-{uuid.uuid4().hex[:8]}", topic, inbox) as link:
        link.publish(topic, b"hello", qos=1)
        assert inbox.next().payload == b"hello"


def test_embedded_broker_serves_mqtt_311_clients(embedded_broker: EmbeddedBroker) -> None:
    topic, inbox = unique_topic(), Inbox()
    with subscriber(embedded_broker.url, "ingest", topic, inbox) as link:
        assert link.protocol_version == 4  # amqtt refused MQTT 5; the link fell back
        with MqttLink(embedded_broker.url, "publisher") as publisher:
            publisher.publish(topic, b"reading batch", qos=1)
        message = inbox.next()
    assert (message.topic, message.payload) == (topic, b"reading batch")


def test_embedded_broker_queues_for_persistent_session_while_away(
    embedded_broker: EmbeddedBroker,
) -> None:
    topic, inbox = unique_topic(), Inbox()
    with subscriber(embedded_broker.url, "ingest-away", topic, inbox):
        pass
    with MqttLink(embedded_broker.url, "publisher") as publisher:
        publisher.publish(topic, b"while away", qos=1)
    with subscriber(embedded_broker.url, "ingest-away", topic, inbox):
        assert inbox.next().payload == b"while away"


def test_embedded_broker_restarts_on_the_same_port(embedded_broker: EmbeddedBroker) -> None:
    url = embedded_broker.url
    topic, inbox = unique_topic(), Inbox()
    with subscriber(url, "ingest-reconnect", topic, inbox) as link:
        embedded_broker.stop()
        assert not embedded_broker.running
        embedded_broker.start()
        assert embedded_broker.url == url
        assert link.wait_connected(timeout=15), "the link did not reconnect by itself"
        with MqttLink(url, "publisher") as publisher:
            publisher.publish(topic, b"after restart", qos=1)
        assert inbox.next().payload == b"after restart"


def test_embedded_broker_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host="0.0.0.0")


@pytest.mark.integration
def test_pg_database_is_fresh_and_writable(pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE reading (device text, value double precision)")
        conn.execute("INSERT INTO reading VALUES ('dev-1', 12.5)")
        assert conn.execute("SELECT device, value FROM reading").fetchall() == [("dev-1", 12.5)]


@pytest.mark.integration
def test_drop_database_removes_it_even_while_connected() -> None:
    url = create_database()
    name = url.rsplit("/", 1)[1]
    lingering = psycopg.connect(url)  # FORCE must disconnect this one
    try:
        drop_database(url)
    finally:
        lingering.close()
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(url, connect_timeout=5)
    assert name.startswith("civicmesh_test_")
