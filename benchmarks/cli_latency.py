"""How long each ``fleetlora`` command takes to answer, start-up included (issue 15).

Targets: every ``--help`` under 1 s; the listings an operator or a device integrator runs all day
(``coordinator status``, ``versions list``, ``packages list``, ``devices quarantined``, ``audit list``,
``device status``, ``device corpus list``, ``device quarantine list``, ``device review list``) under 2 s.

Each command runs as its own process (the ``fleetlora`` console script beside this Python) ``--runs``
times; the median wall time counts. The listings read a real set-up made first in a temporary folder:
a SQLite coordinator database with three versions of the tiny model's adapter (two of them committed
rounds), two signed packages, a privacy ledger, an enrolled device in quarantine, and that device's
state folder (``fleetlora device enroll``, a package applied with ``fleetlora device apply``, a corpus
fed through ``fleetlora device ingest``, one record of it quarantined). ``coordinator status`` also asks
the SuperLink through ``flwr`` subprocesses; none is set up here, so ``flwr`` answers with an error that
the command shows in its runs table. Its time in ``flwr`` is measured inside the process, and ``ours_s``
(the total less that) is what its target applies to.

Run from the repository root (``--smoke``: one run of a few commands, no package applied on the
device, nothing written; ``make test`` runs it)::

    .venv/bin/python benchmarks/cli_latency.py [--runs 3] [--smoke | --quick]

``--quick`` (what ``make bench`` runs): one run of every command, written to
benchmarks/results/quick/cli_latency.json. There is no baseline to time against: each command has its
target instead; ``slowest_help_s`` and ``slowest_listing_s`` are the figures held against them.

Progress goes to stderr; the JSON result (also written to ``--json`` unless ``--smoke``) is the last
line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results_io import default_path, emit, machine

HELP_TARGET_S = 1.0
LISTING_TARGET_S = 2.0
TENANT = "default"
LINEAGE = "bench-lineage"
DEVICE = "bench-device"
FLWR_SECONDS = "cli-latency: seconds in flwr:"
TIMEOUT_S = 300.0

# `coordinator status` with fleetlora.coordinator.flower_control.flwr (every call to the SuperLink)
# timed: the time is printed to stderr on a line of its own as the process ends.
STATUS_WRAPPER = f"""
import sys, time
from fleetlora.coordinator import flower_control
real, spent = flower_control.flwr, [0.0]
def timed(*args, **kwargs):
    started = time.perf_counter()
    try:
        return real(*args, **kwargs)
    finally:
        spent[0] += time.perf_counter() - started
flower_control.flwr = timed
try:
    from fleetlora.cli import main
    sys.argv = ["fleetlora", *sys.argv[1:]]
    main()
finally:
    print("{FLWR_SECONDS}", spent[0], file=sys.stderr)
