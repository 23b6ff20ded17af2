"""One device's reach over a round is bounded: its weight by the last round's median count, its delta's
norm by the last round's median norm and by the global adapter's norm (coordinator/influence.py)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.common.delta import from_array_record, l2_norm, to_array_record
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.aggregation import WEIGHTS_CAPPED, DeltaAggregator, ExampleWeightedMean
from fleetlora.coordinator.influence import Accepted, InfluenceSettings, RoundBounds
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.uploads import open_plain
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_aggregation import GLOBAL, _delta, _reasons, _task_identity, _train_reply
from tests.coordinator.test_rounds import _run_config

__all__ = ["_task_identity"]  # the autouse fixture, imported so it applies here too

HISTORY = Accepted(examples=(100, 120, 80), norms=(2.0, 1.0, 3.0))


def test_a_first_round_bounds_norms_by_the_adapter_and_later_rounds_by_the_last_one_too():
    first = RoundBounds.for_round(InfluenceSettings(), adapter_norm=0.5, previous=None)
    assert first.max_weight == math.inf and first.max_norm == 100.0  # 100 × max(1, 0.5)
    assert first.waits_for_round  # and its own medians, once its replies are in
    settled = first.settle(examples=[10, 30, 20], norms=[1.0, 3.0, 2.0])
    assert (settled.max_weight, settled.max_norm) == (40.0, 20.0)
    assert "this round's median" in (settled.norm_problem(21.0) or "")

    later = RoundBounds.for_round(InfluenceSettings(), adapter_norm=5.0, previous=HISTORY)
    assert later.max_weight == 200.0  # 2 × the median count, 100
    assert later.max_norm == 20.0 and "median" in (later.norm_problem(21.0) or "")  # 10 × 2.0 < 100 × 5
    # The median-based bound never goes below the adapter's own norm: tiny deltas from colluders
    # cannot drag it under honest ones.
    floored = RoundBounds.for_round(InfluenceSettings(), adapter_norm=50.0, previous=HISTORY)
    assert floored.max_norm == 50.0
    assert not later.anomalous(21.0) and later.anomalous(501.0)  # only the absolute bound flags

    off = RoundBounds.for_round(InfluenceSettings(0, 0, 0), adapter_norm=50.0, previous=HISTORY)
    assert (off.max_weight, off.max_norm) == (math.inf, math.inf)


@pytest.mark.parametrize("bad", [0.5, -1.0, math.inf, math.nan])
def test_a_cap_is_off_or_at_least_one(bad: float):
    with pytest.raises(ConfigError, match="weight-cap must be 0"):
        InfluenceSettings(weight_cap=bad)


def test_an_inflated_example_count_weighs_no_more_than_the_cap():
    bounds = RoundBounds.for_round(InfluenceSettings(), adapter_norm=1.0, previous=HISTORY)
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, bounds)
    aggregator.add(_train_reply(1, _delta(1.0), examples=100))
    aggregator.add(_train_reply(2, _delta(4.0), examples=10**9))  # claims a billion examples

    update = aggregator.release(sampled=2, online=2)

    # (100 × 1 + 200 × 4) / 300, not ≈ 4: the claim counts as 200, twice the last round's median.
    assert torch.allclose(update.delta["w"], torch.full((4,), 3.0))
    assert update.metrics[WEIGHTS_CAPPED] == 1.0
    assert aggregator.participants == {1: 100, 2: 10**9}  # what each reported stays on record


def test_a_scaled_delta_is_dropped_with_its_norm_and_the_bound():
    bounds = RoundBounds.for_round(InfluenceSettings(), adapter_norm=1.0, previous=HISTORY)
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, bounds)
    aggregator.add(_train_reply(1, _delta(0.5)))
    aggregator.add(_train_reply(2, _delta(500.0)))  # ×1000

    assert set(aggregator.participants) == {1}
    (reason,) = _reasons(aggregator)
    assert reason.startswith("delta norm 1225 above the round's bound 20 (10 × the last round's median)")


def test_a_round_without_history_bounds_each_device_by_the_round_itself():
    """A new lineage's first round: nothing is known, so the replies are held until all are in."""
    bounds = RoundBounds.for_round(InfluenceSettings(), adapter_norm=1.0, previous=None)
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, bounds)
    for node in (1, 2, 3):
        aggregator.add(_train_reply(node, _delta(1.0), examples=100))
    aggregator.add(
        _train_reply(4, _delta(4.0), examples=10**9)
    )  # within 100 × the adapter, a billion claimed
    aggregator.add(_train_reply(5, _delta(30.0)))  # ×30: under 100 × the adapter's norm, over 10 × the median

    assert not aggregator.participants  # held: the bounds are not known yet
    aggregator.mark_missing([1, 2, 3, 4, 5, 6])
    update = aggregator.release(sampled=6, online=6)

    assert set(aggregator.participants) == {1, 2, 3, 4}
    assert [(d.node_id, d.reason.split(" (")[-1]) for d in aggregator.drops] == [
        (5, "10 × this round's median)"),
        (6, "no reply before the deadline"),
    ]
    # Node 4 weighs 2 × the median count (100): (3 × 100 × 1 + 200 × 4) / 500.
    assert torch.allclose(update.delta["w"], torch.full((4,), 1100 / 500))
    assert update.metrics[WEIGHTS_CAPPED] == 1.0


