"""The round loop against real ClientApps over an in-process Grid: aggregation, faults, resume."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp

from fleetlora.client.client_app import build_client_app, upload_consent
from fleetlora.common import records
from fleetlora.common.delta import from_array_record, to_array_record
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid

# A device gives up a round it cannot finish before the deadline (client/pacing.py), and on a busy machine
# (the suite's workers share 2 cores) training and DP planning take seconds: rounds get a minute. The tests
# that wait out a silent device set a shorter one.
SILENT_DEADLINE = 10.0


def _run_config(db: str, **overrides) -> dict:
    config = {
        "model": "tiny",
        "data": "builtin",
        "eval-data": "builtin-test",
        "partition": "iid",
        "seed": 0,
        "rounds": 2,
        "devices-per-round": 3,
        "min-devices": 2,
        "round-deadline": 60.0,
        "local-steps": 10,
        "learning-rate": 3e-3,
        "max-length": 32,
        # The round machinery on LoRA without DP; the head regime and DP (the defaults) have their own tests.
        "regime": "lora",
        "dp-epsilon": 0.0,
        "db": db,
    }
    return {**config, **overrides}


def _faulty_app(
    *, raise_on: set[int] = frozenset(), poison: set[int] = frozenset(), fail_eval: set[int] = frozenset()
) -> ClientApp:
    """The real ClientApp, except that some devices crash or send NaN."""
    real = build_client_app()
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        if context.node_id in raise_on:
            raise RuntimeError("disk full")
        reply = real(message, context)
        if context.node_id in poison:
            delta = from_array_record(reply.content[records.ARRAYS])
            delta = {n: torch.full_like(t, float("nan")) for n, t in delta.items()}
            reply.content[records.ARRAYS] = to_array_record(delta)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        if context.node_id in fail_eval:
            raise RuntimeError("out of memory")
        return real(message, context)

    return app


def test_rounds_store_the_weighted_mean_of_deltas_and_loss_falls(sqlite_url: str, caplog):
    config = _run_config(sqlite_url)
    grid = LocalGrid(build_client_app(), num_nodes=3, run_config=config)
    captured: list[Message] = []
    original_pull = grid.pull_messages
    grid.pull_messages = lambda ids: captured.extend(r := list(original_pull(ids))) or r  # type: ignore[method-assign]
    federation = Federation(grid, CoordinatorSettings.from_run_config(config), run_id=77)

    with caplog.at_level(logging.INFO, logger="fleetlora.coordinator.rounds"):
        outcomes = federation.run()

    assert [o.round for o in outcomes] == [1, 2] and all(o.version for o in outcomes)
    first = outcomes[0]
    assert len(first.participants) == 3 and not first.drops
    # The stored round-1 adapter is v0 + sum(n_i * delta_i) / sum(n_i), recomputed here by hand.
    v0 = federation.storage.versions.chain(first.version.id)[1]
    assert v0.round == 0
    train_replies = [m for m in captured if records.ARRAYS in m.content.array_records][:3]
    weights = [m.content[records.METRICS][records.NUM_EXAMPLES] for m in train_replies]
    assert sorted(weights) == sorted(first.participants.values())
    base = federation.storage.versions.adapter(v0.id)
    deltas = [from_array_record(m.content[records.ARRAYS]) for m in train_replies]
    stored = federation.storage.versions.adapter(first.version.id)
    total = sum(weights)
    for name in base:
        weighted = sum(w * d[name].double() for w, d in zip(weights, deltas, strict=True))
        expected = base[name].double() + weighted / total
        torch.testing.assert_close(stored[name], expected.float(), rtol=0, atol=1e-7)
    # Evaluated on the coordinator's test set, the loss goes down round over round.
    losses = [v0.metrics["central_loss"], *(o.metrics["central_loss"] for o in outcomes)]
    assert losses[-1] < losses[0]
    assert "federated_eval_loss" in outcomes[-1].metrics
    # Each round's phases were stored as it ran, with its devices counted, and logged one line each.
    phases = federation.storage.ledgers.phases(federation.lineage, run_id=77)
    for outcome in outcomes:
        rows = [p for p in phases if p.round == outcome.round]
        assert [p.phase for p in rows] == ["sampling", "training", "aggregating", "evaluating", "completed"]
        assert [(p.done, p.total) for p in rows if p.total is not None] == [(3, 3), (3, 3)]
        assert rows[-1].detail == outcome.version.label and all(p.finished_at for p in rows)
    last = federation.storage.ledgers.phases(last_rounds=1)
    assert {p.round for p in last} == {2} and len(last) == 5
    logged = [r for r in caplog.records if getattr(r, "event", None) == "round_phase"]
    assert {(r.round, r.phase) for r in logged} >= {(1, "sampling"), (2, "training"), (2, "completed")}
    assert [r.version for r in logged if r.phase == "completed"] == [o.version.label for o in outcomes]
    assert all(r.run_id == 77 for r in logged)


def test_crashed_and_silent_devices_are_dropped_and_the_round_completes(sqlite_url: str):
    config = _run_config(
        sqlite_url, **{"devices-per-round": 4, "rounds": 1, "round-deadline": SILENT_DEADLINE}
    )
    app = _faulty_app(raise_on={102}, poison={103}, fail_eval={105})
    grid = LocalGrid(app, num_nodes=5, run_config=config, silent={104})
    settings = CoordinatorSettings.from_run_config({**config, "devices-per-round": 5})
    started = time.monotonic()

    federation = Federation(grid, settings)
    (outcome,) = federation.run()

    assert outcome.version is not None
    assert set(outcome.participants) == {101, 105}
    reasons = {d.node_id: d.reason for d in outcome.drops}
    assert reasons[102].startswith("device error") and "disk full" in reasons[102]
    assert reasons[103] == "delta holds NaN or inf"
    assert reasons[104] == "no reply before the deadline"
    assert reasons[105] == "evaluation: device error: RuntimeError: out of memory"
    (record,) = federation.storage.ledgers.rounds(federation.lineage)
    assert record.status == "completed" and len(record.dropped) == 4
    # The silent device costs one deadline for training and one for evaluation, not forever.
    assert time.monotonic() - started < 2 * settings.round_deadline + 30


def test_training_gets_a_full_deadline_after_round_1_asked_every_node_who_it_is(sqlite_url: str):
    """At 1,000 simulated devices round 1's identity queries take longer than a short deadline: that wait
    is the sampling's, and the devices still get a whole round-deadline to train."""
    config = _run_config(
        sqlite_url, **{"rounds": 1, "devices-per-round": 2, "round-deadline": SILENT_DEADLINE}
    )
    real = build_client_app()
    app = ClientApp()

    @app.query(records.QUERY_IDENTITY.removeprefix("query."))
    def identity(message: Message, context) -> Message:
        time.sleep(SILENT_DEADLINE / 3.5)  # four of them outlast the round's deadline
        return real(message, context)

    app.train()(real)
    app.evaluate()(real)
    grid = LocalGrid(app, num_nodes=4, run_config=config)

    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert outcome.version is not None and len(outcome.participants) == 2
    queries = [m for m in grid.received if m.metadata.message_type == records.QUERY_IDENTITY]
    trains = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(queries) == 4 and len(trains) == 2
    assert all(m.metadata.ttl <= SILENT_DEADLINE for m in queries)
    # before: what was left of the deadline the queries had used up, the 1 s floor
    assert all(m.metadata.ttl > SILENT_DEADLINE - 3 for m in trains)


