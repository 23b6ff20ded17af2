import dataclasses
import io
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetlora.client.device_state import DeviceState
from fleetlora.client.updates import (
    HIGHEST,
    POINTERS,
    SLOTS,
    UPDATES_DIR,
    UpdateSlots,
    apply_package,
    health_check,
    load_active_adapter,
)
from fleetlora.common.codec import Codec, encode
from fleetlora.common.config import ModelSpec
from fleetlora.common.delta import sha256_hex, trainable_state
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.common.model import build_model
from fleetlora.common.package import Package, PackageError, read_package, sign
from fleetlora.coordinator.packages import PackagePolicy, build_package
from tests.client.update_harness import TENANT, Fleet, make_fleet, snapshot, states_equal


@pytest.fixture
def fleet(tmp_path: Path, tiny_spec: ModelSpec, sqlite_url: str) -> Fleet:
    return make_fleet(tmp_path, tiny_spec, sqlite_url)


@pytest.fixture
def device(tmp_path: Path) -> DeviceState:
    return DeviceState(tmp_path / "device")


def _package(fleet: Fleet, to: int, source: int | None, *, built: datetime | None = None) -> bytes:
    """The stored package from version index ``source`` (None: full adapter) to version index ``to``."""
    source_id = None if source is None else fleet.versions[source].id
    info = build_package(
        fleet.storage, fleet.versions[to].id, source_id, fleet.key, PackagePolicy(), now=built
    )
    return fleet.storage.packages.blob(info.id)


def _parse(fleet: Fleet, blob: bytes) -> Package:
    return read_package(io.BytesIO(blob), fleet.public)


def _resign(fleet: Fleet, blob: bytes, payload: bytes | None = None, **changes) -> bytes:
    """A package re-signed by the coordinator with manifest changes (and optionally another payload)."""
    package = _parse(fleet, blob)
    payload = package.payload if payload is None else payload
    manifest = dataclasses.replace(
        package.manifest, payload_sha256=sha256_hex(payload), payload_length=len(payload), **changes
    )
    return sign(manifest, payload, fleet.key).to_bytes()


def _apply(fleet: Fleet, blob: bytes, device: DeviceState, **kwargs):
    kwargs.setdefault("tenant", TENANT)
    return apply_package(io.BytesIO(blob), device, fleet.public, **kwargs)


def _device_at(fleet: Fleet, device: DeviceState, *chain: int) -> None:
    """Apply a full package to version index ``chain[0]``, then deltas along the chain."""
    _apply(fleet, _package(fleet, chain[0], None), device)
    for source, to in itertools.pairwise(chain):
        _apply(fleet, _package(fleet, to, source), device)


def _active_state(device: DeviceState):
    slots = UpdateSlots(device)
    active = slots.active()
    assert active is not None
    return active, slots.load(active)


def _pointer_files(device: DeviceState) -> dict[int, Path]:
    """The pointer copies by the generation each records."""
    folder = device.root / UPDATES_DIR
    return {
        json.loads((folder / f"{p}.json").read_text())["generation"]: folder / f"{p}.json" for p in POINTERS
    }


def test_full_then_delta_packages_rebuild_the_registry_adapters(fleet: Fleet, device: DeviceState):
    assert UpdateSlots(device).active() is None
    slots_used = []
    steps = [(0, None), (1, 0), (2, 1)]
    for generation, (to, source) in enumerate(steps, start=1):
        applied = _apply(fleet, _package(fleet, to, source), device)
        expected_previous = None if source is None else fleet.versions[source].id
        assert applied.previous == expected_previous
        assert applied.seconds > 0
        active, state = _active_state(device)
        assert active == applied.active
        assert (active.version, active.sequence) == (fleet.versions[to].id, fleet.versions[to].id)
        assert active.generation == generation
        assert active.codec == "fp32+zstd" and active.reconstruction_error == 0.0
        assert active.tenant == TENANT and active.base_sha256 == fleet.loaded.base_sha256
        assert active.spec == fleet.spec
        assert active.adapter_sha256 == fleet.versions[to].adapter_sha256
        assert states_equal(state, fleet.adapters[to])
        slots_used.append(active.slot)
    assert slots_used == [SLOTS[0], SLOTS[1], SLOTS[0]]  # A/B: never the slot in use
    assert sorted(_pointer_files(device)) == [2, 3]  # the third commit replaced the oldest copy


