"""Shared set-up for the update-package tests, and the process the crash test runs.

:func:`make_fleet` stores three versions of the tiny model's adapter in SQLite storage (v0 the
initial adapter, v1 and v2 seeded perturbations of it) with the lineage record packages need, and
creates the coordinator's keys. Run as a script, ``crash TEMPLATE PACKAGE PUBKEY TENANT OUT MAX``
imports torch and builds the model once, then for kill point N = 1, 2, ... up to MAX:

* applies the package file to a copy of the device TEMPLATE (``OUT/device-N``) in a forked child,
  with ``os.fsync`` and ``os.replace`` counted and the child SIGKILLed just before call N;
* once it was killed, opens the device in another forked child, as a restarted process would, health-
  checks the adapter its pointer names, and writes that adapter (safetensors) and a JSON summary to
  ``OUT/recovered-N.*``;
* prints one JSON line for N, and stops after the first apply that ran to its end.

Forking from a process that has its imports done (as the device's warm runner does,
client/warm_clientapp.py) spares each kill point two Python start-ups: seconds instead of minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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


def _in_child(output: Path, work: Callable[[], None]) -> int:
    """Run ``work`` in a forked copy of this process, its stdout and stderr written to ``output``; its
    exit code as :mod:`subprocess` gives it (-9: SIGKILLed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's loop
        code = 1
        try:
            descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(descriptor, 1)
            os.dup2(descriptor, 2)
            work()
            sys.stdout.flush()
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _apply(device: Path, package: str, trusted: Ed25519PublicKey, tenant: str, kill_at: int) -> None:
    calls = 0

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
        applied = apply_package(stream, DeviceState(device), trusted, tenant=tenant)
    print(json.dumps({"version": applied.active.version, "calls": calls}), flush=True)


def _recover(device: Path, out: Path) -> None:
    started = time.perf_counter()
    slots = UpdateSlots(DeviceState(device))
    active = slots.active()
    summary: dict[str, object] = {"version": None}
    if active is not None:
        state = slots.load(active)
        health_check(cached_model(active.spec), state, active.adapter_sha256, slots.files.path(active.slot))
        out.with_suffix(".safetensors").write_bytes(serialize(state))
        summary = {"version": active.version, "sequence": active.sequence, "generation": active.generation}
    summary["seconds"] = time.perf_counter() - started
    out.with_suffix(".json").write_text(json.dumps(summary))


def _crash_main(template: str, package: str, public: str, tenant: str, out: str, most: str) -> None:
    trusted = read_public_key(Path(public), Ed25519PublicKey)
    with open(package, "rb") as stream:
        manifest, _ = read_manifest(stream, trusted)
    # Built before the forks, so that they count only the apply's calls.
    cached_model(from_config(ModelSpec, manifest.model, "model"))
    folder = Path(out)
    for kill_at in range(1, int(most) + 1):
        device = folder / f"device-{kill_at}"
        shutil.copytree(template, device)
        log = folder / f"apply-{kill_at}.out"
        point: dict[str, object] = {
            "kill_at": kill_at,
            "apply": _in_child(log, partial(_apply, device, package, trusted, tenant, kill_at)),
        }
        point["output"] = log.read_text()
        if point["apply"] == -signal.SIGKILL:
            started = time.perf_counter()
            recovered = partial(_recover, device, folder / f"recovered-{kill_at}")
            point["recover"] = _in_child(folder / f"recover-{kill_at}.out", recovered)
            point["recover_seconds"] = time.perf_counter() - started
            point["recover_output"] = (folder / f"recover-{kill_at}.out").read_text()
        print(json.dumps(point), flush=True)
        if point["apply"] != -signal.SIGKILL:
            break


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"crash": _crash_main}[command](*arguments)
