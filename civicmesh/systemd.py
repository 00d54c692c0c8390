"""systemd service notifications (``Type=notify``, ``WatchdogSec=``) without a library.

A unit with ``Type=notify`` waits for ``READY=1``; with ``WatchdogSec=`` it restarts a
service that stops sending ``WATCHDOG=1``. Both are datagrams to ``$NOTIFY_SOCKET``; when
the variable is unset (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    # Never blocking: a receiver that does not read (a full queue: 10 datagrams by
    # default on Linux) must not stall the service's main loop. A lost WATCHDOG=1 is
    # harmless next to a device that stops publishing; the next tick sends another.
    with socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    ) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:  # BlockingIOError (full) included
            return False
    return True


class Watchdog:
    """Pets systemd's watchdog at half its interval when the main loop calls :meth:`tick`."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval_s = int(usec) / 2_000_000 if usec and usec.isdigit() else None
        self._last = 0.0

    def tick(self) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            notify("WATCHDOG=1")
            self._last = now
