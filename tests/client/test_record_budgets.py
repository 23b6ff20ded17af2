"""Per-record privacy budgets: each record's ε, accounted over the steps it could be sampled in.

These tests plan and spend rounds without training (the account only needs the steps a round takes),
and check the cohort bookkeeping against an independent per-record log.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import pytest

from fleetlora.client import privacy
from fleetlora.client.device_state import DeviceState
from fleetlora.client.privacy_account import record_key
from fleetlora.common import records
from fleetlora.common.config import PrivacySettings, TrainSettings
from fleetlora.common.data import Example
from fleetlora.common.dp_accounting import AccountantStep, epsilon_from_history
from fleetlora.common.errors import IncompatibleStateError

TARGET = 4.0
SETTINGS = TrainSettings(
    local_steps=4, batch_size=8, privacy=PrivacySettings(epsilon=TARGET, planned_rounds=3)
)


def _records(start: int, count: int) -> list[Example]:
    return [
        Example(f"record number {i}: please move my savings", "transfer") for i in range(start, start + count)
    ]


def _round(device: DeviceState, examples: list[Example], round_number: int) -> tuple[privacy.RoundPlan, dict]:
    """Plan and spend one round as the ClientApp does (training left out)."""
    plan = privacy.plan_round(privacy.load_account(device), SETTINGS, examples, round_number=round_number)
    steps = SETTINGS.steps_for(len(plan.examples))
    return plan, privacy.spend(device, plan, SETTINGS.privacy, steps)


def test_with_records_arriving_no_record_passes_the_target_and_training_goes_on(tmp_path: Path):
    # A corpus device: 8 records arrive every round and it trains on its newest 40 (its window).
    device = DeviceState(tmp_path)
    corpus = _records(0, 32)
    steps_of: dict[str, list[AccountantStep]] = defaultdict(list)  # each record's own steps, logged here
    retired_keys: set[str] = set()
    reports = []
    for round_number in range(1, 19):
        try:
            plan, report = _round(device, corpus[-40:], round_number)
        except privacy.BudgetSpent:  # the window is all spent: the arrivals wait for more to come
            corpus += _records(len(corpus), 8)
            continue
        noise = plan.noise
        assert noise.sample_rate == pytest.approx(min(1.0, SETTINGS.batch_size / len(plan.examples)))
        keys = {record_key(e.text) for e in plan.examples}
        assert not keys & retired_keys  # a retired record is never sampled again
        for key in keys:
            steps_of[key].append((noise.noise_multiplier, noise.sample_rate, 4))
        reports.append(report)
        account = privacy.load_account(device)
        assert account is not None
        retired_keys = {k for c in account.cohorts if c.retired for k in c.records}
        corpus += _records(len(corpus), 8)

    assert len(reports) >= 12  # a lifetime budget would have stopped after 3 rounds
    # Every record's ε, from its own steps only, stays within the target; the largest is what is reported.
    epsilons = [
        epsilon_from_history(h, delta=1e-5) for h in {tuple(h): h for h in steps_of.values()}.values()
    ]
    assert max(epsilons) <= TARGET
    assert reports[-1][records.DP_EPSILON] == pytest.approx(max(epsilons), rel=1e-9)
    # Old records retired along the way, and stay retired: the count only grows.
    retired = [r[records.DP_RECORDS_RETIRED] for r in reports]
    assert retired == sorted(retired) and retired[-1] == len(retired_keys) > 0


def test_when_records_stop_arriving_the_device_stops_once_they_are_spent(tmp_path: Path):
    device = DeviceState(tmp_path)
    corpus = _records(0, 32)
    for round_number in range(1, 4):
        _round(device, corpus, round_number)
        corpus += _records(len(corpus), 16)
    trained = 0
    with pytest.raises(privacy.BudgetSpent, match="every record is spent"):
        for round_number in range(4, 40):
            _round(device, corpus, round_number)
            trained += 1
    assert 0 < trained < 36  # the later cohorts trained on, then ran out too
    stored = device.load_json(privacy.ACCOUNT_FILE)
    with pytest.raises(privacy.BudgetSpent):
        _round(device, corpus, 99)
    assert device.load_json(privacy.ACCOUNT_FILE) == stored  # declining spends nothing


def test_the_account_survives_a_restart_and_continues_where_it_stopped(tmp_path: Path):
    corpus = _records(0, 40)
    _round(DeviceState(tmp_path), corpus, 1)
    _, before = _round(DeviceState(tmp_path), corpus + _records(40, 10), 2)
    restarted = DeviceState(tmp_path)  # a new process: everything comes from the file
    account = privacy.load_account(restarted)
    assert account is not None and [c.joined for c in account.cohorts] == [1, 2]
    assert account.largest_epsilon(1e-5) == pytest.approx(before[records.DP_EPSILON], rel=1e-12)
    _, after = _round(restarted, corpus + _records(40, 10), 3)
    assert before[records.DP_EPSILON] < after[records.DP_EPSILON] <= TARGET


def test_a_retired_record_that_leaves_and_comes_back_stays_retired(tmp_path: Path):
    device = DeviceState(tmp_path)
    first, arrivals = _records(0, 16), _records(16, 16)
    for round_number in range(1, 4):  # the planned three rounds spend the first records
        _round(device, first, round_number)
    with pytest.raises(privacy.BudgetSpent, match="after this round > target 4"):
        _round(device, first, 4)
    plan, report = _round(device, first + arrivals, 4)  # new records arrive: they train, the first retire
    assert {e.text for e in plan.examples} == {e.text for e in arrivals}
    assert report[records.DP_RECORDS_RETIRED] == 16
    _round(device, arrivals, 5)  # the first records leave the corpus ...
    plan, _ = _round(device, first + arrivals, 6)  # ... and come back
    assert {e.text for e in plan.examples} == {e.text for e in arrivals}


@pytest.fixture(scope="module")
def damaged_documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """A real account after one round, and that account damaged in each way a device must refuse."""
    device = DeviceState(tmp_path_factory.mktemp("device"))
    plan = privacy.plan_round(None, SETTINGS, _records(0, 16), round_number=1)
    privacy.spend(device, plan, SETTINGS.privacy, 4)
    good = device.load_json(privacy.ACCOUNT_FILE)
    assert good is not None

    def with_step(step: list) -> dict:
        document = json.loads(json.dumps(good))
        document["cohorts"][0]["history"] = [step]
        return document

    sigma, rate, _ = good["cohorts"][0]["history"][0]
    two_cohorts = json.loads(json.dumps(good))
    two_cohorts["cohorts"].append({**good["cohorts"][0], "joined": 2})
    return {
        "negative steps": with_step([sigma, rate, -4]),
        "fractional steps": with_step([sigma, rate, 3.5]),
        "NaN σ": with_step([math.nan, rate, 4]),
        "infinite σ": with_step([math.inf, rate, 4]),
        "negative σ": with_step([-sigma, rate, 4]),
        "negative q": with_step([sigma, -rate, 4]),
        "NaN q": with_step([sigma, math.nan, 4]),
        "q above 1": with_step([sigma, 1.5, 4]),
        "a record in two cohorts": two_cohorts,
        "the lifetime account of schema 1": {"noise_multiplier": sigma, "accountant": "rdp", "history": []},
        "no cohorts": {k: v for k, v in good.items() if k != "cohorts"},
    }


@pytest.mark.parametrize(
    "damage",
    [
        "negative steps",
        "fractional steps",
        "NaN σ",
        "infinite σ",
        "negative σ",
        "negative q",
        "NaN q",
        "q above 1",
        "a record in two cohorts",
        "the lifetime account of schema 1",
        "no cohorts",
    ],
)
def test_an_implausible_account_is_refused_never_restarted(
    tmp_path: Path, damaged_documents: dict[str, dict], damage: str
):
    device = DeviceState(tmp_path)
    device.save_json(privacy.ACCOUNT_FILE, damaged_documents[damage])
    with pytest.raises(IncompatibleStateError, match="privacy spend is unknown"):
        privacy.load_account(device)


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_an_account_that_is_not_a_plain_file_is_refused(tmp_path: Path, kind: str):
    device = DeviceState(tmp_path / "device")
    path = device.path(privacy.ACCOUNT_FILE, ".json")
    path.parent.mkdir()
    if kind == "directory":
        path.mkdir()
    else:
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text("{}")
        os.symlink(elsewhere, path)
    with pytest.raises(IncompatibleStateError, match="privacy spend is unknown"):
        privacy.load_account(device)


def test_a_device_budget_stops_for_good_even_while_records_keep_arriving(tmp_path: Path):
    lifetime = TrainSettings(
        local_steps=4,
        batch_size=8,
        privacy=PrivacySettings(epsilon=TARGET, planned_rounds=3, budget="device"),
    )
    device = DeviceState(tmp_path)
    corpus = _records(0, 32)
    trained = 0
    for round_number in range(1, 10):
        try:
            window = corpus[-32:]  # as in the first test, it trains on its newest records
            plan = privacy.plan_round(
                privacy.load_account(device), lifetime, window, round_number=round_number
            )
        except privacy.BudgetSpent:
            corpus += _records(len(corpus), 8)
            continue
        privacy.spend(device, plan, lifetime.privacy, lifetime.steps_for(len(plan.examples)))
        trained += 1
        corpus += _records(len(corpus), 8)
    account = privacy.load_account(device)

    assert trained == 3  # the planned rounds, then never again: arrivals share the first cohort's spend
    assert account is not None and len(account.cohorts) == 1  # the 32 first records and 8 + 8 arrivals
    assert len(account.cohorts[0].records) == 48 and account.largest_epsilon(1e-5) <= TARGET