def test_errors_the_superlink_answers_for_devices_drop_those_devices_not_the_round(sqlite_url: str):
    """Expired messages come back as errors from the SuperLink's own node id: each is its device's drop
    (before, the second one was a "duplicate reply" of node 1 and the devices went unnamed)."""
    config = _run_config(sqlite_url, **{"rounds": 1, "devices-per-round": 4})
    grid = LocalGrid(build_client_app(), num_nodes=4, run_config=config, expired={102, 104})

    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert outcome.version is not None and set(outcome.participants) == {101, 103}
    reasons = {d.node_id: d.reason for d in outcome.drops}
    assert set(reasons) == {102, 104}
    assert all(r.startswith("device error") and "Message Unavailable" in r for r in reasons.values())


def test_round_without_quorum_fails_and_keeps_the_version(sqlite_url: str):
    config = _run_config(sqlite_url, **{"rounds": 1, "min-devices": 3, "round-deadline": SILENT_DEADLINE})
    grid = LocalGrid(build_client_app(), num_nodes=3, run_config=config, silent={103})
    federation = Federation(grid, CoordinatorSettings.from_run_config(config))

    (outcome,) = federation.run()

    assert outcome.version is None and "2 valid deltas, 3 needed" in outcome.error
    assert [v.round for v in federation.storage.versions.all(federation.lineage)] == [0]
    (record,) = federation.storage.ledgers.rounds(federation.lineage)
    assert record.status == "failed" and record.received == 2
    phases = federation.storage.ledgers.phases(federation.lineage)
    assert [p.phase for p in phases] == ["sampling", "training", "failed"]
    assert (phases[1].done, phases[1].total) == (2, 3) and "2 valid deltas" in phases[-1].detail