"""

HELP_COMMANDS = [
    [],
    ["simulate"],
    ["coordinator"],
    ["coordinator", "versions"],
    ["coordinator", "packages"],
    ["coordinator", "devices"],
    ["coordinator", "keys"],
    ["coordinator", "certs"],
    ["coordinator", "round"],
    ["coordinator", "db"],
    ["coordinator", "operator"],
    ["coordinator", "audit"],
    ["coordinator", "status"],
    ["coordinator", "versions", "list"],
    ["coordinator", "packages", "build"],
    ["device"],
    ["device", "corpus"],
    ["device", "quarantine"],
    ["device", "review"],
    ["device", "status"],
    ["device", "apply"],
    ["device", "ingest"],
    ["device", "model-info"],
]
SMOKE_HELP = [[], ["coordinator"], ["device"]]
# The listings, with placeholders the set-up fills in: DB (the database URL), CONFIG (fleetlora.toml),
# STATE (the device's state folder).
LISTINGS = [
    ["coordinator", "status", "--config", "CONFIG"],
    ["coordinator", "versions", "list", "--db", "DB"],
    ["coordinator", "packages", "list", "--db", "DB"],
    ["coordinator", "devices", "quarantined", "--db", "DB"],
    ["coordinator", "audit", "list", "--db", "DB"],
    ["device", "status", "--state-dir", "STATE"],
    ["device", "corpus", "list", "--state-dir", "STATE"],
    ["device", "quarantine", "list", "--state-dir", "STATE"],
    ["device", "review", "list", "--state-dir", "STATE"],
]
SMOKE_LISTINGS = [LISTINGS[0], LISTINGS[1], LISTINGS[5], LISTINGS[6]]
CORPUS = [
    {"text": "the battery lasts two days on one charge", "label": "pos"},
    {"text": "the screen cracked in the first week", "label": "neg"},
    {"text": "setup took five minutes and just worked"},
    {"text": "support never answered my three emails"},
]


@dataclass(frozen=True)
class Fixture:
    folder: Path
    db: str
    config: Path
    state: Path

    def fill(self, words: list[str]) -> list[str]:
        return [
            {"DB": self.db, "CONFIG": str(self.config), "STATE": str(self.state)}.get(w, w) for w in words
        ]


def fleetlora() -> list[str]:
    """The console script a user runs, else ``python -m fleetlora``."""
    script = Path(sys.executable).parent / "fleetlora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fleetlora"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    argv: list[str], cwd: Path, stdin: str | None = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "COLUMNS": "160", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False
    )
    return time.perf_counter() - started, done


def checked(what: str, argv: list[str], cwd: Path, stdin: str | None = None) -> float:
    """Run a set-up command; its seconds, or RuntimeError with what it said."""
    seconds, done = run(argv, cwd, stdin)
    if done.returncode != 0:
        raise RuntimeError(
            f"set-up `{what}` exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"
        )
    log(f"  set-up {what}: {seconds:.2f} s")
    return seconds


def make_fixture(folder: Path, *, apply_package: bool) -> tuple[Fixture, dict[str, float]]:
    """The coordinator database, fleetlora.toml and the device's state folder the listings read."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fleetlora.common.config import ModelSpec, to_config
    from fleetlora.common.host_config import load_host_config
    from fleetlora.common.keys import COORDINATOR_SIGNING_PUB, DEVICE_SIGNING_PUB, read_public_key
    from fleetlora.common.model import cached_model
    from fleetlora.coordinator.keys import init_keys, load_signing_key
    from fleetlora.coordinator.packages import PackagePolicy, build_package
    from fleetlora.coordinator.storage import NewVersion, RoundReport, Storage
    from fleetlora.coordinator.uploads import PrivacySpend

    setup: dict[str, float] = {}
    state = folder / "device"
    config = folder / "fleetlora.toml"
    config.write_text('[coordinator]\nstate-dir = "coordinator"\n')
    db = load_host_config(config).coordinator.database_url
    command = fleetlora()
    setup["device enroll"] = checked(
        "device enroll",
        [*command, "device", "enroll", "--state-dir", str(state), "--device-id", DEVICE],
        folder,
    )

    spec = ModelSpec(name="tiny", task="classify", labels=("neg", "pos"), max_length=32)
    loaded = cached_model(spec)
    storage = Storage.open(db, TENANT)
    storage.versions.register_lineage(
        LINEAGE, TENANT, to_config(spec, "model"), loaded.base_sha256, loaded.base_bytes
    )
    adapter = dict(loaded.initial_adapter)
    versions = [
        storage.versions.add(
            NewVersion(
                lineage=LINEAGE,
                round=0,
                parent_id=None,
                base_model_sha256=loaded.base_sha256,
                adapter=adapter,
                participants={},
                metrics={},
            )
        )
    ]
    for round_number in (1, 2):
        adapter = {name: tensor + 0.01 * round_number for name, tensor in adapter.items()}
        versions.append(
            storage.versions.commit_round(
                NewVersion(
                    lineage=LINEAGE,
                    round=round_number,
                    parent_id=versions[-1].id,
                    base_model_sha256=loaded.base_sha256,
                    adapter=adapter,
                    participants={DEVICE: 12},
                    metrics={"central_accuracy": 0.5 + 0.1 * round_number},
                ),
                RoundReport(sampled=1, received=1, dropped=[], upload_bytes=4096, seconds=3.0),
            )
        )
        storage.ledgers.record_privacy(
            LINEAGE, round_number, [PrivacySpend(DEVICE, 0.5 * round_number, 1e-5, 1.1, 0.25, 10, 0)]
        )
    storage.devices.enroll(
        DEVICE, TENANT, read_public_key(state / DEVICE_SIGNING_PUB, Ed25519PublicKey), None
    )
    storage.devices.flag(LINEAGE, 2, [(DEVICE, "delta norm out of bounds")], quarantine_after=1)
    keys = folder / "keys"
    init_keys(keys)
    signing = load_signing_key(keys)
    full = build_package(storage, versions[-1].id, None, signing, PackagePolicy())
    build_package(storage, versions[-1].id, versions[-2].id, signing, PackagePolicy())
    storage.db.close()

    if apply_package:
        package = folder / "full.pkg"
        package.write_bytes(Storage.open(db, TENANT).packages.blob(full.id))
        key = keys / COORDINATOR_SIGNING_PUB
        apply = ["device", "apply", str(package), "--state-dir", str(state), "--coordinator-key", str(key)]
        setup["device apply"] = checked("device apply", [*command, *apply, "--tenant", TENANT], folder)
    records = "\n".join(json.dumps(r) for r in CORPUS) + "\n{not json\n"  # the last line is quarantined
    setup["device ingest"] = checked(
        "device ingest",
        [*command, "device", "ingest", "--state-dir", str(state), "--stdin", "--device-id", DEVICE],
        folder,
        records,
    )
    return Fixture(folder, db, config, state), setup


