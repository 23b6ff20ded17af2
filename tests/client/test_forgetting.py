"""Forgetting control on the device: the replay pool, distillation, online EWC, and their settings."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType

from fleetlora.client import forgetting, privacy
from fleetlora.client.client_app import build_client_app
from fleetlora.client.corpus import drift
from fleetlora.client.corpus.records import Record, stamped
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.client.local_data import corpus_examples
from fleetlora.client.privacy_account import record_key
from fleetlora.client.train import NoisePlan, train_locally
from fleetlora.common import records
from fleetlora.common.config import (
    ForgettingSettings,
    ModelSpec,
    PrivacySettings,
    TrainSettings,
    from_config,
    to_config,
)
from fleetlora.common.data import Example, load_examples, split_holdout
from fleetlora.common.delta import trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.messages import Instructions
from fleetlora.common.model import build_model, cached_model
from fleetlora.coordinator.exchange import round_messages
from fleetlora.coordinator.settings import CoordinatorSettings
from tests.coordinator.local_grid import LocalGrid

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _records(start: int, count: int, label: str = "transfer") -> list[Example]:
    return [Example(f"record number {i}: please move my savings", label) for i in range(start, start + count)]


# ---------------------------------------------------------------------------------------------
# The pool


def _corpus_device(tmp_path: Path, old: list[Example], new: list[Example]) -> DeviceState:
    """A device whose corpus holds ``old`` (arrived before it last trained) and ``new`` (after)."""
    device = DeviceState(tmp_path / "device")
    with CorpusStore(device.root / CORPUS_FILE) as store:
        for at, examples in ((T0, old), (T0 + timedelta(hours=2), new)):
            for e in examples:
                store.add(stamped(Record(e.text, "test", "device", label=e.label, arrived_at=at)))
    drift.save_reference(device, [e.text for e in old], T0 + timedelta(hours=1))
    return device


def test_arrivals_are_the_records_that_came_after_the_device_last_trained(tmp_path: Path):
    old, new = _records(0, 30), _records(100, 6)
    device = _corpus_device(tmp_path, old, new)

    arrived = forgetting.arrived_texts(device)
    pool = forgetting.compose_pool([*old, *new], 0.0, arrived=arrived, seed=1)

    assert arrived == {e.text for e in new}
    assert pool.examples == new and (pool.arrivals, pool.replayed) == (6, 0)


def test_a_device_that_never_trained_counts_every_record_as_new(tmp_path: Path):
    device = DeviceState(tmp_path / "fresh")
    assert forgetting.arrived_texts(device) is None
    everything = _records(0, 10)
    assert forgetting.compose_pool(everything, 0.5, arrived=None, seed=1).examples == everything


@pytest.mark.parametrize(("share", "replayed"), [(0.25, 2), (0.5, 6), (0.9, 30)])
def test_the_replay_share_of_the_pool_is_older_records(share: float, replayed: int):
    old, new = _records(0, 30), _records(100, 6)
    arrived = {e.text for e in new}

    pool = forgetting.compose_pool([*old, *new], share, arrived=arrived, seed=7)

    # k = round(share / (1 − share) × 6): 2, 6, and 54 capped at the 30 older records.
    assert (pool.arrivals, pool.replayed) == (6, replayed)
    assert pool.examples[:6] == new and set(pool.examples[6:]) <= set(old)
    assert len(set(pool.examples)) == len(pool.examples)


def test_the_same_seed_draws_the_same_pool_and_another_seed_another():
    old, new = _records(0, 40), _records(100, 10)
    arrived = {e.text for e in new}

    first = forgetting.compose_pool([*old, *new], 0.5, arrived=arrived, seed=3)
    again = forgetting.compose_pool([*new, *old], 0.5, arrived=arrived, seed=3)  # order does not matter
    other = forgetting.compose_pool([*old, *new], 0.5, arrived=arrived, seed=4)

    assert set(first.examples) == set(again.examples)
    assert set(first.examples) != set(other.examples)
    # One more older record changes the replayed set by at most one record.
    grown = forgetting.compose_pool([*old, *_records(500, 1), *new], 0.5, arrived=arrived, seed=3)
    assert len(set(first.examples) - set(grown.examples)) <= 1


def test_with_nothing_new_the_device_declines_the_round():
    old = _records(0, 10)
    with pytest.raises(forgetting.NothingArrived, match="no training record arrived"):
        forgetting.compose_pool(old, 0.5, arrived=set(), seed=1)


def _dp_round(
    device: DeviceState, rounds: int, train_set: list[Example], arrived: list[Example], number: int
) -> privacy.RoundPlan:
    """Pool, plan and spend one DP round as the ClientApp does (training left out)."""
    # ε 1 and q ≥ 1/8 keep σ large, which Opacus calibrates fast.
    settings = TrainSettings(
        local_steps=4, batch_size=4, privacy=PrivacySettings(epsilon=1.0, planned_rounds=rounds)
    )
    retired = forgetting.retired_keys(privacy.load_account(device))
    pool = forgetting.compose_pool(
        train_set, 0.5, arrived={e.text for e in arrived}, seed=number, retired=retired
    )
    plan = privacy.plan_round(privacy.load_account(device), settings, pool.examples, round_number=number)
    privacy.spend(device, plan, settings.privacy, settings.steps_for(len(plan.examples)))
    return plan


def test_under_dp_replayed_records_are_charged_the_rounds_steps(tmp_path: Path):
    device = DeviceState(tmp_path)
    first, second = _records(0, 16), _records(100, 16)
    _dp_round(device, 3, first, first, 1)

    plan = _dp_round(device, 3, [*first, *second], second, 2)  # share 0.5: all 16 older records replayed

    assert {e.text for e in plan.examples} == {e.text for e in [*first, *second]}
    account = privacy.load_account(device)
    assert account is not None
    of = account.cohort_of()
    sigma = account.noise_multiplier
    for e in plan.examples:  # each record in the pool: this round's (σ, q = 4 / 32, 4 steps) on its history
        assert account.cohorts[of[record_key(e.text)]].history[-1] == (sigma, 4 / 32, 4)
    assert len(account.cohorts[of[record_key(first[0].text)]].history) == 2


def test_under_dp_retired_records_are_not_replayed(tmp_path: Path):
    device = DeviceState(tmp_path)
    first, second, third = _records(0, 16), _records(100, 16), _records(200, 16)
    _dp_round(device, 1, first, first, 1)  # a budget planned for one round: the first cohort spends it all
    # Replay asks for 16 of the first: they cannot afford the round, and retire.
    plan = _dp_round(device, 1, [*first, *second], second, 2)
    assert {e.text for e in plan.examples} == {e.text for e in second}
    account = privacy.load_account(device)
    assert account is not None
    cohorts, of = account.cohorts, account.cohort_of()
    assert all(cohorts[of[record_key(e.text)]].retired for e in first)
    # Every record trained this round is charged the round's (σ, q, steps).
    assert all(len(cohorts[of[record_key(e.text)]].history) == 1 for e in plan.examples)
    assert cohorts[of[record_key(second[0].text)]].history[0][1] == pytest.approx(4 / 16)

    retired = forgetting.retired_keys(account)
    pool = forgetting.compose_pool(
        [*first, *second, *third], 0.5, arrived={e.text for e in third}, seed=3, retired=retired
    )
    assert pool.replayed == 16 and set(pool.examples[16:]) == set(second)  # never the retired first


# ---------------------------------------------------------------------------------------------
# Distillation


def test_the_distillation_loss_is_the_formula_by_hand():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.5, -0.5, 2.0]])
    labels = torch.tensor([0, 2])
    w, t = 0.3, 2.0

    got = forgetting.distillation_loss(student, labels, teacher, weight=w, temperature=t)

    expected = 0.0
    for s, q, y in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        ce = -s[y] + math.log(sum(math.exp(v) for v in s))
        p_s = [math.exp(v / t) / sum(math.exp(u / t) for u in s) for v in s]
        p_t = [math.exp(v / t) / sum(math.exp(u / t) for u in q) for v in q]
        kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
        expected += ((1 - w) * ce + w * t * t * kl) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_weight_zero_is_the_plain_cross_entropy_and_the_mask_covers_the_ce_only():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 1, 0])
    plain = torch.nn.functional.cross_entropy(student, labels)
    unmixed = forgetting.distillation_loss(student, labels, teacher, weight=0, temperature=2)
    assert torch.allclose(unmixed, plain)  # the mean of per-example CEs: equal up to rounding

    absent = torch.tensor([False, False, True, True, True])
    masked = forgetting.distillation_loss(student, labels, teacher, weight=0.5, temperature=1, absent=absent)
    ce = torch.nn.functional.cross_entropy(student.masked_fill(absent, float("-inf")), labels)
    kl = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert float(masked) == pytest.approx(float(0.5 * ce + 0.5 * kl), rel=1e-5)  # the KL sees all 5


@pytest.mark.parametrize("regime", ["head", "lora"])
@pytest.mark.parametrize("private", [False, True])
def test_a_round_with_every_control_on_trains_in_both_regimes_with_and_without_dp(
    tiny_spec: ModelSpec, regime: str, private: bool
):
    loaded = build_model(dataclasses.replace(tiny_spec, regime=regime))
    examples = load_examples("builtin")[:48]
    controls = ForgettingSettings(distill_weight=0.5, distill_temperature=2.0, ewc_lambda=10.0)
    settings = TrainSettings(local_steps=3, batch_size=16, learning_rate=1e-2, forgetting=controls)
    noise = NoisePlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / 3) if private else None
    before = trainable_state(loaded.model)

    first = train_locally(loaded, examples, settings, seed=0, noise=noise)
    second = train_locally(loaded, examples, settings, seed=1, noise=noise, fisher=first.fisher)

    assert math.isfinite(first.loss) and math.isfinite(second.loss) and second.steps == 3
    after = trainable_state(loaded.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert first.fisher is not None and second.fisher is not None
    assert first.fisher.keys() == before.keys()
    assert all(bool((f >= 0).all() and torch.isfinite(f).all()) for f in second.fisher.values())
    assert all(getattr(p, "grad_sample", None) is None for p in loaded.model.parameters())


def test_distillation_is_refused_for_a_causal_lm():
    loaded = build_model(ModelSpec("tiny", "causal-lm", max_length=32))
    settings = TrainSettings(local_steps=1, forgetting=ForgettingSettings(distill_weight=0.5))
    with pytest.raises(ConfigError, match="distill-weight"):
        train_locally(loaded, load_examples("builtin")[:4], settings, seed=0)
    with pytest.raises(ConfigError, match="distill-weight"):
        CoordinatorSettings.from_run_config({"model": "tiny", "task": "causal-lm", "distill-weight": 0.5})


# ---------------------------------------------------------------------------------------------
# Online EWC


def _ewc(tiny_spec: ModelSpec, strength: float = 3.0) -> tuple[forgetting.OnlineEWC, dict]:
    """EWC over the tiny model's trainable parameters with a random Fisher, the weights moved off θ*."""
    loaded = build_model(tiny_spec)
    params = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in params.items()}
    ewc = forgetting.OnlineEWC(params, fisher, strength)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=generator))
    return ewc, fisher


