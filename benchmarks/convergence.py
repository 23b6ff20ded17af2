"""How fast federated LoRA configurations reach test accuracy on BANKING77 (the setup of issue 7).

Issue 7 asks which federated options (server optimizers, FFA-LoRA, longer local schedules) buy
accuracy per round and per byte over plain FedAvg on non-IID data. This benchmark runs each option
as a named arm on the same fleet — MiniLM + LoRA r=8 on query/value with a trainable linear head
on mean-pooled states (the anchor arm keeps transformers' own head, as issue 7 measured it),
BANKING77 (77 intents) split over 20 devices by Dirichlet(0.5) over intents, seed 0, 5 devices a
round that must all reply, batch 16, max length 64 — and scores every round's global
adapter on the coordinator against the FULL test.csv (``central_accuracy``). Two non-federated
references bracket the arms: ``centralized`` (one model on the pooled train.csv, the upper bound)
and ``local-only`` (each of the first 5 devices training alone, the lower bound).

Federated arms go through ``fleetlora.simulations.runner.simulate`` as shipped, one after another
in this process, each with a fresh output folder and database; the references call
``train_locally`` and ``evaluate`` directly with the same :class:`ModelSpec` the federation reads.

Run from the repository root (MiniLM on 2 CPU cores: minutes per arm, see ``wall_seconds``)::

    .venv/bin/python benchmarks/convergence.py [--arms fedavg-anchor,fedadam,...] [--rounds 10]
        [--data ../shared/data/banking77] [--plot benchmarks/results/convergence.png]

``--quick`` (what ``make bench`` runs, a few minutes): the ``fedavg-anchor`` and ``fedavg`` arms on
MiniLM for 2 rounds, on a seeded sample of BANKING77 (2,000 train, 500 test texts), written to
benchmarks/results/quick/convergence.json. ``--smoke`` (what ``make test`` runs): the tiny model on a
sample of the built-in corpus, one round of ``fedavg`` and both references, nothing written unless
``--json``/``--plot`` are given.

Progress goes to stderr; the JSON result is written to ``--json`` (after every arm, so a stopped
run keeps what finished) and is the last line of stdout. The plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results_io import emit, load_average, load_before_after, machine, write_json

from fleetlora.client.client_app import training_seed
from fleetlora.client.train import train_locally
from fleetlora.common.batches import evaluate
from fleetlora.common.config import ModelSpec, TrainSettings
from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.data.partition import PartitionScheme, partition_indices
from fleetlora.common.model import LoadedModel, build_model, cached_model
from fleetlora.common.run_config import DEFAULTS
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.simulations.runner import SimulationConfig, simulate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"  # ../shared
RESULTS = Path("benchmarks/results")
QUICK_JSON = RESULTS / "quick" / "convergence.json"
QUICK_ARMS = ["fedavg-anchor", "fedavg"]  # the baseline (issue 7's anchor) and the project default
QUICK_SAMPLE = [2000, 500]  # BANKING77 train and test texts drawn (seed 0) for --quick
SMOKE_ARMS = ["fedavg", "centralized", "local-only"]  # one federated arm and both references
SMOKE_SAMPLE = [1200, 200]  # built-in corpus texts for --smoke (every local-only device gets some)
DEVICES = 20
PARTITION = "dirichlet:0.5"
SEED = 0
DEVICES_PER_ROUND = 5
MIN_DEVICES = 5
BATCH_SIZE = 16
MAX_LENGTH = 64
LEARNING_RATE = 3e-3  # the project default (TrainSettings.learning_rate), pinned here
ANCHOR_LEARNING_RATE = 1e-3  # issue 7's anchor budget
CENTRALIZED_EPOCHS = 3
LOCAL_ONLY_DEVICES = 5  # partition ids 0..4
# A round waits for its slowest device; 5 epochs on 5 devices run one after another can pass
# simulate's 600 s default on 2 cores, and a deadline only bounds waiting, it changes no result.
ROUND_DEADLINE = 3600.0
# FedAvgM's step is lr × v with v ≈ delta / (1 − momentum) in steady state: lr 0.1 at momentum 0.9
# keeps the effective step near plain FedAvg's (Hsu et al. 2019 keep lr / (1 − momentum) ≈ 1).
FEDAVGM_SERVER_LR = 0.1
FEDAVGM_MOMENTUM = 0.9
ADAPTIVE_SERVER_LR = 0.01  # FedAdam / FedYogi, tau 1e-3 (Reddi et al. 2021's suggested range)
ADAPTIVE_TAU = 1e-3
PERSONAL = "federated_eval_personal_accuracy"


@dataclass(frozen=True)
class FederatedArm:
    """A federated configuration: what differs from the shared fleet, as SimulationConfig fields."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


