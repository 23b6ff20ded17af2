"""A device's identities, made once in its state folder; their public halves go to the coordinator.

Two keys: an Ed25519 key that signs the device's sealed uploads (checked by fleetlora's registry), and
an ECDSA P-384 key in OpenSSH format with which its SuperNode authenticates to the SuperLink
(registered with Flower's ``flwr supernode register``). Flower refuses a key registered before, even
after unregistering, so a device that is re-enrolled makes a new auth key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlora.client.device_state import DeviceState
from fleetlora.common.keys import (
    DEVICE_SIGNING_KEY,
    DEVICE_SIGNING_PUB,
    read_private_key,
    write_private_key,
    write_private_key_bytes,
    write_public_key,
)

SUPERNODE_AUTH_KEY = "supernode-auth.key"
SUPERNODE_AUTH_PUB = "supernode-auth.pub"


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


def ensure_auth_key(device: DeviceState) -> Path:
    """The SuperNode's public auth key file (OpenSSH), creating the key pair on first use."""
    public = device.root / SUPERNODE_AUTH_PUB
    if not (device.root / SUPERNODE_AUTH_KEY).exists():
        key = ec.generate_private_key(ec.SECP384R1())
        write_private_key_bytes(
            device.root / SUPERNODE_AUTH_KEY,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return public
