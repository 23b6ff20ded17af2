"""Fault injection: kill the device at every fsync and rename of an apply; it must come back whole.

A child process applies the delta package v1 → v2 with ``os.fsync`` and ``os.replace`` counted and
SIGKILLs itself just before call N. A fresh child then opens the device as a restarted device
would and health-checks the adapter its pointer names: that must be v1 or v2, exactly as the
registry holds it, never nothing and never a torn adapter. Both children are forks of one harness
process (tests/client/update_harness.py) that has torch imported and the model built.
"""

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fleetlora.client.device_state import DeviceState
from fleetlora.client.updates import UPDATES_DIR, UpdateSlots, apply_package
from fleetlora.common.config import ModelSpec
from fleetlora.common.package import PackageError
from fleetlora.coordinator.packages import PackagePolicy, build_package
from tests.client import update_harness
from tests.client.update_harness import TENANT, Fleet, make_fleet, states_equal

HARNESS = Path(update_harness.__file__)
REPO = Path(__file__).resolve().parents[2]
RECOVERY_LIMIT_S = 30.0
MAX_KILL_POINTS = 40


def _crash(template: Path, package: Path, public: Path, out: Path) -> list[dict]:
    """The harness's kill points, in order: one JSON object each."""
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(HARNESS), "crash", str(template), str(package), str(public), TENANT, str(out),
         str(MAX_KILL_POINTS)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # one process that imports torch and builds the tiny model, then forks per kill point
def test_killed_apply_recovers_to_the_old_or_the_new_adapter(
    tmp_path: Path, tiny_spec: ModelSpec, sqlite_url: str
):
    fleet = make_fleet(tmp_path, tiny_spec, sqlite_url)
    v1, v2 = fleet.versions[1], fleet.versions[2]
    expected = {v1.id: fleet.adapters[1], v2.id: fleet.adapters[2]}

    template = DeviceState(tmp_path / "template")
    full = fleet.storage.packages.blob(
        build_package(fleet.storage, v1.id, None, fleet.key, PackagePolicy()).id
    )
    apply_package(io.BytesIO(full), template, fleet.public, tenant=TENANT)
    package = tmp_path / "v1-v2.pkg"
    package.write_bytes(
        fleet.storage.packages.blob(build_package(fleet.storage, v2.id, v1.id, fleet.key, PackagePolicy()).id)
    )
    crashes = tmp_path / "crashes"

    recovered: dict[int, int] = {}  # kill point → version the restarted device came back with
    completed_at = None
    for point in _crash(template.root, package, fleet.public_path, crashes):
        kill_at, device = point["kill_at"], crashes / f"device-{point['kill_at']}"
        assert kill_at == len(recovered) + 1
        if point["apply"] == 0:  # fewer than kill_at calls: the apply ran to its end
            assert json.loads(point["output"].strip().splitlines()[-1]) == {
                "version": v2.id,
                "calls": kill_at - 1,
            }
            completed_at = kill_at
            break
        assert point["apply"] == -signal.SIGKILL, point
        assert point["output"].strip().splitlines()[-1].startswith(f"call {kill_at}: ")

        out = crashes / f"recovered-{kill_at}"
        assert point["recover"] == 0, point
        assert point["recover_seconds"] < RECOVERY_LIMIT_S
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["version"] in expected, (kill_at, summary)
        assert states_equal(load_file(out.with_suffix(".safetensors")), expected[summary["version"]])
        assert not [p for p in (device / UPDATES_DIR).iterdir() if p.name.startswith(".")]  # scratch gone
        recovered[kill_at] = summary["version"]

        state = DeviceState(device)
        with package.open("rb") as stream:
            if summary["version"] == v1.id:  # the update was lost: applying it again completes it
                assert apply_package(stream, state, fleet.public, tenant=TENANT).previous == v1.id
            else:  # the update stands, and the same package is now a replay
                with pytest.raises(PackageError) as caught:
                    apply_package(stream, state, fleet.public, tenant=TENANT)
                assert caught.value.reason == "rollback"
        _assert_at_v2(state, fleet)

    assert completed_at is not None, f"the apply was still killed at call {MAX_KILL_POINTS}"
    _assert_at_v2(DeviceState(crashes / f"device-{completed_at}"), fleet)
    kill_points = sorted(recovered)
    assert len(kill_points) >= 4 and kill_points == list(range(1, completed_at))
    # Killed before the pointer's rename: the old adapter; after it: the new one. One commit point.
    versions = [recovered[n] for n in kill_points]
    assert versions[0] == v1.id and versions[-1] == v2.id
    assert versions == sorted(versions, key=lambda v: v == v2.id)


def _assert_at_v2(state: DeviceState, fleet: Fleet) -> None:
    slots = UpdateSlots(state)
    active = slots.active()
    assert active is not None and active.version == fleet.versions[2].id
    assert states_equal(slots.load(active), fleet.adapters[2])
