"""Shared set-up for the update-package tests, and the child process of the crash harness.

:func:`make_fleet` stores three versions of the tiny model's adapter in SQLite storage (v0 the
initial adapter, v1 and v2 seeded perturbations of it) with the lineage record packages need, and
creates the coordinator's keys. Run as a script, this file is the process the crash test kills:

* ``apply DEVICE PACKAGE PUBKEY TENANT``: apply a package file, with ``os.fsync`` and ``os.replace``
  counted and the process SIGKILLed just before call number ``$KILL_AT``;
* ``recover DEVICE OUT``: open the device as a restarted process would, health-check the adapter
  its pointer names, and write that adapter (safetensors) and a JSON summary next to ``OUT``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetlora.client.device_state import DeviceState
from fleetlora.client.updates import UpdateSlots, apply_package, health_check
from fleetlora.common.config import ModelSpec, from_config, to_config
from fleetlora.common.delta import State, serialize
from fleetlora.common.keys import (
    COORDINATOR_SIGNING_KEY,
    COORDINATOR_SIGNING_PUB,
    read_private_key,
    read_public_key,
)
from fleetlora.common.model import LoadedModel, cached_model
from fleetlora.common.package import read_manifest

if TYPE_CHECKING:  # the coordinator is imported only where a fleet is made: the child processes start faster
    from fleetlora.coordinator.storage import Storage, VersionInfo

LINEAGE = "lineage-L"
TENANT = "acme"
KILL_AT = "FLEETLORA_TEST_KILL_AT"


@dataclass
class Fleet:
    spec: ModelSpec
    loaded: LoadedModel
    storage: Storage
    key: Ed25519PrivateKey
    public: Ed25519PublicKey
    public_path: Path
    versions: list[VersionInfo]  # v0 (initial adapter), v1, v2
    adapters: list[State]  # as storage returns them


def make_fleet(folder: Path, spec: ModelSpec, db_url: str) -> Fleet:
    from fleetlora.coordinator.keys import init_keys
    from fleetlora.coordinator.storage import NewVersion, Storage

    loaded = cached_model(spec)
    storage = Storage.open(db_url)
    storage.versions.register_lineage(
        LINEAGE, TENANT, to_config(spec, "model"), loaded.base_sha256, loaded.base_bytes
    )
    generator = torch.Generator().manual_seed(7)
    states = [dict(loaded.initial_adapter)]
    for _ in range(2):
        states.append(
            {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in states[-1].items()}
        )
    versions: list[VersionInfo] = []
    for round_number, state in enumerate(states):
        versions.append(
            storage.versions.add(
                NewVersion(
                    lineage=LINEAGE,
                    parent_id=versions[-1].id if versions else None,
                    round=round_number,
                    base_model_sha256=loaded.base_sha256,
                    adapter=state,
                    participants={},
                    metrics={},
                )
            )
        )
    keys = folder / "keys"
    init_keys(keys)
    return Fleet(
        spec=spec,
        loaded=loaded,
        storage=storage,
        key=read_private_key(keys / COORDINATOR_SIGNING_KEY, Ed25519PrivateKey),
        public=read_public_key(keys / COORDINATOR_SIGNING_PUB, Ed25519PublicKey),
        public_path=keys / COORDINATOR_SIGNING_PUB,
        versions=versions,
        adapters=[storage.versions.adapter(v.id) for v in versions],
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def states_equal(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _apply_main(device: str, package: str, public: str, tenant: str) -> None:
    trusted = read_public_key(Path(public), Ed25519PublicKey)
    with open(package, "rb") as stream:
        manifest, _ = read_manifest(stream, trusted)
    cached_model(from_config(ModelSpec, manifest.model, "model"))  # warm up: count only the apply's calls
    kill_at, calls = int(os.environ[KILL_AT]), 0

    def counted(real, name):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            print(f"call {calls}: {name}", flush=True)
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return wrapper

    os.fsync = counted(os.fsync, "fsync")
    os.replace = counted(os.replace, "replace")
    with open(package, "rb") as stream:
        applied = apply_package(stream, DeviceState(Path(device)), trusted, tenant=tenant)
    print(json.dumps({"version": applied.active.version, "calls": calls}), flush=True)


def _recover_main(device: str, out: str) -> None:
    started = time.perf_counter()
    slots = UpdateSlots(DeviceState(Path(device)))
    active = slots.active()
    summary: dict[str, object] = {"version": None}
    if active is not None:
        state = slots.load(active)
        health_check(cached_model(active.spec), state, active.adapter_sha256, slots.files.path(active.slot))
        Path(out).with_suffix(".safetensors").write_bytes(serialize(state))
        summary = {"version": active.version, "sequence": active.sequence, "generation": active.generation}
    summary["seconds"] = time.perf_counter() - started
    Path(out).with_suffix(".json").write_text(json.dumps(summary))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"apply": _apply_main, "recover": _recover_main}[command](*arguments)
