"""Build and sign update packages (format: :mod:`fleetlora.common.package`).

A package takes a device from a stored version to a later one of the same lineage: the delta
between the two adapters, or the whole adapter for a device that has none. The builder walks the
codec ladder (:data:`fleetlora.common.codec.LADDER`) from lossless down and keeps the first codec
whose whole package fits under ``cap × base-model bytes`` with a reconstruction error within
``max_error``; if none does it refuses, naming each codec's size and error. A version the retention
gate holds (coordinator/retention.py) gets no package until it is released. Every package is
stored whole in SQL (:class:`fleetlora.coordinator.storage.PackageStore`), so what a device
received can always be shown again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetlora.common.codec import LADDER, decode, encode, inflated_bound, relative_error
from fleetlora.common.delta import apply_delta, diff, sha256_hex
from fleetlora.common.errors import ConfigError, FleetloraError
from fleetlora.common.package import MAX_CAP, Manifest, sign, utc_iso
from fleetlora.coordinator.defaults import DEFAULT_MAX_ERROR, DEFAULT_TTL
from fleetlora.coordinator.models import utcnow
from fleetlora.coordinator.storage import PackageInfo, Storage


class PackageTooLarge(FleetloraError):
    """No codec brings the package under the cap."""


@dataclass(frozen=True)
class PackagePolicy:
    """How packages are built: the size cap (share of the base model's bytes) and how long they live."""

    cap: float = MAX_CAP
    ttl: timedelta = DEFAULT_TTL
    # A lossier codec is used only while the rebuilt adapter stays this close to the real one
    # (relative L2): past it, the package would not be the version it names.
    max_error: float = DEFAULT_MAX_ERROR

    def __post_init__(self) -> None:
        if not self.max_error > 0:
            raise ConfigError(f"package max error must be > 0, got {self.max_error}.")
        if not 0 < self.cap <= MAX_CAP:
            raise ConfigError(f"package cap must be in (0, {MAX_CAP}], got {self.cap}.")
        if self.ttl <= timedelta(0):
            raise ConfigError(f"package lifetime must be positive, got {self.ttl}.")


def build_package(
    storage: Storage,
    to_version: int,
    from_version: int | None,
    key: Ed25519PrivateKey,
    policy: PackagePolicy,
    *,
    now: datetime | None = None,
) -> PackageInfo:
    """Build, sign and store the package ``from_version`` → ``to_version`` (None: full adapter)."""
    started = time.perf_counter()
    target = storage.versions.get(to_version)
    if target.held:  # the one check every way to a package passes (rounds, distribution, the CLI)
        raise FleetloraError(
            f"v{to_version} is held by the retention gate (it forgot key knowledge): no package is built "
            f"for it until an operator releases it (`fleetlora coordinator versions release v{to_version} "
            "--reason ...`)."
        )
    lineage = storage.versions.lineage(target.lineage)
    if from_version is not None:
        source = storage.versions.get(from_version)
        if source.lineage != target.lineage or source.id >= target.id:
            raise ConfigError(
                f"v{from_version} cannot be updated to v{to_version}: the target must be a later "
                "version of the same lineage."
            )
    adapter = storage.versions.adapter(to_version)
    base = storage.versions.adapter(from_version) if from_version is not None else None
    payload_state = diff(adapter, base) if base is not None else adapter
    limit = int(policy.cap * lineage.base_model_bytes)
    created = now or utcnow()
    sizes: list[str] = []
    for codec in LADDER:
        payload = encode(payload_state, codec)
        decoded = decode(payload, codec, max_bytes=inflated_bound(payload_state))
        rebuilt = apply_delta(base, decoded) if base is not None else decoded
        manifest = Manifest(
            tenant=lineage.tenant,
            lineage=lineage.lineage,
            model=lineage.model,
            base_sha256=lineage.base_model_sha256,
            base_bytes=lineage.base_model_bytes,
            from_version=from_version,
            to_version=to_version,
            sequence=to_version,
            created=utc_iso(created),
            expires=utc_iso(created + policy.ttl),
            payload_sha256=sha256_hex(payload),
            payload_length=len(payload),
            codec=codec.name,
            reconstruction_error=relative_error(adapter, rebuilt),
        )
        blob = sign(manifest, payload, key).to_bytes()
        error = manifest.reconstruction_error
        sizes.append(f"{codec.name} {len(blob)} bytes, error {error:.2g}")
        if len(blob) <= limit and math.isfinite(error) and error <= policy.max_error:
            seconds = time.perf_counter() - started
            return storage.packages.add(manifest, blob, cap=policy.cap, build_seconds=seconds)
    raise PackageTooLarge(
        f"No codec fits v{from_version or 'none'} → v{to_version} under the cap of {limit} bytes "
        f"({policy.cap:.1%} of {lineage.base_model_bytes} base-model bytes) with reconstruction error "
        f"<= {policy.max_error:g}; by codec: {'; '.join(sizes)}. Raise the cap (at most {MAX_CAP:.0%}) "
        "or the allowed error, or train a smaller adapter."
    )