def test_too_few_devices_online_fails_at_the_deadline(sqlite_url: str):
    config = _run_config(sqlite_url, **{"rounds": 1, "round-deadline": 1.0, "min-devices": 3})
    grid = LocalGrid(build_client_app(), num_nodes=2, run_config=config)
    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()
    assert outcome.version is None and "Only 2 of the 3 devices" in outcome.error


def test_two_runs_with_one_seed_train_the_same_devices_whatever_node_ids_flower_drew(tmp_path):
    node_ids = {"first": [901, 17, 455, 62], "second": [3, 777, 48, 1200]}  # partition i at node_ids[i]
    outcomes = {}
    for run, nodes in node_ids.items():
        config = _run_config(f"sqlite:///{tmp_path / run}.db", **{"devices-per-round": 2, "seed": 1})
        grid = LocalGrid(build_client_app(), 4, config)
        grid.node_ids = nodes
        outcomes[run] = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    schedules = {run: [o.sampled_devices for o in outcomes[run]] for run in node_ids}
    assert schedules["first"] == schedules["second"]
    assert all(len(devices) == 2 for devices in schedules["first"])
    for run, nodes in node_ids.items():  # the devices drawn are the devices that trained
        for outcome in outcomes[run]:
            trained = sorted(f"partition-{nodes.index(n)}" for n in outcome.participants)
            assert trained == sorted(outcome.sampled_devices)


def test_a_restarted_coordinator_resumes_from_the_latest_version(db_url: str):
    config = _run_config(db_url)
    first = Federation(LocalGrid(build_client_app(), 3, config), CoordinatorSettings.from_run_config(config))
    last = first.run()[-1].version

    again = Federation(
        LocalGrid(build_client_app(), 3, config),
        CoordinatorSettings.from_run_config({**config, "rounds": 1}),
    )
    (outcome,) = again.run()

    assert outcome.round == 3 and outcome.version.parent_id == last.id
    rounds = [v.round for v in again.storage.versions.all(again.lineage)]
    assert rounds == [0, 1, 2, 3]  # nothing lost, nothing repeated


def test_another_lora_alpha_starts_a_new_lineage(sqlite_url: str):
    config = _run_config(sqlite_url, rounds=1)
    first = Federation(LocalGrid(build_client_app(), 3, config), CoordinatorSettings.from_run_config(config))
    first.run()
    other = Federation(
        LocalGrid(build_client_app(), 3, config),
        CoordinatorSettings.from_run_config({**config, "lora-alpha": 32}),
    )
    assert other.lineage != first.lineage
    (outcome,) = other.run()
    assert outcome.round == 1 and outcome.version.parent_id != first.storage.versions.latest(first.lineage).id


