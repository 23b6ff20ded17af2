"""Key knowledge and the retention gate (issue 16, coordinator side): a pinned key set, every version
scored on it, a version that forgot held back (stored, never packaged or distributed) until an
operator releases it, and both recorded in the audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.config import Config
from flwr.app import Message
from flwr.clientapp import ClientApp
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.common.config import ModelSpec, to_config
from fleetlora.common.data import Example
from fleetlora.common.delta import from_array_record, to_array_record
from fleetlora.common.errors import DataError, FleetloraError
from fleetlora.common.model import cached_model
from fleetlora.coordinator import key_sets
from fleetlora.coordinator.at_rest import KEY_FILE_ENV, AtRestKey
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.db import MIGRATIONS, upgrade
from fleetlora.coordinator.keys import init_keys, load_signing_key
from fleetlora.coordinator.packages import PackagePolicy, build_package
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import NewVersion, Storage
from fleetlora.coordinator.storage.audit import verify
from fleetlora.coordinator.storage.key_sets import examples_sha256
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config

HEAD = "base_model.model.classifier.modules_to_save.default"  # the tiny model's classifier, in the adapter


def _key_file(folder: Path, rows: list[tuple[str, str]], name: str = "key.csv") -> Path:
    path = folder / name
    path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    return path


def _invoke(*args: str) -> str:
    done = CliRunner().invoke(app, list(args))
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        raise done.exception
    assert done.exit_code == 0, done.output
    return done.output


def _lineage(storage: Storage, spec: ModelSpec, lineage: str = "L") -> None:
    loaded = cached_model(spec)
    storage.versions.register_lineage(
        lineage, "default", to_config(spec, "model"), loaded.base_sha256, loaded.base_bytes
    )


# ---- the file: hostile input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("", ".csv", "contains no examples"),
        ("text,label\n", ".csv", "contains no examples"),
        ("text,label\nhello,balance,extra\n", ".csv", "3 fields where the header has 2"),
        ('{"text": 3}\n', ".jsonl", "expected an object with a 'text' string"),
        ("text,label\nhello,balance\nbye,\n", ".csv", "have no label"),
        ("hello\n", ".txt", "a key set is a .csv"),
    ],
)
def test_a_key_set_file_that_is_empty_or_malformed_is_refused_naming_the_problem(
    tmp_path: Path, content: str, suffix: str, expected: str
):
    path = tmp_path / f"key{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        key_sets.read_key_set(path)


def test_an_oversized_key_set_is_refused_by_its_size_before_it_is_read(tmp_path: Path):
    path = tmp_path / "huge.csv"
    with path.open("wb") as handle:  # sparse: nothing to read but its size
        handle.truncate(key_sets.MAX_BYTES + 1)
    with pytest.raises(DataError, match="a key set is at most 8 MiB"):
        key_sets.read_key_set(path)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        key_sets.read_key_set(tmp_path / "folder.csv")


# ---- the store: pinning, listing, labels ----------------------------------------------------------


def test_adding_a_key_set_pins_it_and_keeps_the_older_ones(db_url: str, tiny_spec: ModelSpec):
    storage = Storage.open(db_url, "default")
    first = storage.key_sets.add("first", [Example("my card was declined", "card_declined")])
    second = storage.key_sets.add("second", [Example("what is my balance", "balance")] * 2)
    other = Storage.open(db_url, "other").key_sets.add("theirs", [Example("x", "y")])

    assert [(k.id, k.pinned) for k in storage.key_sets.all()] == [(first.id, False), (second.id, True)]
    assert storage.key_sets.pinned() == second and Storage.open(db_url, "other").key_sets.pinned() == other
    assert storage.key_sets.examples(second.id) == [Example("what is my balance", "balance")] * 2
    assert second.examples_sha256 == examples_sha256([Example("what is my balance", "balance")] * 2)
    with pytest.raises(FleetloraError, match="No key set"):
        storage.key_sets.examples(other.id)  # another tenant's is as absent as a missing one
    # Once the tenant has a classification lineage, a label it lacks is refused by name.
    _lineage(storage, tiny_spec)
    with pytest.raises(DataError, match="labels 'weather' are not among"):
        storage.key_sets.add("bad", [Example("is it raining", "weather")])
    with pytest.raises(DataError, match="has no labels"):
        storage.key_sets.add("plain", [Example("is it raining")])
    assert storage.key_sets.pinned() == second


def test_key_set_add_and_list_on_the_command_line(tmp_path: Path, sqlite_url: str, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "at-rest.key"))
    AtRestKey.create(tmp_path / "at-rest.key")
    path = _key_file(tmp_path, [("my card was declined", "card_declined"), ("pin please", "pin_change")])

    out = _invoke("key-set", "add", str(path), "--name", "cards", "--db", sqlite_url)
    assert "key set 1 (cards): 2 examples, 2 labels" in out and "pinned for default" in out
    _invoke("key-set", "add", str(path), "--db", sqlite_url)
    listed = json.loads(_invoke("key-set", "list", "--json", "--db", sqlite_url))
    assert [(k["name"], k["pinned"], k["example_count"]) for k in listed] == [
        ("cards", False, 2),
        ("key.csv", True, 2),
    ]
    assert "pinned" in _invoke("key-set", "list", "--db", sqlite_url)
    assert json.loads(_invoke("key-set", "list", "--json", "--db", sqlite_url, "--tenant", "x")) == []
    # The texts are operator data: sealed at rest like adapters.
    with create_engine(sqlite_url).connect() as connection:
        stored = connection.execute(text("SELECT examples FROM key_sets")).scalars().all()
    assert all(blob.startswith(b"FLAR1") and b"declined" not in blob for blob in stored)
    added = [e for e in Storage.open(sqlite_url).audit.entries() if e.action == "key-set.added"]
    assert [json.loads(e.details)["name"] for e in added] == ["cards", "key.csv"]
    with pytest.raises(DataError, match="contains no examples"):
        _invoke("key-set", "add", str(_key_file(tmp_path, [], "empty.csv")), "--db", sqlite_url)


# ---- the gate in the round loop -------------------------------------------------------------------


def _steering_app(targets: list[dict[str, torch.Tensor]]) -> ClientApp:
    """The real ClientApp, except that every device's delta takes the global adapter to ``targets[0]``:
    a version whose key accuracy the test decides."""
    real, app = build_client_app(), ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        reply = real(message, context)
        received = from_array_record(message.content[records.ARRAYS])
        delta = {n: targets[0][n] - received[n] for n in received}
        reply.content[records.ARRAYS] = to_array_record(delta)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        return real(message, context)

    for query in (records.QUERY_UPDATE_STATUS, records.QUERY_UPDATE_APPLY):  # distribution's questions
        app.query(query.removeprefix("query."))(lambda message, context: real(message, context))
    return app


def _predicting(state: dict[str, torch.Tensor], label_index: int) -> dict[str, torch.Tensor]:
    """``state`` with a classifier that answers ``label_index`` whatever the text (weights 0, one bias)."""
    steered = {n: t.clone() for n, t in state.items()}
    steered[f"{HEAD}.weight"].zero_()
    steered[f"{HEAD}.bias"] = torch.zeros_like(steered[f"{HEAD}.bias"])
    steered[f"{HEAD}.bias"][label_index] = 5.0
    return steered


def test_a_version_that_forgot_is_held_until_an_operator_releases_it(tmp_path: Path, sqlite_url: str):
    init_keys(tmp_path / "keys")
    key_file = _key_file(tmp_path, [("what is my balance", "balance"), ("balance please", "balance")])
    config = _run_config(
        sqlite_url,
        **{
            "rounds": 1,
            "devices-per-round": 2,
            "min-devices": 1,
            "local-steps": 1,
            "eval-data": "",
            "keys": str(tmp_path / "keys"),
            "device-state": str(tmp_path / "devices"),
            "key-set": str(key_file),
            "norm-cap": 0.0,
            "norm-ratio": 0.0,
            "aggregator": "mean",
            "server-optimizer": "fedavg",
        },
    )
    settings = CoordinatorSettings.from_run_config(config)
    labels = settings.spec.labels
    initial = cached_model(settings.spec).initial_adapter
    good, bad = _predicting(initial, labels.index("balance")), _predicting(initial, labels.index("refund"))
    targets = [good]

    def run_round() -> tuple:
        grid = LocalGrid(_steering_app(targets), 2, config)
        federation = Federation(grid, settings)
        (outcome,) = federation.run()
        return outcome, federation.storage, grid

    # Round 1 answers "balance" for everything: a perfect key score, distributed.
    first, storage, _ = run_round()
    assert first.metrics["key_accuracy"] == first.metrics["key_score"] == 1.0 and first.held is None
    assert first.distribution is not None and first.distribution.statuses == {"applied": 2}
    # Round 2 forgot it: stored and scored, held, no package built and nothing offered to any device.
    targets[0] = bad
    second, storage, grid = run_round()
    held = second.version
    assert held is not None and held.held and second.metrics["key_score"] == 0.0
    assert second.held is not None and f"the best earlier (v{first.version.id})" in second.held
    assert second.package is None and second.distribution is None
    assert not [p for p in storage.packages.all() if p.to_version == held.id]
    assert {m.metadata.message_type for m in grid.received} == {"train", "evaluate"}
    assert {u.version_id for u in storage.devices.updates()} == {first.version.id}
    (publishing,) = [p for p in storage.ledgers.phases() if p.round == 2 and p.phase == "publishing"]
    assert publishing.detail.startswith(f"{held.label} held: key score 0.0000 is below 0.95 × 1.0000")
    assert (held.key_score, storage.versions.get(held.id).held) == (0.0, True)
    with pytest.raises(FleetloraError, match="is held by the retention gate"):
        build_package(storage, held.id, None, load_signing_key(tmp_path / "keys"), PackagePolicy())
    assert len(storage.key_sets.all()) == 1  # the run config's file was pinned once, not per run

    # Only a held version can be released, and only with a reason; the release builds its package.
    with pytest.raises(FleetloraError, match="is not held"):
        _invoke("versions", "release", first.version.label, "--reason", "fine", "--db", sqlite_url)
    with pytest.raises(FleetloraError, match="Say why"):
        _invoke("versions", "release", held.label, "--reason", " ", "--db", sqlite_url)
    out = _invoke(
        "versions", "release", held.label, "--reason", "new intents matter more",
        "--keys", str(tmp_path / "keys"), "--db", sqlite_url,
    )  # fmt: skip
    assert f"released {held.label}" in out and "package" in out
    released = storage.versions.get(held.id)
    assert not released.held and released.hold.release_reason == "new intents matter more"
    assert released.hold.released_by and released.hold.released_at
    listed = _invoke("versions", "list", "--db", sqlite_url)
    assert "released" in listed

    # Round 3 forgets again and is held, but the released version reaches the devices now.
    third, storage, _ = run_round()
    assert third.held is not None and third.distribution is not None
    assert third.distribution.target == held.id and third.distribution.statuses == {"applied": 2}
    assert {u.version_id for u in storage.devices.updates()} == {held.id}
    # Both holds and the release are in the audit log, and the chain still verifies.
    entries = storage.audit.entries()
    actions = [(e.action, e.subject) for e in entries if e.action.startswith(("version.held", "version.rel"))]
    assert actions == [
        ("version.held", held.label),
        ("version.released", held.label),
        ("version.held", third.version.label),
    ]
    assert verify(entries, storage.audit.head(), [], None) == []


# ---- the schema -------------------------------------------------------------------------------


def test_a_0008_database_is_upgraded_and_its_versions_read_unscored_and_not_held(sqlite_url: str):
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0008")
        connection.execute(
            text("INSERT INTO model_versions (lineage, round, base_model_sha256, adapter, adapter_sha256, "
                 "adapter_bytes, metrics, created_at, schema_version) "
                 "VALUES ('L', 0, 'b', x'00', 'a', 1, '{}', CURRENT_TIMESTAMP, 1)")
        )  # fmt: skip
    assert upgrade(engine) == "0010"
    engine.dispose()

    storage = Storage.open(sqlite_url)
    (version,) = storage.versions.all()
    assert (version.key_score, version.key_set_id, version.hold, version.held) == (None, None, None, False)
    assert storage.key_sets.all() == []


def test_a_stored_version_is_scored_and_the_newest_unheld_is_what_may_be_distributed(sqlite_url: str):
    storage = Storage.open(sqlite_url, "default")
    storage.versions.register_lineage("L", "default", {}, "b" * 64, 1)
    key_set = storage.key_sets.add("k", [Example("t", "a")])
    made = []
    for round_number, (score, hold) in enumerate([(0.9, None), (0.5, "forgot"), (0.95, None), (0.1, "x")]):
        made.append(
            storage.versions.add(
                NewVersion(
                    lineage="L",
                    round=round_number,
                    parent_id=made[-1].id if made else None,
                    base_model_sha256="b" * 64,
                    adapter={"w": torch.ones(2)},
                    participants={},
                    metrics={},
                    key_set_id=key_set.id,
                    key_score=score,
                    hold=hold,
                )
            )
        )
    assert storage.versions.best_key_score("L", key_set.id) == (made[2].id, 0.95)
    assert storage.versions.latest("L").id == made[3].id
    assert storage.versions.latest("L", distributable=True).id == made[2].id
    storage.versions.score(made[0].id, key_set.id, 0.99)  # scored again: the newer score counts
    assert storage.versions.best_key_score("L", key_set.id) == (made[0].id, 0.99)
    assert storage.versions.get(made[0].id).key_score == 0.99
