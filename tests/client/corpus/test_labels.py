"""Semi-automatic labels: sure proposals become labels with provenance, unsure ones wait for a person."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleetlora.client.corpus import labels
from fleetlora.client.corpus.records import Record, stamped
from fleetlora.client.corpus.store import CorpusStore, UnknownIdError
from fleetlora.common.config import ModelSpec
from fleetlora.common.errors import ConfigError, DataError
from fleetlora.common.model import build_model

TEXTS = [
    "my card was declined at the shop",
    "how do I change my pin",
    "where is my refund",
    "what is the rate",
]


@pytest.fixture
def store(tmp_path: Path) -> CorpusStore:
    store = CorpusStore(tmp_path / "corpus.sqlite", capacity_bytes=10**7)
    store.add_many(stamped(Record(t, "test", "d")) for t in TEXTS)
    store.add(stamped(Record("already labelled text here", "test", "d", label="balance")))
    return store


def test_sure_proposals_become_labels_with_provenance(store: CorpusStore, tiny_spec: ModelSpec):
    model = labels.Labeller(build_model(tiny_spec), "model:v3")
    n_labels = len(tiny_spec.labels)
    counts = labels.propose(store, model, floor=0.5 / n_labels)  # an untrained head is near uniform
    assert counts == {"labelled": 4}
    labelled = {r.text: r for r in store.window() if r.text in TEXTS}
    for record in labelled.values():
        assert record.label in tiny_spec.labels
        provenance = record.metadata[labels.PROVENANCE]
        assert provenance["by"] == "model:v3" and 0 < provenance["confidence"] <= 1 and provenance["at"]
    assert store.unlabelled() == []


def test_unsure_proposals_wait_for_review_and_a_person_settles_them(store: CorpusStore, tiny_spec: ModelSpec):
    counts = labels.propose(store, labels.Labeller(build_model(tiny_spec), "model:v3"), floor=0.99)
    assert counts == {"review": 4}
    queue = labels.review_queue(store)
    assert len(queue) == 4 and all(r.label is None for r in queue)
    first, second = queue[0], queue[1]
    top = max(first.metadata[labels.REVIEW]["proposals"], key=lambda p: p["confidence"])["label"]
    assert labels.settle(store, first.id) == top  # accept the proposal
    with pytest.raises(DataError, match="not one of the fleet's labels"):
        labels.settle(store, second.id, "refnud", known=tiny_spec.labels)  # a typo is not a new class
    assert labels.settle(store, second.id, "refund", known=tiny_spec.labels) == "refund"  # or correct it
    settled = {r.id: r for r in store.window()}
    assert settled[second.id].label == "refund"
    assert settled[second.id].metadata[labels.PROVENANCE]["by"] == "human"
    assert labels.REVIEW not in settled[second.id].metadata
    assert len(labels.review_queue(store)) == 2
    with pytest.raises(DataError, match="waiting for review"):
        labels.settle(store, second.id)
    third = labels.review_queue(store)[0]
    assert labels.settle(store, third.id, "crypto", known=tiny_spec.labels, new_label=True) == "crypto"


def test_two_models_that_agree_are_surer_and_two_that_disagree_go_to_review(
    store: CorpusStore, tiny_spec: ModelSpec, tmp_path: Path
):
    one = labels.Labeller(build_model(tiny_spec), "model:a")
    p = labels.probabilities(one.loaded, TEXTS).max(dim=1).values
    floor = float(p.max()) + 1e-3  # one model alone is never this sure
    counts = labels.propose(store, one, one, floor=floor)  # the same model twice: always agrees
    assert counts["labelled"] >= 1
    for record in store.window():
        if record.text in TEXTS and record.label:
            assert record.metadata[labels.PROVENANCE]["confidence"] > float(p.max())

    other = labels.Labeller(build_model(dataclasses.replace(tiny_spec, seed=7)), "model:b")
    fresh = CorpusStore(tmp_path / "fresh.sqlite", capacity_bytes=10**7)
    fresh.add_many(stamped(Record(t, "test", "d")) for t in TEXTS)
    tops = [labels.probabilities(m.loaded, TEXTS).argmax(dim=1).tolist() for m in (one, other)]
    disagree = {t for t, a, b in zip(TEXTS, *tops, strict=True) if a != b}
    assert disagree  # the two seeded heads differ somewhere
    labels.propose(fresh, one, other, floor=0.01)  # however low the floor, a dispute goes to a person
    waiting = {r.text for r in labels.review_queue(fresh)}
    assert disagree <= waiting


def test_bad_settings_are_refused(store: CorpusStore, tiny_spec: ModelSpec):
    model = labels.Labeller(build_model(tiny_spec), "m")
    with pytest.raises(ConfigError, match="floor"):
        labels.propose(store, model, floor=1.0)
    causal = labels.Labeller(build_model(ModelSpec("tiny", "causal-lm", max_length=32)), "lm")
    with pytest.raises(ConfigError, match="classification"):
        labels.propose(store, causal)
    with pytest.raises(UnknownIdError):
        store.relabel("no-such-id", "x", {})
