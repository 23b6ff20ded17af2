"""A device's signing identity: made once in its state folder, its public half handed to the coordinator."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlora.client.device_state import DeviceState
from fleetlora.common.keys import (
    DEVICE_SIGNING_KEY,
    DEVICE_SIGNING_PUB,
    read_private_key,
    write_private_key,
    write_public_key,
)


def ensure_device_key(device: DeviceState) -> Ed25519PublicKey:
    """The device's public signing key, creating the key pair (private half 0600) on first use."""
    path = device.root / DEVICE_SIGNING_KEY
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_private_key(path, key)
        write_public_key(device.root / DEVICE_SIGNING_PUB, key.public_key())
    return signing_key(device).public_key()


def signing_key(device: DeviceState) -> Ed25519PrivateKey:
    return read_private_key(device.root / DEVICE_SIGNING_KEY, Ed25519PrivateKey)
