"""Sampling by device id: one seed, one schedule, whatever node ids Flower drew; OS entropy when deployed."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.coordinator import deploy_cli, flower_control
from fleetlora.coordinator.sampling import Sampler, sample_devices
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid

ROUNDS = range(1, 11)


def _fleet(devices: int, *, node_seed: int, app: ClientApp | None = None, silent=()) -> LocalGrid:
    """Simulated devices ``partition-0`` … under node ids drawn at random, as the Simulation Engine does."""
    grid = LocalGrid(app or build_client_app(), devices, run_config={})
    grid.node_ids = random.Random(node_seed).sample(range(1, 2**63), devices)
    grid.silent = {grid.node_ids[i] for i in silent}
    return grid


def _schedule(
    grid: LocalGrid,
    *,
    seed: int | None,
    count: int = 3,
    wanting: set[int] = frozenset(),
    ineligible: set[int] = frozenset(),
):
    """The device ids each round samples, in the order drawn."""
    sampler = Sampler(grid, count=count, seed=seed, ttl=5.0)
    online = sorted(grid.node_ids)
    schedule = []
    for number in ROUNDS:
        drawn = sampler.draw(number, online, set(wanting), time.monotonic() + 1.0, ineligible=ineligible)
        schedule.append(sampler.named(drawn, online))
    return schedule


def _identity_queries(grid: LocalGrid) -> list[int]:
    return [
        m.metadata.dst_node_id for m in grid.received if m.metadata.message_type == records.QUERY_IDENTITY
    ]


def test_one_seed_samples_the_same_devices_whatever_node_ids_flower_drew():
    first, second = _fleet(6, node_seed=1), _fleet(6, node_seed=2)
    assert set(first.node_ids).isdisjoint(second.node_ids)

    assert _schedule(first, seed=1) == _schedule(second, seed=1)


def test_the_schedule_moves_with_the_round_and_the_seed():
    schedule = _schedule(_fleet(6, node_seed=1), seed=1)

    assert all(len(devices) == 3 and len(set(devices)) == 3 for devices in schedule)
    assert all(d.startswith("partition-") for devices in schedule for d in devices)
    assert len({tuple(devices) for devices in schedule}) > 1
    assert schedule != _schedule(_fleet(6, node_seed=1), seed=2)


def test_without_a_seed_two_runs_draw_different_schedules():
    # 10 rounds of 3 ordered devices out of 6: the chance two OS draws agree is 120^-10.
    assert _schedule(_fleet(6, node_seed=1), seed=None) != _schedule(_fleet(6, node_seed=1), seed=None)


def test_devices_that_want_to_train_come_first_under_the_seed():
    grid = _fleet(6, node_seed=3)
    wanting = {grid.node_ids[4], grid.node_ids[5]}

    schedule = _schedule(grid, seed=1, wanting=wanting)

    # First while behind their fair share (half the rounds here), last once they have it.
    assert set(schedule[0][:2]) == {"partition-4", "partition-5"}
    assert [sum(d in devices for devices in schedule) for d in ("partition-4", "partition-5")] == [5, 5]


def test_a_device_that_always_wants_to_train_gets_no_more_than_its_fair_share():
    """6 devices, 3 a round, 10 rounds: each is due 5; one that says it wants every round is not drawn 10."""
    grid = _fleet(6, node_seed=3)
    greedy = "partition-4"

    for seed in (*range(20), None):
        schedule = _schedule(grid, seed=seed, wanting={grid.node_ids[4]})
        drawn = sum(greedy in devices for devices in schedule)
        assert drawn == 5, (seed, drawn)  # before this bound: 10 of 10


def test_each_node_is_asked_who_it_is_once_a_run():
    grid = _fleet(6, node_seed=4)

    _schedule(grid, seed=1)

    assert sorted(_identity_queries(grid)) == sorted(grid.node_ids)


def test_a_node_that_cannot_say_who_it_is_is_named_by_its_node_id_and_not_asked_again():
    app = ClientApp()  # a device too old for query.identity: its ClientApp raises
    grid = _fleet(4, node_seed=5, app=app, silent={0})

    schedule = _schedule(grid, seed=1, count=2)

    names = {f"node-{n}" for n in grid.node_ids}
    assert all(set(devices) <= names for devices in schedule)
    assert sorted(_identity_queries(grid)) == sorted(grid.node_ids)


def test_when_every_device_trains_nothing_is_drawn_and_no_one_is_asked():
    grid = _fleet(3, node_seed=6)

    schedule = _schedule(grid, seed=1, count=3)

    assert not grid.received
    assert all(sorted(devices) == devices and len(devices) == 3 for devices in schedule)


def test_a_draw_depends_on_the_set_of_names_not_on_node_ids_or_their_order():
    names = {7: "b", 3: "a", 9: "d", 1: "c"}
    renamed = {40: "c", 10: "a", 30: "d", 20: "b"}  # the same devices under other node ids

    def draw(nodes: dict[int, str], order: list[int]) -> list[str]:
        drawn = sample_devices(order, 2, set(), random.Random("1:1"), name=nodes.__getitem__)
        return [nodes[n] for n in drawn]

    assert draw(names, [7, 3, 9, 1]) == draw(names, [1, 9, 3, 7]) == draw(renamed, [40, 10, 30, 20])


def test_a_deployed_round_samples_from_the_os_unless_federation_asks_for_a_seed(tmp_path: Path, monkeypatch):
    sent: list[dict] = []
    monkeypatch.setattr(flower_control, "start_run", lambda host, config: sent.append(config) or 1)
    host = tmp_path / "fleetlora.toml"

    def started(federation: str) -> CoordinatorSettings:
        host.write_text(f"[federation]\nmodel = 'tiny'\n{federation}")
        deploy_cli.round_start(rounds=None, min_devices=None, fraction=None, deadline=None, config=host)
        return CoordinatorSettings.from_run_config(sent[-1])

    assert started("").sampling_seed is None
    assert started("sampling = 'seeded'\nseed = 3\n").sampling_seed == 3
    # A fleet lives through many short runs: its DP noise is planned for its life, not for one run.
    assert started("").train.privacy.planned_rounds == deploy_cli.DEPLOYED_DP_ROUNDS
    assert not started("").plan_dp_by_schedule
    assert started("dp-rounds = 7\n").train.privacy.planned_rounds == 7


@pytest.mark.parametrize(("sampling", "seed"), [("seeded", 5), ("random", None)])
def test_the_run_configs_sampling_key_sets_the_seed_rounds_draw_with(sampling: str, seed: int | None):
    config = {"model": "tiny", "seed": 5, "sampling": sampling}
    assert CoordinatorSettings.from_run_config(config).sampling_seed == seed


def test_a_seeded_plan_counts_exactly_the_rounds_each_device_will_be_drawn():
    grid = _fleet(6, node_seed=3)
    online = sorted(grid.node_ids)
    sampler = Sampler(grid, count=3, seed=4, ttl=5.0)
    planned = sampler.participations(online, ROUNDS, time.monotonic() + 1.0)
    deadline = time.monotonic() + 1.0
    drawn = [node for number in ROUNDS for node in sampler.draw(number, online, set(), deadline)]

    assert planned == {node: drawn.count(node) for node in online}
    assert sum(planned.values()) == 3 * len(ROUNDS)


def test_a_random_plan_is_the_expected_count_and_a_small_fleet_trains_every_round():
    grid = _fleet(6, node_seed=3)
    online = sorted(grid.node_ids)
    random_plan = Sampler(grid, count=4, seed=None, ttl=5.0).participations(online, ROUNDS, time.monotonic())
    everyone = Sampler(grid, count=6, seed=1, ttl=5.0).participations(online, ROUNDS, time.monotonic())

    assert random_plan == dict.fromkeys(online, 7)  # ceil(10 rounds × 4 / 6)
    assert everyone == dict.fromkeys(online, 10)


def test_a_wish_to_train_from_a_node_that_is_not_online_is_ignored():
    """A stored wants-train row of a node that left (or never was) used to crash every round's draw."""
    grid = _fleet(6, node_seed=3)
    sampler = Sampler(grid, count=3, seed=1, ttl=5.0)
    online = sorted(grid.node_ids)

    drawn = sampler.draw(1, online, {online[0], 424242}, time.monotonic() + 1.0)

    assert len(drawn) == 3 and drawn[0] == online[0]


