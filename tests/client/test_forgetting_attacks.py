"""The device's forgetting control under attack (issue 16): damaged or oversized files in its state
folder never fail a round again and again, and values from the wire that would overflow are refused."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from fleetlora.client import forgetting
from fleetlora.client.corpus import drift, simulated
from fleetlora.client.corpus.records import Record, stamped
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.client.local_data import corpus_examples
from fleetlora.common.config import ModelSpec, TrainSettings, from_config, to_config
from fleetlora.common.data import Example
from fleetlora.common.delta import trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.model import build_model

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _device(tmp_path: Path) -> DeviceState:
    """A corpus device holding records that came at T0 and T0 + 2 h."""
    device = DeviceState(tmp_path / "device")
    with CorpusStore(device.root / CORPUS_FILE) as store:
        for number in range(10):
            at = T0 if number < 6 else T0 + timedelta(hours=2)
            text = f"record {number}: move my savings"
            store.add(stamped(Record(text, "test", "d", label="transfer", arrived_at=at)))
    return device


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        (forgetting.ARRIVALS_FILE, b"{not json"),
        (forgetting.ARRIVALS_FILE, b'{"since": "yesterday"}'),
        (forgetting.ARRIVALS_FILE, b'{"since": "2026-03-01T00:00:00"}'),  # no time zone
        (forgetting.ARRIVALS_FILE, None),  # oversized: refused by its size
        (drift.REFERENCE_FILE, b'{"trained_at": 7, "counts": {}}'),
    ],
)
def test_a_damaged_arrivals_or_reference_file_is_set_aside_and_every_record_counts_as_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, damage: bytes | None
):
    device = _device(tmp_path)
    drift.save_reference(device, ["record"], T0 + timedelta(hours=3))  # nothing new since
    path = device.path(name, ".json")
    if damage is None:
        with path.open("wb") as handle:  # sparse: nothing in it to read, only its size
            handle.truncate(2**20)
    else:
        path.write_bytes(damage)

    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # and again: the damage does not come back
            assert forgetting.arrived_texts(device) is None

    assert (device.root / f"{name}.damaged").is_file()
    assert f"{name}.json" in caplog.text and "set aside" in caplog.text


def test_an_oversized_fisher_is_set_aside_by_its_size_without_being_read(
    tiny_spec: ModelSpec, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    reference = trainable_state(build_model(tiny_spec).model)
    device = DeviceState(tmp_path / "device")
    device.root.mkdir()
    with device.path(forgetting.FISHER_FILE).open("wb") as handle:
        handle.truncate(2**28)  # sparse: only its size is there, far beyond a tiny model's Fisher

    with caplog.at_level(logging.WARNING):
        assert forgetting.load_fisher(device, reference) is None

    assert (device.root / f"{forgetting.FISHER_FILE}.damaged").is_file()
    assert f"{2**28} bytes" in caplog.text


@pytest.mark.parametrize("damage", [b"[1]", b'{"phase": "two"}', b'{"phase": -3}', b'{"phase": 99}', b"\xff"])
def test_a_damaged_phase_file_is_set_aside_and_the_phases_are_taken_in_again_without_duplicates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: bytes
):
    device = DeviceState(tmp_path / "device")
    partition = [Example(f"text {i} about {label}", label) for i in range(4) for label in ("a", "b", "c")]
    phases = [("a",), ("b",), ("c",)]
    simulated.catch_up_phases(device, "d", partition, phases, 1)
    device.path(simulated.PHASE_FILE, ".json").write_bytes(damage)

    with caplog.at_level(logging.WARNING):
        simulated.catch_up_phases(device, "d", partition, phases, 2)

    stored = corpus_examples(device.root / CORPUS_FILE)
    assert sorted(e.label for e in stored) == ["a"] * 4 + ["b"] * 4  # phase 1 once, phase 2 now
    assert device.load_json(simulated.PHASE_FILE) == {"phase": 2}
    assert (device.root / f"{simulated.PHASE_FILE}.damaged").is_file() and "set aside" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("distill_temperature", 1e200, r"distill-temperature must be in \[0.01, 100\]"),
        ("distill_temperature", 1e-300, r"distill-temperature must be in \[0.01, 100\]"),
        ("ewc_lambda", 1e300, r"ewc-lambda must be in \[0, 1e\+06\]"),
        ("ewc_lambda", math.inf, "ewc-lambda must be a finite number"),
        ("distill_weight", True, "distill-weight must be a finite number"),
    ],
)
def test_values_from_the_wire_that_would_overflow_the_loss_are_refused(key: str, value: object, message: str):
    sent = to_config(TrainSettings(), "train")
    with pytest.raises(ConfigError, match=message):
        from_config(TrainSettings, {**sent, f"train.forgetting.{key}": value}, "train")


def test_the_largest_temperature_allowed_still_gives_a_finite_loss():
    student, teacher = torch.randn(3, 4) * 30, torch.randn(3, 4) * 30
    labels = torch.tensor([0, 1, 2])
    for temperature in (0.01, 100.0):
        loss = forgetting.distillation_loss(student, labels, teacher, weight=0.5, temperature=temperature)
        assert math.isfinite(float(loss))


@pytest.mark.parametrize(("share", "moved"), [(0.3, 1), (0.5, 1), (0.9, 9)])
def test_one_arrival_moves_up_to_the_ceiling_of_share_over_one_minus_share_older_records_into_the_pool(
    share: float, moved: int
):
    """The bound docs/security.md states for DP under add/remove adjacency (replay's group size)."""
    older = [Example(f"older record {i}", "a") for i in range(200)]
    arrivals = [Example(f"new record {i}", "a") for i in range(12)]
    most = 0
    for n in range(1, len(arrivals)):
        pools = [
            forgetting.compose_pool([*older, *new], share, arrived={e.text for e in new}, seed=3).examples
            for new in (arrivals[:n], arrivals[: n + 1])
        ]
        most = max(most, len({e.text for e in pools[1]} - {e.text for e in pools[0]}) - 1)
    assert most == moved  # ⌈share / (1 − share)⌉, the arrival itself not counted
