"""A device's own folder: what it keeps between rounds and across restarts.

A real device names the folder in its node config (``state-dir``). A simulated device gets
``<run config device-state>/partition-<id>``, so every virtual device of a fleet keeps its own
files the way a phone would. Writes are atomic (temporary file, fsync, rename): a device killed
mid-write keeps the previous file, never a torn one. The folder and every file read from it must be
this user's alone (``common/trusted_paths.py``): the folder is created 0700, and one another local user
can write is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from fleetlora.common.errors import ConfigError, IncompatibleStateError
from fleetlora.common.trusted_paths import check_trusted, make_trusted_folder

if TYPE_CHECKING:  # torch loads where tensors are read or written: `device status` starts without it
    import torch

    from fleetlora.common.delta import State

UserConfig = Mapping[str, bool | int | float | str]  # a Flower node or run config


class DeviceState:
    """Named tensor (safetensors) and JSON files in one folder, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def locate(cls, node_config: UserConfig, run_config: UserConfig) -> DeviceState:
        """The device's folder from its node config, or the simulated device's under the run's."""
        found = cls.find(node_config, run_config)
        if found is not None:
            return found
        raise ConfigError(
            "This device has no state folder for what it keeps between rounds: start the SuperNode "
            "with --node-config 'state-dir=\"DIR\"'."
        )

    @classmethod
    def find(cls, node_config: UserConfig, run_config: UserConfig) -> DeviceState | None:
        """Like :meth:`locate`, but None for a device configured without a state folder."""
        if "state-dir" in node_config:
            root = Path(str(node_config["state-dir"]))
        elif "partition-id" in node_config and run_config.get("device-state"):
            root = Path(str(run_config["device-state"])) / f"partition-{node_config['partition-id']}"
        else:
            return None
        if root.exists():
            check_trusted(root)  # its privacy account and trusted keys must be this user's alone
        return cls(root)

    def path(self, name: str, suffix: str = ".safetensors") -> Path:
        return self.root / f"{name}{suffix}"

    def load_arrays(self, name: str, max_bytes: int | None = None) -> State | None:
        """The stored tensors, or None if never saved; a damaged file raises IncompatibleStateError, as
        does one over ``max_bytes`` (checked by its size, before it is read). The file is memory-mapped,
        not read whole first (:func:`~fleetlora.common.delta.deserialize_file`)."""
        from fleetlora.common.delta import deserialize_file

        path = self.path(name)
        if not path.is_file():
            return None
        check_trusted(path)
        _check_size(path, max_bytes)
        try:
            return deserialize_file(path)
        except SafetensorError as exc:
            raise IncompatibleStateError(f"{path} is damaged ({exc}).") from exc

    def save_arrays(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the named tensor file in one step."""
        from fleetlora.common.delta import serialize

        self._replace(self.path(name), serialize(state))

    def load_json(self, name: str, max_bytes: int | None = None) -> dict[str, Any] | None:
        """A stored JSON document, or None if never saved; a damaged file raises IncompatibleStateError,
        as does one over ``max_bytes`` (checked by its size, before it is read).

        Something other than a plain file under the name (a folder, a symlink) is damage too: reading
        it as "never saved" would let whatever it guards start over.
        """
        path = self.path(name, ".json")
        if not path.exists() and not path.is_symlink():
            return None
        if path.is_symlink() or not path.is_file():
            raise IncompatibleStateError(f"{path} is damaged (not a plain file).")
        check_trusted(path)
        _check_size(path, max_bytes)
        try:
            document = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a number too long, nesting too deep
            raise IncompatibleStateError(f"{path} is damaged ({str(exc)[:200]}).") from exc
        if not isinstance(document, dict):
            raise IncompatibleStateError(f"{path} is damaged (not a JSON object).")
        return document

    def save_json(self, name: str, document: Mapping[str, Any]) -> None:
        """Replace the named JSON document in one step."""
        self._replace(self.path(name, ".json"), json.dumps(document, indent=1).encode())

    def _replace(self, target: Path, blob: bytes) -> None:
        """Write ``blob`` to a scratch file, fsync it, rename it over ``target``, fsync the folder."""
        make_trusted_folder(self.root)
        fd, scratch = tempfile.mkstemp(prefix=f".{target.name}.", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(scratch, target)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def set_aside(self, name: str, suffix: str = ".safetensors") -> Path:
        """Move a damaged file out of the way (kept for inspection) and return its new path."""
        damaged = self.path(name, suffix).with_suffix(".damaged")
        os.replace(self.path(name, suffix), damaged)
        return damaged


def _check_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a file larger than its kind ever is, before reading it whole (None: no limit)."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise IncompatibleStateError(f"{path} is damaged ({size} bytes; such a file is at most {max_bytes}).")
