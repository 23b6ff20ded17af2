"""Apply update packages on the device: verify first, write the inactive slot, check health, switch.

The device keeps two adapter slots (``slot-a``, ``slot-b``) and a pointer naming the active one,
in ``<state-dir>/updates/``. Applying a package never touches the active slot:

1. read and verify the package (:mod:`fleetlora.common.package`): trusted signature, tenant, base
   model, expiry, sequence above the last applied, from-version equal to the active version,
   declared size within the device's own cap, payload hash;
2. decode it and rebuild the new adapter (active + delta, or the full adapter);
3. write it to the inactive slot (temporary file → fsync → rename → fsync folder);
4. health check: read the slot back, check its hash, load it into the model, run a canary input
   and require finite outputs;
5. switch: write the pointer naming the new slot.

The pointer is the single commit point, and it is kept as two copies (``active-0.json``,
``active-1.json``) with a generation number and a sha256 each; a write replaces the older copy.
At start-up the device takes the newest copy whose checksum holds *and* whose slot file matches the
adapter hash it records, else the other copy. A device killed at any point of an apply therefore
comes back with the old adapter or the new one, never a torn one. The highest sequence ever applied is
kept in a file of its own (``highest-applied.json``), so a device that falls back to an older slot
still refuses packages older than the newest it had.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetlora.client.device_state import DeviceState
from fleetlora.common.canonical import canonical_json
from fleetlora.common.config import ModelSpec, from_config
from fleetlora.common.errors import ConfigError, IncompatibleStateError
from fleetlora.common.package import (
    MAX_CAP,
    Expectations,
    Manifest,
    PackageError,
    PackageRejection,
    check_claims,
    read_manifest,
    read_payload,
)

if TYPE_CHECKING:  # torch and the model load when a package is applied: `device status` needs neither
    from fleetlora.common.delta import State
    from fleetlora.common.model import LoadedModel

UPDATES_DIR = "updates"
SLOTS = ("slot-a", "slot-b")
POINTERS = ("active-0", "active-1")
HIGHEST = "highest-applied"  # the highest package sequence applied, with its checksum


@dataclass(frozen=True)
class ActiveAdapter:
    """What the pointer says the device runs: which slot, which version, and how it got there."""

    generation: int
    slot: str
    version: int
    sequence: int
    adapter_sha256: str
    base_sha256: str
    tenant: str
    lineage: str
    model: dict[str, Any]
    codec: str
    reconstruction_error: float
    applied_at: str

    @property
    def spec(self) -> ModelSpec:
        return from_config(ModelSpec, self.model, "model")


@dataclass(frozen=True)
class Applied:
    previous: int | None
    active: ActiveAdapter
    seconds: float


class UpdateSlots:
    """The two adapter slots and the pointer pair in ``<state-dir>/updates``."""

    def __init__(self, device: DeviceState) -> None:
        self.files = DeviceState(device.root / UPDATES_DIR)

    def active(self) -> ActiveAdapter | None:
        """The adapter the device runs, after recovering from any interrupted apply (None: none yet)."""
        for pointer in sorted(self._pointers(), key=lambda p: p.generation, reverse=True):
            slot = self.files.path(pointer.slot)
            if slot.is_file() and hashlib.sha256(slot.read_bytes()).hexdigest() == pointer.adapter_sha256:
                self._remove_scratch()
                return pointer
        self._remove_scratch()  # a first apply killed before its switch
        return None

    def load(self, active: ActiveAdapter) -> State:
        state = self.files.load_arrays(active.slot)
        if state is None:
            raise IncompatibleStateError(f"{self.files.path(active.slot)} vanished.")
        return state

    def load_into(self, loaded: LoadedModel, active: ActiveAdapter | None) -> float:
        """Put ``active``'s adapter (None: the model's initial one) into ``loaded``'s model; return the
        seconds its slot's read (memory-mapped) and the copy into the model took.

        A damaged slot, or one whose layout does not fit the model, raises IncompatibleStateError and
        leaves the model as it was.
        """
        from fleetlora.common.delta import load_trainable_state

        started = time.perf_counter()
        load_trainable_state(loaded.model, self.load(active) if active else loaded.initial_adapter)
        return time.perf_counter() - started

    def write_slot(self, slot: str, state: State) -> str:
        """Write ``state`` into ``slot`` durably; return the sha256 of the bytes written."""
        self.files.save_arrays(slot, state)
        return hashlib.sha256(self.files.path(slot).read_bytes()).hexdigest()

    def highest_sequence(self) -> int:
        """The highest package sequence this device ever applied, kept apart from the pointers and slots.

        A damaged slot or pointer makes the device fall back to an older adapter; it must not also
        forget how far it got, or a replayed older package would be taken (a rollback). A missing
        record on a device with pointers (one set up before the record existed) is their highest; a
        damaged record refuses every apply until the state folder is restored.
        """
        document = self.files.load_json(HIGHEST)  # IncompatibleStateError when damaged
        if document is None:
            return max((p.sequence for p in self._pointers()), default=0)
        checksum = document.pop("checksum", None)
        sequence = document.get("sequence")
        if checksum != _checksum(document) or type(sequence) is not int or sequence < 0:
            raise IncompatibleStateError(
                f"{self.files.path(HIGHEST, '.json')} is damaged: the device cannot tell which packages it "
                "already applied. Restore the state folder from a backup, or enroll it again as new."
            )
        return sequence

    def switch(self, active: ActiveAdapter) -> None:
        """Commit: raise the highest applied sequence, then write the pointer over the older copy."""
        highest = {"sequence": max(active.sequence, self.highest_sequence())}
        self.files.save_json(HIGHEST, {**highest, "checksum": _checksum(highest)})
        valid = {name: p.generation for name, p in self._named_pointers()}
        # A missing or damaged copy is the one to write; otherwise the older of the two.
        target = min(POINTERS, key=lambda name: valid.get(name, -1))
        document = asdict(active)
        document["checksum"] = _checksum(asdict(active))
        self.files.save_json(target, document)

    def _named_pointers(self) -> list[tuple[str, ActiveAdapter]]:
        found = []
        for name in POINTERS:
            try:
                document = self.files.load_json(name)
            except IncompatibleStateError:
                continue  # a damaged copy: the other one stands
            if document is None:
                continue
            checksum = document.pop("checksum", None)
            if checksum != _checksum(document):
                continue
            try:
                found.append((name, ActiveAdapter(**document)))
            except TypeError:
                continue
        return found

    def _pointers(self) -> list[ActiveAdapter]:
        return [p for _, p in self._named_pointers()]

    def _remove_scratch(self) -> None:
        """Temporary files of an apply that was killed before its rename."""
        if self.files.root.is_dir():
            for scratch in self.files.root.glob(".*"):
                scratch.unlink(missing_ok=True)


def apply_package(
    stream: BinaryIO,
    device: DeviceState,
    trusted: Ed25519PublicKey,
    *,
    tenant: str,
    cap: float = MAX_CAP,
    now: datetime | None = None,
) -> Applied:
    """Verify the package in ``stream`` and make it the device's active adapter, or raise PackageError.

    Nothing on disk changes unless every check passes; a failed health check leaves the old adapter.
    """
    started = time.perf_counter()
    slots = UpdateSlots(device)
    current = slots.active()
    manifest, _signature = read_manifest(stream, trusted)
    loaded = _model_for(manifest)
    check_claims(
        manifest,
        Expectations(
            tenant=tenant,
            base_sha256=loaded.base_sha256,
            active_version=current.version if current else None,
            # At or above the highest ever applied: a device that fell back to an older slot may take
            # the package it lost again, never an older one.
            last_sequence=max(current.sequence if current else 0, slots.highest_sequence() - 1),
            max_payload_bytes=int(cap * loaded.base_bytes),
        ),
        now or datetime.now(UTC),
    )
    payload = read_payload(stream, manifest)
    state = _rebuild(manifest, payload, loaded, slots.load(current) if current else None)
    slot = next(s for s in SLOTS if current is None or s != current.slot)
    adapter_sha256 = slots.write_slot(slot, state)
    try:
        health_check(loaded, slots.files.load_arrays(slot) or {}, adapter_sha256, slots.files.path(slot))
        active = _activate(slots, slot, adapter_sha256, manifest, current)
    except BaseException:
        # The model in memory must not keep running an adapter the device did not switch to.
        slots.load_into(loaded, current)
        raise
    return Applied(current.version if current else None, active, time.perf_counter() - started)


def load_active_adapter(device: DeviceState, loaded: LoadedModel) -> float:
    """Put the adapter ``device`` runs (after recovering from any interrupted apply; the initial one
    before its first package) into ``loaded``'s model; return the seconds the load took (the slot's read
    and the copy into the model, not the pointer's recovery and hash check before them)."""
    slots = UpdateSlots(device)
    return slots.load_into(loaded, slots.active())


