"""Key files: private keys written owner-only (0600) and never overwritten, public keys as PEM.

The coordinator holds an X25519 key pair (devices encrypt uploads to it) and an Ed25519 signing key
(it signs update packages); a device holds an Ed25519 key that signs its uploads. Private keys are
PKCS#8 PEM, public keys SubjectPublicKeyInfo PEM, both readable by standard tools (``openssl pkey``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fleetlora.common.errors import ConfigError
from fleetlora.common.trusted_paths import check_trusted, make_trusted_folder

# File names, the same on every machine: the coordinator's in its keys folder, the device's in its
# state folder.
COORDINATOR_HPKE_KEY = "coordinator-hpke.key"
COORDINATOR_HPKE_PUB = "coordinator-hpke.pub"
COORDINATOR_SIGNING_KEY = "coordinator-signing.key"
COORDINATOR_SIGNING_PUB = "coordinator-signing.pub"
DEVICE_SIGNING_KEY = "device-signing.key"
DEVICE_SIGNING_PUB = "device-signing.pub"

PrivateKey = Ed25519PrivateKey | X25519PrivateKey
PublicKey = Ed25519PublicKey | X25519PublicKey
PrivateKeyT = TypeVar("PrivateKeyT", Ed25519PrivateKey, X25519PrivateKey)
PublicKeyT = TypeVar("PublicKeyT", Ed25519PublicKey, X25519PublicKey)  # callers name the kind they expect


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Create ``path`` with mode 0600 and the key in it; refuse to replace an existing key."""
    write_private_key_bytes(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def write_private_key_bytes(path: Path, blob: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``blob`` (a PEM private key, or a raw secret key); never
    replace a file."""
    make_trusted_folder(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists: move it away first if you mean to replace that key."
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())


def read_public_key(path: Path, kind: type[PublicKeyT]) -> PublicKeyT:
    """A public key from a file no other local user can change (``common/trusted_paths.py``)."""
    if not path.is_file():
        raise ConfigError(f"No public key at {path}: copy it from the machine that made it.")
    check_trusted(path.parent)
    check_trusted(path)
    return load_public_key(path.read_bytes(), kind, str(path))


def write_public_key(path: Path, key: PublicKey) -> None:
    """Write (or replace) a public key, mode 0644, in an owner-only folder."""
    make_trusted_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o644)  # an existing file keeps its mode through open; this sets it
        handle.write(public_pem(key))


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_private_key(path: Path, kind: type[PrivateKeyT]) -> PrivateKeyT:
    """Load a private key of ``kind``; refuse a file that others can read."""
    if not path.is_file():
        raise ConfigError(
            f"No key at {path}: create it first (fleetlora coordinator keys init / device enroll)."
        )
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} is readable by other users: run `chmod 600 {path}`.")
    check_trusted(path.parent)
    check_trusted(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, kind):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not a {kind.__name__}.")
    return key


def load_public_key(pem: bytes, kind: type[PublicKeyT], source: str) -> PublicKeyT:
    """Parse a PEM public key of ``kind``; ``source`` names where it came from in errors."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ConfigError(f"{source} is not a PEM public key ({exc}).") from exc
    if not isinstance(key, kind):
        raise ConfigError(f"{source} holds a {type(key).__name__}, not a {kind.__name__}.")
    return key