def measure(words: list[str], fixture: Fixture, runs: int, target: float, kind: str) -> dict[str, Any]:
    """``runs`` timed runs of ``fleetlora WORDS``; ``coordinator status`` through STATUS_WRAPPER."""
    status = words[:2] == ["coordinator", "status"] and "--help" not in words
    argv = [*([sys.executable, "-c", STATUS_WRAPPER] if status else fleetlora()), *fixture.fill(words)]
    seconds, flwr_seconds, codes = [], [], []
    error = ""
    for _ in range(runs):
        elapsed, done = run(argv, fixture.folder)
        seconds.append(round(elapsed, 4))
        codes.append(done.returncode)
        if done.returncode != 0:
            error = (done.stderr or done.stdout)[-2000:]
        if status:
            spent = [line for line in done.stderr.splitlines() if line.startswith(FLWR_SECONDS)]
            flwr_seconds.append(float(spent[-1].removeprefix(FLWR_SECONDS)) if spent else 0.0)
    median = statistics.median(seconds)
    result: dict[str, Any] = {
        "kind": kind,
        "runs_s": seconds,
        "median_s": round(median, 4),
        "target_s": target,
    }
    if status:  # the target is on what is left once the SuperLink's answers are taken out
        median = statistics.median(total - flwr for total, flwr in zip(seconds, flwr_seconds, strict=True))
        result.update(flwr_s=round(statistics.median(flwr_seconds), 6), ours_s=round(median, 4))
    result.update(met=median < target, exit_codes=codes)
    if error:
        result["error"] = error
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each command (the median counts)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="one run of a few commands; nothing written")
    mode.add_argument("--quick", action="store_true", help="one run of every command; results/quick/")
    parser.add_argument("--json", type=Path, help="JSON to write (default results/cli_latency.json)")
    args = parser.parse_args(argv)
    if args.smoke or args.quick:
        args.runs = 1
    args.json = args.json or default_path("cli_latency", args.quick)
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "benchmarks/cli_latency.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "targets_s": {"help": HELP_TARGET_S, "listing": LISTING_TARGET_S},
    }
    helps = SMOKE_HELP if args.smoke else HELP_COMMANDS
    listings = SMOKE_LISTINGS if args.smoke else LISTINGS
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as scratch:
        log("setting up a coordinator database and a device state folder ...")
        fixture, result["setup_s"] = make_fixture(Path(scratch), apply_package=not args.smoke)
        commands: dict[str, dict[str, Any]] = {}
        plan = [([*w, "--help"], HELP_TARGET_S, "help") for w in helps]
        plan += [(w, LISTING_TARGET_S, "listing") for w in listings]
        for words, target, kind in plan:
            name = shlex.join(["fleetlora", *words])
            commands[name] = measure(words, fixture, args.runs, target, kind)
            shown = commands[name]
            extra = (
                f" (ours {shown['ours_s']:.2f} s, flwr {shown['flwr_s']:.2f} s)" if "ours_s" in shown else ""
            )
            log(f"{name}: {shown['median_s']:.2f} s{extra} {'ok' if shown['met'] else 'OVER'} {target:g} s")
    result["commands"] = commands
    result["failed"] = [name for name, c in commands.items() if any(c["exit_codes"])]
    result["unmet"] = [name for name, c in commands.items() if not c["met"]]
    result["all_met"] = not result["unmet"]
    for kind in ("help", "listing"):  # a listing's own time: less flwr's where it asks the SuperLink
        times = [c.get("ours_s", c["median_s"]) for c in commands.values() if c["kind"] == kind]
        result[f"slowest_{kind}_s"] = max(times) if times else None
    emit(result, None if args.smoke else args.json)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
