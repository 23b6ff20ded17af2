"""What differential privacy costs the fleet in accuracy, in time and in memory (issue 13's measurements).

All federated arms run the real pipeline (``fleetlora simulate``: sealed uploads, per-record privacy
accounts, signed packages) on BANKING77, 20 devices Dirichlet(0.5), seed 0, so every arm trains the
same device schedule; only the privacy setting changes.

- **federated**: test accuracy after every round for ε ∈ {1, 2, 4, 8} per record and without DP, at
  the default regime (``head``) and each ``--per-round`` value (devices a round), with the largest ε
  any record spent.
- **references** at the same ε and the same local settings (batch 256, SGD lr 40, C 0.5, the regime's
  zero-shot start): *pooled*, DP-SGD on the union of the devices' training records on one machine, for
  as many passes as an average record makes in the federated run; *local-only*, each device alone on its
  own records for the same passes, scored on the whole test set (mean over devices).
- **streaming**: records arrive ``--stream-records`` a round per device through the corpus pipeline,
  for ``--stream-rounds`` rounds at ε = 8 with noise planned for ``--stream-plan`` participations; per-
  record budgets (``dp-budget record``) against one lifetime budget per device (``device``).
- **cost**: one device's DP round against the same round without DP (median seconds, ratio; target
  ≤ 1.15×), and the process's peak resident memory after them.

Run from the repository root (about 40 minutes on 2 cores; ``--smoke`` runs every part on the tiny
model and the built-in corpus in about two minutes, and is what ``make test`` runs)::

    .venv/bin/python benchmarks/dp_utility.py [--rounds 20] [--per-round 20,5] [--parts ...] [--smoke]

``--quick`` (what ``make bench`` runs): the cost part alone on the full fleet's MiniLM (3 repeats),
written to benchmarks/results/quick/dp_utility.json; a smoke run writes nothing unless ``--json`` or
``--plot`` is given.

Progress goes to stderr; the JSON result (also written to ``--json``) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants.utils import get_noise_multiplier
from results_io import machine

from fleetlora.client.local_data import local_examples
from fleetlora.client.train import NoisePlan, train_locally
from fleetlora.common.batches import evaluate
from fleetlora.common.config import TrainSettings
from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.delta import load_trainable_state
from fleetlora.common.model import LoadedModel, build_model
from fleetlora.common.run_config import DEFAULTS
from fleetlora.coordinator.settings import CoordinatorSettings

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
DELTA = 1e-5
SEED = 0
PARTS = ("federated", "references", "streaming", "cost")


@dataclass(frozen=True)
class Setup:
    """The fleet every arm shares."""

    model: str
    data: str
    eval_data: str
    devices: int
    partition: str

    def simulate_args(self) -> list[str]:
        return [
            "--model", self.model, "--data", self.data, "--eval-data", self.eval_data,
            "--devices", str(self.devices), "--partition", self.partition, "--seed", str(SEED),
        ]  # fmt: skip


FULL = Setup("minilm", str(BANKING77 / "train.csv"), str(BANKING77 / "test.csv"), 20, "dirichlet:0.5")
SMOKE = Setup("tiny", "builtin", "builtin-test", 4, "dirichlet:0.5")


def progress(text: str) -> None:
    print(f"[dp_utility] {text}", file=sys.stderr, flush=True)


# ---- federated arms: the real pipeline, one `fleetlora simulate` each ------------------------------


def simulate(setup: Setup, out: Path, extra: Sequence[str]) -> dict[str, Any]:
    """One arm as a user runs it; its results.json, condensed."""
    command = [
        sys.executable,
        "-m",
        "fleetlora",
        "simulate",
        *setup.simulate_args(),
        "--out",
        str(out),
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    # The fleet's current version after each round: a failed round (every device spent, say) keeps it.
    accuracy = [results["initial"]["metrics"]["central_accuracy"]]
    for r in rounds:
        accuracy.append(r["metrics"].get("central_accuracy", accuracy[-1]) if r["version"] else accuracy[-1])
    return {
        "command": shlex.join(["fleetlora", *command[3:]]),
        "accuracy": accuracy,
        "failed_rounds": sum(1 for r in rounds if not r["version"]),
        "participants": [r["participants"] for r in rounds],
        "largest_epsilon": max((d["epsilon"] for d in results["devices"].values()), default=0.0),
        "records_retired": sum(d["records_retired"] for d in results["devices"].values()),
        "partitions": [r["partitions"] for r in rounds],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def federated_arms(
    setup: Setup, epsilons: Sequence[float], per_round: Sequence[int], rounds: int, scratch: Path, plain: bool
) -> dict[str, dict[str, Any]]:
    arms = {}
    for count in per_round:
        for epsilon in [*epsilons, 0.0] if plain else epsilons:
            name = f"{count}/round, " + (f"ε={epsilon:g}" if epsilon else "no DP")
            progress(f"federated {name}: {rounds} rounds")
            arms[name] = simulate(
                setup,
                scratch / f"fed-{count}-{epsilon:g}",
                ["--rounds", str(rounds), "--devices-per-round", str(count), "--dp-epsilon", str(epsilon)],
            )
            progress(
                f"  accuracy {arms[name]['accuracy'][-1]:.4f}, largest ε {arms[name]['largest_epsilon']:.3f}"
            )
    return arms


def streaming_arms(setup: Setup, args: argparse.Namespace, scratch: Path) -> dict[str, dict[str, Any]]:
    arms = {}
    for budget in ("record", "device"):
        progress(f"streaming, {budget} budgets: {args.stream_rounds} rounds")
        arms[budget] = simulate(
            setup,
            scratch / f"stream-{budget}",
            [
                "--rounds",
                str(args.stream_rounds),
                "--stream-records",
                str(args.stream_records),
                "--dp-epsilon",
                "8",
                "--dp-rounds",
                str(args.stream_plan),
                "--dp-budget",
                budget,
            ],
        )
        progress(
            f"  accuracy {arms[budget]['accuracy'][-1]:.4f}, largest ε {arms[budget]['largest_epsilon']:.3f}"
        )
    return arms


# ---- references: the same records and settings, without federation --------------------------------


def device_splits(setup: Setup) -> list[list[Example]]:
    """Each simulated device's training records, exactly as its ClientApp reads them."""
    run_config = {"data": setup.data, "partition": setup.partition, "seed": SEED}
    return [
        split_holdout(
            local_examples({"partition-id": i, "num-partitions": setup.devices}, run_config), DEFAULTS.holdout
        )[0]
        for i in range(setup.devices)
    ]


