"""The class-incremental scenario checked against what could make it score the wrong thing: a resumed
run (a crashed simulation started again with the same --out), a failed round, labels given in an
order of the operator's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fleetlora.common.config import to_config
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.data.partition import phase_labels
from fleetlora.common.model import cached_model
from fleetlora.coordinator.rounds import FederationStart, RoundOutcome
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import NewVersion, Storage, VersionInfo
from fleetlora.simulations.scenario import PhaseVersions, incremental_settings, score_phases
from tests.coordinator.test_rounds import _run_config

HEAD = "base_model.model.classifier.modules_to_save.default"  # the tiny model's classifier, in the adapter


def _outcome(number: int, version: VersionInfo | None) -> RoundOutcome:
    return RoundOutcome(number, version, [], {}, [], 0, 0.0, error=None if version else "too few devices")


def test_a_resumed_run_scores_the_versions_that_closed_each_phase_by_absolute_round(
    tmp_path: Path, sqlite_url: str
):
    config = _run_config(sqlite_url, **{"stream-phases": 2, "phase-rounds": 2, "rounds": 4})
    settings = CoordinatorSettings.from_run_config(config)
    loaded = cached_model(settings.spec)
    first, second = phase_labels(settings.spec.labels, 2, settings.spec.seed)
    test = tmp_path / "test.csv"  # one example of each phase's first intent: quick to score
    test.write_text(f"text,label\nplease help me,{first[0]}\nwhat now,{second[0]}\n")
    settings = dataclasses.replace(settings, eval_data=str(test))
    storage = Storage.open(sqlite_url, settings.tenant)
    storage.versions.register_lineage("L", settings.tenant, to_config(settings.spec, "model"), "b" * 64, 1)
    made: list[VersionInfo] = []
    # Round r's version answers one label whatever the text: phase 1's at round 2, phase 2's at round 3.
    for number, label in enumerate([second[0], second[0], first[0], second[0]]):
        adapter = {n: t.clone() for n, t in loaded.initial_adapter.items()}
        adapter[f"{HEAD}.weight"].zero_()
        adapter[f"{HEAD}.bias"] = torch.zeros_like(adapter[f"{HEAD}.bias"])
        adapter[f"{HEAD}.bias"][settings.spec.labels.index(label)] = 5.0
        new = NewVersion("L", number, made[-1].id if made else None, "b" * 64, adapter, {}, {})
        made.append(storage.versions.add(new))

    # This process resumed from round 2's version; its round 3 completed and its round 4 failed.
    versions = PhaseVersions()
    versions.started(FederationStart("L", made[2], 3, 1, 1.0, resumed=True))
    versions.round_finished(_outcome(3, made[3]))
    versions.round_finished(_outcome(4, None))

    scored = score_phases(settings, versions, phases=2, phase_rounds=2)

    rows = scored["phases"]
    assert [(row["phase"], row["round"]) for row in rows] == [(1, 2), (2, 4)]
    assert [row["accuracy_by_phase"] for row in rows] == [[1.0, 0.0], [0.0, 1.0]]  # round 2's; round 3's


def test_the_key_set_holds_the_first_phase_of_the_labels_in_the_order_the_run_gives_them(tmp_path: Path):
    labels = tuple(reversed(labels_of(load_examples("builtin"))))
    run = {"model": "tiny", "data": "builtin", "labels": ",".join(labels), "stream-phases": 2}

    incremental_settings(run, tmp_path)

    first = phase_labels(CoordinatorSettings.from_run_config(run).spec.labels, 2, 0)[0]
    assert {e.label for e in load_examples(tmp_path / "scenario" / "key-set.csv")} == set(first)
