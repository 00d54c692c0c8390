"""A small synchronous MQTT link over paho-mqtt 2.x, shared by edge, gateway and ingest.

Why paho: it is the one Python client with manual acknowledgement
(``Client(..., manual_ack=True)`` then ``client.ack(mid, qos)``), which ingest needs to
acknowledge a message only after the database committed it.

- ``publish`` waits for the broker's PUBACK (QoS 1) and raises :class:`MqttError` when
  it does not come: callers keep the message in their durable outbox until then.
- MQTT 5 is tried first; a broker that refuses it (amqtt speaks 3.1.1 only) gets 3.1.1.
- paho's network thread reconnects with exponential backoff (1 s .. 30 s) and every
  subscription is renewed on each connect.
- A handler never takes the link down: it runs inside a guard that logs and counts what
  it raised, hands the message to the subscription's ``on_error`` (to quarantine it) and
  then acknowledges it, so a poison message is not redelivered for ever.
- The owner keeps the link alive: :meth:`MqttLink.maintain`, called from the owner's main
  loop, connects a link that never connected (booted offline) and rebuilds one whose
  network thread died, with its own backoff (1 s .. ``reconnect_max_s``); :attr:`healthy`
  is what a systemd watchdog should watch.
- ``persistent=True`` asks for a persistent session (clean start off, session expiry
  set), so the broker queues QoS 1 messages while the subscriber is away.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from civicmesh.errors import MqttError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (TLS, default port 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise ValueError(f"Invalid MQTT URL {url!r}: use mqtt://host:port or mqtts://host:port")
        if not parts.hostname:
            raise ValueError(f"Invalid MQTT URL {url!r}: no host")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A received message; with manual acknowledgement, pass it to :meth:`MqttLink.ack`."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    # Which connection of its link delivered it: a packet id means something only on the
    # connection it came with, so an acknowledgement is never sent on a later one.
    connection: int = 0


Handler = Callable[[Message], None]
# Called with a message whose handler raised and the exception; returns whether the
# message is dealt with (acknowledge it: True) or must stay unacknowledged (False).
ErrorHandler = Callable[[Message, Exception], bool]


class MqttLink:
    """One MQTT connection with acknowledged publishing and renewed subscriptions."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        persistent: bool = False,
        manual_ack: bool = False,
        protocol: str = "auto",
        keepalive: int = 30,
        max_inflight: int = 100,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        reconnect_max_s: float = 60.0,
    ) -> None:
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"Invalid MQTT protocol {protocol!r}: use auto, 5 or 3.1.1")
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.persistent = persistent
        self.manual_ack = manual_ack
        self._protocol_choice = protocol
        self._keepalive = keepalive
        self._max_inflight = max_inflight
        self._tls = (tls_ca, tls_cert, tls_key)
        self._will: tuple[str, bytes] | None = None
        self.connections = 0  # successful connects so far (each a new packet-id space)
        self._subscriptions: dict[str, tuple[int, Handler, ErrorHandler | None]] = {}
        self._subacks: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._client: paho.Client | None = None
        self.protocol_version = 0
        self.handler_errors = 0  # messages whose handler raised (each logged)
        self.rebuilds = 0  # connections maintain() made after a dead or missing one
        self._reconnect_max_s = reconnect_max_s
        self._backoff_s = 1.0
        self._next_attempt = 0.0  # monotonic time of maintain()'s next connect attempt
        self._closed = False

    @property
    def protocol_choice(self) -> str:
        return self._protocol_choice

    @property
    def tls_args(self) -> dict[str, str | None]:
        """The TLS files, as the constructor takes them (for a second link like this one)."""
        ca, cert, key = self._tls
        return {"tls_ca": ca, "tls_cert": cert, "tls_key": key}

    def set_will(self, topic: str, payload: bytes) -> None:
        """A retained message the broker publishes when this client vanishes (from the
        next connect on)."""
        self._will = (topic, payload)

    # ----------------------------------------------------------------- lifecycle

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (MQTT 5 first when ``auto``) and start the network thread."""
        self._closed = False
        choices = {"auto": [5, 4], "5": [5], "3.1.1": [4]}[self._protocol_choice]
        last_error = ""
        for version in choices:
            try:
                self._start(version, timeout)
                self.protocol_version = version
                log.info(
                    "MQTT %s connected to %s:%s as %s",
                    "5" if version == 5 else "3.1.1",
                    self.address.host,
                    self.address.port,
                    self.client_id,
                )
                return
            except MqttError as exc:
                last_error = str(exc)
                self._stop()
        raise MqttError(
            f"Cannot connect to MQTT broker {self.address.host}:{self.address.port}: {last_error}"
        )

    def _start(self, version: int, timeout: float) -> None:
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs: dict[str, object] = {}
        if version == 4:
            kwargs["clean_session"] = not self.persistent
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            manual_ack=self.manual_ack,
            **kwargs,  # type: ignore[arg-type]
        )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        if self.address.username:
            client.username_pw_set(self.address.username, self.address.password)
        ca, cert, key = self._tls
        if self.address.tls or ca:
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._refused = None
        self._connected.clear()
        props = None
        clean_start: bool | Literal[3] = paho.MQTT_CLEAN_START_FIRST_ONLY
        if version == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.persistent:
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                clean_start = False
            else:
                clean_start = True
        self._client = client
        try:
            if version == 5:
                client.connect(
                    self.address.host,
                    self.address.port,
                    keepalive=self._keepalive,
                    clean_start=clean_start,
                    properties=props,
                )
            else:
                client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
        except OSError as exc:
            raise MqttError(str(exc)) from None
        client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused is not None:
                raise MqttError(f"broker refused the connection: {self._refused}")
            if time.monotonic() > deadline:
                raise MqttError(f"no CONNACK within {timeout:.0f} s")

    def _stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread; :meth:`maintain` stops too."""
        self._closed = True
        self._stop()

    def _thread_alive(self) -> bool:
        client = self._client
        # paho keeps its network thread in a private attribute; None before loop_start().
        thread = getattr(client, "_thread", None) if client is not None else None
        return isinstance(thread, threading.Thread) and thread.is_alive()

    @property
    def healthy(self) -> bool:
        """The link works or is being worked on: its network thread runs (paho reconnects
        by itself), or :meth:`maintain` has a connect attempt scheduled. False when the
        network thread died and nobody called :meth:`maintain` since."""
        if self._client is None:
            return not self._closed and time.monotonic() < self._next_attempt + 5.0
        return self._thread_alive()

    def maintain(self, timeout: float = 5.0) -> bool:
        """Keep the link up; call it from the owner's loop. Returns :attr:`is_connected`.

        A link that never connected (broker down at boot) or whose network thread died
        is connected afresh, at most once per backoff interval (1 s doubling to
        ``reconnect_max_s``); a link whose thread runs is left to paho's own reconnect."""
        if self._closed:
            return False
        if self._client is not None and self._thread_alive():
            return self.is_connected
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        if self._client is not None:
            log.error(
                "MQTT network thread for %s:%s died; rebuilding the connection",
                self.address.host,
                self.address.port,
            )
            self._stop()
        try:
            self.connect(timeout)
        except MqttError as exc:
            self._next_attempt = time.monotonic() + self._backoff_s
            log.warning("MQTT %s; next attempt in %.0f s", exc, self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, self._reconnect_max_s)
            return False
        self.rebuilds += 1
        self._backoff_s = 1.0
        self._next_attempt = 0.0
        return True

    def __enter__(self) -> MqttLink:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_connected(self) -> bool:
        # A dead network thread leaves the flag set; such a link is not connected.
        return self._connected.is_set() and self._thread_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ callbacks

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.info("MQTT broker refused connection: %s", reason)
            return
        _no_delay(client)
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic_filter, (qos, _handler, _on_error) in subscriptions:
            client.subscribe(topic_filter, qos=qos)
        self.connections += 1
        self._connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        if client is not self._client:  # close() dropped it: a disconnect we asked for
            log.debug("MQTT connection to %s closed", self.address.host)
        elif self._connected.is_set():
            log.warning("MQTT connection to %s lost: %s", self.address.host, reason)
        self._connected.clear()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        message = Message(
            msg.topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain), self.connections
        )
        qos, handler, on_error = self._subscription_for(msg.topic)
        if handler is None:
            # Not acknowledged on purpose: a persistent session redelivers it once a
            # handler is subscribed (a message can arrive before subscribe() after a restart).
            log.warning(
                "MQTT message on %s matches no subscription yet; left unacknowledged", msg.topic
            )
            return
        if qos == 0:
            # nothing to acknowledge was asked for; a broker that delivers above the
            # subscription's QoS anyway (amqtt) is answered at once
            self.ack(message)
        try:
            handler(message)
        # The guard: whatever a handler raises must not unwind paho's network thread.
        except Exception as exc:
            self._handler_failed(message, qos, exc, on_error)

    def _handler_failed(
        self, message: Message, qos: int, exc: Exception, on_error: ErrorHandler | None
    ) -> None:
        """A handler raised: log and count it, let ``on_error`` quarantine the message,
        then acknowledge it (unless ``on_error`` says it must stay unacknowledged)."""
        self.handler_errors += 1
        log.error(
            "MQTT handler for %s raised %s: %s",
            message.topic,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        settle = True
        if on_error is not None:
            try:
                settle = on_error(message, exc)
            except Exception as second:  # the same guard for the error handler
                log.error("MQTT error handler for %s raised too: %r", message.topic, second)
                settle = True
        if settle and qos > 0:
            self.ack(message)

    def _subscription_for(self, topic: str) -> tuple[int, Handler | None, ErrorHandler | None]:
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic_filter, (qos, handler, on_error) in subscriptions:
            plain = (
                topic_filter.split("/", 2)[2]
                if topic_filter.startswith("$share/")
                else topic_filter
            )
            if paho.topic_matches_sub(plain, topic):
                return qos, handler, on_error
        return 0, None, None

    # ------------------------------------------------------------------- actions

    def _require(self) -> paho.Client:
        if self._client is None:
            raise MqttError("MQTT link is not connected; call connect() first")
        return self._client

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10
    ) -> None:
        """Publish and, for QoS >= 1, wait for the broker's acknowledgement.

        QoS 0 returns at once, so it is also what a handler running in paho's own thread
        may publish (waiting for a PUBACK there would deadlock)."""
        client = self._require()
        if not self.is_connected:
            raise MqttError("not connected to the broker")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        deadline = time.monotonic() + timeout
        while not info.is_published():
            if time.monotonic() > deadline:
                raise MqttError(f"no PUBACK for {topic} within {timeout:.1f} s")
            if not self.is_connected:
                raise MqttError("connection lost before PUBACK")
            time.sleep(0.001)

    def publish_many(
        self, items: list[tuple[str, bytes]], *, qos: int = 1, timeout: float = 30
    ) -> int:
        """Publish several messages pipelined; return how many leading ones were acknowledged.

        The broker acknowledges in order per connection, but only the count of the
        acknowledged prefix is reported so a caller can release exactly those.
        """
        client = self._require()
        if not self.is_connected:
            raise MqttError("not connected to the broker")
        infos = []
        for topic, payload in items:
            info = client.publish(topic, payload, qos=qos)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            infos.append(info)
        deadline = time.monotonic() + timeout
        done = 0
        while done < len(infos):
            if infos[done].is_published():
                done += 1
                continue
            if time.monotonic() > deadline or not self.is_connected:
                break
            time.sleep(0.001)
        return done

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        on_error: ErrorHandler | None = None,
    ) -> None:
        """Subscribe now (if connected) and again after every reconnect.

        ``handler`` runs on paho's network thread inside a guard; when it raises,
        ``on_error`` (if given) gets the message and the exception, see :data:`ErrorHandler`.
        """
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler, on_error)
        if self._client is not None and self._connected.is_set():
            result, mid = self._client.subscribe(topic_filter, qos=qos)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._wait_suback(mid, 10.0)

    def _wait_suback(self, mid: int | None, timeout: float) -> None:
        """Wait for the broker to confirm a subscription, so nothing published after
        ``subscribe()`` returns can miss it."""
        if mid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if mid in self._subacks:
                    self._subacks.discard(mid)
                    return
            time.sleep(0.005)
        raise MqttError(f"no SUBACK from the broker within {timeout:.0f} s")

    def _on_subscribe(
        self, client: paho.Client, userdata: object, mid: int, reasons: object, props: object
    ) -> None:
        with self._lock:
            self._subacks.add(mid)

    def ack(self, message: Message) -> bool:
        """Acknowledge a message received with ``manual_ack=True``.

        Returns False when the message came on an earlier connection: its packet id may
        name another message now, and the broker redelivers it on this connection anyway.
        """
        if message.connection and message.connection != self.connections:
            log.debug("not acknowledging mid %d of an earlier connection", message.mid)
            return False
        if self.manual_ack and message.qos > 0 and self._client is not None:
            self._client.ack(message.mid, message.qos)
        return True


def _no_delay(client: paho.Client) -> None:
    """Turn off Nagle's algorithm: paho leaves it on, and a small PUBLISH or PUBACK then
    waits for the peer's delayed ACK (tens of ms per round trip when traffic flows both
    ways on the connection, as receipts make it)."""
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