def test_devices_known_not_to_be_eligible_are_drawn_after_everyone_else():
    """6 devices, 3 a round: the 2 not eligible are never drawn while 4 others are online, even the one
    that wants to train; with 5 a round, exactly one of them fills the last place."""
    grid = _fleet(6, node_seed=3)
    ineligible = {grid.node_ids[4], grid.node_ids[5]}
    named = {"partition-4", "partition-5"}

    for seed in (*range(10), None):
        schedule = _schedule(grid, seed=seed, wanting={grid.node_ids[5]}, ineligible=ineligible)
        assert all(len(devices) == 3 and not named & set(devices) for devices in schedule), seed
        crowded = _schedule(grid, seed=seed, count=5, ineligible=ineligible)
        assert all(devices[-1] in named and not named & set(devices[:-1]) for devices in crowded), seed


def test_ineligible_devices_are_still_drawn_when_too_few_others_are_online():
    """They may have become eligible since they said: a round of ineligible devices beats no round."""
    grid = _fleet(4, node_seed=6)

    schedule = _schedule(grid, seed=1, count=3, ineligible=set(grid.node_ids[1:]))
    everyone = _schedule(grid, seed=1, count=3, ineligible=set(grid.node_ids))

    assert all(devices[0] == "partition-0" and len(devices) == 3 for devices in schedule)
    assert all(len(set(devices)) == 3 for devices in everyone)


def test_a_seeded_draw_with_ineligible_devices_is_a_function_of_their_names_not_node_ids():
    first, second = _fleet(6, node_seed=1), _fleet(6, node_seed=2)

    schedules = [
        _schedule(grid, seed=4, wanting={grid.node_ids[1]}, ineligible={grid.node_ids[0], grid.node_ids[3]})
        for grid in (first, second, first)
    ]

    assert schedules[0] == schedules[1] == schedules[2]
    assert "partition-0" not in {d for devices in schedules[0] for d in devices}


def test_sample_devices_puts_the_ineligible_after_the_last_and_consumes_no_randomness_without_them():
    online, last, ineligible = [1, 2, 3, 4, 5, 6], {2, 3}, {3, 4}

    drawn = sample_devices(online, 6, {1, 4}, random.Random("7:1"), last=last, ineligible=ineligible)

    # wanting (1; 4 is not eligible), the rest (5, 6), last (2), then the ineligible (3 and 4)
    assert drawn[0] == 1 and set(drawn[1:3]) == {5, 6} and drawn[3] == 2 and set(drawn[4:]) == {3, 4}
    without = sample_devices(online, 6, {1}, random.Random("7:1"), last={2})
    assert without == sample_devices(online, 6, {1}, random.Random("7:1"), last={2}, ineligible=())
