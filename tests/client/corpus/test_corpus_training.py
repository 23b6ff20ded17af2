"""A device whose `data-path` is `corpus` trains on what its corpus store holds, labelled records only."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fleetlora.client.client_app import build_client_app
from fleetlora.client.corpus import simulated
from fleetlora.client.corpus.pipeline import Pipeline
from fleetlora.client.corpus.records import Record
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.local_data import local_examples
from fleetlora.common import records
from fleetlora.common.data import load_examples, split_holdout
from fleetlora.common.run_config import DEFAULTS
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config


def _fill(state_dir: Path, examples, unlabelled: int) -> None:
    with CorpusStore(state_dir / CORPUS_FILE) as store:
        pipeline = Pipeline(store)
        for e in examples:
            pipeline.ingest(Record(text=e.text, source="test", device=state_dir.name, label=e.label))
        # A label the fleet does not have: skipped in training, where it once failed the device every round.
        pipeline.ingest(Record(text="Can I pay my rent with this card?", source="test", device=state_dir.name,
                               label="not_a_fleet_label"))  # fmt: skip
        for i in range(unlabelled):
            pipeline.ingest(Record(text=f"a new request number {i} about my {i * 7} account", source="test",
                                   device=state_dir.name))  # fmt: skip


def test_devices_train_on_their_corpus_store(tmp_path: Path, sqlite_url: str):
    examples = load_examples("builtin")
    node_configs = []
    for i in range(2):
        state = tmp_path / f"device-{i}"
        _fill(state, examples[i * 150 : (i + 1) * 150], unlabelled=20)
        node_configs.append(
            {
                "data-path": "corpus",
                "state-dir": str(state),
                "device-id": f"device-{i}",
                "upload-consent": True,
            }
        )
    stored = local_examples(node_configs[0], {})
    assert len(stored) > 150 and sum(e.label is None for e in stored) == 20  # near-duplicates aside

    config = _run_config(sqlite_url, **{"devices-per-round": 2, "min-devices": 2, "rounds": 1})
    grid = LocalGrid(build_client_app(), 2, config, node_configs=node_configs)
    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert outcome.version is not None and not outcome.drops
    # Each device trained on the training side of its records with a fleet label; unlabelled ones waited.
    fleet_labels = {e.label for e in examples}
    expected = []
    for c in node_configs:
        train, _ = split_holdout(
            [e for e in local_examples(c, {}) if e.label in fleet_labels], DEFAULTS.holdout
        )
        expected.append(len(train))
    assert sorted(outcome.participants.values()) == sorted(expected)


def test_a_corpus_device_reports_drift_when_asked_for_its_status(tmp_path: Path, sqlite_url: str):
    examples = load_examples("builtin")
    state = tmp_path / "device-0"
    _fill(state, examples[:150], unlabelled=0)
    node = {"data-path": "corpus", "state-dir": str(state), "device-id": "device-0", "upload-consent": True}
    config = _run_config(sqlite_url, **{"devices-per-round": 1, "min-devices": 1, "rounds": 1})
    grid = LocalGrid(build_client_app(), 1, config, node_configs=[node])

    def status() -> ConfigRecord:
        query = Message(
            RecordDict({records.CONFIG: ConfigRecord({records.TENANT: "default"})}),
            dst_node_id=grid.node_ids[0],
            message_type=records.QUERY_UPDATE_STATUS,
        )
        (reply,) = grid.send_and_receive([query])
        return reply.content[records.CONFIG]

    assert status()[records.WANTS_TRAIN] is True  # never trained, holds records
    Federation(grid, CoordinatorSettings.from_run_config(config)).run()  # trains; keeps the reference
    assert status()[records.WANTS_TRAIN] is False  # nothing new since
    play = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not play.is_file():
        pytest.skip(f"needs {play}")
    lines = [line for line in play.read_text().splitlines() if len(line) > 30][:60]
    with CorpusStore(state / CORPUS_FILE) as store:
        pipeline = Pipeline(store)
        for line in lines:
            pipeline.ingest(Record(text=line, source="test", device="device-0"))
    assert status()[records.WANTS_TRAIN] is True  # a new topic arrived


def test_a_streamed_simulation_feeds_every_device_through_its_corpus_pipeline(
    tmp_path: Path, sqlite_url: str
):
    config = _run_config(
        sqlite_url, **{"stream-records": 40, "device-state": str(tmp_path), "rounds": 2, "min-devices": 3}
    )
    grid = LocalGrid(build_client_app(), 3, config)
    first, second = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert first.version is not None and second.version is not None and not second.drops
    for partition in range(3):
        with CorpusStore(tmp_path / f"partition-{partition}" / CORPUS_FILE) as store:
            stats = store.stats()
            held = store.quarantined()
        # Two rounds of 40 fresh records each, less near-duplicates the partition itself holds, plus
        # any injected near-duplicate the detector missed (its recall is below 1) …
        assert 60 <= stats.hot_records <= 80 + 2 * round(40 * simulated.NEAR_SHARE)
        # … while the injected junk went to quarantine with its reason.
        assert held and all(h.record.source.startswith("simulation:round-") for h in held)
    # Round 2 trained on what had arrived by then: more than round 1's examples.
    assert second.examples > first.examples
