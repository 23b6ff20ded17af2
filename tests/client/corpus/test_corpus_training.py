"""A device whose `data-path` is `corpus` trains on what its corpus store holds, labelled records only."""

from __future__ import annotations

from pathlib import Path

from fleetlora.client.client_app import HOLDOUT_FRACTION, build_client_app
from fleetlora.client.corpus.pipeline import Pipeline
from fleetlora.client.corpus.records import Record
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.local_data import local_examples
from fleetlora.common.data import load_examples, split_holdout
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config


def _fill(state_dir: Path, examples, unlabelled: int) -> None:
    with CorpusStore(state_dir / CORPUS_FILE) as store:
        pipeline = Pipeline(store)
        for e in examples:
            pipeline.ingest(Record(text=e.text, source="test", device=state_dir.name, label=e.label))
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
    # Each device trained on the training side of its labelled records; unlabelled ones waited.
    expected = []
    for c in node_configs:
        train, _ = split_holdout([e for e in local_examples(c, {}) if e.label is not None], HOLDOUT_FRACTION)
        expected.append(len(train))
    assert sorted(outcome.participants.values()) == sorted(expected)