def test_full_package_replaces_an_active_adapter(fleet: Fleet, device: DeviceState):
    _device_at(fleet, device, 0)
    applied = _apply(fleet, _package(fleet, 2, None), device)
    assert applied.previous == fleet.versions[0].id
    active, state = _active_state(device)
    assert active.version == fleet.versions[2].id
    assert states_equal(state, fleet.adapters[2])


def _nan_full_package(fleet: Fleet) -> bytes:
    broken = {n: t.clone() for n, t in fleet.adapters[2].items()}
    next(iter(broken.values())).view(-1)[0] = float("nan")
    return _resign(fleet, _package(fleet, 2, None), payload=encode(broken, Codec("fp32")))


def _missing_tensor_package(fleet: Fleet) -> bytes:
    partial = dict(list(fleet.adapters[2].items())[1:])
    return _resign(fleet, _package(fleet, 2, None), payload=encode(partial, Codec("fp32")))


def _flip_last(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


# Each case: (package bytes for a device at v1, keyword arguments for apply_package, expected reason).
Case = Callable[[Fleet], tuple[bytes, dict]]
REJECTIONS: dict[str, tuple[Case, str]] = {
    "other-key": (
        lambda f: (sign(*_split(f, _package(f, 2, 1)), Ed25519PrivateKey.generate()).to_bytes(), {}),
        "bad-signature",
    ),
    "replay": (lambda f: (_package(f, 1, 0), {}), "rollback"),
    "rollback": (lambda f: (_package(f, 0, None), {}), "rollback"),
    "expired": (
        lambda f: (_package(f, 2, 1, built=datetime.now(UTC) - timedelta(days=8)), {}),
        "expired",
    ),
    "expired-by-clock": (
        lambda f: (_package(f, 2, 1), {"now": datetime.now(UTC) + timedelta(days=8)}),
        "expired",
    ),
    "wrong-from-version": (lambda f: (_package(f, 2, 0), {}), "wrong-from-version"),
    "wrong-tenant": (lambda f: (_package(f, 2, 1), {"tenant": "someone-else"}), "wrong-tenant"),
    "wrong-base": (lambda f: (_resign(f, _package(f, 2, 1), base_sha256="0" * 64), {}), "wrong-base"),
    "tampered": (lambda f: (_flip_last(_package(f, 2, 1)), {}), "tampered"),
    "trailing-bytes": (lambda f: (_package(f, 2, 1) + b"more", {}), "oversize"),
    "device-cap": (
        lambda f: (
            (blob := _package(f, 2, 1)),
            {"cap": (_parse(f, blob).manifest.payload_length - 1) / f.loaded.base_bytes},
        ),
        "oversize",
    ),
    "bad-magic": (lambda f: (b"NOTAPKG!" + _package(f, 2, 1)[8:], {}), "malformed"),
    "wrong-layout": (lambda f: (_missing_tensor_package(f), {}), "malformed"),
    "nan-adapter": (lambda f: (_nan_full_package(f), {}), "unhealthy"),
}


def _split(fleet: Fleet, blob: bytes):
    package = _parse(fleet, blob)
    return package.manifest, package.payload


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_package_leaves_the_device_untouched(fleet: Fleet, device: DeviceState, case: str):
    _device_at(fleet, device, 0, 1)
    make, reason = REJECTIONS[case]
    blob, kwargs = make(fleet)
    before_files = snapshot(device.root)
    before_active = UpdateSlots(device).active()
    with pytest.raises(PackageError) as caught:
        _apply(fleet, blob, device, **kwargs)
    assert caught.value.reason == reason
    assert snapshot(device.root) == before_files
    active, state = _active_state(device)
    assert active == before_active
    assert active.version == fleet.versions[1].id
    assert states_equal(state, fleet.adapters[1])


def test_truncated_package_file_leaves_the_device_untouched(
    fleet: Fleet, device: DeviceState, tmp_path: Path
):
    _device_at(fleet, device, 0)
    blob = _package(fleet, 1, 0)
    before = snapshot(device.root)
    for cut in (10, len(blob) // 2, len(blob) - 1):
        path = tmp_path / "package.bin"
        path.write_bytes(blob[:cut])
        with path.open("rb") as stream, pytest.raises(PackageError) as caught:
            apply_package(stream, device, fleet.public, tenant=TENANT)
        assert caught.value.reason == "truncated"
        assert snapshot(device.root) == before
    # The whole file still applies.
    path.write_bytes(blob)
    with path.open("rb") as stream:
        assert (
            apply_package(stream, device, fleet.public, tenant=TENANT).active.version == fleet.versions[1].id
        )


@pytest.mark.parametrize("damage", ["flip-middle-byte", "edit-version", "truncate", "delete"])
def test_damaged_newest_pointer_falls_back_to_the_other_copy(fleet: Fleet, device: DeviceState, damage: str):
    _device_at(fleet, device, 1, 2)
    newest = _pointer_files(device)[2]
    blob = newest.read_bytes()
    if damage == "flip-middle-byte":
        newest.write_bytes(
            blob[: len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0x01]) + blob[len(blob) // 2 + 1 :]
        )
    elif damage == "edit-version":
        document = json.loads(blob)
        document["version"] += 5  # valid JSON, but its checksum no longer holds
        newest.write_text(json.dumps(document))
    elif damage == "truncate":
        newest.write_bytes(blob[: len(blob) // 2])
    else:
        newest.unlink()
    active, state = _active_state(device)
    assert (active.generation, active.version) == (1, fleet.versions[1].id)
    assert states_equal(state, fleet.adapters[1])
    # The device carries on from there: the damaged copy is the one the next commit replaces.
    applied = _apply(fleet, _package(fleet, 2, 1), device)
    assert applied.previous == fleet.versions[1].id
    assert sorted(_pointer_files(device)) == [1, 2]
    active, state = _active_state(device)
    assert active.version == fleet.versions[2].id
    assert states_equal(state, fleet.adapters[2])


def test_slot_changed_after_its_pointer_falls_back_to_the_older_pointer(fleet: Fleet, device: DeviceState):
    _device_at(fleet, device, 1, 2)
    active, _ = _active_state(device)
    slot = device.root / UPDATES_DIR / f"{active.slot}.safetensors"
    blob = slot.read_bytes()
    slot.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x01]))  # still loads, but not the adapter committed
    fallback, state = _active_state(device)
    assert (fallback.generation, fallback.version) == (1, fleet.versions[1].id)
    assert fallback.slot != active.slot
    assert states_equal(state, fleet.adapters[1])
    # With the other slot damaged too, no pointer holds: the device has no adapter it can trust.
    other = device.root / UPDATES_DIR / f"{fallback.slot}.safetensors"
    other.write_bytes(other.read_bytes()[:-10])
    assert UpdateSlots(device).active() is None


def test_failed_canary_leaves_the_old_adapter_active(fleet: Fleet, device: DeviceState):
    _device_at(fleet, device, 0, 1)
    before_active = UpdateSlots(device).active()
    assert before_active is not None
    folder = device.root / UPDATES_DIR
    kept = {
        p: (folder / p).read_bytes()
        for p in (*(f"{n}.json" for n in POINTERS), f"{before_active.slot}.safetensors")
    }

    def nan_logits(_module, _inputs, output):
        output.logits = torch.full_like(output.logits, float("nan"))
        return output

    hook = fleet.loaded.model.register_forward_hook(nan_logits)
    try:
        with pytest.raises(PackageError) as caught:
            _apply(fleet, _package(fleet, 2, 1), device)
    finally:
        hook.remove()
    assert caught.value.reason == "unhealthy"
    assert {p: (folder / p).read_bytes() for p in kept} == kept
    active, state = _active_state(device)
    assert active == before_active
    assert states_equal(state, fleet.adapters[1])
    # With a healthy model the same package applies.
    assert _apply(fleet, _package(fleet, 2, 1), device).active.version == fleet.versions[2].id


def test_health_check_refuses_a_slot_that_does_not_read_back(fleet: Fleet, device: DeviceState):
    _device_at(fleet, device, 1)
    active, state = _active_state(device)
    path = device.root / UPDATES_DIR / f"{active.slot}.safetensors"
    health_check(fleet.loaded, state, active.adapter_sha256, path)
    with pytest.raises(PackageError) as caught:
        health_check(fleet.loaded, state, "0" * 64, path)
    assert caught.value.reason == "unhealthy"
    with pytest.raises(PackageError) as caught:
        health_check(fleet.loaded, dict(list(state.items())[1:]), active.adapter_sha256, path)
    assert caught.value.reason == "unhealthy"


def test_a_device_whose_slots_are_damaged_still_refuses_older_packages(fleet: Fleet, device: DeviceState):
    """Before the highest sequence was kept apart, damaged slots reset rollback protection to zero."""
    _device_at(fleet, device, 1, 2)
    for slot in SLOTS:
        path = device.root / UPDATES_DIR / f"{slot}.safetensors"
        blob = path.read_bytes()
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x01]))
    assert UpdateSlots(device).active() is None  # no adapter it can trust

    with pytest.raises(PackageError, match="rollback"):
        _apply(fleet, _package(fleet, 1, None), device)  # older than the v2 it had
    _apply(fleet, _package(fleet, 2, None), device)  # the one it lost comes back
    active, state = _active_state(device)
    assert active.version == fleet.versions[2].id and states_equal(state, fleet.adapters[2])


