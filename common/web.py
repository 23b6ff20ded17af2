"""One web stack for what fleetlora serves over HTTP: ASGI apps (Starlette) on uvicorn's h11 server.

The device's corpus ingest endpoint is served this way; the coordinator's console and metrics are
meant to be. :class:`WebServer` binds its socket when it is made (so port 0's pick is known at once
and a port in use is a one-line :class:`ConfigError`), then serves from whichever thread calls
:meth:`WebServer.serve_forever` until :meth:`WebServer.shutdown`.

Each connection is bounded:

* **time**: uvicorn closes an idle keep-alive connection, but it waits for ever on a client that
  connects and sends nothing, or half a request line, headers or body, and on one that stops reading
  its answer. Here a request must arrive whole within ``connection_seconds`` of the connection's
  opening (or of its first byte, after a keep-alive wait), however it trickles in; an answer must be
  taken with no stall that long. Otherwise the connection is dropped. While the app works on a
  complete request, no clock runs;
* **number**: a request that arrives while ``max_connections`` other connections are open is
  answered 503 and its connection closed (uvicorn's ``limit_concurrency``); half-sent ones are
  dropped by the clock above, so they hold the slots only that long;
* **size**: a request line with its headers over :data:`MAX_HEADER_BYTES` is answered 400 (h11);
  bodies are the app's to bound while it reads them.

This module imports uvicorn: import it only where something is about to be served, so the command
line stays quick to start.
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from fleetlora.common.errors import ConfigError

MAX_HEADER_BYTES = 16 * 1024  # the request line and its headers; h11 answers 400 beyond this
BACKLOG = 128  # pending connections the kernel holds before the server accepts them
SHUTDOWN_SECONDS = 5  # shutdown waits this long for answers in progress, then cancels them


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a clock on every connection the server is waiting on.

    uvicorn arms a timer only between requests (keep-alive): from the connection's opening to the end
    of its request, and while a client does not read its answer, it waits without limit. Here a
    request has :attr:`idle_seconds` in all to arrive whole, from the connection's opening or, after a
    keep-alive wait, from its first byte (bytes trickling in do not restart the clock); a client that
    leaves its answer unread that long, with the write buffer full, is dropped too. While the app
    works on a complete request, no timer runs.
    """

    idle_seconds: float = 10.0  # set per server by WebServer (its connection_seconds)

    _read_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_on_client():
            self._cancel_read()  # the request is whole: the app's turn
        elif self._read_timer is None:
            self._arm_read()  # the first byte of the next request on a kept-alive connection

    def pause_writing(self) -> None:
        super().pause_writing()
        self._cancel_write()
        self._write_timer = self.loop.call_later(self.idle_seconds, self._drop)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        self._cancel_write()
        super().connection_lost(exc)

    def _waiting_on_client(self) -> bool:
        """No request yet, the last one answered and the next one begun, or a body still arriving."""
        cycle = self.cycle
        return cycle is None or cycle.response_complete or cycle.more_body

    def _arm_read(self) -> None:
        self._cancel_read()
        if not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.idle_seconds, self._drop)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _cancel_write(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _drop(self) -> None:
        self._read_timer = self._write_timer = None
        self.transport.abort()  # not close(): that would wait for a buffer the client does not read


class WebServer:
    """An ASGI app served by uvicorn (h11, asyncio) on a socket bound at once.

    The methods follow :class:`socketserver.BaseServer`'s: ``server_address``, ``serve_forever``
    (blocks; run it in a thread to serve in the background), ``shutdown`` (from another thread:
    returns once ``serve_forever`` has), ``server_close``.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        connection_seconds: float = 10.0,
        max_connections: int = 32,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self._socket = _listen(host, port)
        self.server_address: tuple[Any, ...] = self._socket.getsockname()
        protocol = type("Protocol", (GuardedH11Protocol,), {"idle_seconds": connection_seconds})
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",  # nothing here speaks WebSocket; an Upgrade header is ignored
            lifespan="off",
            interface="asgi3",
            loop="asyncio",
            limit_concurrency=max_connections + 1,  # counts the asking connection: 503 past max
            timeout_keep_alive=max(1, math.ceil(connection_seconds)),
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            h11_max_incomplete_event_size=max_header_bytes,
            proxy_headers=False,  # no proxy in front: X-Forwarded-For is not believed
            server_header=False,
            log_config=None,  # the process's logging stays as the caller set it up
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._serving = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or, on the main thread, SIGINT/SIGTERM); once per server."""
        self._serving.set()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving: no new connections, answers in progress finish (for up to
        :data:`SHUTDOWN_SECONDS`), then ``serve_forever`` returns, before this does."""
        self._server.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        """Release the listening socket (``serve_forever`` releases it too, when it ends)."""
        self._socket.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses its port at once
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"Port {port} on {host} is in use by another program: stop it, or pick another port "
                "(0 picks a free one)."
            ) from None
        raise ConfigError(f"Cannot listen on {host} port {port}: {exc.strerror or exc}.") from None
    return sock