def _activate(
    slots: UpdateSlots, slot: str, adapter_sha256: str, manifest: Manifest, current: ActiveAdapter | None
) -> ActiveAdapter:
    """Switch the pointer to ``slot``: the commit point of an apply."""
    active = ActiveAdapter(
        generation=(current.generation if current else 0) + 1,
        slot=slot,
        version=manifest.to_version,
        sequence=manifest.sequence,
        adapter_sha256=adapter_sha256,
        base_sha256=manifest.base_sha256,
        tenant=manifest.tenant,
        lineage=manifest.lineage,
        model=manifest.model,
        codec=manifest.codec,
        reconstruction_error=manifest.reconstruction_error,
        applied_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    slots.switch(active)
    return active


def health_check(loaded: LoadedModel, state: State, expected_sha256: str, path: Path) -> None:
    """The slot as written: its hash, that it loads into the model, and a finite canary output."""
    from fleetlora.common.delta import load_trainable_state
    from fleetlora.common.model import canary_is_finite

    if hashlib.sha256(path.read_bytes()).hexdigest() != expected_sha256:
        raise PackageError(PackageRejection.UNHEALTHY, f"{path} does not read back as written")
    try:
        load_trainable_state(loaded.model, state)
    except IncompatibleStateError as exc:
        raise PackageError(PackageRejection.UNHEALTHY, f"adapter does not load ({exc})") from None
    if not canary_is_finite(loaded):
        raise PackageError(PackageRejection.UNHEALTHY, "canary inference gave non-finite outputs")


def _model_for(manifest: Manifest) -> LoadedModel:
    from fleetlora.common.model import cached_model

    try:
        return cached_model(from_config(ModelSpec, manifest.model, "model"))
    except (ConfigError, KeyError, TypeError) as exc:
        raise PackageError(
            PackageRejection.MALFORMED, f"package names a model this device cannot build ({exc})"
        ) from None


def _rebuild(manifest: Manifest, payload: bytes, loaded: LoadedModel, active: State | None) -> State:
    """The adapter the package describes, checked against the model's own layout."""
    import torch

    from fleetlora.common.codec import Codec, CodecError, decode, inflated_bound
    from fleetlora.common.delta import apply_delta, check_layout

    layout = loaded.initial_adapter
    try:
        decoded = decode(payload, Codec.parse(manifest.codec), max_bytes=inflated_bound(layout))
        check_layout(decoded, layout)
        state = decoded if active is None or manifest.from_version is None else apply_delta(active, decoded)
    except (CodecError, IncompatibleStateError) as exc:
        raise PackageError(PackageRejection.MALFORMED, str(exc)) from None
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise PackageError(PackageRejection.UNHEALTHY, "the rebuilt adapter holds non-finite values")
    return state


def _checksum(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document)).hexdigest()
