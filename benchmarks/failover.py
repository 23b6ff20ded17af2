"""Failover: a coordinator host killed under a running round, back within 15 s (issue 14).

On 127.0.0.1, with the tiny model and 2 devices (``simulations/local_deployment.py``, the commands of
docs/operator.md): each repeat starts a two-round run, SIGKILLs the coordinator host's whole process
group while the second round trains, starts ``fleetlora coordinator up`` again after 1 s (what its
supervisor does: systemd's ``Restart=always`` / ``RestartSec=1`` in
deploy/fleetlora-coordinator.service, Docker's restart policy in docker-compose.yml), and then runs
one more round. It reports, per repeat and as the worst case, the seconds from the kill until the
SuperLink answers its health check over TLS and until both devices are online again, and checks
that no stored version was lost or stored twice. Target: the SuperLink back within 15 s.

Run from the repository root::

    .venv/bin/python benchmarks/failover.py [--repeats 3] [--json benchmarks/results/failover.json]

``--smoke`` is one repeat and writes nothing unless ``--json`` is given (``make test`` runs it);
``--quick`` (what ``make bench`` runs) is one repeat written to benchmarks/results/quick/failover.json.
There is no baseline to time against: the SuperLink's return is held against its target.
Progress goes to stderr; the JSON result is the last line of stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_io import default_path, emit, load_average, load_before_after, machine

from fleetlora.simulations.local_deployment import LocalFleet

TARGET_SECONDS = 15.0
RESTART_DELAY = 1.0  # RestartSec in deploy/fleetlora-coordinator.service
FEDERATION: dict[str, Any] = {
    "model": "tiny",
    "data": "builtin",
    "eval-data": "builtin-test",
    "rounds": 1,
    "devices-per-round": 2,
    "min-devices": 2,
    "round-deadline": 120.0,
    "local-steps": 5,
}


def progress(message: str) -> None:
    print(f"[failover {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Kills to measure (default 3).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="One kill; nothing written without --json.")
    mode.add_argument("--quick", action="store_true", help="One kill; results/quick/failover.json.")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke or args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    json_path = args.json or (
        None if args.smoke else default_path("failover", args.quick, Path("benchmarks/results"))
    )
    load_before = load_average()
    kills: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleetlora-failover-") as folder:
        fleet = LocalFleet(Path(folder), devices=2, federation=dict(FEDERATION))  # on free ports
        try:
            progress("starting the coordinator host and 2 devices")
            fleet.start()
            for repeat in range(repeats):
                failover = fleet.fail_over(online=2, restart_delay=RESTART_DELAY)
                kill = {**dataclasses.asdict(failover), "lost": failover.lost, "doubled": failover.doubled}
                kills.append(kill)
                progress(
                    f"kill {repeat + 1}/{repeats}: SuperLink back in {failover.superlink_seconds} s, "
                    f"devices in {failover.devices_seconds} s, then {failover.status_after}"
                )
        finally:
            fleet.stop()
    worst = max(k["superlink_seconds"] for k in kills)
    result = {
        "benchmark": "failover",
        "command": shlex.join(sys.orig_argv),
        "setup": {"devices": 2, "restart_delay_seconds": RESTART_DELAY, **FEDERATION},
        "kills": kills,
        "superlink_back_seconds_worst": worst,
        "devices_back_seconds_worst": max(k["devices_seconds"] for k in kills),
        "versions_lost": sum(len(k["lost"]) for k in kills),
        "versions_doubled": sum(len(k["doubled"]) for k in kills),
        "runs_completed_after_restart": sum(k["status_after"] == "finished:completed" for k in kills),
        "target_seconds": TARGET_SECONDS,
        "target_met": worst <= TARGET_SECONDS,
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average": load_before_after(load_before),
    }
    emit(result, json_path)
    return result


if __name__ == "__main__":
    main()
