"""What fleetlora's federation loop costs on top of a bare Flower app doing the same local training.

fleetlora wraps every round in its own machinery: quorum waits with deadlines, adapter deltas
instead of full states, a SQL version registry, federated evaluation on each device's held-out
text and central evaluation on the coordinator. This benchmark runs the same tiny-model federation
through (a) a bare Flower app — stock ``FedAvg``, training only, nothing stored — and (b)
``fleetlora.simulations.runner.simulate`` as it ships, in one process, bare arm first, and prints
both timings so the overhead is a measured number rather than a guess.

Both arms build the same :class:`ModelSpec` and :class:`TrainSettings` (asserted against what
fleetlora reads from its run config) and train every device on the same partition of the
built-in corpus with ``train_locally``. The per-arm work still differs (fleetlora evaluates and
stores every round); the printed JSON says exactly how, in ``arms`` and ``notes``.

Run from the repository root::

    .venv/bin/python benchmarks/round_overhead.py [--rounds 2] [--local-steps 20] [--devices 3]

``--quick`` (what ``make bench`` runs) is the default workload, written to
benchmarks/results/quick/round_overhead.json; ``--smoke`` (what ``make test`` runs) is 2 rounds of
2 steps on 2 devices, nothing written unless ``--json`` is given. Run it as a script: Ray's workers
import its apps by value only when it is ``__main__``.

Progress goes to stderr; the last line of stdout is one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation  # imports Ray here, so neither arm's timing pays for it
from results_io import emit, load_average, load_before_after, machine

from fleetlora.client.client_app import training_seed
from fleetlora.client.local_data import local_examples
from fleetlora.client.train import train_locally
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.data import load_examples, split_holdout
from fleetlora.common.data.examples import labels_of
from fleetlora.common.delta import load_trainable_state, trainable_state
from fleetlora.common.model import cached_model
from fleetlora.common.run_config import DEFAULTS
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.simulations.runner import SimulationConfig, simulate

QUICK_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quick" / "round_overhead.json"
CLIENT_CPUS = 2  # SimulationConfig's default: both arms get the same Ray client resources
# Pinned in both arms rather than taken from fleetlora's defaults, which move; the learning rate does
# not change what a step costs, batch size and max length do.
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
MAX_LENGTH = 48
DATA_CONFIG: dict[str, bool | int | float | str] = {
    "data": "builtin",
    "partition": "dirichlet:1.0",
    "seed": 0,
}

ARMS = {
    "bare_flower": (
        "Flower ServerApp with stock FedAvg(fraction_train=1.0, fraction_evaluate=0.0): per round, "
        "send the full trainable state to every device, train_locally, reply with the full state and "
        "num-examples, weighted average. No client or central evaluation, nothing stored."
    ),
    "fleetlora": (
        "fleetlora.simulations.runner.simulate as shipped: preflight (data, partition, model build), "
        "then per round wait for quorum, send state + instructions, train_locally, reply with the delta, "
        "weighted mean delta, store the version in SQLite, federated evaluation on every device's "
        "20% held-out split (a second exchange), central evaluation on builtin-test (600 examples); "
        "plus a central evaluation of the initial version and results.json."
    ),
}


def progress(text: str) -> None:
    """One progress line on stderr (stdout is kept for the JSON result)."""
    print(f"[round_overhead] {text}", file=sys.stderr, flush=True)


# ---- the shared workload --------------------------------------------------------------------------


def fleetlora_config(rounds: int, devices: int, local_steps: int, out: Path) -> SimulationConfig:
    """The fleetlora arm's configuration; every device trains in every round."""
    return SimulationConfig(
        devices=devices,
        out=out,
        client_cpus=CLIENT_CPUS,
        settings={
            "model": "tiny",
            "rounds": rounds,
            "devices-per-round": devices,
            "min-devices": devices,
            "local-steps": local_steps,
            "data": str(DATA_CONFIG["data"]),
            "partition": str(DATA_CONFIG["partition"]),
            "seed": int(DATA_CONFIG["seed"]),
            "batch-size": BATCH_SIZE,
            "learning-rate": LEARNING_RATE,
            "max-length": MAX_LENGTH,
            # The bare arm trains LoRA without noise: pinned here too, since fleetlora's defaults moved
            # to the head regime under DP.
            "regime": "lora",
            "dp-epsilon": 0.0,
        },
    )