ONE_EPOCH: dict[str, Any] = {"local_epochs": 1.0, "learning_rate": LEARNING_RATE}
ANCHOR: dict[str, Any] = {"local_epochs": 1.0, "learning_rate": ANCHOR_LEARNING_RATE}


def adaptive_arm(label: str, optimizer: str) -> FederatedArm:
    """FedAdam or FedYogi on the server (beta1 0.9, beta2 0.99: fleetlora's defaults), 1 epoch, lr 3e-3."""
    return FederatedArm(
        f"{label}, server lr {ADAPTIVE_SERVER_LR}, beta1 0.9, beta2 0.99, tau {ADAPTIVE_TAU}, "
        "1 epoch, lr 3e-3",
        {
            **ONE_EPOCH,
            "server_optimizer": optimizer,
            "server_lr": ADAPTIVE_SERVER_LR,
            "server_tau": ADAPTIVE_TAU,
        },
    )


FEDERATED_ARMS: dict[str, FederatedArm] = {
    "fedavg-anchor": FederatedArm(
        "issue 7's anchor: plain FedAvg, 1 local epoch, local lr 1e-3, transformers' own head "
        "(BERT pooler over [CLS])",
        {**ANCHOR, "pooling": "transformers"},
    ),
    "mean-head": FederatedArm("the anchor with fleetlora's mean-pooling head: one factor changed", ANCHOR),
    "fedavg": FederatedArm("plain FedAvg, 1 local epoch, local lr 3e-3 (project default lr)", ONE_EPOCH),
    "restricted": FederatedArm(
        "FedAvg with the restricted softmax (each device's loss over its own classes), 1 epoch, lr 3e-3",
        {**ONE_EPOCH, "restricted_softmax": True},
    ),
    "dp-eps8": FederatedArm(
        "the restricted arm with DP-SGD on every device, epsilon 8 per device over the rounds (issue 3)",
        {**ONE_EPOCH, "restricted_softmax": True, "dp_epsilon": 8.0},
    ),
    "dp-eps8-tuned": FederatedArm(
        "dp-eps8 tuned for DP: batch 64 (noise on the mean gradient 1/4 as large per step), FFA-LoRA "
        "(half the noised coordinates), 2 local epochs, sigma planned for 4 participations (5 of 20 "
        "devices a round take part in 2.5 of 10 rounds on average); a round needs 3 devices, since "
        "a device sampled a 5th time declines",
        {
            **ONE_EPOCH,
            "restricted_softmax": True,
            "dp_epsilon": 8.0,
            "dp_rounds": 4,
            "batch_size": 64,
            "ffa_lora": True,
            "local_epochs": 2.0,
            "min_devices": 3,
        },
    ),
    "personal-head": FederatedArm(
        "FedAvg with personal heads (kept per device; the global head is their mean), 1 epoch, lr 3e-3",
        {**ONE_EPOCH, "personal_head": True},
    ),
    "ffa": FederatedArm(
        "FedAvg with FFA-LoRA (A frozen at its seeded init, only B and the head train), 1 epoch, lr 3e-3",
        {**ONE_EPOCH, "ffa_lora": True},
    ),
    "fedavgm": FederatedArm(
        f"FedAvgM, server lr {FEDAVGM_SERVER_LR}, momentum {FEDAVGM_MOMENTUM} "
        f"(lr / (1 - momentum) = {FEDAVGM_SERVER_LR / (1 - FEDAVGM_MOMENTUM):.2g}), 1 epoch, lr 3e-3",
        {
            **ONE_EPOCH,
            "server_optimizer": "fedavgm",
            "server_lr": FEDAVGM_SERVER_LR,
            "server_momentum": FEDAVGM_MOMENTUM,
        },
    ),
    "fedadam": adaptive_arm("FedAdam", "fedadam"),
    "fedyogi": adaptive_arm("FedYogi", "fedyogi"),
    "fedavg-5ep": FederatedArm(
        "plain FedAvg, 5 local epochs, lr 3e-3 (issue 7's 'tuned local schedule <= 5 epochs')",
        {"local_epochs": 5.0, "learning_rate": LEARNING_RATE},
    ),
}
REFERENCE_ARMS = {
    "centralized": (
        f"not federated: one model on the pooled train.csv (all of it, no hold-out), "
        f"{CENTRALIZED_EPOCHS} epochs of train_locally (1 epoch per call, lr 3e-3, fresh AdamW per call), "
        "evaluated after each epoch; accuracy[i] is after epoch i+1"
    ),
    "local-only": (
        f"lower bound: partition ids 0..{LOCAL_ONLY_DEVICES - 1} of the same split each train a fresh "
        "model alone on their 80% train split for `rounds` × 1 epoch (lr 3e-3, fresh AdamW per epoch, "
        "the federation's training seeds); final_accuracy is the mean of their test accuracies"
    ),
}
ARM_NAMES = (*FEDERATED_ARMS, *REFERENCE_ARMS)


