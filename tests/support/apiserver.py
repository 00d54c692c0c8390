"""A real uvicorn server for an ASGI app on a free 127.0.0.1 port, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .net import free_port


@contextmanager
def serve_app(
    app: Any,
    *,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
    start_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (``http(s)://127.0.0.1:port``).

    Waits (polling, with a deadline) until uvicorn listens; stops it and joins its thread
    afterwards."""
    import uvicorn  # the analytics extra; support is imported by every test module

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ssl_certfile=None if ssl_certfile is None else str(ssl_certfile),
        ssl_keyfile=None if ssl_keyfile is None else str(ssl_keyfile),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        scheme = "https" if ssl_certfile is not None else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
