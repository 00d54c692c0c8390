"""An MQTT broker inside the process, for the one-command demo and for tests.

It runs amqtt 0.12 (pure Python, MQTT 3.1.1 only) on its own asyncio loop in a
background thread, so synchronous code (the paho-based :class:`civicmesh.mqtt.MqttLink`)
can use it like any external broker. It listens on loopback only and lets every client
in: fine on one machine, never on a network. Production uses Mosquitto
(``deploy/mosquitto/``); amqtt's throughput (~5-7k messages/s) is enough for a demo.

Clients negotiate down to 3.1.1 by themselves (``MqttLink(protocol="auto")``); there are
no shared subscriptions, so the embedded case runs one ingest worker on a plain
subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from civicmesh.errors import CivicmeshError

log = logging.getLogger(__name__)

# amqtt logs every connection and packet at INFO; the demo's console is for civicmesh.
_NOISY_LOGGERS = ("amqtt", "transitions")
# A disconnected persistent session keeps its queued messages this long (as Mosquitto's
# persistent_client_expiration in deploy/mosquitto/civicmesh-dev.conf).
SESSION_EXPIRY_S = 7 * 24 * 3600
_LISTENER = "default"
_MQTT_311 = 4
_CONNECT_TIMEOUT_S = 10.0
_MAX_CONNECT_BYTES = 64 * 1024
# CONNACK, remaining length 2, no session present, 0x01 "unacceptable protocol version":
# the 3.1.1 answer, which MQTT 5 clients understand as "try 3.1.1".
_CONNACK_UNACCEPTABLE_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])


class BrokerError(CivicmeshError):
    """The embedded broker could not start or stop."""

    reason = "broker.error"


class LoopbackAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Let every client in, without marking its session anonymous.

    amqtt's own AnonymousAuthPlugin flags sessions as anonymous, and amqtt then neither
    keeps a persistent session nor queues QoS 1 messages for it while it is away; ingest
    relies on exactly that across its own restarts. Access control is the loopback-only
    listener.
    """

    async def authenticate(self, *, session: Session) -> bool:
        return True