def test_devices_refuse_a_different_base_model(sqlite_url: str):
    config = _run_config(sqlite_url, rounds=1)
    real = build_client_app()
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        message.content[records.CONFIG][records.BASE_MODEL_SHA256] = "0" * 64  # another base
        return real(message, context)

    federation = Federation(LocalGrid(app, 3, config), CoordinatorSettings.from_run_config(config))
    (outcome,) = federation.run()

    assert outcome.version is None
    assert len(outcome.drops) == 3 and all("Base model sha256" in d.reason for d in outcome.drops)


@pytest.mark.parametrize(
    "bad",
    [
        {"min-devices": 5},
        {"rounds": 0},
        {"round-deadline": 0},
        {"task": "causal-lm", "personal-head": True},
    ],
)
def test_bad_coordinator_settings_are_refused(sqlite_url: str, bad: dict):
    with pytest.raises(ValueError):
        CoordinatorSettings.from_run_config(_run_config(sqlite_url, **bad))


def _final_adapter(url: str, rounds_before_restart: int, *, forget_optimizer: bool = False) -> dict:
    """Run 3 FedAdam rounds, restarting the coordinator after ``rounds_before_restart`` of them (short
    ones: 2 local steps and no central evaluation, which do not touch the optimizer's state)."""
    fedadam = {"server-optimizer": "fedadam", "server-lr": 0.01, "local-steps": 2, "eval-data": ""}
    config = _run_config(url, **fedadam)
    settings = CoordinatorSettings.from_run_config({**config, "rounds": rounds_before_restart})
    first = Federation(LocalGrid(build_client_app(), 3, config), settings)
    first.run()
    if forget_optimizer:
        with first.storage.db.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM optimizer_states")
    remaining = 3 - rounds_before_restart
    if remaining:
        again = Federation(
            LocalGrid(build_client_app(), 3, config),
            CoordinatorSettings.from_run_config({**config, "rounds": remaining}),
        )
        again.run()
        first = again
    return first.storage.versions.adapter(first.storage.versions.latest(first.lineage).id)


def test_server_optimizer_state_survives_a_restart(tmp_path):
    continuous = _final_adapter(f"sqlite:///{tmp_path / 'a.db'}", 3)
    restarted = _final_adapter(f"sqlite:///{tmp_path / 'b.db'}", 2)
    forgotten = _final_adapter(f"sqlite:///{tmp_path / 'c.db'}", 2, forget_optimizer=True)
    assert all(torch.equal(continuous[n], restarted[n]) for n in continuous)
    assert not all(torch.equal(continuous[n], forgotten[n]) for n in continuous)  # the state matters


def test_learning_rate_decays_across_rounds(sqlite_url: str):
    settings = CoordinatorSettings.from_run_config(_run_config(sqlite_url, **{"lr-decay": 0.5}))
    assert settings.train_for_round(1).learning_rate == pytest.approx(3e-3)
    assert settings.train_for_round(3).learning_rate == pytest.approx(3e-3 * 0.25)


def test_personal_heads_are_kept_on_each_device_and_scored_beside_the_global_model(sqlite_url, tmp_path):
    config = _run_config(
        sqlite_url, **{"personal-head": True, "partition": "dirichlet:0.3", "device-state": str(tmp_path)}
    )
    grid = LocalGrid(build_client_app(), 3, config)
    outcomes = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    kept = sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.glob("*/personal-head-*"))
    assert kept == ["partition-0", "partition-1", "partition-2"]
    for outcome in outcomes:
        metrics = outcome.metrics
        assert 0.0 <= metrics["federated_eval_personal_accuracy"] <= 1.0
        assert "federated_eval_accuracy" in metrics and "central_accuracy" in metrics
    # Every device trained in round 1, so round 1's evaluation already scores their own heads.
    assert (
        outcomes[0].metrics["federated_eval_personal_accuracy"]
        != outcomes[0].metrics["federated_eval_accuracy"]
    )


