"""Update packages: a signed manifest and a payload that take a device from one global version to another.

Layout of a package (file or message, the same bytes)::

    MAGIC (8 bytes) | manifest length (4 bytes, big-endian) | manifest | signature (64) | payload

The manifest is canonical JSON (sorted keys, no spaces, UTF-8) and names everything a device
checks before it touches its adapter: tenant, base-model sha256, from- and to-version, sequence
number, creation and expiry times, the payload's sha256 and length, and its codec. The coordinator's
Ed25519 key signs ``SIGNING_CONTEXT ‖ manifest``; the payload is bound through its hash. The
checks follow The Update Framework's (TUF) threat list: a signature by a trusted key (arbitrary
packages), sequence strictly above the last applied (rollback and replay), an expiry (freeze), and
reading no more than the declared length (endless data).

The sequence number is the to-version's id: ids only grow, so a package to an older version, or a
second package to the current one, always carries a sequence the device has already passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlora.common.canonical import canonical_json
from fleetlora.common.errors import FleetloraError

MAGIC: Final = b"FLPKG\x00\x01\n"
FORMAT: Final = 1
SIGNING_CONTEXT: Final = b"fleetlora update package v1\x00"
SIGNATURE_BYTES: Final = 64
MAX_MANIFEST_BYTES: Final = 64 * 1024
READ_CHUNK: Final = 1 << 20
# The fleet's contract: a whole package is never more than this share of its base model's bytes. The
# coordinator builds under it and a device refuses more (each may be set lower, never higher).
MAX_CAP: Final = 0.10
_LENGTH = struct.Struct(">I")


class PackageRejection(StrEnum):
    """Why a device refused a package: the reason codes it reports (``docs/packages.md`` section 8)."""

    MALFORMED = "malformed"  # not a package, a manifest or payload that does not parse, an unknown model
    BAD_SIGNATURE = "bad-signature"  # not signed by the trusted coordinator key
    TRUNCATED = "truncated"  # ends before a declared length
    WRONG_TENANT = "wrong-tenant"
    WRONG_BASE = "wrong-base"  # for another base model than the device built
    EXPIRED = "expired"
    ROLLBACK = "rollback"  # sequence not above the last applied: older or replayed
    WRONG_FROM_VERSION = "wrong-from-version"  # a delta from a version the device does not hold
    OVERSIZE = "oversize"  # larger than the device's cap, or data after the declared payload
    TAMPERED = "tampered"  # payload does not match its signed sha256
    UNHEALTHY = "unhealthy"  # the rebuilt adapter is non-finite, does not load or read back


class PackageError(FleetloraError):
    """A package a device must not apply; ``reason`` is the code logs and the coordinator record."""

    def __init__(self, reason: PackageRejection, detail: str) -> None:
        super().__init__(f"update package rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Manifest:
    """What a package claims; trusted only once its signature verifies."""

    tenant: str
    lineage: str
    model: dict[str, Any]  # the ModelSpec as config entries, so a device can apply a package file alone
    base_sha256: str
    base_bytes: int
    from_version: int | None  # None: the payload is the full adapter
    to_version: int
    sequence: int
    created: str  # ISO 8601, UTC
    expires: str
    payload_sha256: str
    payload_length: int
    codec: str
    reconstruction_error: float  # ‖adapter − decoded adapter‖ / ‖adapter‖ as the builder measured it
    format: int = FORMAT

    def canonical(self) -> bytes:
        return canonical_json(dataclasses.asdict(self))

    def check_types(self) -> None:
        """Raise TypeError/ValueError unless every field has its declared type (JSON checks none)."""
        kinds = {
            str: ("tenant", "lineage", "base_sha256", "created", "expires", "payload_sha256", "codec"),
            int: ("base_bytes", "to_version", "sequence", "payload_length", "format"),
        }
        for kind, names in kinds.items():
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
        if self.from_version is not None and type(self.from_version) is not int:
            raise TypeError(f"from_version must be int or null, got {self.from_version!r}")
        if not isinstance(self.model, dict) or not isinstance(self.reconstruction_error, int | float):
            raise TypeError("model must be an object and reconstruction_error a number")
        for stamp in (self.created, self.expires):
            if datetime.fromisoformat(stamp).tzinfo is None:
                raise ValueError(f"timestamp {stamp!r} has no time zone")

    @property
    def expires_at(self) -> datetime:
        return datetime.fromisoformat(self.expires)

    @classmethod
    def parse(cls, blob: bytes) -> Manifest:
        try:
            fields = json.loads(blob)
            if not isinstance(fields, dict) or set(fields) != {f.name for f in dataclasses.fields(cls)}:
                raise ValueError("unexpected fields")
            manifest = cls(**fields)
            manifest.check_types()
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise PackageError(PackageRejection.MALFORMED, f"manifest is not valid ({exc})") from None
        if manifest.format != FORMAT:
            raise PackageError(
                PackageRejection.MALFORMED, f"package format {manifest.format}, this device reads {FORMAT}"
            )
        return manifest


@dataclass(frozen=True)
class Package:
    manifest: Manifest
    signature: bytes
    payload: bytes

    def to_bytes(self) -> bytes:
        manifest = self.manifest.canonical()
        return MAGIC + _LENGTH.pack(len(manifest)) + manifest + self.signature + self.payload


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def sign(manifest: Manifest, payload: bytes, key: Ed25519PrivateKey) -> Package:
    """Sign ``manifest``, after checking it describes ``payload``."""
    if (
        manifest.payload_length != len(payload)
        or manifest.payload_sha256 != hashlib.sha256(payload).hexdigest()
    ):
        raise ValueError("manifest does not describe this payload")
    return Package(manifest, key.sign(SIGNING_CONTEXT + manifest.canonical()), payload)


@dataclass(frozen=True)
class Expectations:
    """What the receiving device knows, against which a package's claims are checked."""

    tenant: str
    base_sha256: str  # of the base model installed on the device
    active_version: int | None  # None: the device holds no packaged adapter yet
    last_sequence: int  # 0 before the first package
    max_payload_bytes: int  # the size cap the device enforces itself: cap × its base model's bytes