def shared_workload(config: SimulationConfig) -> tuple[ModelSpec, TrainSettings]:
    """The bare arm's spec and settings, checked equal to what fleetlora reads from its run config."""
    spec = ModelSpec(
        name="tiny",
        task="classify",
        labels=labels_of(load_examples("builtin")),
        max_length=MAX_LENGTH,
        seed=0,
    )
    train = TrainSettings(
        local_steps=config.run.local_steps,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        privacy=PrivacySettings(planned_rounds=config.run.rounds),  # fleetlora plans DP for the run's rounds
    )
    settings = CoordinatorSettings.from_run_config(config.run_config())
    if settings.spec != spec or settings.train != train:
        raise SystemExit(
            f"The arms would not do the same work:\n  bare     {spec} {train}\n"
            f"  fleetlora {settings.spec} {settings.train}"
        )
    return spec, train


def backend_config() -> dict[str, Any]:
    """Ray resources and logging, as ``simulate`` passes them when not verbose."""
    return {
        "client_resources": {"num_cpus": CLIENT_CPUS, "num_gpus": 0.0},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
    }


# ---- arm (a): a bare Flower app -------------------------------------------------------------------


@dataclass
class BareRun:
    """What the bare ServerApp observed: round-boundary timestamps and train replies per round."""

    strategy_seconds: float = 0.0
    boundaries: list[float] = field(default_factory=list)  # before round 1, then after each round
    train_replies: list[int] = field(default_factory=list)  # non-error replies per train exchange

    @property
    def round_seconds(self) -> list[float]:
        return [b - a for a, b in pairwise(self.boundaries)]


class CountingGrid:
    """Delegates to a Grid and counts the non-error replies of each non-empty exchange."""

    def __init__(self, grid: Grid, run: BareRun) -> None:
        self._grid = grid
        self._run = run

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages:  # fraction_evaluate=0.0 makes every evaluate exchange empty
            self._run.train_replies.append(sum(not r.has_error() for r in replies))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def bare_server_app(spec: ModelSpec, rounds: int, devices: int, run: BareRun) -> ServerApp:
    """Stock FedAvg from the tiny model's initial trainable state; timestamps each round boundary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        loaded = cached_model(spec)
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_available_nodes=devices,
            min_train_nodes=devices,
        )

        def mark_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            run.boundaries.append(time.perf_counter())
            return None

        started = time.perf_counter()
        strategy.start(
            cast(Grid, CountingGrid(grid, run)),
            initial_arrays=ArrayRecord(trainable_state(loaded.model)),
            num_rounds=rounds,
            evaluate_fn=mark_round,
        )
        run.strategy_seconds = time.perf_counter() - started

    return app


def bare_client_app(spec: ModelSpec, train: TrainSettings) -> ClientApp:
    """Load the global state, train on this device's partition exactly as fleetlora does, reply in full."""
    app = ClientApp()

    @app.train()
    def train_round(message: Message, context: Context) -> Message:
        loaded = cached_model(spec)
        load_trainable_state(loaded.model, message.content["arrays"].to_torch_state_dict())
        train_set, _ = split_holdout(local_examples(context.node_config, DATA_CONFIG), DEFAULTS.holdout)
        server_round = int(message.content["config"]["server-round"])
        device = int(context.node_config.get("partition-id", context.node_id))  # as fleetlora's client
        result = train_locally(loaded, train_set, train, seed=training_seed(spec.seed, server_round, device))
        content = RecordDict(
            {
                "arrays": ArrayRecord(trainable_state(loaded.model)),
                "metrics": MetricRecord({"num-examples": result.examples}),
            }
        )
        return Message(content, reply_to=message)

    return app


def run_bare(spec: ModelSpec, train: TrainSettings, rounds: int, devices: int) -> tuple[float, BareRun]:
    """Wall seconds of the whole ``run_simulation`` call, and what the ServerApp recorded."""
    cached_model.cache_clear()  # the coordinator side builds its model inside the timed call
    run = BareRun()
    started = time.perf_counter()
    run_simulation(
        server_app=bare_server_app(spec, rounds, devices, run),
        client_app=bare_client_app(spec, train),
        num_supernodes=devices,
        backend_config=backend_config(),
    )
    wall = time.perf_counter() - started
    if len(run.round_seconds) != rounds or run.train_replies != [devices] * rounds:
        raise SystemExit(
            f"Bare arm incomplete: round times {run.round_seconds}, replies {run.train_replies}."
        )
    return wall, run


# ---- arm (b): fleetlora ---------------------------------------------------------------------------


def run_fleetlora(config: SimulationConfig) -> tuple[float, dict[str, Any]]:
    """Wall seconds of the whole ``simulate`` call (it wraps ``run_simulation``), and its results."""
    cached_model.cache_clear()  # do not inherit the bare arm's model: preflight builds its own
    started = time.perf_counter()
    results = simulate(config)
    wall = time.perf_counter() - started
    rounds = results["rounds"]
    if len(rounds) != config.run.rounds or any(
        r.get("error") or r["participants"] != config.devices for r in rounds
    ):
        raise SystemExit(f"fleetlora arm incomplete: {json.dumps(rounds, default=str)}")
    return wall, results


