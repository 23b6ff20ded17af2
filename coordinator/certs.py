"""TLS for the SuperLink: a private CA and a server certificate it signs (``coordinator certs init``).

Devices trust the CA certificate (``ca.crt``) and verify the SuperLink's certificate against it, so
the server certificate must name every address devices dial (``--host`` options: DNS names or IP
addresses). The CA key stays on the coordinator host; a real deployment may use certificates from
its own CA instead (docs/operator.md). Keys are ECDSA P-384, written 0600 and never overwritten.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import write_private_key_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
KEY_USAGES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
    "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
)  # fmt: skip
# The CA signs certificates and revocation lists, nothing else.
CA_KEY_USAGE = x509.KeyUsage(**{usage: usage in ("key_cert_sign", "crl_sign") for usage in KEY_USAGES})


def init_certs(folder: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 825) -> list[Path]:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` for ``hosts``; refuse to overwrite."""
    paths = [folder / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    present = [p for p in paths if p.exists()]
    if present:
        raise ConfigError(f"{present[0]} already exists: move the old certificates away to make new ones.")
    if not hosts:
        raise ConfigError("Name at least one host (DNS name or IP address) devices connect to.")
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetlora coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write_key(folder / CA_KEY, ca_key)
    _write_key(folder / SERVER_KEY, server_key)
    (folder / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_key_bytes(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