def dp_training(
    loaded: LoadedModel, records: list[Example], settings: TrainSettings, epsilon: float, passes: float
) -> None:
    """``passes`` over ``records`` in one go, DP-SGD at ``epsilon`` (no DP at 0), from the zero-shot start."""
    load_trainable_state(loaded.model, loaded.initial_adapter)
    local = TrainSettings(
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        local_epochs=passes,
        restricted_softmax=False,
        max_rate_noise=settings.max_rate_noise,  # the rate adapts to σ as on a device
    )
    noise = None
    if epsilon:
        rate = min(1.0, settings.batch_size / len(records))
        sigma = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=DELTA, sample_rate=rate, steps=local.steps_for(len(records))
        )
        noise = NoisePlan(float(sigma), settings.privacy.max_grad_norm, rate)
    train_locally(loaded, records, local, seed=SEED, noise=noise)


def references(
    setup: Setup, epsilons: Sequence[float], per_round: int, rounds: int
) -> dict[str, dict[str, float]]:
    settings = CoordinatorSettings.from_run_config(
        {"model": setup.model, "data": setup.data, "eval-data": setup.eval_data}
    )
    loaded = build_model(settings.spec)
    test = load_examples(setup.eval_data)
    splits = device_splits(setup)
    # An average record's passes in the federated run: local epochs × rounds it is sampled in.
    passes = settings.train.local_epochs * rounds * per_round / setup.devices
    out: dict[str, dict[str, float]] = {"pooled": {}, "local-only": {}}
    for epsilon in [*epsilons, 0.0]:
        label = f"ε={epsilon:g}" if epsilon else "no DP"
        progress(f"references {label}: {passes:g} passes")
        dp_training(loaded, [e for split in splits for e in split], settings.train, epsilon, passes)
        out["pooled"][label] = evaluate(loaded, test)["accuracy"]
        alone = []
        for split in splits:
            dp_training(loaded, split, settings.train, epsilon, passes)
            alone.append(evaluate(loaded, test)["accuracy"])
        out["local-only"][label] = statistics.mean(alone)
    out["passes"] = {"per record": passes}
    return out