def _hostile_app(*, blow_up: set[int] = frozenset(), inflate: set[int] = frozenset()) -> ClientApp:
    """The real ClientApp, except that some devices send 1e30 in one coordinate or claim 10⁹ examples."""
    real = build_client_app()
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        reply = real(message, context)
        if context.node_id in blow_up:
            delta = from_array_record(reply.content[records.ARRAYS])
            name = next(iter(delta))
            delta[name].view(-1)[0] = 1e30  # finite, and alone enough to wreck the mean
            reply.content[records.ARRAYS] = to_array_record(delta)
        if context.node_id in inflate:
            reply.content[records.METRICS][records.NUM_EXAMPLES] = 10**9
        return reply

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        return real(message, context)

    return app


def test_one_hostile_device_can_neither_wreck_nor_take_over_the_fleet(sqlite_url: str):
    config = _run_config(sqlite_url, **{"rounds": 3, "devices-per-round": 4, "min-devices": 3})
    grid = LocalGrid(_hostile_app(blow_up={101}, inflate={102}), 4, config)
    federation = Federation(grid, CoordinatorSettings.from_run_config(config))

    outcomes = federation.run()

    assert all(o.version is not None for o in outcomes)  # no round lost, no wrecked version stored
    for outcome in outcomes:
        (blown,) = [d.reason for d in outcome.drops if d.node_id == 101]
        assert "above the round's bound" in blown
        assert 101 not in outcome.participants
    # The inflated claim weighs at most 2 × the median count: round 1's own, then the last round's.
    assert all(outcome.metrics[WEIGHTS_CAPPED] == 1.0 for outcome in outcomes)
    final = federation.storage.versions.adapter(outcomes[-1].version.id)
    assert l2_norm(final) < 1e3

    # A restarted coordinator bounds its first round by the stored round's counts.
    (resumed,) = Federation(grid, CoordinatorSettings.from_run_config({**config, "rounds": 1})).run()
    assert resumed.version is not None and resumed.metrics[WEIGHTS_CAPPED] == 1.0


@pytest.mark.parametrize(
    ("value", "overrides", "error"),
    [
        (float("inf"), {}, "the new global adapter holds NaN or inf: not stored"),
        (1e6, {}, "the new global adapter moved"),  # finite, far past 100 × the adapter it came from
        (
            1e30,
            {"norm-ratio": 0.0},
            "the new global adapter gives NaN or inf on the canary input: not stored",
        ),
    ],
)
def test_a_broken_new_global_adapter_is_never_stored(sqlite_url: str, monkeypatch, value, overrides, error):
    from fleetlora.coordinator import rounds

    config = _run_config(sqlite_url, rounds=2, **overrides)
    federation = Federation(
        LocalGrid(build_client_app(), 3, config), CoordinatorSettings.from_run_config(config)
    )
    real_step = rounds.server_step
    steps = iter([True, False])  # round 1's server step overflows, round 2's is sound

    def overflowing(settings, state, delta, optimizer_state):
        new_state, moments = real_step(settings, state, delta, optimizer_state)
        if next(steps):
            new_state = {name: torch.full_like(t, value) for name, t in new_state.items()}
        return new_state, moments

    monkeypatch.setattr(rounds, "server_step", overflowing)
    first, second = federation.run()

    assert first.version is None and (first.error or "").startswith(error)
    assert second.version is not None and second.version.parent_id == 1  # trained on from the initial version
    assert [v.round for v in federation.storage.versions.all()] == [0, 2]


def test_an_operator_reverts_to_an_earlier_version_and_the_fleet_trains_on_from_it(sqlite_url: str):
    from typer.testing import CliRunner

    from fleetlora.coordinator.cli import app
    from fleetlora.coordinator.storage import Storage

    config = _run_config(sqlite_url, rounds=2)
    grid = LocalGrid(build_client_app(), 3, config)
    Federation(grid, CoordinatorSettings.from_run_config(config)).run()  # v1 (round 0), v2, v3
    runner = CliRunner()

    done = runner.invoke(app, ["versions", "revert", "v2", "--reason", "v3 scored badly", "--db", sqlite_url])

    assert done.exit_code == 0, done.output
    versions = Storage.open(sqlite_url).versions
    reverted = versions.latest(versions.get(2).lineage)
    assert reverted is not None and (reverted.id, reverted.round, reverted.parent_id) == (4, 3, 3)
    assert reverted.metrics["reverted_to"] == 2 and reverted.metrics["revert_reason"] == "v3 scored badly"
    assert reverted.adapter_sha256 == versions.get(2).adapter_sha256  # the very same adapter bytes
    (next_round,) = Federation(grid, CoordinatorSettings.from_run_config({**config, "rounds": 1})).run()
    assert next_round.version is not None and next_round.version.parent_id == 4

    for args, message in [
        (["versions", "revert", "v5", "--reason", "x"], "v5 is already the newest"),
        (["versions", "revert", "v99", "--reason", "x"], "No version v99"),
        (["versions", "revert", "v2", "--reason", " "], "Give the reason"),
    ]:
        refused = runner.invoke(app, [*args, "--db", sqlite_url])
        assert refused.exit_code != 0 and message in str(refused.exception), refused.output