def test_the_ewc_penalty_gradient_is_lambda_f_times_the_distance_to_the_anchor(tiny_spec: ModelSpec):
    ewc, fisher = _ewc(tiny_spec, strength=3.0)
    formula = {n: 3.0 * fisher[n] * (p.detach() - ewc.anchor[n]) for n, p in ewc.params.items()}

    ewc.penalty().backward()
    autograd = {n: p.grad.clone() for n, p in ewc.params.items() if p.grad is not None}
    for p in ewc.params.values():
        p.grad = None
    ewc.on_gradient(batch_size=16)  # what a step adds to a zero data gradient

    assert autograd.keys() == formula.keys()
    for name, expected in formula.items():
        assert torch.allclose(autograd[name], expected, atol=1e-6)
        assert torch.allclose(ewc.params[name].grad, expected, atol=1e-6)


def test_the_fisher_averages_the_old_with_this_rounds_batch_times_squared_gradients():
    weight = torch.nn.Parameter(torch.zeros(3))
    old = {"w": torch.tensor([2.0, 0.0, 4.0])}
    ewc = forgetting.OnlineEWC({"w": weight}, old, strength=1.0)
    for gradient in ([1.0, 0.0, 2.0], [3.0, 0.0, 0.0]):
        weight.grad = torch.tensor(gradient)
        ewc.on_gradient(batch_size=4)
    # F_new = 4 × mean(g²) = [20, 0, 8]; F = ½ old + ½ new.
    assert torch.allclose(ewc.updated_fisher()["w"], torch.tensor([11.0, 0.0, 6.0]))

    fresh = forgetting.OnlineEWC({"w": weight}, None, strength=1.0)
    weight.grad = torch.tensor([1.0, 0.1, 0.0])
    fresh.on_gradient(batch_size=4, noise_variance=0.25)  # under DP the noise variance comes off, floored
    assert torch.allclose(fresh.updated_fisher()["w"], torch.tensor([3.0, 0.0, 0.0]))


