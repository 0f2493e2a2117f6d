"""Run an ASGI app with uvicorn in a background thread of the node.

uvicorn normally owns the process (signals, event loop); here the node owns the lifecycle,
so signal handlers are left to the node (:meth:`dicomnode.app.node.Node.serve_forever`)
and :meth:`HttpServer.stop` asks uvicorn to finish in-flight requests and exit.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from dicomnode.errors import ConfigError

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the node handles SIGTERM/SIGINT
        pass


class HttpServer:
    """uvicorn on ``host:port`` (port 0: a free port, see :attr:`port`)."""

    def __init__(self, app: ASGIApp, host: str, port: int, log_level: str = "warning") -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        self._server = _QuietServer(config)
        self._thread: threading.Thread | None = None
        self.host = host

    def start(self, timeout: float = 20.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ConfigError(
                    f"the HTTP port {self.host}:{self._server.config.port} cannot be bound "
                    "(in use?); see the log above"
                )
            if time.monotonic() > deadline:
                raise ConfigError("the HTTP server did not start in time")
            time.sleep(0.02)
        log.info("HTTP on http://%s:%d", self.host, self.port)

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
