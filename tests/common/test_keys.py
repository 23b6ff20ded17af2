import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import load_public_key, public_pem, read_private_key, write_private_key


def test_private_keys_are_owner_only_and_read_back(tmp_path: Path):
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "keys" / "device.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = read_private_key(path, Ed25519PrivateKey)
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_an_existing_key_is_never_overwritten(tmp_path: Path):
    path = tmp_path / "device.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        write_private_key(path, Ed25519PrivateKey.generate())
    assert path.read_bytes() == before


def test_a_key_others_can_read_is_refused(tmp_path: Path):
    path = tmp_path / "device.key"
    write_private_key(path, Ed25519PrivateKey.generate())
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_private_key(path, Ed25519PrivateKey)


def test_the_wrong_kind_of_key_is_named(tmp_path: Path):
    path = tmp_path / "hpke.key"
    write_private_key(path, X25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="not a Ed25519PrivateKey"):
        read_private_key(path, Ed25519PrivateKey)
    pem = public_pem(X25519PrivateKey.generate().public_key())
    assert isinstance(load_public_key(pem, X25519PublicKey, "coordinator.pub"), X25519PublicKey)
    with pytest.raises(ConfigError, match=r"coordinator\.pub holds"):
        load_public_key(pem, Ed25519PublicKey, "coordinator.pub")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(b"garbage", Ed25519PublicKey, "upload")
    with pytest.raises(ConfigError, match="No key at"):
        read_private_key(tmp_path / "missing.key", Ed25519PrivateKey)
