"""What one or two hostile devices among 20 do to the global model, for each aggregator (issue 14).

BANKING77, 20 devices Dirichlet(0.5), 5 a round, 10 rounds, seed 0, at the default local training
(head regime, DP-SGD at ε 8 per record with σ planned for each device's participations). Every arm
trains the same device schedule; the hostile devices are the ones sampled most often (ties by
partition), so an attack gets every chance the schedule offers.

Each round runs the coordinator's own code in one process: devices train with ``train_locally`` as
the ClientApp does; every delta goes through ``DeltaAggregator.add_delta`` (layout, finiteness, the
round's norm bound, the weight cap) into the chosen ``DeltaMean``; ``server_step`` applies the
release. What is left out is the transport (Flower messages, sealing), which changes nothing here:
the hostile devices are enrolled, so their uploads open. A hostile device trains honestly on its own
records, then sends instead:

- **inflate**: its honest delta, claiming 10⁹ examples;
- **scale**: its honest delta × 100;
- **sign-flip**: the negative of its honest delta;
- **collude**: every hostile device sends the same delta, which raises one class's bias (every
  prediction drifts to it), scaled to 0.9 × ``norm-cap`` × its honest delta's norm: just under the
  bound it can expect from the last round's median;
- **noise**: Gaussian noise of that same norm.

The figure for each arm is the central test accuracy after the last round, the mean over
``--repeats`` runs (DP noise is drawn from the OS's entropy, so runs of one arm differ by a point or
two; their standard deviation is kept beside it). The target for the default aggregator is to stay
within 2 points of the clean run with one attacker, for every attack.

Run from the repository root (about 15 minutes on 2 cores with 3 repeats; ``--smoke``: the tiny
model, 6 devices, 2 rounds, every attack and aggregator once, in seconds, which ``make test`` runs)::

    .venv/bin/python benchmarks/aggregation_attacks.py [--smoke] [--aggregators mean,trimmed-mean,median]

``--quick`` (what ``make bench`` runs): the same fleet for 5 rounds, the default aggregator only, one
hostile device, every attack once, written to benchmarks/results/quick/aggregation_attacks.json; a
smoke run writes nothing unless ``--json`` is given.

Progress goes to stderr; the JSON result (also written to ``--json``) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from results_io import default_path, machine

from fleetlora.client.local_data import local_examples
from fleetlora.client.privacy import plan_round
from fleetlora.client.train import NoisePlan, train_locally
from fleetlora.common.batches import evaluate, pooled_features
from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.delta import State, diff, is_finite, l2_norm, load_trainable_state, trainable_state
from fleetlora.common.model import LoadedModel, build_model
from fleetlora.common.run_config import DEFAULTS
from fleetlora.common.server_optim import server_step
from fleetlora.coordinator.aggregation import DeltaAggregator, ExampleWeightedMean
from fleetlora.coordinator.influence import Accepted, RoundBounds, accepted
from fleetlora.coordinator.robust import CoordinateTrimmedMean
from fleetlora.coordinator.sampling import sample_devices
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.uploads import ReplyMetrics, open_plain

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
SEED = 0
AGGREGATORS = ("mean", "trimmed-mean", "median")
TARGET_POINTS = 2.0  # one attacker in 20 may cost the default aggregator at most this much accuracy


@dataclass(frozen=True)
class Fleet:
    model: str
    data: str
    eval_data: str
    devices: int
    per_round: int
    rounds: int
    partition: str = "dirichlet:0.5"


FULL = Fleet("minilm", str(BANKING77 / "train.csv"), str(BANKING77 / "test.csv"), 20, 5, 10)
SMOKE = Fleet("tiny", "builtin", "builtin-test", 6, 3, 2, "iid")
QUICK_ROUNDS = 5


@dataclass(frozen=True)
class Sent:
    """What one device sends: its delta and the example count it claims."""

    delta: State
    examples: int


Attack = Callable[[Sent, int, float], Sent]  # (honest, the hostile device's index, norm-cap) → sent


def _colluding_direction(like: State) -> State:
    """One class's bias up, nothing else: every prediction drifts to class 0."""
    direction = {name: torch.zeros_like(t) for name, t in like.items()}
    bias = next(name for name in direction if name.endswith("bias"))
    direction[bias].view(-1)[0] = 1.0
    return direction


def _scaled(direction: State, norm: float) -> State:
    scale = norm / max(l2_norm(direction), 1e-12)
    return {name: t * scale for name, t in direction.items()}


def _under_the_cap(honest: Sent, norm_cap: float) -> float:
    return 0.9 * norm_cap * l2_norm(honest.delta)