@pytest.mark.parametrize("damage", ["layout", "negative", "nan", "garbage"])
def test_a_damaged_or_mismatched_fisher_is_set_aside_and_ewc_starts_fresh(
    tiny_spec: ModelSpec, tmp_path: Path, damage: str
):
    loaded = build_model(tiny_spec)
    reference = trainable_state(loaded.model)
    device = DeviceState(tmp_path / "device")
    stored = {n: torch.ones_like(t) for n, t in reference.items()}
    name = next(iter(stored))
    if damage == "layout":
        stored[name] = torch.ones(3)
    elif damage == "negative":
        stored[name] = -stored[name]
    elif damage == "nan":
        stored[name] = torch.full_like(stored[name], float("nan"))
    device.save_arrays(forgetting.FISHER_FILE, stored)
    if damage == "garbage":
        device.path(forgetting.FISHER_FILE).write_bytes(b"not safetensors")

    assert forgetting.load_fisher(device, reference) is None
    assert not device.path(forgetting.FISHER_FILE).exists()
    assert (device.root / f"{forgetting.FISHER_FILE}.damaged").is_file()

    settings = TrainSettings(local_steps=2, batch_size=8, forgetting=ForgettingSettings(ewc_lambda=1.0))
    result = train_locally(loaded, load_examples("builtin")[:16], settings, seed=0, fisher=None)
    assert result.fisher is not None
    forgetting.save_fisher(device, result.fisher)
    kept = forgetting.load_fisher(device, trainable_state(loaded.model))
    assert kept is not None and kept.keys() == reference.keys()


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replay-share": 0.3}, 'replay-share 0.3 .*train-on = "all"'),
        ({"train-on": "arrivals", "replay-share": 0.95}, r"replay-share must be in \[0, 0.9\]"),
        ({"distill-weight": 1.0}, r"distill-weight must be in \[0, 1\)"),
        ({"distill-temperature": 0.0}, r"distill-temperature must be in \[0.01, 100\]"),
        ({"ewc-lambda": -1.0}, r"ewc-lambda must be in \[0, 1e\+06\]"),
        ({"train-on": "new"}, "train-on: must be one of all, arrivals"),
    ],
)
def test_bad_forgetting_settings_are_refused_with_the_key_named(values: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        CoordinatorSettings.from_run_config({"model": "tiny", "labels": "a,b", **values})


def test_a_device_refuses_bad_forgetting_values_from_the_wire():
    sent = to_config(TrainSettings(), "train")
    for key, value in [("ewc_lambda", float("nan")), ("replay_share", "0.5"), ("train_on", "everything")]:
        with pytest.raises(ConfigError, match=key.replace("_", "-")):
            from_config(TrainSettings, {**sent, f"train.forgetting.{key}": value}, "train")


def test_the_forgetting_keys_reach_the_device_with_the_round():
    run = {
        "model": "tiny",
        "labels": "a,b",
        "train-on": "arrivals",
        "replay-share": 0.2,
        "distill-weight": 0.4,
        "distill-temperature": 3.0,
        "ewc-lambda": 50.0,
    }
    settings = CoordinatorSettings.from_run_config(run)
    sent = Instructions(settings.spec, settings.train_for_round(2), round=2, version=1, base_sha256="0" * 64)

    received = Instructions.from_record(sent.to_record()).train.forgetting

    assert received == ForgettingSettings("arrivals", 0.2, 0.4, 3.0, 50.0)
    assert CoordinatorSettings.from_run_config({"model": "tiny", "labels": "a,b"}).train.forgetting == (
        ForgettingSettings()
    )


# ---------------------------------------------------------------------------------------------
# On the device, through its ClientApp


def test_a_corpus_device_trains_on_its_newest_batch_until_another_comes_and_survives_a_bad_fisher(
    tiny_spec: ModelSpec, tmp_path: Path
):
    state = tmp_path / "device"
    examples = load_examples("builtin")

    def ingest(batch: list[Example]) -> None:
        with CorpusStore(state / CORPUS_FILE) as store:
            for e in batch:
                store.add(stamped(Record(e.text, "test", "device-0", label=e.label)))

    ingest(examples[:60])
    node = {"data-path": "corpus", "state-dir": str(state), "device-id": "device-0", "upload-consent": True}
    grid = LocalGrid(build_client_app(), 1, {"holdout": 0.0}, node_configs=[node])
    loaded = cached_model(tiny_spec)
    controls = ForgettingSettings(train_on="arrivals", replay_share=0.5, distill_weight=0.3, ewc_lambda=1.0)
    settings = TrainSettings(local_steps=2, batch_size=8, forgetting=controls)

    def train(round_number: int) -> Message:
        sent = Instructions(tiny_spec, settings, round_number, round_number, loaded.base_sha256)
        (message,) = round_messages(
            grid.node_ids, trainable_state(loaded.model), sent, MessageType.TRAIN, ttl=60
        )
        (reply,) = grid.send_and_receive([message])
        assert not reply.has_error(), reply.error
        return reply

    first = train(1)  # never trained: every record is new
    assert first.content[records.METRICS][records.NUM_EXAMPLES] == 60
    fisher = DeviceState(state).path(forgetting.FISHER_FILE)
    assert fisher.is_file()

    second = train(2)  # nothing arrived since: the same (first) batch again
    assert second.content[records.METRICS][records.NUM_EXAMPLES] == 60

    ingest(examples[100:110])
    fisher.write_bytes(b"damaged")
    third = train(3)  # 10 new records and 10 replayed older ones, EWC started afresh
    assert third.content[records.METRICS][records.NUM_EXAMPLES] == 20
    assert (state / f"{forgetting.FISHER_FILE}.damaged").is_file() and fisher.is_file()
    fourth = train(4)  # nothing new since: the newest batch of 10 is learned again, with its replay
    assert fourth.content[records.METRICS][records.NUM_EXAMPLES] == 20


def test_a_streamed_device_counts_only_the_records_of_this_rounds_catch_up_as_new(
    tiny_spec: ModelSpec, tmp_path: Path
):
    run = {
        "data": "builtin",
        "partition": "iid",
        "seed": 0,
        "stream-records": 20,
        "device-state": str(tmp_path),
    }
    grid = LocalGrid(build_client_app(), 1, run)
    loaded = cached_model(tiny_spec)
    settings = TrainSettings(local_steps=1, batch_size=8, forgetting=ForgettingSettings(train_on="arrivals"))

    def train(round_number: int) -> int:
        sent = Instructions(tiny_spec, settings, round_number, round_number, loaded.base_sha256)
        (message,) = round_messages(
            grid.node_ids, trainable_state(loaded.model), sent, MessageType.TRAIN, ttl=60
        )
        (reply,) = grid.send_and_receive([message])
        assert not reply.has_error(), reply.error
        return int(reply.content[records.METRICS][records.NUM_EXAMPLES])

    def training_records() -> int:
        examples = corpus_examples(tmp_path / "partition-0" / CORPUS_FILE)
        return len(split_holdout([e for e in examples if e.label in tiny_spec.labels], 0.2)[0])

    assert train(1) == training_records()
    before = training_records()
    # Round 2 takes in the next 20 records and trains on those alone, not again on round 1's.
    assert train(2) == training_records() - before > 0