def progress(text: str) -> None:
    """One progress line on stderr (stdout is kept for the JSON result)."""
    print(f"[convergence] {text}", file=sys.stderr, flush=True)


# ---- the shared fleet -----------------------------------------------------------------------------


MODEL = {"name": "minilm"}  # --smoke sets "tiny"


def fleet_config(data: Path, rounds: int, out: Path, **overrides: Any) -> SimulationConfig:
    """The fleet every arm shares, with an arm's overrides applied."""
    settings = {
        "model": MODEL["name"],
        "data": str(data / "train.csv"),
        "eval-data": str(data / "test.csv"),
        "rounds": rounds,
        "partition": PARTITION,
        "seed": SEED,
        "devices-per-round": DEVICES_PER_ROUND,
        "min-devices": MIN_DEVICES,
        "batch-size": BATCH_SIZE,
        "max-length": MAX_LENGTH,
        "learning-rate": LEARNING_RATE,
        "local-epochs": 1.0,
        "lora-rank": 8,
        "lora-alpha": 16,
        "lora-targets": "query,value",
        "round-deadline": ROUND_DEADLINE,
        "restricted-softmax": False,  # plain FedAvg unless an arm turns it on (fleetlora's default is on)
    }
    arm = {key.replace("_", "-"): value for key, value in overrides.items()}
    return SimulationConfig(devices=DEVICES, out=out, settings={**settings, **arm})


def reference_spec(data: Path) -> ModelSpec:
    """The ModelSpec the federation itself reads from its run config, so references match it."""
    config = fleet_config(data, rounds=1, out=Path("unused"))  # out only names the database
    return CoordinatorSettings.from_run_config(config.run_config()).spec


def one_epoch() -> TrainSettings:
    """The references' local epoch: the plain loss, as in the plain-FedAvg arms."""
    return TrainSettings(
        local_epochs=1.0, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, restricted_softmax=False
    )


# ---- federated arms -------------------------------------------------------------------------------


