"""`coordinator certs init`: a CA and a server certificate a TLS client accepts for the named hosts only."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, init_certs


def _handshake(folder: Path, ca: Path, server_name: str) -> None:
    """A TLS handshake on 127.0.0.1 with the server certificate, the client trusting ``ca`` only."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(folder / SERVER_CERT, folder / SERVER_KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(timeout=5)
        listener.close()


def test_devices_trusting_the_ca_accept_the_coordinator_for_its_hosts(tmp_path: Path):
    folder = tmp_path / "certs"
    init_certs(folder, hosts=("coordinator.example", "127.0.0.1"))

    _handshake(folder, folder / CA_CERT, "127.0.0.1")
    _handshake(folder, folder / CA_CERT, "coordinator.example")
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _handshake(folder, folder / CA_CERT, "elsewhere.example")

    other = tmp_path / "other"
    init_certs(other)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(folder, other / CA_CERT, "127.0.0.1")  # a CA that did not sign it

    server = x509.load_pem_x509_certificate((folder / SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes()))
    for key in (CA_KEY, SERVER_KEY):
        assert (folder / key).stat().st_mode & 0o777 == 0o600


def test_certificates_are_never_overwritten(tmp_path: Path):
    init_certs(tmp_path)
    before = (tmp_path / CA_KEY).read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        init_certs(tmp_path)
    assert (tmp_path / CA_KEY).read_bytes() == before
