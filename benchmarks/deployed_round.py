"""What deployment costs against simulation, and what the warm ClientApp runner saves (issue 5).

In one run, on 127.0.0.1, with the tiny model and 2 devices (5 local steps each):

- **simulation**: ``fleetlora simulate`` of 2 rounds; the rounds' seconds as the coordinator records
  them (train, aggregate, federated evaluation, update distribution);
- **deployed, cold**: the same 2 rounds on the Deployment Engine (TLS, SuperNode auth) with Flower's
  default isolation, a fresh ``flwr-clientapp`` process per message;
- **deployed, warm**: the same with fleetlora's warm ClientApp runner (``client/warm_clientapp.py``).

For each deployed fleet it also times the cold start of the coordinator host (first start: keys,
certificates, schema, SuperLink ready) and of the devices (enrolment + SuperNode online), and the
recovery after SIGKILL of the coordinator host (restart until both devices are back online).
Round 1 also pays for building the model in each process; round 2 is the steady state quoted.

Where a deployed round's time goes: each round is exchanges (train, federated evaluation; then, after
the round's commit, the update distribution's status query and package), and each is taken apart from
the fleet's own logs, one clock on one machine: when the coordinator sent the messages (their Flower
``created_at``), when the warm runner took each device's task from its SuperNode, when the ClientApp
started and how long it took (``message_handled`` in the devices' ``client-app`` logs), and when the
coordinator had every reply (its ``round_phase`` lines). ``overhead_breakdown`` sums the steady round's
exchanges, on the device whose reply came last, against the gap to the simulated round. One part is the
SuperNode's idle wait (Flower sleeps 3 s after each pull that finds no message, and the coordinator can
only send the next exchange after the last reply, by when every SuperNode has gone back to sleep).

Run from the repository root::

    .venv/bin/python benchmarks/deployed_round.py [--json benchmarks/results/deployed_round.json]

``--quick`` (what ``make bench`` runs) is the same measurement, which is already the smallest that
has a steady round, written to benchmarks/results/quick/deployed_round.json instead. ``--smoke``
(what ``make test`` runs) is its smallest real run: one round of 2 local steps on each fleet, nothing
written unless ``--json`` is given; it still starts a real SuperLink and SuperNodes three times.

Progress goes to stderr; the JSON result is the last line of stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from results_io import default_path, emit, load_average, load_before_after, machine

from fleetlora.common.logs import search_logs
from fleetlora.coordinator.storage import Storage
from fleetlora.simulations.local_deployment import LocalFleet
from fleetlora.simulations.runner import SimulationConfig, simulate

ROUNDS = 2
LOCAL_STEPS = 5
RESULTS = Path("benchmarks/results")
FEDERATION: dict[str, Any] = {
    "model": "tiny",
    "data": "builtin",
    "eval-data": "builtin-test",
    "rounds": ROUNDS,
    "devices-per-round": 2,
    "min-devices": 2,
    "round-deadline": 300.0,
    "local-steps": LOCAL_STEPS,
    "partition": "iid",
}
# Each exchange's message type, and the round phase whose last count is logged when every reply is in
# (the status query's replies are counted by nobody: its end is the package's send).
PHASES = {"train": "training", "evaluate": "evaluating", "query.update_status": None,
          "query.update_apply": "distributing"}  # fmt: skip
IN_ROUND = ("train", "evaluate")  # in a round's seconds; the distribution comes after its commit


def progress(message: str) -> None:
    print(f"[deployed_round] {message}", file=sys.stderr, flush=True)


def simulated(scratch: Path, federation: dict[str, Any]) -> dict[str, Any]:
    config = SimulationConfig(
        devices=2,
        out=scratch / "simulation",
        settings={"model": "tiny", "data": "builtin", "rounds": federation["rounds"], "devices-per-round": 2,
                  "min-devices": 2, "local-steps": federation["local-steps"], "partition": "iid"},
    )  # fmt: skip
    started = time.perf_counter()
    results = simulate(config)
    return {
        "round_seconds": [r["seconds"] for r in results["rounds"]],
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def deployed(scratch: Path, warm: bool, federation: dict[str, Any]) -> dict[str, Any]:
    fleet = LocalFleet(
        scratch / ("warm" if warm else "cold"), devices=2, federation=dict(federation), warm_clientapp=warm
    )
    try:
        coordinator_start = fleet.start_coordinator()
        started = time.monotonic()
        for i in (1, 2):
            fleet.enroll(i)
            fleet.start_device(i)
        fleet.wait_online(2, timeout=120)
        devices_start = time.monotonic() - started
        started = time.monotonic()
        run = fleet.start_run()
        status = fleet.wait_finished(run, 900)
        run_seconds = time.monotonic() - started
        storage = Storage.open(fleet.coordinator.database_url)
        rounds = storage.ledgers.rounds(storage.versions.all()[-1].lineage)
        timeline = exchanges(fleet.folder, fleet.devices, rounds[-1].round)
        fleet.hosts["coordinator"].kill()
        restarted = time.monotonic()
        superlink_ready = fleet.start_coordinator()
        fleet.wait_online(2, timeout=120)
        recovery = time.monotonic() - restarted
    finally:
        fleet.stop()
    return {
        "status": status,
        "round_seconds": [round(r.seconds, 2) for r in rounds],
        "run_seconds": round(run_seconds, 2),
        "coordinator_cold_start_seconds": round(coordinator_start, 2),
        "devices_cold_start_seconds": round(devices_start, 2),
        "recovery_after_kill_seconds": round(recovery, 2),
        "superlink_ready_after_restart_seconds": round(superlink_ready, 2),
        "steady_round_exchanges": timeline,
    }


def _epoch(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"]).timestamp()


def exchanges(folder: Path, devices: int, round_number: int) -> dict[str, dict[str, Any]]:
    """Round ``round_number``'s exchanges from the fleet's logs, in seconds from each one's send.

    Per device: ``taken`` (the warm runner took the task: the SuperNode's idle wait, its pull and the
    runner's poll; None without the runner), ``started`` (the ClientApp began: + fork and Flower's task
    set-up), ``clientapp`` (its own seconds), ``replied`` (it returned). ``all_in``: the coordinator
    had every reply (None where nothing logs it). ``last`` is the device whose ClientApp ended last.
    """
    phases = [
        e for e in search_logs(folder / "coordinator" / "logs", component="rounds")
        if e.get("event") == "round_phase" and e.get("round") == round_number
    ]  # fmt: skip
    if not phases:
        return {}
    begun, ended = _epoch(phases[0]), _epoch(phases[-1])
    handled = [
        e
        for i in range(1, devices + 1)
        if (folder / f"device-{i}" / "logs").is_dir()
        for e in search_logs(folder / f"device-{i}" / "logs", component="client-app")
        if e.get("event") == "message_handled" and begun <= e["sent_at"] <= ended
    ]
    timeline: dict[str, dict[str, Any]] = {}
    for kind, phase in PHASES.items():
        mine = [e for e in handled if e["message_type"] == kind]
        if not mine:
            continue
        sent = min(e["sent_at"] for e in mine)
        done = [e for e in phases if e["phase"] == phase and e["total"] and e["done"] >= e["total"]]
        per_device = {
            e["device"]: {
                "taken": None if e["acquired_at"] is None else round(e["acquired_at"] - sent, 3),
                "started": round(e["started_at"] - sent, 3),
                "clientapp": round(e["seconds"], 3),
                "replied": round(e["started_at"] + e["seconds"] - sent, 3),
            }
            for e in mine
        }
        timeline[kind] = {
            "devices": per_device,
            "last": max(per_device, key=lambda d: per_device[d]["replied"]),
            "all_in": round(_epoch(done[0]) - sent, 3) if done else None,
        }
    return timeline


def overhead_breakdown(
    timeline: dict[str, dict[str, Any]], deployed: float, simulated: float
) -> dict[str, Any]:
    """Where the deployed round's seconds go, summed over its exchanges along the last device to reply.

    ``idle_poll_wait``: send → the runner took the task (the SuperNode's 3 s sleep after an empty pull
    dominates it); ``clientapp_start``: → the ClientApp began (fork, Flower's task set-up); ``clientapp``:
    its work; ``reply``: → the coordinator had every reply (the SuperNode's 0.5 s wait for the ClientApp's
    reply, its push, the coordinator's 0.2 s poll); ``coordinator``: the rest of the round (sampling,
    aggregation, central evaluation, the commit).
    """
    parts = dict.fromkeys(("idle_poll_wait", "clientapp_start", "clientapp", "reply"), 0.0)
    spans = 0.0
    for kind in IN_ROUND:
        if kind not in timeline or timeline[kind]["all_in"] is None:
            continue
        exchange = timeline[kind]
        last = exchange["devices"][exchange["last"]]
        taken = last["taken"] if last["taken"] is not None else last["started"]  # cold: all of it
        parts["idle_poll_wait"] += taken
        parts["clientapp_start"] += last["started"] - taken
        parts["clientapp"] += last["clientapp"]
        parts["reply"] += exchange["all_in"] - last["replied"]
        spans += exchange["all_in"]
    gap = deployed - simulated
    return {
        "exchanges": [kind for kind in IN_ROUND if kind in timeline],
        "deployed_round_seconds": deployed,
        "simulated_round_seconds": simulated,
        "gap_seconds": round(gap, 3),
        **{f"{part}_seconds": round(seconds, 3) for part, seconds in parts.items()},
        "coordinator_seconds": round(deployed - spans, 3),
        "idle_poll_wait_share_of_gap": round(parts["idle_poll_wait"] / gap, 3) if gap > 0 else None,
        "gap_without_idle_poll_wait_seconds": round(gap - parts["idle_poll_wait"], 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="JSON to write (default results/deployed_round.json)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the same run, written to results/quick/")
    mode.add_argument("--smoke", action="store_true", help="1 round of 2 steps; nothing written")
    args = parser.parse_args(argv)
    federation = {**FEDERATION, **({"rounds": 1, "local-steps": 2} if args.smoke else {})}
    if not args.smoke:
        args.json = args.json or default_path("deployed_round", args.quick, RESULTS)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fleetlora-deployed-") as folder:
        scratch = Path(folder)
        progress("simulation")
        simulation = simulated(scratch, federation)
        progress(f"simulation rounds {simulation['round_seconds']}")
        arms = {}
        for warm in (False, True):
            name = "warm" if warm else "cold"
            progress(f"deployed, {name} ClientApp")
            arms[name] = deployed(scratch, warm, federation)
            progress(f"{name}: rounds {arms[name]['round_seconds']}, run {arms[name]['run_seconds']} s")
    steady = {name: arm["round_seconds"][-1] for name, arm in arms.items()}
    result = {
        "benchmark": "deployed_round",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "setup": {"devices": 2, **federation},
        "simulation": simulation,
        "deployed": arms,
        "steady_round_seconds": {"simulation": simulation["round_seconds"][-1], **steady},
        "ratio_deployed_over_simulated": {
            name: round(seconds / simulation["round_seconds"][-1], 2) for name, seconds in steady.items()
        },
        "warm_over_cold": round(steady["warm"] / steady["cold"], 3),
        "overhead_breakdown": overhead_breakdown(
            arms["warm"]["steady_round_exchanges"], steady["warm"], simulation["round_seconds"][-1]
        ),
        "targets": {"cold_start_seconds": 300, "recovery_seconds": 30},
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average": load_before_after(load_before),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
