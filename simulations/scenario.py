"""``fleetlora simulate --scenario incremental``: a fleet that never stops learning, and what it forgets.

The labels are split into phases (:func:`~fleetlora.common.data.partition.phase_labels`); each phase
brings its intents to the devices through their corpus pipeline (run-config ``stream-phases``), and
lasts ``phase-rounds`` rounds. Devices train on what arrived since they last trained (``train-on =
"arrivals"``), with the forgetting controls the run sets (docs/research.md, "Forgetting control").
After the run, the version that closed each phase is scored on the test examples of every phase:

- ``seen``: accuracy on the intents of all phases so far; ``first``: on the first phase's;
- ``retention``: for each earlier phase, its accuracy after the last phase ÷ its accuracy right after
  it was learned, averaged over the earlier phases (the issue's definition).

Any labelled file given with ``--data`` works: without ``--eval-data`` a fifth of it (by a hash of the
text, as a device's hold-out) becomes the test set. The first phase's test examples are pinned as the
key-knowledge set, so the coordinator's retention gate sees the same forgetting (versions it holds are
listed in results.json).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleetlora.common.batches import evaluate
from fleetlora.common.config import split_names
from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.data.examples import labels_of
from fleetlora.common.data.partition import phase_labels
from fleetlora.common.delta import load_trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.model import cached_model
from fleetlora.common.run_config import SETTINGS, RunValue
from fleetlora.coordinator.rounds import FederationObserver, FederationStart, RoundOutcome
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import Storage

SCENARIOS = ("incremental",)
DEFAULT_PHASES = 4
# The default configuration's forgetting control (benchmarks/forgetting.py measures the arms).
# Replay alone, half of each round's set. On the built-in corpus under DP (seed 1) it kept 97.7% of earlier
# phases' accuracy; distillation at weight 0.5 kept 42% on BANKING77 without DP, where plain SGD at the head
# regime's rate does not follow the soft targets stably (docs/research.md).
DEFAULT_CONTROL: dict[str, RunValue] = {"train-on": "arrivals", "replay-share": 0.5}
# A replayed record trains again in later phases: under DP, noise planned for twice the schedule's rounds
# keeps earlier cohorts' budgets from running out before the stream ends (unless dp-rounds is set).
DP_ROUNDS_PER_ROUND = 2
CONTROL_KEYS = ("train-on", "replay-share", "distill-weight", "distill-temperature", "ewc-lambda")


def incremental_settings(settings: Mapping[str, RunValue], out: Path) -> dict[str, RunValue]:
    """The run-config keys of the scenario: the caller's, over the scenario's defaults.

    Writes the data files the run needs under ``out/scenario`` (a test split when none is given, the
    key-knowledge set). Rounds are phases × phase-rounds; a different ``--rounds`` is refused.
    """
    from fleetlora.common.run_config import DEFAULTS  # the table's defaults, for keys the caller left

    phases = int(settings.get("stream-phases") or DEFAULT_PHASES)
    phase_rounds = int(settings.get("phase-rounds", DEFAULTS.phase_rounds))
    rounds = phases * phase_rounds
    if "rounds" in settings and int(settings["rounds"]) != rounds:
        raise ConfigError(
            f"--scenario incremental runs {phases} phases × {phase_rounds} rounds = {rounds} rounds; "
            f"leave --rounds out, or set --stream-phases and --phase-rounds instead."
        )
    folder = out / "scenario"
    folder.mkdir(parents=True, exist_ok=True)
    data = str(settings.get("data", DEFAULTS.data))
    train, test = _train_and_test(data, settings.get("eval-data"), folder)
    # The fleet's labels as the coordinator takes them (settings.py): phases cut their order.
    labels = split_names(str(settings.get("labels") or "")) or labels_of(load_examples(train))
    if len(labels) < phases:
        raise ConfigError(f"{data} has {len(labels)} labels: too few for {phases} phases (--stream-phases).")
    seed = int(settings.get("seed", DEFAULTS.seed))
    first = set(phase_labels(labels, phases, seed)[0])
    key_set = folder / "key-set.csv"
    _write_csv(key_set, [e for e in load_examples(test) if e.label in first])
    known = {s.key for s in SETTINGS}
    scenario: dict[str, RunValue] = {
        "stream-phases": phases,
        "rounds": rounds,
        "data": train,
        "eval-data": test,
        **({"key-set": str(key_set)} if "key-set" in known else {}),
    }
    if not any(key in settings for key in CONTROL_KEYS):
        scenario.update(DEFAULT_CONTROL)
    if not settings.get("dp-rounds"):
        scenario["dp-rounds"] = DP_ROUNDS_PER_ROUND * rounds
    return {**scenario, **{k: v for k, v in settings.items() if k not in ("data", "eval-data")}}


def configuration_name(settings: Mapping[str, RunValue]) -> str:
    """How results.json names the run's forgetting control: ``default``, or the keys it set."""
    chosen = {k: settings[k] for k in CONTROL_KEYS if k in settings}
    if chosen == {k: v for k, v in DEFAULT_CONTROL.items()}:
        return "default"
    return ",".join(f"{k}={v}" for k, v in chosen.items()) or "default"


