"""A TLS-1.3-only terminator in front of the SuperLink (issue 14).

Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs as HTTPS from uvicorn, on an
``ssl.SSLContext`` it makes itself with no minimum version, so it negotiates TLS 1.2 as well as 1.3. No
Flower option changes that, and it cannot be raised from outside: CPython sets a minimum of TLS 1.2 on
every new context, over OpenSSL's ``MinProtocol`` configuration. So with the terminator on,
``coordinator up`` binds the SuperLink to a loopback port and this proxy holds the public one: it
completes TLS 1.3 handshakes only (an older one fails and the connection is closed; asyncio drops the
``protocol_version`` alert OpenSSL made, so the client sees the connection end), then opens a TLS
connection of its own to the SuperLink, verified against the coordinator's CA, and copies bytes both
ways. TLS is re-originated rather than forwarded as plaintext because the SuperLink refuses SuperNode
authentication without its own TLS (``--insecure`` and ``--enable-supernode-auth`` exclude each other);
the check of the CA also means a local process that grabs the loopback port gets no traffic.

Every resource is bounded: at most ``max_connections`` at once, counted from ``accept`` so handshakes in
progress count too; a handshake timeout; an idle timeout over both directions together; when either
side closes or fails, both are closed; and each direction moves at most one 64 KiB chunk before it
waits for the other side to take it (``drain``), so nothing buffers without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CLOSE_TIMEOUT = 10.0  # for the last bytes and TLS's close_notify to get out; then the connection is dropped
# The SuperLink (uvicorn) speaks HTTP/1.1 only. Offering h2 would let a client that can do both pick
# HTTP/2 and then send a preface uvicorn cannot read; with no overlap the handshake goes on without ALPN.
ALPN = ("http/1.1",)


@dataclass(frozen=True)
class Limits:
    """How much one terminator may hold, and for how long."""

    max_connections: int = 1024  # client connections at once, handshaking ones included
    handshake_timeout: float = 10.0  # seconds from accept to a finished TLS handshake
    idle_timeout: float = 120.0  # seconds with no byte either way; Flower's clients give up after 30
    backend_timeout: float = 10.0  # seconds to connect to and handshake with the SuperLink

    @classmethod
    def within_open_files(cls) -> Limits:
        """The defaults, with no more connections than this process's open-file limit holds (two
        descriptors each, and room for the rest of the process), so accept never runs out of them."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls()
        return cls(max_connections=max(1, min(cls.max_connections, (soft - 128) // 2)))


def server_context(cert: Path, key: Path, alpn: tuple[str, ...] = ALPN) -> ssl.SSLContext:
    """The public side: TLS 1.3 and nothing older, with the coordinator's server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def backend_context(ca_cert: Path) -> ssl.SSLContext:
    """The loopback side: the SuperLink's certificate must chain to the coordinator's CA."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class TlsTerminator:
    """Accepts TLS 1.3 on ``listen`` and relays each connection to TLS on ``backend``."""

    def __init__(
        self,
        listen: tuple[str, int],
        backend: tuple[str, int],
        server_ssl: ssl.SSLContext,
        backend_ssl: ssl.SSLContext,
        *,
        backend_hostname: str | None = None,  # the name checked in the backend's certificate
        limits: Limits = Limits(),
    ) -> None:
        self.listen, self.backend, self.limits = listen, backend, limits
        self._server_ssl, self._backend_ssl = server_ssl, backend_ssl
        self._backend_hostname = backend_hostname or backend[0]
        self._listener: socket.socket | None = None
        self.port = 0  # the listening port, once bound (listen's port may be 0: any free one)
        self._connections: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections closed at accept because the limit was reached
        self.failed_handshakes = 0  # TLS 1.2 and older, timeouts, garbage

    def bind(self) -> int:
        """Open the listening socket (here, so a port in use fails in the caller); return its port."""
        if self._listener is None:
            host, port = self.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            dualstack = host == "::" and socket.has_dualstack_ipv6()
            self._listener = socket.create_server(
                (host, port), family=family, backlog=128, dualstack_ipv6=dualstack
            )
            self._listener.setblocking(False)
            self.port = int(self._listener.getsockname()[1])
        return self.port

    @property
    def active(self) -> int:
        return len(self._connections)

    async def serve(self) -> None:
        """Accept until cancelled; then close the listener and every connection."""
        self.bind()
        listener = self._listener
        assert listener is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, peer = await loop.sock_accept(listener)
                except OSError as exc:  # out of file descriptors, say: wait rather than spin
                    log.warning("TLS terminator: accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                if len(self._connections) >= self.limits.max_connections:
                    self.refused += 1
                    conn.close()
                    continue
                task = loop.create_task(self._handle(conn, peer))
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)
        finally:
            listener.close()
            self._listener = None
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _handle(self, conn: socket.socket, peer: object) -> None:
        loop = asyncio.get_running_loop()
        writers: list[asyncio.StreamWriter] = []
        try:
            client = asyncio.StreamReader(limit=CHUNK)
            try:  # returns once the handshake is done; on failure asyncio closes the socket
                transport, protocol = await loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(client),
                    conn,
                    ssl=self._server_ssl,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
            except OSError as exc:  # ssl.SSLError (TLS 1.2 offered, say) and timeouts are OSErrors
                self.failed_handshakes += 1
                log.debug("TLS terminator: handshake with %s failed: %s", peer, exc)
                return
            writers.append(asyncio.StreamWriter(transport, protocol, client, loop))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for could swallow a `stop` (a cancel) that
            # came as the connection completed, and the relay then held `stop` up until the idle timeout.
            try:
                async with asyncio.timeout(self.limits.backend_timeout):
                    backend, backend_writer = await asyncio.open_connection(
                        *self.backend,
                        ssl=self._backend_ssl,
                        server_hostname=self._backend_hostname,
                        ssl_handshake_timeout=self.limits.backend_timeout,
                        limit=CHUNK,
                    )
            except ssl.SSLError as exc:  # its certificate does not chain to the CA or lacks the name
                log.error("TLS terminator: refused the SuperLink at %s:%s: %s", *self.backend, exc)
                return
            except OSError as exc:  # not listening (yet: `up` polls through here while it starts)
                log.debug("TLS terminator: SuperLink at %s:%s: %s", *self.backend, exc)
                return
            writers.append(backend_writer)
            await self._relay(client, writers[0], backend, backend_writer)
        finally:
            if not writers:  # no transport kept it: close it here (twice is harmless)
                conn.close()
            task = asyncio.current_task()
            shutting_down = task is not None and task.cancelling() > 0  # `stop`: do not linger
            await asyncio.gather(*(_close(w, 1.0 if shutting_down else CLOSE_TIMEOUT) for w in writers))

    async def _relay(
        self,
        client: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        backend: asyncio.StreamReader,
        backend_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until either side closes or fails, or nothing moves for ``idle_timeout``."""
        loop = asyncio.get_running_loop()
        idle = self.limits.idle_timeout
        last = loop.time()

        def touch() -> None:
            nonlocal last
            last = loop.time()

        async def watch() -> None:
            while (left := last + idle - loop.time()) > 0:
                await asyncio.sleep(left)
            log.debug("TLS terminator: closing a connection idle for %.0f s", idle)

        tasks = [
            loop.create_task(_pump(client, backend_writer, touch)),
            loop.create_task(_pump(backend, client_writer, touch)),
            loop.create_task(watch()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, touch: Callable[[], None]
) -> None:
    """One direction: a chunk at a time, each passed on before the next is read."""
    while data := await reader.read(CHUNK):
        touch()
        writer.write(data)
        await writer.drain()
        touch()


async def _close(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Flush and close with TLS's close_notify if the peer answers in time; else drop the connection."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (OSError, TimeoutError):
        writer.transport.abort()


class TerminatorThread:
    """Runs a terminator's event loop in a daemon thread of ``fleetlora coordinator up``.

    In the same process as the SuperLink's parent, so it can neither outlive it nor be left behind:
    ``stop`` ends it, and ``alive`` tells the parent if it died on its own.
    """

    def __init__(self, terminator: TlsTerminator) -> None:
        self.terminator = terminator
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="tls-terminator", daemon=True)

    def start(self) -> TerminatorThread:
        self.terminator.bind()  # raises here if the port is taken
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self.terminator.port

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        self._task = self._loop.create_task(self.terminator.serve())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("TLS terminator stopped")
        finally:
            self._loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection; return once the thread has ended."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._cancel)
            self._thread.join(timeout)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