def run_federated(name: str, data: Path, rounds: int, scratch: Path) -> dict[str, Any]:
    """Run one arm through ``simulate`` in a fresh folder; per-round accuracy, steps, bytes, time."""
    arm = FEDERATED_ARMS[name]
    config = fleet_config(data, rounds, scratch / name, **arm.overrides)
    cached_model.cache_clear()  # every arm builds its own model (FFA changes the spec anyway)
    started = time.perf_counter()
    results = simulate(config)
    wall = time.perf_counter() - started
    failed = [r for r in results["rounds"] if r.get("error")]
    if failed:
        raise SystemExit(f"{name}: failed rounds {json.dumps(failed, default=str)}")
    rounds_out = results["rounds"]
    accuracy = [results["initial"]["metrics"]["central_accuracy"]]
    accuracy += [r["metrics"]["central_accuracy"] for r in rounds_out]
    return {
        "description": arm.description,
        "settings": {k: v for k, v in config.run_config().items() if k not in ("db", "data", "eval-data")},
        "accuracy": rounded(accuracy),
        "final_accuracy": round(accuracy[-1], 4),
        "best_accuracy": round(max(accuracy), 4),
        # participants × example-weighted mean train_steps: see notes.
        "device_steps": round(sum(r["participants"] * r["metrics"]["train_steps"] for r in rounds_out)),
        "upload_bytes": sum(r["upload_bytes"] for r in rounds_out),
        "examples": [r["examples"] for r in rounds_out],
        "central_loss": rounded([r["metrics"]["central_loss"] for r in rounds_out]),
        "federated_accuracy": rounded(
            [r["metrics"].get("federated_eval_accuracy", -1.0) for r in rounds_out]
        ),
        # Personal heads only: the global adapter with each evaluated device's own head.
        **(
            {"personal_accuracy": rounded([r["metrics"][PERSONAL] for r in rounds_out])}
            if all(PERSONAL in r["metrics"] for r in rounds_out)
            else {}
        ),
        "train_loss": rounded([r["metrics"]["train_loss"] for r in rounds_out]),
        "round_seconds": rounded([r["seconds"] for r in rounds_out], 1),
        "trainable_share": round(results["trainable_share"], 5),
        "wall_seconds": round(wall, 1),
    }


# ---- reference arms -------------------------------------------------------------------------------


def test_set_accuracy(loaded: LoadedModel, test: Sequence[Example]) -> float:
    return evaluate(loaded, test)["accuracy"]