@dataclasses.dataclass
class PhaseVersions:
    """Records the run's lineage, the last round it reached (failed or not) and the rounds held; the
    versions are read from the database, so a resumed run's earlier rounds count too."""

    forward: FederationObserver | None = None
    held: list[int] = dataclasses.field(default_factory=list)
    lineage: str = ""
    reached: int = 0

    def started(self, start: FederationStart) -> None:
        self.lineage, self.reached = start.lineage, start.version.round
        if self.forward:
            self.forward.started(start)

    def round_finished(self, outcome: RoundOutcome) -> None:
        self.reached = max(self.reached, outcome.round)
        if getattr(outcome, "held", None):
            self.held.append(outcome.round)
        if self.forward:
            self.forward.round_finished(outcome)


def score_phases(
    settings: CoordinatorSettings, versions: PhaseVersions, phases: int, phase_rounds: int
) -> dict[str, Any]:
    """Each phase-closing version's accuracy on every phase's test intents, and the retention.

    Phase p closes at round p × ``phase_rounds``, as devices count (a resumed run's too); its version
    is the lineage's newest stored at that round (a failed round keeps the one before)."""
    loaded = cached_model(settings.spec)
    groups = phase_labels(settings.spec.labels, phases, settings.spec.seed)
    test = load_examples(settings.eval_data)
    by_phase = [[e for e in test if e.label in set(group)] for group in groups]
    store = Storage.open(settings.db_url, settings.tenant).versions
    stored = store.all(versions.lineage)
    rows: list[dict[str, Any]] = []
    for phase in range(1, phases + 1):
        closing = phase * phase_rounds
        if closing > versions.reached:
            break  # the run stopped before this phase ended
        closed = max((v for v in stored if v.round <= closing), key=lambda v: v.round)
        load_trainable_state(loaded.model, store.adapter(closed.id))
        accuracy = [_accuracy(loaded, examples) for examples in by_phase]
        seen = by_phase[:phase]
        rows.append(
            {
                "phase": phase,
                "round": closing,
                "labels": list(groups[phase - 1]),
                "accuracy_by_phase": accuracy,
                "seen": _weighted([a for a in accuracy[:phase]], [len(s) for s in seen]),
                "first": accuracy[0],
                "all": _weighted(accuracy, [len(s) for s in by_phase]),
            }
        )
    return {"phases": rows, "retention": retention(rows)}


def retention(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Accuracy on each earlier phase after the last ÷ right after it was learned, averaged; and the
    first phase's alone. None when fewer than two phases finished or an earlier phase was never learned."""
    if len(rows) < 2:
        return {"mean": None, "first": None}
    last = rows[-1]["accuracy_by_phase"]
    ratios = [
        last[k] / rows[k]["accuracy_by_phase"][k] if rows[k]["accuracy_by_phase"][k] > 0 else None
        for k in range(len(rows) - 1)
    ]
    known = [r for r in ratios if r is not None]
    return {"mean": sum(known) / len(known) if known else None, "first": ratios[0]}


def plot_phases(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Accuracy per phase: on each phase's intents, on all seen so far, on all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    xs = [row["phase"] for row in rows]
    for k in range(len(rows[0]["accuracy_by_phase"]) if rows else 0):
        ys = [row["accuracy_by_phase"][k] for row in rows]
        axes.plot(xs, ys, marker="o", linewidth=1, alpha=0.6, label=f"phase {k + 1}'s intents")
    axes.plot(xs, [row["seen"] for row in rows], marker="s", color="black", linewidth=2, label="all seen")
    axes.set_xlabel("after phase")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.set_xticks(xs)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _accuracy(loaded: Any, examples: Sequence[Example]) -> float:
    return float(evaluate(loaded, examples)["accuracy"]) if examples else 0.0


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


def _train_and_test(data: str, eval_data: RunValue | None, folder: Path) -> tuple[str, str]:
    """The training data and a labelled test set: the ones given, or a split of ``data`` by text hash."""
    if eval_data:
        return data, str(eval_data)
    if data == "builtin":
        return data, "builtin-test"
    examples = load_examples(data)
    if not examples or any(e.label is None for e in examples):
        raise ConfigError(f"--scenario incremental needs labelled data; {data} has unlabelled rows.")
    train, test = split_holdout(examples, 0.2)
    _write_csv(folder / "train.csv", train)
    _write_csv(folder / "test.csv", test)
    return str(folder / "train.csv"), str(folder / "test.csv")


def _write_csv(path: Path, examples: Sequence[Example]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows((e.text, e.label) for e in examples)
