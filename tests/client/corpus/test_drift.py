"""Drift: a corpus device whose new records moved away from its last training set wants to train."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleetlora.client.corpus.drift import js_divergence, measure, save_reference, token_counts
from fleetlora.client.corpus.records import Record, stamped
from fleetlora.client.corpus.store import CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.common.data import load_examples
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.sampling import sample_devices

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@pytest.fixture(scope="module")
def banking() -> list[str]:
    path = SHARED / "banking77" / "train.csv"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    texts = [e.text for e in load_examples(path)]
    random.Random(0).shuffle(texts)
    return texts


def _store(tmp_path: Path, texts: list[str], at: datetime) -> CorpusStore:
    store = CorpusStore(tmp_path / "corpus.sqlite", capacity_bytes=10**9)
    store.add_many(stamped(Record(t, "test", "d", arrived_at=at)) for t in texts)
    return store


def test_js_divergence_bounds():
    a, b = token_counts(["my card is lost"]), token_counts(["to be or not to be"])
    assert js_divergence(a, a) == 0.0
    assert js_divergence(a, b) == pytest.approx(1.0)
    assert 0 < js_divergence(a, token_counts(["my card is late"])) < 1


def test_same_distribution_does_not_drift_but_another_topic_does(tmp_path: Path, banking: list[str]):
    device = DeviceState(tmp_path)
    trained_at = datetime.now(UTC) - timedelta(hours=1)
    save_reference(device, banking[:800], trained_at)
    later = trained_at + timedelta(minutes=5)

    same = _store(tmp_path / "same", banking[800:1000], later)
    assert not measure(device, same).wants_train

    shakespeare = (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines()
    lines = [line for line in shakespeare if len(line) > 20][:50]
    other = _store(tmp_path / "other", lines, later)
    report = measure(device, other)
    assert report.wants_train and report.score > 1.5 and report.recent == 50


def test_records_older_than_the_reference_and_small_windows_do_not_count(tmp_path: Path, banking: list[str]):
    device = DeviceState(tmp_path)
    now = datetime.now(UTC)
    save_reference(device, banking[:800], now)
    store = _store(tmp_path, ["to be or not to be, that is the question"] * 1, now + timedelta(seconds=1))
    store.add_many(
        stamped(Record(t, "test", "d", arrived_at=now - timedelta(days=1))) for t in banking[900:1000]
    )
    report = measure(device, store)
    assert report.recent == 1 and not report.wants_train  # one new record says too little


def test_a_device_that_never_trained_wants_to_once_it_holds_records(tmp_path: Path):
    device = DeviceState(tmp_path)
    empty = CorpusStore(tmp_path / "empty.sqlite", capacity_bytes=10**6)
    assert not measure(device, empty).wants_train
    assert measure(device, _store(tmp_path, ["where is my new card"], datetime.now(UTC))).wants_train


def test_a_bad_threshold_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="ratio"):
        measure(DeviceState(tmp_path), CorpusStore(tmp_path / "c.sqlite", capacity_bytes=10**6), threshold=0)


def test_devices_that_want_to_train_are_sampled_first():
    online = list(range(10))
    for seed in range(20):
        sampled = sample_devices(online, 4, {7, 8}, random.Random(seed))
        assert set(sampled[:2]) == {7, 8} and len(set(sampled)) == 4
    assert len(sample_devices(online, 20, set(), random.Random(0))) == 10
