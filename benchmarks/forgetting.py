"""What a fleet that never stops learning forgets, and what each forgetting control keeps (issue 16).

Every arm is one ``fleetlora simulate --scenario incremental`` (the real pipeline: corpus ingest, sealed
uploads, DP accounts, the retention gate) with the same seed, data, devices and phase schedule; only the
forgetting control changes, each with and without DP at the default ε:

- **none**: devices train on their newest batch of records (``train-on = "arrivals"``), nothing else;
- **replay** (the scenario's default configuration, :data:`fleetlora.simulations.scenario.DEFAULT_CONTROL`),
  **distill**, **ewc**: one control each (docs/research.md, "Forgetting control");
- **combined**: all three together;
- **joint**: devices train on everything they hold (``train-on = "all"``): the reference.

Reported per arm: ``retention`` (each earlier phase's accuracy after the last phase ÷ right after it was
learned, averaged), the first phase's alone, final all-intent accuracy and its gap to joint training,
``distill_drop`` (points the intents of earlier phases lose from one phase-closing version — the teacher of
the next phase — to the next, averaged), seconds per local step against the ``none`` arm, and rounds the
retention gate held.

Run from the repository root (``--smoke``: tiny model, built-in corpus, what ``make test`` runs)::

    .venv/bin/python benchmarks/forgetting.py [--arms none,default,...] [--dp both|on|off] [--smoke]

``--quick`` (what ``make bench`` runs): the none and replay arms without DP on the tiny model and the
built-in corpus, 6 devices over 3 phases, written to benchmarks/results/quick/forgetting.json; a smoke
run writes nothing unless ``--json`` or ``--plot`` is given.

Progress goes to stderr; the JSON result (also written to ``--json``) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
SEED = 1

ARMS: dict[str, dict[str, Any]] = {
    "none": {"train-on": "arrivals"},
    "replay": {},  # the scenario's default configuration: replay-share 0.5
    "distill": {"train-on": "arrivals", "distill-weight": 0.2},
    "ewc": {"train-on": "arrivals", "ewc-lambda": 0.005},
    "combined": {"train-on": "arrivals", "replay-share": 0.5, "distill-weight": 0.2, "ewc-lambda": 0.005},
    "joint": {"train-on": "all"},
}


@dataclass(frozen=True)
class Setup:
    """The fleet and stream every arm shares."""

    model: str
    data: str
    eval_data: str
    devices: int
    per_round: int
    phases: int
    phase_rounds: int
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return [
            "--model", self.model, "--data", self.data, "--eval-data", self.eval_data,
            "--devices", str(self.devices), "--devices-per-round", str(self.per_round),
            "--stream-phases", str(self.phases), "--phase-rounds", str(self.phase_rounds),
            "--seed", str(SEED), *self.extra,
        ]  # fmt: skip


FULL = Setup("minilm", str(BANKING77 / "train.csv"), str(BANKING77 / "test.csv"), 20, 10, 3, 2)
SMOKE = Setup("tiny", "builtin", "builtin-test", 4, 3, 2, 2, ("--regime", "lora", "--local-steps", "10"))
QUICK = Setup("tiny", "builtin", "builtin-test", 6, 3, 3, 2, ("--regime", "lora", "--local-steps", "20"))


def progress(text: str) -> None:
    print(f"[forgetting] {text}", file=sys.stderr, flush=True)


def run_arm(setup: Setup, control: Mapping[str, Any], epsilon: float | None, out: Path) -> dict[str, Any]:
    """One arm as a researcher runs it; its results.json, condensed."""
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in control.items())
    command = [
        sys.executable, "-m", "fleetlora", "simulate", "--scenario", "incremental", *setup.args(),
        *(["--dp-epsilon", str(epsilon)] if epsilon is not None else []),
        *(["--run-config", pairs] if pairs else []), "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    phases = results["scenario"]["phases"]
    steps = [r["metrics"] for r in results["rounds"] if r["metrics"].get("train_steps")]
    return {
        "command": shlex.join(["fleetlora", *command[3:]]),
        "retention": results["retention"][results["scenario"]["configuration"]],
        "first_phase_retention": results["retention"]["first_phase"],
        "final_accuracy": phases[-1]["all"] if phases else None,
        "seen_by_phase": [round(p["seen"], 4) for p in phases],
        "accuracy_by_phase": [p["accuracy_by_phase"] for p in phases],
        "distill_drop_points": distill_drop(phases),
        "seconds_per_step": statistics.median(m["train_seconds"] / m["train_steps"] for m in steps)
        if steps and all("train_seconds" in m for m in steps)
        else None,
        "held_rounds": results["scenario"]["held_rounds"],
        "failed_rounds": sum(1 for r in results["rounds"] if not r["version"]),
        "largest_epsilon": max((d["epsilon"] for d in results["devices"].values()), default=0.0),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def distill_drop(phases: Sequence[Mapping[str, Any]]) -> float | None:
    """Points the earlier phases' intents lose from each phase-closing version (the next phase's teacher)
    to the next one, averaged over phases after the first."""
    drops = []
    for before, after in itertools.pairwise(phases):
        earlier = range(before["phase"])  # the phases the teacher had learned
        teacher = statistics.fmean(before["accuracy_by_phase"][k] for k in earlier)
        student = statistics.fmean(after["accuracy_by_phase"][k] for k in earlier)
        drops.append(100 * (teacher - student))
    return round(statistics.fmean(drops), 2) if drops else None


def compare(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each arm against joint training and the none arm, in the same privacy setting."""
    out: dict[str, Any] = {}
    for name, arm in arms.items():
        privacy = name.partition(", ")[2]
        joint = arms.get(f"joint, {privacy}")
        plain = arms.get(f"none, {privacy}")
        out[name] = {
            "gap_to_joint_points": round(100 * (joint["final_accuracy"] - arm["final_accuracy"]), 2)
            if joint and arm["final_accuracy"] is not None
            else None,
            "step_cost_over_none": round(arm["seconds_per_step"] / plain["seconds_per_step"], 3)
            if plain and arm["seconds_per_step"] and plain["seconds_per_step"]
            else None,
        }
    return out


