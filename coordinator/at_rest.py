"""Blobs at rest: adapters, optimizer states, update packages and key sets in SQL, sealed with AES-256-GCM.

A copy of the coordinator's database (a backup, a dump, a stolen disk) then holds no adapter in the
clear. Each blob is sealed alone under a 256-bit key with a fresh 96-bit nonce; the associated data
binds what the blob is and where it belongs (its kind, its row's id, and its lineage or version), so a
blob copied into another row, or another kind of row, fails to open instead of being served as that
row's. A sealed blob is ``FLAR1`` ‖ key id (8 bytes: sha256 of the key) ‖ nonce ‖ ciphertext and tag.

The key comes from the environment of every coordinator process (the ServerApp, the CLI):
``FLEETLORA_AT_REST_KEY_FILE`` names a file holding 32 random bytes (``fleetlora coordinator keys
init-at-rest`` writes one, mode 0600), or ``FLEETLORA_AT_REST_KEY`` holds them base64-encoded. Several
files, separated by the path separator (``:``), are the current key first and older ones after it, which
are only read with: that is how a rotation (``fleetlora coordinator db rotate-key``) runs while both are
in use. Without a key, blobs are written in the clear (as before) and a sealed one cannot be read.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetlora.common.canonical import canonical_json
from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.keys import write_private_key_bytes
from fleetlora.common.trusted_paths import check_trusted

MAGIC = b"FLAR1"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_BYTES = 8
KEY_FILE_ENV = "FLEETLORA_AT_REST_KEY_FILE"
KEY_ENV = "FLEETLORA_AT_REST_KEY"


class SealedBlobError(FleetloraError):
    """A stored blob that cannot be opened: wrong key, damaged, or moved from another row."""


@dataclass(frozen=True)
class AtRestKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigError(f"An at-rest key is {KEY_BYTES} bytes, got {len(self.secret)}.")

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(self.secret).digest()[:KEY_ID_BYTES]

    @classmethod
    def read(cls, path: Path) -> AtRestKey:
        if not path.is_file():
            raise ConfigError(
                f"No at-rest key at {path}: `fleetlora coordinator keys init-at-rest` makes one."
            )
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by other users: run `chmod 600 {path}`.")
        check_trusted(path)
        return cls(path.read_bytes())

    @classmethod
    def create(cls, path: Path) -> AtRestKey:
        """A new random key written to ``path`` (0600); an existing file is never replaced."""
        key = cls(secrets.token_bytes(KEY_BYTES))
        write_private_key_bytes(path, key.secret)
        return key


def is_sealed(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


class BlobCipher:
    """Seals with the first key, opens with any; with no keys, writes in the clear."""

    def __init__(self, keys: Sequence[AtRestKey] = ()) -> None:
        self.keys = list(keys)
        self._by_id = {key.key_id: AESGCM(key.secret) for key in self.keys}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> BlobCipher:
        environ = os.environ if environ is None else environ
        if files := environ.get(KEY_FILE_ENV):
            return cls([AtRestKey.read(Path(f)) for f in files.split(os.pathsep) if f])
        if encoded := environ.get(KEY_ENV):
            try:
                return cls([AtRestKey(base64.b64decode(encoded, validate=True))])
            except ValueError as exc:
                raise ConfigError(f"{KEY_ENV} is not base64 of {KEY_BYTES} bytes ({exc}).") from None
        return cls()

    @property
    def current_id(self) -> bytes | None:
        return self.keys[0].key_id if self.keys else None

    def seal(self, blob: bytes, binding: Mapping[str, object]) -> bytes:
        """``blob`` sealed under the current key for the row ``binding`` names; in the clear without one."""
        if not self.keys:
            return blob
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self.keys[0].secret).encrypt(nonce, blob, canonical_json(dict(binding)))
        return MAGIC + self.keys[0].key_id + nonce + sealed

    def open(self, stored: bytes, binding: Mapping[str, object], *, allow_clear: bool = False) -> bytes:
        """The plaintext of a stored blob.

        A blob stored in the clear is returned as it is only while this process has no key (or with
        ``allow_clear``, for the rotation that seals it): with a key, a clear blob is one that someone
        wrote around the coordinator, and is refused.
        """
        if not is_sealed(stored):
            if self.keys and not allow_clear:
                what = ", ".join(f"{k} {v}" for k, v in binding.items())
                raise SealedBlobError(
                    f"The {what} blob is stored in the clear although this coordinator seals blobs at rest: "
                    "run `fleetlora coordinator db rotate-key` to seal what was stored before, or restore "
                    "the database if nobody should have written it."
                )
            return stored
        what = ", ".join(f"{k} {v}" for k, v in binding.items())
        head = len(MAGIC)
        key_id = stored[head : head + KEY_ID_BYTES]
        nonce = stored[head + KEY_ID_BYTES : head + KEY_ID_BYTES + NONCE_BYTES]
        aead = self._by_id.get(key_id)
        if aead is None:
            raise SealedBlobError(
                f"The {what} blob is encrypted at rest under key {key_id.hex()}, which this process does not "
                f"have: set {KEY_FILE_ENV} to its key file."
            )
        try:
            return aead.decrypt(
                nonce, stored[head + KEY_ID_BYTES + NONCE_BYTES :], canonical_json(dict(binding))
            )
        except InvalidTag:
            raise SealedBlobError(
                f"The {what} blob does not open: it was damaged, or moved here from another row. Restore the "
                "database from a backup."
            ) from None
