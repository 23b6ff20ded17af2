"""The TLS-1.3-only terminator in front of the SuperLink (issue 14), over real sockets on 127.0.0.1.

The backend here is a small HTTPS server with the coordinator's certificates that, like Flower's
SuperLink, accepts TLS 1.2 as well as 1.3. The slow tests start the real SuperLink the way
``fleetlora coordinator up`` does.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import CoordinatorHost, load_host_config
from fleetlora.common.logs import search_logs
from fleetlora.coordinator import flower_control, superlink
from fleetlora.coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_certs
from fleetlora.coordinator.tls_terminator import (
    Limits,
    TerminatorThread,
    TlsTerminator,
    backend_context,
    server_context,
)

TLS12 = ssl.TLSVersion.TLSv1_2


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    init_certs(folder, ("localhost", "127.0.0.1"))
    return folder


class Backend(http.server.ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]


@contextlib.contextmanager
def backend(certs: Path) -> Iterator[Backend]:
    """HTTPS on a free port: GET /health answers 200, POST echoes its body; each request is recorded.
    HTTP/1.0, so it closes the connection after each answer."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.server.requests.append(f"GET {self.path}")  # type: ignore[attr-defined]
            self._answer(200 if self.path == "/health" else 404, b"ok")

        def do_POST(self) -> None:
            self.server.requests.append(f"POST {self.path}")  # type: ignore[attr-defined]
            self._answer(200, self.rfile.read(int(self.headers["Content-Length"])))

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = Backend(("127.0.0.1", 0), Handler)
    server.requests = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 and 1.3, as the SuperLink
    context.load_cert_chain(certs / SERVER_CERT, certs / SERVER_KEY)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def terminator(certs: Path, backend_port: int, **limits: Any) -> Iterator[TerminatorThread]:
    running = TerminatorThread(
        TlsTerminator(
            ("127.0.0.1", 0),
            ("127.0.0.1", backend_port),
            server_context(certs / SERVER_CERT, certs / SERVER_KEY),
            backend_context(certs / CA_CERT),
            limits=Limits(**limits),
        )
    ).start()
    try:
        yield running
    finally:
        running.stop()
    assert not running.alive


def client_context(certs: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / CA_CERT))
    if maximum is not None:
        context.maximum_version = maximum
    return context


@contextlib.contextmanager
def tls(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> Iterator[ssl.SSLSocket]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        yield sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a TLS close or a dropped connection both end it)."""
    data = b""
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def get(port: int, context: ssl.SSLContext, path: str = "/health") -> tuple[bytes, str]:
    with tls(port, context) as sock:
        version = str(sock.version())  # before the close, after which it is None
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return read_all(sock), version


def assert_refused(port: int, context: ssl.SSLContext) -> None:
    """The TLS handshake fails. The client sees the connection end rather than a protocol_version
    alert: asyncio drops the connection on a failed handshake without sending the alert OpenSSL made."""
    with pytest.raises((ssl.SSLError, ConnectionResetError)), tls(port, context):
        pass


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    """Polls ``predicate`` (returning as soon as it holds): a loaded CI machine may take seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_tls12_only_client_is_refused_while_the_backend_alone_would_take_it(certs: Path):
    with backend(certs) as server, terminator(certs, server.server_address[1]) as front:
        # The backend on its own negotiates TLS 1.2, as Flower's SuperLink does.
        answer, version = get(server.server_address[1], client_context(certs, maximum=TLS12))
        assert answer.startswith(b"HTTP/1.0 200") and version == "TLSv1.2"
        server.requests.clear()
        assert_refused(front.port, client_context(certs, TLS12))
        wait_until(lambda: front.terminator.failed_handshakes == 1)  # refused by the handshake itself
        wait_until(lambda: front.terminator.active == 0)
        assert server.requests == []  # nothing reached the backend