ATTACKS: dict[str, Attack] = {
    "inflate": lambda honest, _, cap: Sent(honest.delta, 10**9),
    "scale": lambda honest, _, cap: Sent({n: t * 100 for n, t in honest.delta.items()}, honest.examples),
    "sign-flip": lambda honest, _, cap: Sent({n: -t for n, t in honest.delta.items()}, honest.examples),
    "collude": lambda honest, _, cap: Sent(
        _scaled(_colluding_direction(honest.delta), _under_the_cap(honest, cap)), honest.examples
    ),
    "noise": lambda honest, who, cap: Sent(
        _scaled(
            {
                n: torch.randn(t.shape, generator=torch.Generator().manual_seed(who), dtype=torch.float32).to(
                    t.dtype
                )
                for n, t in honest.delta.items()
            },
            _under_the_cap(honest, cap),
        ),
        honest.examples,
    ),
}


@dataclass
class Device:
    records: list[Example]
    noise: NoisePlan | None


def progress(text: str) -> None:
    print(f"[aggregation_attacks] {text}", file=sys.stderr, flush=True)


def schedule(fleet: Fleet) -> list[list[int]]:
    """Each round's sampled partitions: seeded, the same in every arm."""
    partitions = list(range(fleet.devices))
    return [
        sample_devices(partitions, fleet.per_round, set(), random.Random(f"{SEED}:{r}"))
        for r in range(1, fleet.rounds + 1)
    ]


def devices(fleet: Fleet, settings: CoordinatorSettings, rounds: list[list[int]]) -> list[Device]:
    """Each device's training records and its DP noise, planned for the rounds it is sampled in."""
    run_config = {"data": fleet.data, "partition": fleet.partition, "seed": SEED}
    participations = Counter(p for sampled in rounds for p in sampled)
    out = []
    for partition in range(fleet.devices):
        node = {"partition-id": partition, "num-partitions": fleet.devices}
        records, _ = split_holdout(local_examples(node, run_config), DEFAULTS.holdout)
        train = settings.train
        noise = None
        if train.privacy.enabled and participations[partition]:
            planned = dataclasses.replace(train.privacy, planned_rounds=participations[partition])
            plan = plan_round(None, dataclasses.replace(train, privacy=planned), records, round_number=1)
            noise = plan.noise
        out.append(Device(records, noise))
    return out


def run_arm(
    loaded: LoadedModel,
    settings: CoordinatorSettings,
    fleet_devices: list[Device],
    rounds: list[list[int]],
    test: list[Example],
    hostile: Sequence[int],
    attack: Attack | None,
) -> dict[str, Any]:
    """The federation for one arm; the accuracy after each round and what the rounds dropped."""
    influence = settings.influence
    trim = influence.trim
    state = loaded.initial_adapter
    moments: State = {}
    previous: Accepted | None = None
    accuracy, drops = [], 0
    for number, sampled in enumerate(rounds, start=1):
        bounds = RoundBounds.for_round(influence, l2_norm(state), previous)
        mean = CoordinateTrimmedMean(state, trim) if trim is not None else ExampleWeightedMean(state)
        aggregator = DeltaAggregator(state, mean, open_plain, bounds)
        train = settings.train_for_round(number)
        for partition in sampled:
            device = fleet_devices[partition]
            load_trainable_state(loaded.model, state)
            result = train_locally(
                loaded, device.records, train, seed=SEED * 1000 + number * 100 + partition, noise=device.noise
            )
            sent = Sent(diff(trainable_state(loaded.model), state), result.examples)
            if attack and partition in hostile:
                sent = attack(sent, hostile.index(partition), influence.norm_cap or 10.0)
            aggregator.add_delta(
                partition,
                sent.delta,
                ReplyMetrics(sent.examples, {"train_loss": result.loss}),
                device=f"partition-{partition}",
            )
        aggregator.mark_missing(sampled)
        drops += len(aggregator.drops)
        if aggregator.participants:
            update = aggregator.release(sampled=len(sampled), online=len(fleet_devices))
            candidate, moments = server_step(settings.server, state, update.delta, moments)
            if is_finite(candidate):  # the coordinator refuses a non-finite global state
                state = candidate
            previous = accepted(aggregator.participants, aggregator.norms)
        load_trainable_state(loaded.model, state)
        accuracy.append(evaluate(loaded, test)["accuracy"])
    return {"accuracy": accuracy, "final": accuracy[-1], "dropped": drops}