def test_a_damaged_record_of_the_highest_applied_sequence_refuses_every_apply(
    fleet: Fleet, device: DeviceState
):
    _device_at(fleet, device, 1)
    record = device.root / UPDATES_DIR / f"{HIGHEST}.json"
    record.write_text(record.read_text().replace('"sequence": ', '"sequence": 1'))  # checksum fails

    with pytest.raises(IncompatibleStateError, match="cannot tell which packages it already applied"):
        _apply(fleet, _package(fleet, 2, 1), device)
    assert _active_state(device)[0].version == fleet.versions[1].id  # nothing changed


def test_the_active_adapter_loads_into_a_fresh_model_as_it_was_saved(fleet: Fleet, device: DeviceState):
    fresh = build_model(fleet.spec)  # not the cached model apply_package used
    assert load_active_adapter(device, fresh) >= 0.0  # no package yet: the initial adapter
    assert states_equal(trainable_state(fresh.model), fleet.loaded.initial_adapter)
    _device_at(fleet, device, 0, 2)
    seconds = load_active_adapter(device, fresh)
    assert isinstance(seconds, float) and seconds >= 0.0
    active, saved = _active_state(device)
    assert active.version == fleet.versions[2].id
    assert states_equal(trainable_state(fresh.model), saved)  # bit for bit what the slot holds


def test_a_damaged_slot_is_refused_by_the_load_path_and_the_model_keeps_its_adapter(
    fleet: Fleet, device: DeviceState
):
    _device_at(fleet, device, 1)
    slots = UpdateSlots(device)
    active = slots.active()
    assert active is not None
    fresh = build_model(fleet.spec)
    slot = slots.files.path(active.slot)
    slot.write_bytes(slot.read_bytes()[:-10])  # torn after its pointer was checked
    with pytest.raises(IncompatibleStateError, match="damaged"):
        slots.load_into(fresh, active)
    assert states_equal(trainable_state(fresh.model), fleet.loaded.initial_adapter)