def plot(arms: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    privacies = sorted({name.partition(", ")[2] for name in arms})
    figure, axes = plt.subplots(1, len(privacies), figsize=(6 * len(privacies), 4.2), squeeze=False)
    for ax, privacy in zip(axes[0], privacies, strict=True):
        for name, arm in arms.items():
            if name.endswith(privacy) and arm["seen_by_phase"]:
                xs = range(1, len(arm["seen_by_phase"]) + 1)
                ax.plot(xs, arm["seen_by_phase"], marker="o", label=name.partition(", ")[0])
        ax.set_title(f"Accuracy on all intents seen, {privacy}")
        ax.set_xlabel("after phase")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny model, built-in corpus, two arms")
    mode.add_argument("--quick", action="store_true", help="two arms, tiny model, 3 phases; results/quick/")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--dp", choices=("both", "on", "off"), default="both")
    parser.add_argument("--json", type=Path, help="JSON to write (default results/forgetting.json)")
    parser.add_argument("--plot", type=Path, help="PNG to write (default results/forgetting.png)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else QUICK if args.quick else FULL
    results = REPO / "benchmarks" / "results"
    if args.smoke or args.quick:
        args.arms, args.dp = "none,replay", "off"
    if args.quick:
        args.json = args.json or results / "quick" / "forgetting.json"
    elif not args.smoke:
        args.json = args.json or results / "forgetting.json"
        args.plot = args.plot or results / "forgetting.png"
    if setup is FULL and not Path(setup.data).is_file():
        parser.error(f"BANKING77 is not at {BANKING77}: this benchmark needs ../shared/data beside the repo.")
    names = args.arms.split(",")
    if unknown := set(names) - set(ARMS):
        parser.error(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    privacy = {"both": [("no DP", 0.0), ("DP", None)], "on": [("DP", None)], "off": [("no DP", 0.0)]}[args.dp]
    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "benchmarks/forgetting.py", *given])
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlora-forgetting-") as scratch:
        for label, epsilon in privacy:
            for name in names:
                progress(f"{name}, {label}")
                arms[f"{name}, {label}"] = run_arm(
                    setup, ARMS[name], epsilon, Path(scratch) / f"{name}-{label.replace(' ', '')}"
                )
    result = {
        "command": command,
        "machine": {"cores": os.cpu_count(), "cpus": os.cpu_count(), "torch_threads": _torch_threads()},
        "setup": setup.__dict__ | {"extra": list(setup.extra), "seed": SEED},
        "targets": {
            "retention_without_dp": 0.95,
            "retention_with_dp": 0.90,
            "gap_to_joint_points": 3.0,
            "distill_drop_points": 3.0,
        },
        "arms": arms,
        "comparison": compare(arms),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot is not None:
        plot(arms, args.plot)
    print(json.dumps(result))
    return result


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