def _settings(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as run-config overrides: VALUE read as JSON (2, 0.5, true), else as
    text; the run config checks each key and type."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value.strip()
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny model, 6 devices, 2 rounds")
    mode.add_argument(
        "--quick", action="store_true", help="5 rounds, the default aggregator, 1 hostile, 1 repeat"
    )
    parser.add_argument("--aggregators", default=",".join(AGGREGATORS), help="comma-separated")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument("--hostile", default="1,2", help="comma-separated numbers of hostile devices")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each arm (DP noise differs run to run): mean and sd"
    )
    parser.add_argument(
        "--per-round", type=int, default=5, help="devices a round (the fleet's default is 20)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config setting for every arm, e.g. weight-cap=2 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="JSON to write (default results/aggregation_attacks.json)")
    args = parser.parse_args(argv)
    fleet = SMOKE if args.smoke else dataclasses.replace(FULL, per_round=args.per_round)
    if args.smoke:
        args.repeats = 1
    elif args.quick:
        fleet = dataclasses.replace(fleet, rounds=QUICK_ROUNDS)
        # No aggregators named: the default one, resolved for this fleet below.
        args.repeats, args.hostile, args.aggregators = 1, "1", ""
    if not args.smoke:
        args.json = args.json or default_path("aggregation_attacks", args.quick)
    if not args.smoke and not Path(fleet.data).is_file():
        parser.error(f"BANKING77 is not at {BANKING77}: this benchmark needs ../shared/data beside the repo.")
    aggregators = args.aggregators.split(",") if args.aggregators else []
    attacks = args.attacks.split(",")
    counts = [int(n) for n in args.hostile.split(",")]
    if unknown := (set(aggregators) - set(AGGREGATORS)) | (set(attacks) - set(ATTACKS)):
        parser.error(f"unknown aggregator or attack: {sorted(unknown)}")
    started = time.perf_counter()
    base = {
        "model": fleet.model, "data": fleet.data, "eval-data": fleet.eval_data, "partition": fleet.partition,
        "devices-per-round": fleet.per_round, "rounds": fleet.rounds, "seed": SEED,
        **_settings(parser, args.set),
    }  # fmt: skip
    rounds = schedule(fleet)
    ranked = sorted(range(fleet.devices), key=lambda p: (-sum(p in s for s in rounds), p))
    test = load_examples(fleet.eval_data)
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "benchmarks/aggregation_attacks.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "fleet": dataclasses.asdict(fleet),
        "schedule": rounds,
        "hostile_devices": ranked[: max(counts)],
        "arms": {},
    }
    defaults = CoordinatorSettings.from_run_config(base)
    aggregators = aggregators or [defaults.influence.aggregator]
    loaded = build_model(defaults.spec)
    fleet_devices = devices(fleet, defaults, rounds)
    if loaded.spec.regime == "head":  # every text's features once, shared by every arm
        pooled_features(loaded, [e for d in fleet_devices for e in d.records] + test)
    for aggregator in aggregators:
        influence = dataclasses.replace(defaults.influence, aggregator=aggregator)
        settings = dataclasses.replace(defaults, influence=influence)
        arms: dict[str, Any] = {}
        cases = [("clean", (), None)] + [
            (f"{attack} ×{count}", tuple(ranked[:count]), ATTACKS[attack])
            for attack in attacks
            for count in counts
        ]
        for name, hostile, attack_fn in cases:
            progress(f"{aggregator}: {name} ({args.repeats} runs)")
            runs = [
                run_arm(loaded, settings, fleet_devices, rounds, test, hostile, attack_fn)
                for _ in range(args.repeats)
            ]
            finals = [r["final"] for r in runs]
            arms[name] = {
                "final": statistics.mean(finals),
                "sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "finals": finals,
                "dropped": runs[0]["dropped"],
                "accuracy": runs[0]["accuracy"],
            }
        clean = arms["clean"]["final"]
        one = [a["final"] for name, a in arms.items() if name.endswith("×1")]
        result["arms"][aggregator] = {
            "arms": arms,
            "worst_points_lost_with_one": round(100 * (clean - min(one)), 2) if one else None,
        }
    default = result["arms"].get(defaults.influence.aggregator)  # `auto` resolved for this fleet
    result["default_aggregator"] = defaults.influence.aggregator
    if default and default["worst_points_lost_with_one"] is not None:
        result["default_meets_target"] = default["worst_points_lost_with_one"] <= TARGET_POINTS
        # The headline: the default aggregator's worst final accuracy with one attacker, against its
        # clean run (the baseline, trained on the same schedule in the same run).
        clean = default["arms"]["clean"]["final"]
        worst = min(a["final"] for name, a in default["arms"].items() if name.endswith("×1"))
        result["default_clean_final"] = round(clean, 4)
        result["default_worst_final_with_one"] = round(worst, 4)
        result["default_worst_over_clean"] = round(worst / clean, 3) if clean else None
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
