"""What a device or coordinator trusts must be its user's alone (common/trusted_paths.py): another local
user who could write a state folder or a key file could swap in their own key or reset a privacy account."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlora.client.device_state import DeviceState
from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import read_public_key, write_public_key
from fleetlora.common.trusted_paths import check_trusted

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def test_a_state_folder_others_can_write_is_refused_with_the_fix(tmp_path: Path):
    root = tmp_path / "device"
    DeviceState(root).save_json("account", {"spent": 1.0})
    root.chmod(0o777)

    with pytest.raises(
        ConfigError, match=r"can be written by its group or by others \(mode 777\).*chmod go-w"
    ):
        DeviceState.locate({"state-dir": str(root)}, {})
    root.chmod(0o755)
    assert DeviceState.locate({"state-dir": str(root)}, {}).load_json("account") == {"spent": 1.0}


def test_a_state_file_others_can_write_is_refused(tmp_path: Path):
    state = DeviceState(tmp_path / "device")
    state.save_json("account", {"spent": 1.0})
    state.path("account", ".json").chmod(0o666)

    with pytest.raises(ConfigError, match="chmod go-w"):
        state.load_json("account")


def test_a_replaced_coordinator_key_in_a_group_writable_file_is_not_trusted(tmp_path: Path):
    key = tmp_path / "keys" / "coordinator-signing.pub"
    write_public_key(key, Ed25519PrivateKey.generate().public_key())
    key.chmod(0o664)

    with pytest.raises(ConfigError, match="chmod go-w"):
        read_public_key(key, Ed25519PublicKey)


def test_what_fleetlora_writes_is_owner_only_whatever_the_umask(tmp_path: Path):
    old = os.umask(0o002)  # a user-private-group default: new files group-writable
    try:
        key = tmp_path / "state" / "coordinator-signing.pub"
        write_public_key(key, Ed25519PrivateKey.generate().public_key())
        DeviceState(tmp_path / "device").save_json("account", {})
    finally:
        os.umask(old)

    assert oct(key.stat().st_mode & 0o777) == "0o644" and oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "device").stat().st_mode & 0o777) == "0o700"
    read_public_key(key, Ed25519PublicKey)  # and reads back


def test_a_sticky_shared_folder_is_accepted(tmp_path: Path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others add files but cannot replace this user's

    check_trusted(shared)


@pytest.mark.skipif(os.name == "posix" and os.getuid() != 0, reason="giving a file away needs root")
def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path):
    root = tmp_path / "device"
    root.mkdir(mode=0o700)
    os.chown(root, 12345, -1)

    with pytest.raises(ConfigError, match="belongs to user id 12345"):
        DeviceState.locate({"state-dir": str(root)}, {})