def step_cost(setup: Setup, repeats: int) -> dict[str, float]:
    """One device's round with and without DP, alternated so both see the same load."""
    settings = CoordinatorSettings.from_run_config(
        {"model": setup.model, "data": setup.data, "eval-data": setup.eval_data}
    )
    loaded = build_model(settings.spec)
    records = max(device_splits(setup), key=len)
    train = settings.train
    rate = min(1.0, train.batch_size / len(records))
    noise = NoisePlan(1.0, train.privacy.max_grad_norm, rate)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    train_locally(loaded, records, train, seed=SEED)  # features computed and cached once, as on a device
    for _ in range(repeats):
        for kind in ("plain", "dp"):
            load_trainable_state(loaded.model, loaded.initial_adapter)
            started = time.perf_counter()
            train_locally(loaded, records, train, seed=SEED, noise=noise if kind == "dp" else None)
            times[kind].append(time.perf_counter() - started)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {
        "device_records": len(records),
        "steps": train.steps_for(len(records)),
        "expected_batch": train.batch_size,
        "plain_round_seconds": round(plain, 5),
        "dp_round_seconds": round(dp, 5),
        "dp_over_plain": round(dp / plain, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ---- output ---------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, arm in result["federated"].items():
        left.plot(range(len(arm["accuracy"])), arm["accuracy"], marker="o", markersize=3, label=name)
    left.set_title(f"federated, {result['setup']['devices']} devices {result['setup']['partition']}")
    for name, arm in result["streaming"].items():
        right.plot(
            range(len(arm["accuracy"])), arm["accuracy"], marker="o", markersize=3, label=f"{name} budgets"
        )
    right.set_title(f"streaming {result['stream_records']} records/round, ε = 8")
    for axes in (left, right):
        axes.set_xlabel("round")
        axes.set_ylabel("test accuracy")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="every part, tiny model and built-in data")
    mode.add_argument("--quick", action="store_true", help="the cost part, 3 repeats; results/quick/")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilons", default="1,2,4,8", help="comma-separated ε per record")
    parser.add_argument("--per-round", default="20,5", help="comma-separated devices a round")
    parser.add_argument("--stream-records", type=int, default=20)
    parser.add_argument("--stream-rounds", type=int, default=30)
    parser.add_argument("--stream-plan", type=int, default=5, help="participations the noise is planned for")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)"
    )
    parser.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the no-DP arm of each devices-a-round (--no-plain keeps an earlier one)",
    )
    parser.add_argument("--json", type=Path, help="JSON to write (default results/dp_utility.json)")
    parser.add_argument("--plot", type=Path, help="PNG to write (default results/dp_utility.png)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    results = REPO / "benchmarks" / "results"
    if args.quick:
        args.parts, args.repeats = "cost", 3
        args.json = args.json or results / "quick" / "dp_utility.json"
    elif not args.smoke:
        args.json = args.json or results / "dp_utility.json"
        args.plot = args.plot or results / "dp_utility.png"
    if args.smoke:
        # Each arm is one `fleetlora simulate` (about 30 s of start-up on 2 cores); its rounds are kept few.
        args.rounds, args.epsilons, args.per_round = 2, "8", "2"
        args.stream_records, args.stream_rounds, args.stream_plan, args.repeats = 20, 2, 1, 1
    elif not Path(setup.data).is_file():
        parser.error(f"BANKING77 is not at {BANKING77}: this benchmark needs ../shared/data beside the repo.")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    per_round = [int(n) for n in args.per_round.split(",")]
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    # Parts not run this time are kept from an earlier result, each with the command that made it.
    earlier = set(parts) != set(PARTS) and args.json is not None and args.json.is_file()
    result: dict[str, Any] = json.loads(args.json.read_text()) if earlier else {}
    if result and "commands" not in result:  # written by a run of every part
        result["commands"] = dict.fromkeys(PARTS, result.get("command"))
    command = shlex.join(
        ["python", "benchmarks/dp_utility.py", *(argv if argv is not None else sys.argv[1:])]
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dp-utility-") as scratch:
        runs = {
            # Arms run now replace the same arms of an earlier result; the others are kept.
            "federated": lambda: {
                **result.get("federated", {}),
                **federated_arms(setup, epsilons, per_round, args.rounds, Path(scratch), args.plain),
            },
            "references": lambda: references(setup, epsilons, per_round[0], min(args.rounds, 10)),
            "streaming": lambda: streaming_arms(setup, args, Path(scratch)),
            "cost": lambda: step_cost(setup, args.repeats),
        }
        result.update(command=command, setup={**dataclasses.asdict(setup), "seed": SEED, "delta": DELTA})
        for part in parts:
            result[part] = runs[part]()
            result.setdefault("commands", {})[part] = command
        if "streaming" in parts:
            result["stream_records"] = args.stream_records
    result.setdefault("wall_seconds", {})
    if not isinstance(result["wall_seconds"], dict):  # a result from before parts could be run alone
        result["wall_seconds"] = {"all": result["wall_seconds"]}
    result["wall_seconds"][",".join(parts)] = round(time.perf_counter() - started, 1)
    schedules = {
        json.dumps(arm["partitions"])
        for name, arm in result.get("federated", {}).items()
        if name.startswith(f"{per_round[0]}/")
    }
    if "federated" in result:
        result["same_schedule_in_every_arm"] = len(schedules) == 1
    result["machine"] = machine()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot is not None and {"federated", "streaming"} <= set(result):
        plot(result, args.plot)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
