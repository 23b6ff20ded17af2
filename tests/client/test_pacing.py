"""Pauses, deadlines, the battery throttle and low priority (client/pacing.py), on real training steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fleetlora.client import client_app
from fleetlora.client.client_app import build_client_app
from fleetlora.client.gates import Gates, NoSensors, Readings
from fleetlora.client.pacing import Pacer, RoundAbandoned
from fleetlora.client.train import Runtime, train_locally
from fleetlora.common import records
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.data.builtin import builtin_examples
from fleetlora.common.delta import load_trainable_state, to_array_record, trainable_state
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.messages import Instructions
from fleetlora.common.model import cached_model
from tests.client.test_gates import Script
from tests.coordinator.local_grid import LocalGrid

QUIET, SPIKE = Readings(foreground_load=0.1), Readings(foreground_load=0.9)


class FakeTime:
    """A clock that moves only when slept on, or by ``tick`` per read (a step's cost)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick, self.slept = 1_000.0, tick, 0.0

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def pacer(readings: list[Readings], *, steps: int, deadline: float | None = None, tick: float = 1.0):
    fake = FakeTime(tick)
    made = Pacer(
        Gates(DeviceSettings(), Script(readings)),
        steps=steps,
        deadline=None if deadline is None else fake.now + deadline,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    return made, fake


def test_a_foreground_spike_pauses_before_the_next_step_and_training_resumes_there():
    # One look per step; the spike shows at the 4th look (before step 3) and lasts three looks.
    run, fake = pacer([QUIET, QUIET, QUIET, SPIKE, SPIKE, SPIKE, QUIET], steps=8)
    taken = []
    for step in range(8):
        run(step)
        taken.append(step)
    assert taken == list(range(8))
    assert run.pauses == 1 and run.paused_at == [3]
    assert fake.slept == pytest.approx(3.0)  # three polls of one second while paused
    assert run.paused_seconds > 0


def test_a_paused_run_trains_the_same_adapter_as_an_uninterrupted_one(tiny_spec: ModelSpec):
    settings = TrainSettings(local_steps=6, batch_size=8)
    examples = builtin_examples()[:48]
    loaded = cached_model(tiny_spec)
    start = trainable_state(loaded.model)

    def trained(runtime: Runtime | None) -> dict[str, torch.Tensor]:
        load_trainable_state(loaded.model, start)
        train_locally(loaded, examples, settings, seed=7, runtime=runtime)
        return trainable_state(loaded.model)

    plain = trained(None)
    run, _ = pacer([QUIET, QUIET, SPIKE, SPIKE, QUIET], steps=6)
    paused = trained(Runtime(between_steps=run))
    assert run.pauses == 1
    assert plain.keys() == paused.keys()
    assert all(torch.equal(plain[k], paused[k]) for k in plain)


def test_a_round_paused_past_its_deadline_is_given_up_with_the_steps_it_took():
    run, _ = pacer([QUIET, QUIET, SPIKE], steps=10, deadline=30.0, tick=0.2)
    run(0)
    run(1)
    with pytest.raises(RoundAbandoned, match="paused past the round's deadline") as raised:
        run(2)
    assert raised.value.steps_taken == 2


def test_a_round_that_cannot_finish_in_time_is_given_up_before_it_trains_in_vain():
    # Each step costs about 2 s of the fake clock; 10 steps do not fit in 12 s.
    run, _ = pacer([QUIET], steps=10, deadline=12.0, tick=1.0)
    with pytest.raises(RoundAbandoned, match="cannot finish before the round's deadline") as raised:
        for step in range(10):
            run(step)
    assert 0 < raised.value.steps_taken < 10


def test_a_round_whose_deadline_passed_before_its_first_step_trains_none():
    run, _ = pacer([QUIET], steps=10, deadline=-1.0)
    with pytest.raises(RoundAbandoned, match="deadline passed before its first step") as raised:
        run(0)
    assert raised.value.steps_taken == 0  # nothing to charge


def test_the_battery_rests_count_in_the_time_a_step_takes():
    # Steps of 1 s at twice the power share rest 1 s after each: 2 s a step, so 10 (19 s) miss an 18 s
    # deadline, which shows after the first step. Counted without the rests (1 s a step), the round would
    # have trained 8 steps before giving up, each charged under DP.
    busy = Readings(on_battery=True, battery_percent=80, own_load=0.5)
    run, fake = pacer([busy], steps=10, deadline=18.0, tick=0.0)
    with pytest.raises(RoundAbandoned, match="cannot finish") as raised:
        for step in range(10):
            run(step)
            fake.now += 1.0  # the step itself
    assert raised.value.steps_taken == 1


def test_on_battery_training_rests_to_keep_its_cpu_share_at_the_power_share():
    busy = Readings(on_battery=True, battery_percent=80, own_load=0.5)
    run, fake = pacer([busy], steps=4, tick=0.5)
    for step in range(4):
        run(step)
    # A step that took the CPU at twice the 0.25 share rests as long again.
    assert fake.slept > 0
    mains, fake_mains = pacer([Readings(on_battery=False, own_load=0.5)], steps=4, tick=0.5)
    for step in range(4):
        mains(step)
    assert fake_mains.slept == 0


def test_the_pacer_looks_at_most_every_quarter_second():
    class Counting(NoSensors):
        looks = 0

        def read(self) -> Readings:
            Counting.looks += 1
            return Readings()

    fake = FakeTime(tick=0.01)
    run = Pacer(
        Gates(DeviceSettings(), Counting()), steps=100, deadline=None, clock=fake.clock, sleep=fake.sleep
    )
    for step in range(100):
        run(step)
    assert 2 <= Counting.looks <= 10  # about 100 × 0.02 s / 0.25 s, not 100


# ---- through the ClientApp, as a deployed device answers


def train_message(
    spec: ModelSpec, settings: TrainSettings, node: int, ttl: float | None = None, kind: str = "train"
) -> Message:
    loaded = cached_model(spec)
    instructions = Instructions(spec, settings, round=4, version=3, base_sha256=loaded.base_sha256)
    content = RecordDict(
        {
            records.CONFIG: instructions.to_record(),
            records.ARRAYS: to_array_record(trainable_state(loaded.model)),
        }
    )
    extra = {} if ttl is None else {"ttl": ttl}
    return Message(content, dst_node_id=node, message_type=kind, **extra)


def device_node(tmp_path: Path, sensors: dict) -> dict:
    (tmp_path / "sensors.json").write_text(json.dumps(sensors))
    return {
        "device-id": "kiosk-7",
        "data-path": "builtin",
        "state-dir": str(tmp_path / "state"),
        "upload-consent": True,
        "sensors": f"file:{tmp_path / 'sensors.json'}",
    }


def test_a_device_whose_gates_are_closed_declines_the_round_with_its_reason(
    tmp_path: Path, tiny_spec: ModelSpec
):
    grid = LocalGrid(
        build_client_app(), 1, {}, node_configs=[device_node(tmp_path, {"foreground_load": 0.9})]
    )
    message = train_message(tiny_spec, TrainSettings(local_steps=2, batch_size=8), grid.node_ids[0])

    (reply,) = grid.send_and_receive([message])

    config = reply.content[records.CONFIG]
    assert config[records.DECLINED] == "not eligible: foreground load 0.90 (pauses above 0.50)"
    assert records.ARRAYS not in reply.content and "sealed" not in reply.content
    kept = json.loads((tmp_path / "state" / "gates.json").read_text())
    assert kept["event"] == "round check" and "foreground" in kept["closed"]


def test_a_device_without_consent_refuses_before_its_gates_say_anything(tmp_path: Path, tiny_spec: ModelSpec):
    node = {**device_node(tmp_path, {"foreground_load": 0.9, "temperature_c": 49.0}), "upload-consent": False}
    grid = LocalGrid(build_client_app(), 1, {}, node_configs=[node])
    message = train_message(tiny_spec, TrainSettings(local_steps=2, batch_size=8), grid.node_ids[0])

    (reply,) = grid.send_and_receive([message])

    assert reply.has_error() and "no upload consent" in reply.error.reason
    assert "foreground" not in reply.error.reason and "49" not in reply.error.reason
    assert not (tmp_path / "state" / "gates.json").exists()  # not even looked at


@pytest.mark.parametrize("consent", [True, False])
def test_a_status_reply_says_whether_the_device_may_train_and_keeps_its_readings_without_consent(
    tmp_path: Path, consent: bool
):
    node = {**device_node(tmp_path, {"foreground_load": 0.9}), "upload-consent": consent}
    grid = LocalGrid(build_client_app(), 1, {}, node_configs=[node])
    query = Message(
        RecordDict({records.CONFIG: ConfigRecord({records.TENANT: "default"})}),
        dst_node_id=grid.node_ids[0],
        message_type=records.QUERY_UPDATE_STATUS,
    )

    (reply,) = grid.send_and_receive([query])

    said = reply.content[records.CONFIG]
    assert said[records.ELIGIBLE] is False and said[records.ACCELERATOR] == "cpu"
    assert said[records.MEMORY_BYTES] > 0
    if consent:
        assert said[records.NOT_ELIGIBLE] == "foreground load 0.90 (pauses above 0.50)"
    else:  # its load, battery and temperature are its owner's business
        assert said[records.NOT_ELIGIBLE] == "no upload consent"
        assert not (tmp_path / "state" / "gates.json").exists()


def test_a_round_given_up_at_its_deadline_sends_nothing_and_charges_only_the_steps_taken(
    tmp_path: Path, tiny_spec: ModelSpec
):
    grid = LocalGrid(
        build_client_app(), 1, {}, node_configs=[device_node(tmp_path, {"foreground_load": 0.0})]
    )
    settings = TrainSettings(local_steps=400, batch_size=8, privacy=PrivacySettings(epsilon=8.0))
    message = train_message(tiny_spec, settings, grid.node_ids[0], ttl=3.0)

    (reply,) = grid.send_and_receive([message])

    declined = reply.content[records.CONFIG][records.DECLINED]
    assert declined.startswith("gave up after") and "cannot finish before the round's deadline" in declined
    taken = int(declined.split()[3])
    assert 0 < taken < 400
    account = json.loads((tmp_path / "state" / "privacy-account.json").read_text())
    charged = {steps for cohort in account["cohorts"] for (_, _, steps) in cohort["history"]}
    assert charged == {taken}
    assert json.loads((tmp_path / "state" / "gates.json").read_text())["event"] == "round given up"


def test_a_train_message_that_arrives_past_its_deadline_is_declined_before_anything_is_loaded(
    tmp_path: Path, tiny_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
):
    # It waited 5 s in a queue with 3 s to live: no model, no data, no privacy account is touched.
    grid = LocalGrid(
        build_client_app(), 1, {}, node_configs=[device_node(tmp_path, {"foreground_load": 0.0})], queued=5.0
    )
    message = train_message(tiny_spec, TrainSettings(local_steps=2, batch_size=8), grid.node_ids[0], ttl=3.0)
    loads = []
    monkeypatch.setattr(client_app, "cached_model", lambda *a: loads.append(a))
    monkeypatch.setattr(client_app, "local_examples", lambda *a: loads.append(a))

    (reply,) = grid.send_and_receive([message])

    declined = reply.content[records.CONFIG][records.DECLINED]
    assert declined.startswith("expired: the round's deadline had passed 2.")  # 5 s queued, 3 s to live
    assert "clock is ahead" in declined
    assert records.ARRAYS not in reply.content and "sealed" not in reply.content
    assert loads == [] and not (tmp_path / "state" / "privacy-account.json").exists()
    assert not (tmp_path / "state" / "gates.json").exists()  # not even its sensors were read


def test_training_runs_at_the_configured_niceness_and_thread_cap(tmp_path: Path):
    # In a child process, so that this test process keeps its own niceness whatever happens. A thread
    # already running (a tokenizer or torch pool) is lowered too: on Linux niceness is per thread. After the
    # block every thread gets its niceness back where the OS allows it (as root), else keeps the low one.
    script = (
        "import os, threading, torch\n"
        "from fleetlora.client.pacing import low_priority\n"
        "from fleetlora.common.device_settings import DeviceSettings\n"
        "go, seen = threading.Event(), []\n"
        "def pool():\n"
        "    go.wait(); seen.append(os.getpriority(os.PRIO_PROCESS, 0))\n"
        "worker = threading.Thread(target=pool); worker.start()\n"
        "before = torch.get_num_threads()\n"
        "with low_priority(DeviceSettings(nice=12, train_threads=1)) as threads:\n"
        "    inside = (os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads(), threads)\n"
        "    go.set(); worker.join()\n"
        "print(inside, torch.get_num_threads() == before, seen[0], os.getpriority(os.PRIO_PROCESS, 0))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    after = 0 if os.geteuid() == 0 else 12
    assert out.strip() == f"(12, 1, 1) True 12 {after}"