def test_dp_devices_report_their_spend_to_the_ledger_and_decline_past_their_budget(db_url, tmp_path):
    # σ is planned for the steps a device takes: 2 steps spend the whole ε as 10 would.
    privacy = {
        "dp-epsilon": 8.0,
        "dp-rounds": 1,
        "device-state": str(tmp_path),
        "local-steps": 2,
    }
    config = _run_config(db_url, **privacy, **{"min-devices": 3})
    federation = Federation(
        LocalGrid(build_client_app(), 3, config), CoordinatorSettings.from_run_config(config)
    )

    first, second = federation.run()

    assert first.version is not None and len(first.privacy) == 3
    assert {s.device_id for s in first.privacy} == {"partition-0", "partition-1", "partition-2"}
    assert all(7.0 < s.epsilon <= 8.01 and s.noise_multiplier > 0 for s in first.privacy)
    assert not any(k.startswith("dp_") for k in first.metrics)  # per device, never averaged
    # The budget was planned for one round: every device declines the second, which fails for quorum.
    assert second.version is None and not second.privacy
    assert len(second.drops) == 3 and all(
        d.reason.startswith("declined: privacy budget") for d in second.drops
    )
    ledger = federation.storage.ledgers.privacy_ledger(federation.lineage)
    stored = sorted((row.round, row.device_id, row.epsilon) for row in ledger)
    assert stored == sorted((1, spend.device_id, spend.epsilon) for spend in first.privacy)


def test_by_default_devices_train_the_head_with_dp_noise_planned_for_their_own_rounds(sqlite_url, tmp_path):
    defaults = {"regime": "auto", "dp-epsilon": 8.0}  # the table's defaults, which _run_config pins off
    config = _run_config(
        sqlite_url, **defaults, **{"rounds": 4, "devices-per-round": 2, "device-state": str(tmp_path)}
    )
    config = {k: v for k, v in config.items() if k not in {"local-steps", "learning-rate"}}
    settings = CoordinatorSettings.from_run_config(config)
    grid = LocalGrid(build_client_app(), 4, config)
    federation = Federation(grid, settings)

    outcomes = federation.run()

    assert settings.spec.regime == "head" and all(o.version is not None for o in outcomes)
    last = outcomes[-1].version
    assert last is not None
    head = {name for name in federation.loaded.initial_adapter if "classifier" in name}
    assert set(federation.storage.versions.adapter(last.id)) == head  # the head alone is trained and stored
    # Each device's noise was planned for the rounds it was then really sampled in, and no record passed ε.
    trained = [d for o in outcomes for d in o.sampled_devices]
    planned: dict[str, int] = {}
    for message in grid.received:
        if message.metadata.message_type == "train":
            device = f"partition-{grid.node_ids.index(message.metadata.dst_node_id)}"
            planned.setdefault(device, message.content["config"]["train.privacy.planned_rounds"])
    assert planned == {device: trained.count(device) for device in planned}
    assert len(set(planned.values())) > 1  # a schedule that gives devices different rounds
    assert all(0 < spend.epsilon <= 8.0 for o in outcomes for spend in o.privacy)


def test_without_upload_consent_a_device_sends_nothing_but_its_refusal(sqlite_url: str):
    config = _run_config(sqlite_url, **{"simulated-consent": False, "rounds": 1})
    grid = LocalGrid(build_client_app(), 3, config)
    sent: list[Message] = []
    original_pull = grid.pull_messages
    grid.pull_messages = lambda ids: sent.extend(r := list(original_pull(ids))) or r  # type: ignore[method-assign]

    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert outcome.version is None and len(sent) == 3
    assert all(reply.has_error() and "no upload consent" in reply.error.reason for reply in sent)


@pytest.mark.parametrize(
    ("node_config", "run_config", "allowed"),
    [
        ({"data-path": "x.csv"}, {}, False),  # a real device must say so itself
        ({"data-path": "x.csv", "upload-consent": "true"}, {}, True),
        ({"data-path": "x.csv", "upload-consent": False}, {}, False),
        ({"partition-id": 0}, {}, True),  # simulated devices consent unless the run says otherwise
        ({"partition-id": 0}, {"simulated-consent": False}, False),
    ],
)
def test_upload_consent_is_explicit(node_config: dict, run_config: dict, allowed: bool):
    assert upload_consent(node_config, run_config) is allowed