def later_mean(seconds: list[float]) -> float | None:
    """Mean seconds of the rounds after the first, or None when there was only one."""
    return round(statistics.fmean(seconds[1:]), 3) if len(seconds) > 1 else None


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both arms, print progress to stderr and the JSON result as stdout's last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds per arm (default 2)")
    parser.add_argument("--local-steps", type=int, default=20, help="optimizer steps per device (default 20)")
    parser.add_argument("--devices", type=int, default=3, help="simulated devices, all train (default 3)")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the defaults; results/quick/round_overhead.json")
    mode.add_argument("--smoke", action="store_true", help="2 rounds, 2 steps, 2 devices; nothing written")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.local_steps, args.devices = 2, 2, 2
    elif args.quick:
        args.json = args.json or QUICK_JSON
    if args.rounds < 1 or args.local_steps < 1 or args.devices < 1:
        parser.error("--rounds, --local-steps and --devices must all be >= 1")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # as simulate() does when not verbose
    load_before = load_average()  # 1-minute load: other work on the machine skews both arms

    with tempfile.TemporaryDirectory(prefix="fleetlora-bench-") as tmp:
        config = fleetlora_config(args.rounds, args.devices, args.local_steps, Path(tmp))
        spec, train = shared_workload(config)
        progress(f"bare Flower: {args.rounds} round(s), {args.devices} devices, {args.local_steps} steps")
        bare_wall, bare = run_bare(spec, train, args.rounds, args.devices)
        progress(f"bare Flower: {bare_wall:.2f} s wall, rounds {[round(s, 2) for s in bare.round_seconds]}")
        progress("fleetlora: same federation through simulate()")
        fleet_wall, results = run_fleetlora(config)
        fleet_rounds = [float(r["seconds"]) for r in results["rounds"]]
        progress(f"fleetlora: {fleet_wall:.2f} s wall, rounds {[round(s, 2) for s in fleet_rounds]}")

    bare_round = statistics.fmean(bare.round_seconds)
    fleet_round = statistics.fmean(fleet_rounds)
    report = {
        "benchmark": "round_overhead",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "rounds": args.rounds,
        "devices": args.devices,
        "local_steps": args.local_steps,
        "bare_flower_seconds": round(bare_wall, 3),
        "fleetlora_seconds": round(fleet_wall, 3),
        "ratio": round(fleet_wall / bare_wall, 3),
        "bare_flower_round_seconds": round(bare_round, 3),
        "fleetlora_round_seconds": round(fleet_round, 3),
        "round_ratio": round(fleet_round / bare_round, 3),
        "bare_flower_round_seconds_each": [round(s, 3) for s in bare.round_seconds],
        "fleetlora_round_seconds_each": [round(s, 3) for s in fleet_rounds],
        "bare_flower_strategy_seconds": round(bare.strategy_seconds, 3),
        # Rounds after the first: no actor start-up or model build in them (null with --rounds 1).
        "bare_flower_later_round_seconds": later_mean(bare.round_seconds),
        "fleetlora_later_round_seconds": later_mean(fleet_rounds),
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average": load_before_after(load_before),
        "arms": ARMS,
        "notes": (
            "Same spec (tiny, classify, builtin labels, max_length 48, seed 0, LoRA r8/a16, no DP), same "
            f"TrainSettings (batch {BATCH_SIZE}, lr {LEARNING_RATE}, pinned in both arms), same "
            "dirichlet:1.0 partition and 80% train split, same training seeds, every device in every "
            f"round, {CLIENT_CPUS} CPUs per Ray client, one process, bare arm first, model cache cleared "
            "before each arm. Wall seconds time the whole run_simulation call (fleetlora: simulate(), "
            "which adds preflight, an initial central evaluation and results.json) including Ray "
            "start-up and shut-down. Round seconds: fleetlora's rounds[].seconds; bare: between "
            "FedAvg's evaluate_fn calls (before round 1, after each round); round 1 of both arms "
            "includes starting the Ray client actor and building its model. fleetlora is measured as "
            "shipped, so its rounds also include federated and central evaluation and SQLite storage "
            "that the bare arm does not do: the ratios are the cost of fleetlora's round as a whole, "
            "not of its messaging alone. Grid polling differs too (fleetlora 0.2 s, Flower's "
            "InMemoryGrid 0.1 s). Other load on the machine skews both arms: see load_average."
        ),
    }
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
