"""DP-SGD on the device: the noise plan, the budget, and ε that adds up across processes.

A fixed data set is one arrival cohort, so per-record budgets behave here as a lifetime budget did.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleetlora.client import privacy
from fleetlora.client.device_state import DeviceState
from fleetlora.client.train import NoisePlan, train_locally
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.delta import trainable_state
from fleetlora.common.dp_accounting import epsilon_from_history
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.common.model import build_model

SETTINGS = TrainSettings(
    local_steps=4, batch_size=8, learning_rate=3e-3, privacy=PrivacySettings(epsilon=4.0, planned_rounds=3)
)
EXAMPLES = load_examples("builtin")[:64]

# One DP round of a device, as its own process would run it: open the account on disk, train, spend.
ONE_ROUND = """
import json, sys
from pathlib import Path
from fleetlora.client import privacy
from fleetlora.client.device_state import DeviceState
from fleetlora.client.train import train_locally
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.model import build_model

examples = load_examples("builtin")[:64]
spec = ModelSpec("tiny", "classify", labels_of(load_examples("builtin")), max_length=32)
settings = TrainSettings(local_steps=4, batch_size=8, privacy=PrivacySettings(epsilon=4.0, planned_rounds=3))
device = DeviceState(Path(sys.argv[1]))
plan = privacy.plan_round(privacy.load_account(device), settings, examples, round_number=int(sys.argv[2]) + 1)
result = train_locally(build_model(spec), plan.examples, settings, seed=int(sys.argv[2]), noise=plan.noise)
print(json.dumps(privacy.spend(device, plan, settings.privacy, result.steps)))
"""


def test_epsilon_over_three_rounds_in_three_processes_equals_one_run_of_the_same_steps(tmp_path: Path):
    reports = []
    for round_number in range(3):
        done = subprocess.run(
            [sys.executable, "-c", ONE_ROUND, str(tmp_path), str(round_number)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    sigma, rate = reports[0]["dp_noise_multiplier"], reports[0]["dp_sample_rate"]
    assert all(r["dp_noise_multiplier"] == sigma for r in reports)  # chosen once, kept
    one_run = epsilon_from_history([(sigma, rate, 3 * 4)], delta=1e-5)
    assert reports[2]["dp_epsilon"] == pytest.approx(one_run, rel=1e-9)
    assert reports[0]["dp_epsilon"] < reports[1]["dp_epsilon"] < reports[2]["dp_epsilon"]
    # σ was calibrated so the planned 3 rounds spend the whole budget, and no more.
    assert reports[2]["dp_epsilon"] == pytest.approx(4.0, abs=0.05)
    assert reports[2]["dp_epsilon"] <= 4.0 + 0.01


def test_a_device_declines_once_the_next_round_would_pass_its_budget(tmp_path: Path):
    device = DeviceState(tmp_path)
    for round_number in range(1, 4):  # the planned rounds fit
        plan = privacy.plan_round(privacy.load_account(device), SETTINGS, EXAMPLES, round_number=round_number)
        privacy.spend(device, plan, SETTINGS.privacy, 4)
    stored = device.load_json(privacy.ACCOUNT_FILE)
    with pytest.raises(privacy.BudgetSpent, match=r"after this round > target 4"):
        privacy.plan_round(privacy.load_account(device), SETTINGS, EXAMPLES, round_number=4)
    assert device.load_json(privacy.ACCOUNT_FILE) == stored  # declining spends nothing


def test_a_damaged_account_stops_training_instead_of_starting_over(tmp_path: Path):
    device = DeviceState(tmp_path)
    plan = privacy.plan_round(privacy.load_account(device), SETTINGS, EXAMPLES, round_number=1)
    privacy.spend(device, plan, SETTINGS.privacy, 4)
    device.save_json(privacy.ACCOUNT_FILE, {"noise_multiplier": 1.0})  # history lost
    with pytest.raises(IncompatibleStateError, match="privacy spend is unknown"):
        privacy.load_account(device)


def test_empty_poisson_batches_are_noise_only_steps(tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    before = trainable_state(loaded.model)
    examples = load_examples("builtin")[:5]
    # With 5 examples at sample rate 0.05 most of the 20 batches are empty.
    noise = NoisePlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.05)
    result = train_locally(loaded, examples, TrainSettings(local_steps=20, batch_size=1), seed=3, noise=noise)
    assert result.steps == 20
    after = trainable_state(loaded.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # noise moved the weights
    # Opacus' hooks and per-example gradients are gone: the cached model trains plainly next round.
    assert all(getattr(p, "grad_sample", None) is None for p in loaded.model.parameters())
    assert train_locally(loaded, examples, TrainSettings(local_steps=2, batch_size=2), seed=0).steps == 2
