"""Running the app with uvicorn on a socket bound up front, so port 0 works and the base
URL is known before the server starts; in the foreground or on a thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from meshpy.errors import NetworkError

__all__ = ["AppServer", "bind"]

log = logging.getLogger(__name__)

#: Seconds open streams get to finish when the server stops; then they are cancelled (and
#: their generations with them).
GRACEFUL_SHUTDOWN = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host:port` (port 0: a free one); NetworkError if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening now, not when uvicorn starts: clients that connect as soon as the URL is
        # printed wait in the backlog instead of being refused.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise NetworkError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class AppServer:
    """uvicorn serving `app` on `host:port` (port 0: a free one, see `port`), or on a
    socket from `bind`."""

    def __init__(
        self, app: Starlette, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None
    ) -> None:
        self.socket = sock if sock is not None else bind(host, port)
        self.host = self.socket.getsockname()[0]
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN, lifespan="on", access_log=False
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's root, e.g. `http://127.0.0.1:8000`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What OpenAI clients take as `base_url`: the root plus `/v1`."""
        return self.url + "/v1"

    def serve_forever(self) -> None:
        """Serves until SIGINT or SIGTERM (when on the main thread) or `stop`."""
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> AppServer:
        """Serves on a thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="meshpy-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the HTTP server did not start within {timeout:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the server (open streams get GRACEFUL_SHUTDOWN seconds) and waits for it."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.socket.close()

    def __enter__(self) -> AppServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
