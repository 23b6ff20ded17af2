"""The retention gate under attack (issue 16): no path takes a held version to a device, a changed key
set still has a baseline to compare with, a score that is not a number never unlocks or breaks the
gate, and releases are refused for what is not this tenant's held version."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fleetlora.common.config import ModelSpec, to_config
from fleetlora.common.data import Example
from fleetlora.common.errors import DataError, FleetloraError
from fleetlora.common.model import cached_model
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.key_sets import read_key_set
from fleetlora.coordinator.retention import RetentionGate
from fleetlora.coordinator.storage import NewVersion, Storage, VersionInfo
from fleetlora.coordinator.storage.audit import verify

HEAD = "base_model.model.classifier.modules_to_save.default"  # the tiny model's classifier, in the adapter


def _predicting(state: dict[str, torch.Tensor], label_index: int) -> dict[str, torch.Tensor]:
    """``state`` with a classifier that answers ``label_index`` whatever the text."""
    steered = {n: t.clone() for n, t in state.items()}
    steered[f"{HEAD}.weight"].zero_()
    steered[f"{HEAD}.bias"] = torch.zeros_like(steered[f"{HEAD}.bias"])
    steered[f"{HEAD}.bias"][label_index] = 5.0
    return steered


def _version(lineage: str, round_number: int, parent: VersionInfo | None, adapter: dict) -> NewVersion:
    return NewVersion(
        lineage=lineage,
        round=round_number,
        parent_id=parent.id if parent else None,
        base_model_sha256="b" * 64,
        adapter=adapter,
        participants={},
        metrics={},
    )


def _stored(storage: Storage, lineage: str, holds: list[str | None]) -> list[VersionInfo]:
    """Versions of ``lineage`` at rounds 0, 1, ... held with the given reasons (None: not held)."""
    storage.versions.register_lineage(lineage, storage.versions.tenant or "default", {}, "b" * 64, 1)
    made: list[VersionInfo] = []
    for number, hold in enumerate(holds):
        version = _version(lineage, number, made[-1] if made else None, {"w": torch.full((2,), number)})
        made.append(storage.versions.add(dataclasses.replace(version, hold=hold)))
    return made


def test_a_held_version_cannot_be_reverted_to_and_so_reach_devices_as_a_copy(sqlite_url: str):
    storage = Storage.open(sqlite_url, "default")
    good, held, _later = _stored(storage, "L", [None, "forgot", None])

    with pytest.raises(FleetloraError, match=f"{held.label} is held by the retention gate.*versions release"):
        storage.versions.revert(held.id, "roll back to it")
    assert [v.id for v in storage.versions.all()] == [good.id, held.id, _later.id]  # nothing added

    storage.versions.release(held.id, "checked by hand")
    reverted = storage.versions.revert(held.id, "roll back to it")  # released: a revert may copy it
    assert not reverted.held
    assert verify(storage.audit.entries(), storage.audit.head(), [], None) == []


def test_a_release_is_refused_twice_for_an_unknown_version_and_for_another_tenants(sqlite_url: str):
    mine, theirs = Storage.open(sqlite_url, "default"), Storage.open(sqlite_url, "other")
    (_, held) = _stored(mine, "L", [None, "forgot"])
    (_, their_held) = _stored(theirs, "M", [None, "forgot"])

    with pytest.raises(FleetloraError, match=f"No version {their_held.label}"):
        mine.versions.release(their_held.id, "not mine")
    with pytest.raises(FleetloraError, match="No version v999"):
        mine.versions.release(999, "absent")
    mine.versions.release(held.id, "fine")
    with pytest.raises(FleetloraError, match="was released already"):
        mine.versions.release(held.id, "again")
    assert theirs.versions.get(their_held.id).held
    released = [e for e in mine.audit.entries() if e.action == "version.released"]
    assert [e.subject for e in released] == [held.label]


def test_a_newly_pinned_key_set_is_scored_on_the_parent_before_a_new_version_is_judged(
    sqlite_url: str, tiny_spec: ModelSpec
):
    storage = Storage.open(sqlite_url, "default")
    loaded = cached_model(tiny_spec)
    storage.versions.register_lineage(
        "L", "default", to_config(tiny_spec, "model"), loaded.base_sha256, loaded.base_bytes
    )
    labels = tiny_spec.labels
    knows, forgot = (_predicting(loaded.initial_adapter, labels.index(x)) for x in ("refund", "balance"))
    storage.key_sets.add("first", [Example("where is my card", labels[0])])
    gate = RetentionGate(storage, loaded, "L", threshold=0.95)
    parent = storage.versions.add(gate.judge(_version("L", 0, None, knows)))

    # The operator pins a new set while the coordinator runs: the parent knows it, the new version not.
    storage.key_sets.add("second", [Example("i want my money back", "refund")])
    judged = gate.judge(_version("L", 1, parent, forgot))

    assert judged.key_score == 0.0
    assert judged.hold is not None and f"(v{parent.id})" in judged.hold
    assert storage.versions.get(parent.id).key_score == 1.0  # the baseline, stored with the parent


def test_a_score_that_is_not_a_number_is_the_worst_and_the_version_is_held(sqlite_url: str):
    storage = Storage.open(sqlite_url, "default")
    spec = ModelSpec("tiny", "causal-lm", max_length=32)
    loaded = cached_model(spec)
    storage.versions.register_lineage("L", "default", to_config(spec, "model"), loaded.base_sha256, 1)
    storage.key_sets.add("texts", [Example("what is my balance"), Example("send money to my sister")])
    gate = RetentionGate(storage, loaded, "L", threshold=0.95)
    first = storage.versions.add(gate.judge(_version("L", 0, None, loaded.initial_adapter)))
    broken = {n: torch.full_like(t, math.nan) for n, t in loaded.initial_adapter.items()}

    judged = gate.judge(_version("L", 1, first, broken))

    assert judged.key_score == 0.0 and judged.hold is not None
    stored = storage.versions.add(judged)  # NaN is no SQL NOT NULL value, and never the best
    assert stored.held and storage.versions.best_key_score("L", stored.key_set_id)[0] == first.id


# ---- the key-set file: hostile input ---------------------------------------------------------------


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        (f'{{"text": "a", "label": {DEEP}}}\n'.encode(), ".jsonl", "line 1: nested too deep"),
        (b'{"text": "a", "label": {"name": "balance"}}\n', ".jsonl", "line 1: the label must be a string"),
        (b'{"text": "a", "label": "balance"}\n{"text": "b", "label": null}\n', ".jsonl", "1 of 2 .*no label"),
        (b"\xff\xfe\x00 binary", ".csv", "not UTF-8 text"),
        (b"text,label\nmy card,card_lost\nhello,balance\nmy card,refund\n", ".csv", "'my card' .*2 labels"),
    ],
)
def test_a_hostile_key_set_file_is_refused_naming_the_problem(
    tmp_path: Path, content: bytes, suffix: str, expected: str
):
    path = tmp_path / f"key{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        read_key_set(path)


def test_a_key_set_name_cannot_send_escape_sequences_to_the_operators_terminal(
    tmp_path: Path, sqlite_url: str
):
    path = tmp_path / "key.csv"
    path.write_text("text,label\nmy card was declined,card_declined\n")

    name = "\x1b]0;owned\x07x"  # sets the terminal's title, or worse
    done = CliRunner().invoke(app, ["key-set", "add", str(path), "--name", name, "--db", sqlite_url])

    assert done.exit_code == 0, done.output
    assert "\x1b" not in done.output and "\\x1b]0;owned\\x07x" in done.output
