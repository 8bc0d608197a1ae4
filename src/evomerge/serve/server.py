"""Running the app: `serve_forever` for the command line, `serve_in_thread` for tests and benchmarks.

`serve_in_thread` binds 127.0.0.1 on a free port itself (port 0, so two tests never race for one), runs
uvicorn in a daemon thread, waits a bounded time for it to start and stops it on exit. Tests of the
black-box combination start their stand-in "closed" endpoints with it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from evomerge.extras import import_extra


def serve_forever(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    uvicorn = import_extra("uvicorn", who="evomerge serve", extra="serve")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", startup_timeout_s: float = 30.0, stop_timeout_s: float = 10.0
) -> Iterator[str]:
    """Run `app` on `host` at a free port in a background thread; yield its base URL ("http://host:port/v1").

    Raises RuntimeError when the server has not started within `startup_timeout_s`.
    """
    uvicorn = import_extra("uvicorn", who="evomerge serve", extra="serve")
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it
    # Nagle's algorithm and delayed ACKs add about 40 ms to every answer written in two pieces.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    try:
        _wait_started(server, thread, startup_timeout_s)
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
        sock.close()


def _wait_started(server: Any, thread: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited before it started (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start within {timeout_s} s")
        time.sleep(0.01)