class _ReplayReader(StreamReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A stream reader that first returns bytes already read (the CONNECT packet)."""

    def __init__(self, reader: asyncio.StreamReader, consumed: bytes) -> None:
        super().__init__(reader)
        self._consumed = consumed

    async def read(self, n: int = -1) -> bytes:
        if not self._consumed:
            return bytes(await super().read(n))
        if n < 0:
            head, self._consumed = self._consumed, b""
            return head + bytes(await super().read(n))
        head, self._consumed = self._consumed[:n], self._consumed[n:]
        if len(head) < n:
            head += bytes(await super().read(n - len(head)))
        return head


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT control packet: fixed header, remaining length, body."""
    packet = bytearray(await reader.readexactly(1))
    remaining, shift = 0, 0
    for _ in range(4):  # remaining length: a varint of at most 4 bytes
        byte = (await reader.readexactly(1))[0]
        packet.append(byte)
        remaining |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    if remaining > _MAX_CONNECT_BYTES:
        raise ValueError(f"first packet of {remaining} bytes is too large for a CONNECT")
    packet += await reader.readexactly(remaining)
    return bytes(packet)


def _protocol_level(packet: bytes) -> int:
    """The protocol level of a CONNECT packet (4 = MQTT 3.1.1, 5 = MQTT 5)."""
    if packet[0] >> 4 != 1:
        raise ValueError("first packet is not a CONNECT")
    offset = 1
    while packet[offset] & 0x80:
        offset += 1
    offset += 1
    name_length = int.from_bytes(packet[offset : offset + 2], "big")
    level_at = offset + 2 + name_length
    if level_at >= len(packet):
        raise ValueError("CONNECT too short")
    return packet[level_at]


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"Invalid broker host {host!r}: use 127.0.0.1") from exc
    if not address.is_loopback:
        raise ValueError(
            f"Invalid broker host {host!r}: the embedded broker allows anonymous clients, "
            "so it listens on loopback only; use Mosquitto with TLS and ACLs for a network"
        )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedBroker:
    """amqtt in a background thread; ``start()`` returns once it accepts connections.

    With ``port=0`` a free port is chosen on the first start and kept, so ``stop()`` then
    ``start()`` is a broker restart that clients reconnect to by themselves. A restart
    loses sessions and queued messages (amqtt keeps them in memory only).

    The listening socket is ours, not amqtt's: it answers an MQTT 5 CONNECT itself with
    "unacceptable protocol version". amqtt would misread the MQTT 5 properties and wait
    for bytes that never come, stalling every MQTT 5-first client for its full connect
    timeout; 3.1.1 connections are handed to amqtt unchanged.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        _require_loopback(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"Invalid broker port {port}: use 1..65535, or 0 for a free one")
        self.host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        # Open client connections by the task serving each; touched on the loop only.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        if self._port == 0:
            raise BrokerError("the embedded broker has no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        return {
            # "external": amqtt binds nothing; connections come from _accept().
            "listeners": {_LISTENER: {"type": "external", "bind": f"{self.host}:{self._port}"}},
            "plugins": {f"{__name__}.{LoopbackAuthPlugin.__name__}": {}},
            "session_expiry_interval": SESSION_EXPIRY_S,
        }

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; raise :class:`BrokerError` if it does not listen within ``timeout``."""
        if self.running:
            raise BrokerError(f"the embedded broker already runs on {self.url}")
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        pick_port = self._port == 0
        # A port found free can be taken before we bind it: try another a few times.
        for attempt in range(3 if pick_port else 1):
            if pick_port:
                self._port = _free_port(self.host)
            try:
                self._start_thread(timeout)
                break
            except BrokerError:
                if attempt == 2 or not pick_port:
                    if pick_port:
                        self._port = 0
                    raise
                log.info("embedded broker: port %s was taken, trying another", self._port)
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", self.url)

    def _start_thread(self, timeout: float) -> None:
        self._ready.clear()
        self._startup_error = None
        thread = threading.Thread(
            target=self._run, name=f"embedded-broker-{self._port}", daemon=True
        )
        self._thread = thread
        thread.start()
        # _ready is set once the listening socket is bound: connections are accepted.
        if not self._ready.wait(timeout):
            raise BrokerError(f"embedded broker did not start within {timeout:.0f} s")
        if self._startup_error is not None:
            thread.join(timeout)
            self._thread = None
            raise BrokerError(
                f"embedded broker cannot listen on {self.host}:{self._port}: {self._startup_error}"
            ) from self._startup_error

    def _run(self) -> None:
        # asyncio.run cancels leftover tasks and closes the loop, so nothing leaks.
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            broker = Broker(self._config(), loop=self._loop)
            await broker.start()
        except Exception as exc:  # relayed to the thread waiting in start(), which raises
            self._startup_error = exc
            self._ready.set()
            return
        try:
            server = await asyncio.start_server(
                lambda r, w: self._accept(broker, r, w), self.host, self._port, reuse_address=True
            )
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            await broker.shutdown()
            return
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            server.close()
            # Drop the client connections before amqtt's shutdown: it cancels each
            # connection's reader, and on Python 3.11 a cancel racing a read can be lost,
            # leaving shutdown waiting for a reader that waits for the client.
            for writer in self._connections.values():
                writer.close()
            await broker.shutdown()
            await server.wait_closed()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=5)

    async def _accept(
        self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs each connection in its own task
        self._connections[task] = writer
        try:
            await self._handle(broker, reader, writer)
        finally:
            # Closed and waited for here, so no transport outlives the loop.
            writer.close()
            # Cancelled at shutdown is expected here: the task ends right after.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            del self._connections[task]

    async def _handle(
        self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            connect = await asyncio.wait_for(_read_packet(reader), _CONNECT_TIMEOUT_S)
            level = _protocol_level(connect)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("embedded broker: dropped a connection without a valid CONNECT: %s", exc)
            return
        if level != _MQTT_311:
            with contextlib.suppress(ConnectionError):
                writer.write(_CONNACK_UNACCEPTABLE_PROTOCOL)
                await writer.drain()
            return
        await broker.external_connected(
            _ReplayReader(reader, connect), StreamWriterAdapter(writer), _LISTENER
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Disconnect every client and stop listening; does nothing when not running."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None:
            # The loop may already be closed if the thread ended on its own.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout)
        if thread.is_alive():
            raise BrokerError(f"embedded broker on {self.url} did not stop within {timeout:.0f} s")
        self._thread = self._loop = self._stop_requested = None
        log.info("embedded MQTT broker on %s stopped", self.url)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
