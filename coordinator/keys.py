"""The coordinator's key pairs: HPKE (X25519) to receive sealed uploads, Ed25519 to sign packages."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import (
    COORDINATOR_HPKE_KEY,
    COORDINATOR_HPKE_PUB,
    COORDINATOR_SIGNING_KEY,
    COORDINATOR_SIGNING_PUB,
    read_private_key,
    write_private_key,
    write_public_key,
)


def init_keys(folder: Path) -> list[Path]:
    """Create both key pairs in ``folder``; refuse if any key file is already there."""
    private = [folder / COORDINATOR_HPKE_KEY, folder / COORDINATOR_SIGNING_KEY]
    present = [p for p in private if p.exists()]
    if present:
        raise ConfigError(
            f"{present[0]} already exists: these keys are made once; move them away to start over."
        )
    hpke, signing = X25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    write_private_key(folder / COORDINATOR_HPKE_KEY, hpke)
    write_private_key(folder / COORDINATOR_SIGNING_KEY, signing)
    write_public_key(folder / COORDINATOR_HPKE_PUB, hpke.public_key())
    write_public_key(folder / COORDINATOR_SIGNING_PUB, signing.public_key())
    return [*private, folder / COORDINATOR_HPKE_PUB, folder / COORDINATOR_SIGNING_PUB]


def load_hpke_key(folder: Path) -> X25519PrivateKey:
    return read_private_key(folder / COORDINATOR_HPKE_KEY, X25519PrivateKey)


def load_signing_key(folder: Path) -> Ed25519PrivateKey:
    """The key update packages are signed with."""
    return read_private_key(folder / COORDINATOR_SIGNING_KEY, Ed25519PrivateKey)