def test_a_tls13_client_gets_through_both_ways_and_the_backends_close_reaches_it(certs: Path):
    with backend(certs) as server, terminator(certs, server.server_address[1]) as front:
        answer, version = get(front.port, client_context(certs))
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"\r\n\r\nok")
        assert version == "TLSv1.3"  # read_all only returned because the backend's close came through
        body = os.urandom(3 * 1024 * 1024)  # far more than one chunk, so drain() has to wait
        with tls(front.port, client_context(certs)) as sock:
            assert sock.selected_alpn_protocol() is None  # no ALPN offered, none forced on the client
            sock.sendall(f"POST /echo HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert read_all(sock).split(b"\r\n\r\n", 1)[1] == body
        context = client_context(certs)
        context.set_alpn_protocols(["h2", "http/1.1"])  # the SuperLink speaks HTTP/1.1 only
        with tls(front.port, context) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
        assert server.requests == ["GET /health", "POST /echo"]
        wait_until(lambda: front.terminator.active == 0)


def test_a_client_that_connects_and_sends_nothing_is_dropped_after_the_handshake_timeout(certs: Path):
    with (
        backend(certs) as server,
        terminator(certs, server.server_address[1], handshake_timeout=0.5) as front,
    ):
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw:
            assert read_all(raw) == b""
        assert 0.4 < time.monotonic() - started < 10
        wait_until(lambda: front.terminator.active == 0)
        assert server.requests == []


def test_an_idle_session_is_closed_and_traffic_either_way_keeps_it_open(certs: Path):
    # Each byte of the slow client comes 0.1 s after the last: 0.9 s of slack for a loaded machine.
    with backend(certs) as server, terminator(certs, server.server_address[1], idle_timeout=1.0) as front:
        with tls(front.port, client_context(certs)) as sock:  # handshake done, then silence
            started = time.monotonic()
            assert read_all(sock) == b""
            assert 0.9 < time.monotonic() - started < 10
        with tls(front.port, client_context(certs)) as sock:  # a slow client that keeps sending
            for byte in b"GET /health HTTP/1.0\r\n":
                sock.send(bytes([byte]))
                time.sleep(0.1)  # 2.3 s in all, twice the idle timeout
            sock.sendall(b"\r\n")
            assert read_all(sock).startswith(b"HTTP/1.0 200")
        assert server.requests == ["GET /health"]


def test_the_connection_limit_holds_and_frees_when_a_connection_ends(certs: Path):
    with backend(certs) as server, terminator(certs, server.server_address[1], max_connections=2) as front:
        with contextlib.ExitStack() as held:
            first = held.enter_context(tls(front.port, client_context(certs)))
            held.enter_context(tls(front.port, client_context(certs)))
            wait_until(lambda: front.terminator.active == 2)
            assert_refused(front.port, client_context(certs))
            assert front.terminator.refused == 1 and front.terminator.failed_handshakes == 0
            first.close()
            wait_until(lambda: front.terminator.active == 1)
            answer, _ = get(front.port, client_context(certs))
            assert answer.startswith(b"HTTP/1.0 200")
        wait_until(lambda: front.terminator.active == 0)


def test_a_backend_whose_certificate_the_coordinator_ca_did_not_sign_gets_no_traffic(
    certs: Path, tmp_path: Path
):
    other = tmp_path / "other"
    init_certs(other, ("localhost", "127.0.0.1"))
    with backend(other) as server, terminator(certs, server.server_address[1]) as front:
        answer, _ = get(front.port, client_context(certs))
        assert answer == b"" and server.requests == []


def test_stopping_closes_the_port_and_the_open_connections(certs: Path):
    with backend(certs) as server, terminator(certs, server.server_address[1]) as front:
        port = front.port
        with tls(port, client_context(certs)) as sock:
            wait_until(lambda: front.terminator.active == 1)
            front.stop(timeout=60)  # returns as soon as the thread has ended
            assert not front.alive and read_all(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ---- the setting, and the real SuperLink started as `fleetlora coordinator up` starts it


@pytest.mark.parametrize(
    ("settings", "bind"),
    [
        ("", ("127.0.0.1", 9093)),  # on by default: the SuperLink on loopback, port + 1
        ("internal-port = 9500\n", ("127.0.0.1", 9500)),
        ("tls-terminator = false\n", ("0.0.0.0", 9092)),  # off: the SuperLink on the public port
    ],
)
def test_the_superlink_listens_where_the_setting_says(tmp_path: Path, settings: str, bind: tuple[str, int]):
    config = tmp_path / "fleetlora.toml"
    config.write_text(f'[coordinator]\nhost = "0.0.0.0"\nport = 9092\n{settings}')
    host = load_host_config(config).coordinator
    assert host.superlink_bind == bind and host.address == "127.0.0.1:9092"  # clients: unchanged
    assert superlink.superlink_command(host)[1:5] == ["--host", bind[0], "--port", str(bind[1])]


def test_an_internal_port_equal_to_the_public_one_is_refused(tmp_path: Path):
    host = CoordinatorHost(port=9092, internal_port=9092, state_dir=tmp_path)
    init_certs(host.certs_dir)
    with pytest.raises(ConfigError, match="internal-port"):
        superlink.start(host)


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the public port and the SuperLink's default internal one)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            with contextlib.suppress(OSError), socket.socket() as other:
                other.bind(("127.0.0.1", port + 1))
                return port
    raise AssertionError("no two free ports in a row")


@pytest.mark.slow
def test_the_real_superlink_refuses_tls12_only_through_the_terminator(tmp_path: Path):
    host = CoordinatorHost(port=free_port_pair(), state_dir=tmp_path / "coordinator")
    host.state_dir.mkdir()
    superlink.prepare(host)
    assert superlink.superlink_command(host)[1:5] == ["--host", "127.0.0.1", "--port", str(host.port + 1)]
    running = superlink.start(host, tmp_path / "superlink.log")  # returns once /health answers via TLS 1.3
    try:
        certs = host.certs_dir
        answer, version = get(host.port, client_context(certs))
        assert answer.startswith(b"HTTP/1.1 200") and version == "TLSv1.3"
        assert_refused(host.port, client_context(certs, TLS12))
        # Behind it, on loopback only, Flower's SuperLink still takes TLS 1.2: the reason for all this.
        # Should this start failing, a Flower upgrade may let the terminator go (docs/security.md).
        answer, version = get(host.port + 1, client_context(certs, maximum=TLS12))
        assert answer.startswith(b"HTTP/1.1 200") and version == "TLSv1.2"
        assert flower_control.list_runs(host) == []  # the operator CLI (httpx) through the terminator
    finally:
        assert running.stop() is not None
    assert not running.terminator or not running.terminator.alive
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", host.port), timeout=5).close()


@pytest.mark.slow
def test_coordinator_up_exits_non_zero_when_its_superlink_dies_and_cleanly_on_sigterm(tmp_path: Path):
    port, metrics_port = free_port_pair(), free_port_pair()
    config = tmp_path / "fleetlora.toml"
    config.write_text(
        f'[coordinator]\nport = {port}\nstate-dir = "coordinator"\nmetrics-port = {metrics_port}\n'
    )
    host = CoordinatorHost(port=port, state_dir=tmp_path / "coordinator")

    log = tmp_path / "up.log"

    def ready_logged() -> int:
        return sum(e.get("event") == "superlink_ready" for e in search_logs(host.log_dir, "SuperLink"))

    def up() -> psutil.Popen:
        readies = ready_logged() if host.log_dir.is_dir() else 0
        process = psutil.Popen(
            [sys.executable, "-m", "fleetlora", "coordinator", "up", "--config", str(config)],
            cwd=tmp_path,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `up`, the SuperLink and its helpers: one group to clean up
        )
        try:
            # /health can answer the test before `up` has seen it: until `up` logs the SuperLink ready,
            # a SuperLink that dies is one that failed to start, a different path from the one tested.
            wait_until(lambda: _health(host, process, log) and ready_logged() > readies, timeout=120)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        return process

    for ending in ("the SuperLink dies", "SIGTERM"):
        process = up()
        try:
            (child,) = [c for c in process.children() if "flower-superlink" in " ".join(c.cmdline())]
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as answer:
                assert b"fleetlora_database_up 1.0" in answer.read()  # served while the SuperLink runs
            if ending == "SIGTERM":
                process.send_signal(signal.SIGTERM)
                assert process.wait(30) == 0
                assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
            else:
                child.kill()
                assert process.wait(30) != 0
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    lifecycle = ("metrics_started", "superlink_ready", "superlink_died", "superlink_stopped")
    events = [e.get("event") for e in search_logs(host.log_dir, component="coordinator")]
    assert [e for e in events if e in lifecycle] == [*lifecycle[:3], *lifecycle[:2], lifecycle[3]]


def _health(host: CoordinatorHost, process: psutil.Popen, log: Path) -> bool:
    assert process.poll() is None, log.read_text()[-3000:]
    try:
        answer, version = get(host.port, client_context(host.certs_dir))
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.1 200") and version == "TLSv1.3"
