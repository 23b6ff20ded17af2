"""``fleetlora simulate`` as a user runs it: a subprocess on the real Flower Simulation Engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from fleetlora.coordinator.storage import Storage


def fleetlora(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetlora", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_tiny_fleet_end_to_end(tmp_path: Path):
    out = tmp_path / "run"
    done = fleetlora(
        "simulate", "--model", "tiny", "--devices", "3", "--rounds", "2", "--out", str(out),
        "--partition", "iid", "--local-steps", "15", "--learning-rate", "0.003",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fleetlora simulation" in done.stdout  # the per-round table was printed

    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    versions = [results["initial"]["version"], *(r["version"] for r in rounds)]
    assert len(set(versions)) == 3
    assert all(r["participants"] == 3 and r["examples"] > 0 and r["upload_bytes"] > 0 for r in rounds)
    assert results["base_model_bytes"] > 0
    assert rounds[-1]["metrics"]["central_loss"] < results["initial"]["metrics"]["central_loss"]
    # Private by default: every device's records stayed within ε 8, and the table shows the largest.
    assert set(results["devices"]) == {"partition-0", "partition-1", "partition-2"}
    assert all(0 < d["epsilon"] <= 8.0 for d in results["devices"].values())
    assert "max ε" in done.stdout and "not private" not in done.stdout

    # Every round's update package is under the cap, and every device was brought to the new version.
    assert all(0 < r["package_ratio"] <= 0.10 and r["package_bytes"] > 0 for r in rounds)
    assert all(r["updates"]["devices"] == {"applied": 3} for r in rounds)

    storage = Storage.open(f"sqlite:///{out / 'fleetlora.db'}")
    stored = {v.label: v for v in storage.versions.all()}
    assert set(versions) <= set(stored)
    assert stored[versions[2]].parent_id == stored[versions[1]].id

    # Each device's own state agrees: it runs the newest version, and an exported package applies
    # out of band only where it moves the device forward.
    device = out / "devices" / "partition-0"
    status = fleetlora("device", "status", "--state-dir", str(device), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["version"] == stored[versions[2]].id
    shown = fleetlora("device", "status", "--state-dir", str(device)).stdout
    assert f"version: {versions[2]}\n" in shown  # labelled as the coordinator labels it, e.g. v3
    db = f"sqlite:///{out / 'fleetlora.db'}"
    package = tmp_path / "v2.pkg"
    built = fleetlora(
        "coordinator", "packages", "build", "--to", versions[1], "--out", str(package),
        "--keys", str(out / "keys"), "--db", db,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    signing_pub = str(out / "keys" / "coordinator-signing.pub")
    verified = fleetlora("coordinator", "packages", "verify", str(package), "--key", signing_pub)
    assert verified.returncode == 0 and "signature and payload verified" in verified.stdout
    refused = fleetlora(
        "device", "apply", str(package), "--state-dir", str(device),
        "--coordinator-key", signing_pub,
    )  # fmt: skip
    assert "(rollback)" in _error_line(refused)  # an older version than the device holds


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_runs_with_one_seed_sample_the_same_partitions(tmp_path: Path, db_url: str):
    schedules = []
    # The second run keeps its versions in PostgreSQL, with a password (trust auth ignores it) that must
    # not reach results.json.
    secret_db = make_url(db_url).set(password="hunter2").render_as_string(hide_password=False)
    for run, privacy, db in (("first", "8", []), ("second", "0", ["--db", secret_db])):
        out = tmp_path / run  # the schedule depends neither on DP nor on the database
        done = fleetlora(
            "simulate", "--model", "tiny", "--devices", "6", "--devices-per-round", "3", "--rounds", "3",
            "--seed", "1", "--out", str(out), "--dp-epsilon", privacy, *db,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("this run is not private" in " ".join(done.stdout.split())) is (privacy == "0")
        written = (out / "results.json").read_text()
        schedules.append([r["partitions"] for r in json.loads(written)["rounds"]])
        assert "hunter2" not in written + done.stdout + done.stderr

    assert ":***@" in written

    assert schedules[0] == schedules[1]
    assert len(schedules[0]) == 3
    assert all(len(set(partitions)) == 3 and set(partitions) <= set(range(6)) for partitions in schedules[0])


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_unknown_model_path(tmp_path: Path):
    line = _error_line(fleetlora("simulate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path)))
    assert "Unknown model" in line and "no-model" in line


def test_empty_data_file(tmp_path: Path):
    data = tmp_path / "empty.csv"
    data.write_text("")
    line = _error_line(fleetlora("simulate", "--model", "tiny", "--data", str(data), "--out", str(tmp_path)))
    assert "empty.csv contains no examples" in line


def test_malformed_csv(tmp_path: Path):
    data = tmp_path / "bad.csv"
    data.write_text("text,label\nfine,a\ntoo,many,fields\n")
    line = _error_line(fleetlora("simulate", "--model", "tiny", "--data", str(data), "--out", str(tmp_path)))
    assert "bad.csv, line 3" in line


def test_bad_partition_spec(tmp_path: Path):
    line = _error_line(
        fleetlora("simulate", "--model", "tiny", "--partition", "dirichlet:0", "--out", str(tmp_path))
    )
    assert "dirichlet:ALPHA" in line


def test_versions_list_reads_the_database(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    missing = fleetlora("coordinator", "versions", "list", "--db", db, "--json")
    assert missing.returncode == 2 and "db upgrade" in _error_line(missing)  # a read never makes one
    assert not (tmp_path / "empty.db").exists()
    assert fleetlora("coordinator", "db", "upgrade", "--db", db).returncode == 0
    done = fleetlora("coordinator", "versions", "list", "--db", db, "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