def read_manifest(stream: BinaryIO, trusted: Ed25519PublicKey) -> tuple[Manifest, bytes]:
    """The manifest and its signature, read from ``stream``; nothing is believed before it verifies.

    Raises :class:`PackageError`. The stream is left at the payload's first byte.
    """
    if _read_exactly(stream, len(MAGIC), "header") != MAGIC:
        raise PackageError(PackageRejection.MALFORMED, "not a fleetlora update package (bad magic bytes)")
    (length,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size, "header"))
    if length > MAX_MANIFEST_BYTES:
        raise PackageError(
            PackageRejection.MALFORMED, f"manifest declares {length} bytes, more than {MAX_MANIFEST_BYTES}"
        )
    manifest_bytes = _read_exactly(stream, length, "manifest")
    signature = _read_exactly(stream, SIGNATURE_BYTES, "signature")
    try:
        trusted.verify(signature, SIGNING_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise PackageError(
            PackageRejection.BAD_SIGNATURE, "not signed by a trusted coordinator key"
        ) from None
    return Manifest.parse(manifest_bytes), signature


def check_claims(manifest: Manifest, expect: Expectations, now: datetime) -> None:
    """The signed manifest against the device's own state; raises :class:`PackageError`."""
    if manifest.tenant != expect.tenant:
        raise PackageError(
            PackageRejection.WRONG_TENANT, f"package is for {manifest.tenant!r}, not {expect.tenant!r}"
        )
    if manifest.base_sha256 != expect.base_sha256:
        raise PackageError(
            PackageRejection.WRONG_BASE,
            f"package is for base model {manifest.base_sha256[:12]}, this device has "
            f"{expect.base_sha256[:12]}",
        )
    if now >= manifest.expires_at:
        raise PackageError(
            PackageRejection.EXPIRED, f"package expired at {manifest.expires}; ask for a fresh one"
        )
    if manifest.sequence <= expect.last_sequence:
        raise PackageError(
            PackageRejection.ROLLBACK,
            f"sequence {manifest.sequence} is not above the last applied {expect.last_sequence} "
            "(an older or replayed package)",
        )
    if manifest.from_version is not None and manifest.from_version != expect.active_version:
        active = f"v{expect.active_version}" if expect.active_version is not None else "no adapter"
        raise PackageError(
            PackageRejection.WRONG_FROM_VERSION,
            f"package updates v{manifest.from_version}, this device holds {active}",
        )
    if manifest.payload_length > expect.max_payload_bytes:
        raise PackageError(
            PackageRejection.OVERSIZE,
            f"payload of {manifest.payload_length} bytes exceeds this device's cap of "
            f"{expect.max_payload_bytes} bytes",
        )


def read_payload(stream: BinaryIO, manifest: Manifest) -> bytes:
    """Exactly the declared payload, checked against the signed hash; more data after it is refused."""
    payload = _read_exactly(stream, manifest.payload_length, "payload")
    if stream.read(1):
        raise PackageError(
            PackageRejection.OVERSIZE, f"data continues past the declared {manifest.payload_length} bytes"
        )
    if hashlib.sha256(payload).hexdigest() != manifest.payload_sha256:
        raise PackageError(PackageRejection.TAMPERED, "payload does not match the signed sha256")
    return payload


def read_package(stream: BinaryIO, trusted: Ed25519PublicKey) -> Package:
    """A whole package with its signature and payload hash verified (no device-state checks)."""
    manifest, signature = read_manifest(stream, trusted)
    return Package(manifest, signature, read_payload(stream, manifest))


def _read_exactly(stream: BinaryIO, count: int, what: str) -> bytes:
    """``count`` bytes, read in bounded chunks; fewer available means the package was cut short."""
    parts, remaining = [], count
    while remaining:
        part = stream.read(min(remaining, READ_CHUNK))
        if not part:
            raise PackageError(
                PackageRejection.TRUNCATED, f"{what} ends {remaining} bytes before its declared length"
            )
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


PACKAGE: Final = "package"  # the ArrayRecord (common.chunks) of a message that carries a package
