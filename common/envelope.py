"""Sealed uploads: a device's delta encrypted to the coordinator and signed by the device.

The device encrypts with HPKE (RFC 9180, base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
AES-256-GCM) to the coordinator's public key, with an ``info`` string that binds the ciphertext to
one upload: tenant, device, round, base-model sha256 and the version it trained from. It then signs
``len(info) ‖ info ‖ ciphertext`` with its Ed25519 key.

The coordinator never trusts the device's claim about that context. It compares the claim with
what it expects, to name the failure (a replayed round, another model), then verifies the signature
over the ``info`` it rebuilt itself and only then decrypts. A truncated or altered ciphertext fails
the signature; a ciphertext sealed to another coordinator key fails decryption. Each failure raises
:class:`EnvelopeError` with the reason the round records.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.app import ArrayRecord

from fleetlora.common import chunks
from fleetlora.common.canonical import canonical_json
from fleetlora.common.errors import FleetloraError

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
INFO_LABEL = "fleetlora/upload/v1"


class EnvelopeError(FleetloraError):
    """A sealed upload was refused; the message is the reason recorded for the round."""


@dataclass(frozen=True)
class UploadContext:
    """What one upload is for. Both sides build it; only the coordinator's copy is trusted."""

    tenant: str
    device_id: str
    round: int
    base_sha256: str
    from_version: int

    def info(self) -> bytes:
        """The HPKE ``info``: canonical JSON (sorted keys, no spaces) under a versioned label."""
        return f"{INFO_LABEL}:".encode() + canonical_json(dataclasses.asdict(self))


@dataclass(frozen=True)
class SealedUpload:
    ciphertext: bytes  # HPKE encapsulated key ‖ AES-256-GCM ciphertext and tag
    signature: bytes  # Ed25519 over len(info) ‖ info ‖ ciphertext


def _signed_bytes(info: bytes, ciphertext: bytes) -> bytes:
    # The length prefix keeps (info, ciphertext) pairs from sharing a signature by moving the boundary.
    return struct.pack(">I", len(info)) + info + ciphertext


def seal(
    plaintext: bytes, context: UploadContext, coordinator: X25519PublicKey, device_key: Ed25519PrivateKey
) -> SealedUpload:
    """Encrypt ``plaintext`` to the coordinator for ``context`` and sign the result."""
    info = context.info()
    ciphertext = SUITE.encrypt(plaintext, coordinator, info=info)
    return SealedUpload(ciphertext, device_key.sign(_signed_bytes(info, ciphertext)))


def open_sealed(
    sealed: SealedUpload,
    *,
    claimed: UploadContext,
    expected: UploadContext,
    coordinator_key: X25519PrivateKey,
    device_public: Ed25519PublicKey,
) -> bytes:
    """The plaintext, if ``sealed`` is exactly the upload the coordinator expects; else EnvelopeError."""
    if claimed.device_id != expected.device_id or claimed.tenant != expected.tenant:
        raise EnvelopeError(f"upload claims device {claimed.tenant}/{claimed.device_id}, sent by another")
    if claimed.round != expected.round:
        raise EnvelopeError(f"upload is for round {claimed.round}, not {expected.round} (replayed)")
    if claimed.base_sha256 != expected.base_sha256:
        raise EnvelopeError(f"upload is for base model {claimed.base_sha256[:12]}, not ours")
    if claimed.from_version != expected.from_version:
        raise EnvelopeError(
            f"upload trained from version {claimed.from_version}, not {expected.from_version}"
        )
    info = expected.info()
    try:
        device_public.verify(sealed.signature, _signed_bytes(info, sealed.ciphertext))
    except InvalidSignature:
        raise EnvelopeError(
            "signature does not match (ciphertext truncated or altered, or wrong key)"
        ) from None
    try:
        return SUITE.decrypt(sealed.ciphertext, coordinator_key, info=info)
    except InvalidTag:
        raise EnvelopeError("ciphertext does not decrypt with this coordinator's key") from None


# ---- wire form: the sealed bytes as a chunked ArrayRecord, the claim and signature in a ConfigRecord

SEALED: Final = "sealed"  # the reply's ArrayRecord of ciphertext chunks (common.chunks)
_CLAIM = "upload."
MAX_CLAIM_CHARS = 256  # tenant, device id and sha256 hex are far shorter


def to_records(
    sealed: SealedUpload, claimed: UploadContext
) -> tuple[ArrayRecord, dict[str, str | int | bytes]]:
    """The ciphertext as a chunked ArrayRecord, and the config entries of the claim."""
    config: dict[str, str | int | bytes] = {f"{_CLAIM}{k}": v for k, v in dataclasses.asdict(claimed).items()}
    config[f"{_CLAIM}signature"] = sealed.signature
    return chunks.bytes_to_array_record(sealed.ciphertext), config


def from_records(arrays: ArrayRecord, config: Mapping[str, object]) -> tuple[SealedUpload, UploadContext]:
    """Reassemble what :func:`to_records` made; a malformed reply raises :class:`EnvelopeError`."""
    try:
        claimed = UploadContext(
            tenant=_claimed(config, "tenant", str),
            device_id=_claimed(config, "device_id", str),
            round=_claimed(config, "round", int),
            base_sha256=_claimed(config, "base_sha256", str),
            from_version=_claimed(config, "from_version", int),
        )
        signature = config[f"{_CLAIM}signature"]
        ciphertext = chunks.array_record_to_bytes(arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"malformed sealed upload ({exc})") from None
    if not isinstance(signature, bytes):
        raise EnvelopeError("malformed sealed upload (signature is not bytes)")
    return SealedUpload(ciphertext, signature), claimed


_Claimed = TypeVar("_Claimed", str, int)


def _claimed(config: Mapping[str, object], name: str, kind: type[_Claimed]) -> _Claimed:
    """One field of a device's claim, of exactly the type the context has (a device id is looked up
    in SQL before the signature is checked, so a list or a float must never get that far)."""
    value = config[f"{_CLAIM}{name}"]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"claim {name!r} is not a {kind.__name__}")
    if isinstance(value, str) and len(value) > MAX_CLAIM_CHARS:
        raise TypeError(f"claim {name!r} is longer than {MAX_CLAIM_CHARS} characters")
    return value