def run_centralized(data: Path, epochs: int = CENTRALIZED_EPOCHS) -> dict[str, Any]:
    """One model on the pooled train.csv, evaluated on test.csv after each epoch."""
    spec = reference_spec(data)
    train, test = load_examples(data / "train.csv"), load_examples(data / "test.csv")
    started = time.perf_counter()
    loaded = build_model(spec)
    accuracy, steps = [], 0
    for epoch in range(1, epochs + 1):
        result = train_locally(loaded, train, one_epoch(), seed=training_seed(spec.seed, epoch, 0))
        steps += result.steps
        accuracy.append(test_set_accuracy(loaded, test))
        progress(f"  centralized epoch {epoch}: loss {result.loss:.3f}, test accuracy {accuracy[-1]:.4f}")
    return {
        "description": REFERENCE_ARMS["centralized"],
        "accuracy": rounded(accuracy),
        "final_accuracy": round(accuracy[-1], 4),
        "best_accuracy": round(max(accuracy), 4),
        "device_steps": steps,
        "upload_bytes": 0,
        "train_examples": len(train),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_local_only(data: Path, rounds: int) -> dict[str, Any]:
    """The first devices of the split each train alone for ``rounds`` epochs; mean test accuracy."""
    spec = reference_spec(data)
    examples, test = load_examples(data / "train.csv"), load_examples(data / "test.csv")
    parts = partition_indices([e.label for e in examples], DEVICES, PartitionScheme.parse(PARTITION), SEED)
    started = time.perf_counter()
    accuracies, sizes, steps = [], [], 0
    for device in range(LOCAL_ONLY_DEVICES):
        train, _ = split_holdout([examples[i] for i in parts[device]], DEFAULTS.holdout)
        loaded = build_model(spec)  # seeded: the same initial adapter and head as the federation's
        for round_number in range(1, rounds + 1):
            seed = training_seed(spec.seed, round_number, device)  # as that device would in round r
            steps += train_locally(loaded, train, one_epoch(), seed=seed).steps
        accuracies.append(test_set_accuracy(loaded, test))
        sizes.append(len(train))
        progress(f"  local-only device {device}: {len(train)} examples, test accuracy {accuracies[-1]:.4f}")
    mean = sum(accuracies) / len(accuracies)
    return {
        "description": REFERENCE_ARMS["local-only"],
        "accuracy": [round(mean, 4)],
        "final_accuracy": round(mean, 4),
        "device_accuracy": rounded(accuracies),
        "device_train_examples": sizes,
        "device_labels": [len({examples[i].label for i in parts[d]}) for d in range(LOCAL_ONLY_DEVICES)],
        "device_steps": steps,
        "upload_bytes": 0,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def rounded(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


# ---- output ---------------------------------------------------------------------------------------


def plot(arms: dict[str, dict[str, Any]], rounds: int, path: Path) -> None:
    """Test accuracy against round for every arm; references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name, arm in arms.items():
        if name in FEDERATED_ARMS:
            axes.plot(range(len(arm["accuracy"])), arm["accuracy"], marker="o", markersize=3, label=name)
        elif name == "centralized":
            epochs = range(1, len(arm["accuracy"]) + 1)
            axes.plot(
                epochs, arm["accuracy"], "k--", marker="s", markersize=3, label="centralized (x = epoch)"
            )
        elif name == "local-only":
            axes.axhline(arm["final_accuracy"], color="grey", linestyle="--", label="local-only (mean, end)")
    axes.set_xlabel("round (centralized: epoch)")
    axes.set_ylabel("test accuracy (full test.csv)")
    axes.set_title(
        f"BANKING77, MiniLM + LoRA r8 q/v, {DEVICES} devices {PARTITION}, {DEVICES_PER_ROUND}/round"
    )
    axes.set_xlim(0, max(rounds, CENTRALIZED_EPOCHS))
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def relative(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each federated arm's final accuracy over the baseline's: issue 7's anchor, else centralized."""
    baseline = next((b for b in ("fedavg-anchor", "centralized") if b in arms), None)
    if baseline is None or not arms[baseline]["final_accuracy"]:
        return {"baseline": None, "ratios": {}}
    base = arms[baseline]["final_accuracy"]
    ratios = {
        name: round(arm["final_accuracy"] / base, 3)
        for name, arm in arms.items()
        if name in FEDERATED_ARMS and name != baseline
    }
    return {"baseline": baseline, "baseline_final_accuracy": base, "ratios": ratios}


def report(args: argparse.Namespace, arms: dict[str, dict[str, Any]], load_before: float) -> dict[str, Any]:
    return {
        "benchmark": "convergence",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "complete": len(arms) == len(args.arms),
        "arms_requested": args.arms,
        "rounds": args.rounds,
        "final_accuracy_over_baseline": relative(arms),
        "setup": {
            "sample": args.sample,
            "model_name": MODEL["name"],
            "model": (
                "minilm (all-MiniLM-L6-v2) + LoRA r8 alpha16 on query,value; linear head on the mean of "
                "the last hidden states (pooling 'mean') unless an arm says otherwise; head trainable"
            ),
            "data": str(args.data),
            "devices": DEVICES,
            "partition": PARTITION,
            "seed": SEED,
            "devices_per_round": DEVICES_PER_ROUND,
            "min_devices": MIN_DEVICES,
            "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH,
            "round_deadline": ROUND_DEADLINE,
            "fedavgm": {"server_lr": FEDAVGM_SERVER_LR, "server_momentum": FEDAVGM_MOMENTUM},
            "fedadam_fedyogi": {
                "server_lr": ADAPTIVE_SERVER_LR,
                "tau": ADAPTIVE_TAU,
                "beta1": 0.9,
                "beta2": 0.99,
            },
        },
        "arms": arms,
        "machine": machine(),
        "cpus": os.cpu_count(),
        "load_average": load_before_after(load_before),
        "notes": (
            "accuracy: central_accuracy on the full test.csv; federated arms start with round 0 (the "
            "seeded initial adapter), centralized lists epochs 1.., local-only one mean. Federated "
            "devices train on 80% of their partition (20% held out for federated evaluation); "
            "centralized trains on all of train.csv. device_steps for federated arms is the sum over "
            "rounds of participants × train_steps, and fleetlora reports train_steps as an "
            "example-weighted mean over devices, so with local epochs (steps ∝ examples) it overstates "
            "the true sum of steps when device sizes differ. upload_bytes: sum of the deltas devices "
            "sent (fleetlora's upload_bytes); 0 for the references. wall_seconds include Ray start-up, "
            "model builds and every central evaluation (3,080 examples a round). fedavgm uses server "
            "lr 0.1 with momentum 0.9 so lr / (1 - momentum) = 1, the plain-FedAvg step in steady state."
        ),
    }


def run_arm(
    name: str, data: Path, rounds: int, scratch: Path, centralized_epochs: int = CENTRALIZED_EPOCHS
) -> dict[str, Any]:
    """Run one named arm; federated arms get a fresh folder under ``scratch``."""
    if name == "centralized":
        return run_centralized(data, centralized_epochs)
    if name == "local-only":
        return run_local_only(data, rounds)
    return run_federated(name, data, rounds, scratch)


def parse_arms(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from {', '.join(ARM_NAMES)}")
    return list(dict.fromkeys(names))


# ---- main -----------------------------------------------------------------------------------------


def sample_data(train: str, test: str, sizes: list[int], folder: Path) -> Path:
    """train.csv and test.csv of ``sizes`` texts drawn (seed 0) from ``train`` and ``test`` (a CSV or a
    built-in corpus name), in ``folder``: the same fleet on fewer texts."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source, size in (("train.csv", train, sizes[0]), ("test.csv", test, sizes[1])):
        examples = load_examples(source)
        drawn = random.Random(SEED).sample(examples, min(size, len(examples)))
        with (folder / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "category"])
            writer.writerows((e.text, e.label) for e in drawn)
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen arms in order; write JSON and plot after each; print the JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms", type=parse_arms, default=list(ARM_NAMES), help=f"comma-separated (default all: {ARM_NAMES})"
    )
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds per arm (default 10)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.csv and test.csv")
    parser.add_argument("--plot", type=Path, help=f"PNG to write (default {RESULTS / 'convergence.png'})")
    parser.add_argument("--json", type=Path, help=f"JSON to write (default {RESULTS / 'convergence.json'})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help=f"{', '.join(QUICK_ARMS)}, 2 rounds, sampled BANKING77"
    )
    mode.add_argument(
        "--smoke", action="store_true", help="tiny model, built-in corpus, 1 round; nothing written"
    )
    args = parser.parse_args(argv)
    args.sample = None
    if args.smoke:
        args.arms, args.rounds, args.sample = SMOKE_ARMS, 1, SMOKE_SAMPLE
        args.data = Path("builtin")  # a sample of the built-in corpus, not a folder
        MODEL["name"] = "tiny"
    elif args.quick:
        args.arms, args.rounds, args.sample = QUICK_ARMS, 2, QUICK_SAMPLE
        args.json = args.json or QUICK_JSON
    else:
        args.json = args.json or RESULTS / "convergence.json"
        args.plot = args.plot or RESULTS / "convergence.png"
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if not args.smoke:
        for name in ("train.csv", "test.csv"):
            if not (args.data / name).is_file():
                parser.error(f"{args.data / name} not found")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    load_before = load_average()

    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlora-convergence-") as tmp:
        data = args.data
        if args.smoke:
            data = sample_data("builtin", "builtin-test", SMOKE_SAMPLE, Path(tmp) / "data")
        elif args.quick:
            data = sample_data(
                str(args.data / "train.csv"), str(args.data / "test.csv"), QUICK_SAMPLE, Path(tmp) / "data"
            )
        epochs = 1 if args.smoke else CENTRALIZED_EPOCHS
        try:
            for name in args.arms:
                progress(f"{name}: starting ({args.rounds} rounds)")
                arms[name] = run_arm(name, data, args.rounds, Path(tmp), epochs)
                progress(
                    f"{name}: accuracy {arms[name]['accuracy']}, {arms[name]['device_steps']} device-steps, "
                    f"{arms[name]['upload_bytes']} bytes up, {arms[name]['wall_seconds']} s"
                )
                result = report(args, arms, load_before)
                if args.json is not None:
                    write_json(result, args.json)
                if args.plot is not None:
                    plot(arms, args.rounds, args.plot)
        finally:
            MODEL["name"] = "minilm"  # a smoke run in a test process leaves the default behind
    emit(result)  # written after each arm above
    return result


if __name__ == "__main__":
    main()
