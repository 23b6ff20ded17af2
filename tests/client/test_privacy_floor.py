"""The device's privacy floor: a coordinator's request can make training more private, never less."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from flwr.app import RecordDict

from fleetlora.client import privacy
from fleetlora.client.client_app import build_client_app
from fleetlora.client.device_state import DeviceState
from fleetlora.client.privacy_floor import FloorRefused, PrivacyFloor, configured_floor
from fleetlora.client.supernode import node_config
from fleetlora.common import records
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.delta import to_array_record, trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config
from fleetlora.common.messages import Instructions
from fleetlora.common.model import cached_model
from tests.coordinator.local_grid import LocalGrid

FLOOR = {"dp-max-epsilon": 8}


@pytest.mark.parametrize(
    ("request_", "refusal"),
    [
        (PrivacySettings(epsilon=0.0), "trains only with DP at ε ≤ 8 .* asked for DP off"),
        (PrivacySettings(epsilon=1000.0), "asks ε 1000, above this device's ε ≤ 8"),
        (PrivacySettings(epsilon=8.0, delta=1e-3), "asks δ 0.001, above this device's δ ≤ 1e-05"),
    ],
)
def test_a_request_below_the_configured_floor_is_refused_with_the_reason(request_, refusal):
    floor = configured_floor(FLOOR)
    assert floor is not None and floor.requires_dp
    with pytest.raises(FloorRefused, match=refusal):
        floor.admit(request_)


def test_a_more_private_request_is_admitted():
    floor = configured_floor({"dp-max-epsilon": 8, "dp-max-delta": 1e-6})
    assert floor is not None
    floor.admit(PrivacySettings(epsilon=8.0, delta=1e-6))
    floor.admit(PrivacySettings(epsilon=1.0, delta=1e-9))


def test_without_a_floor_or_an_account_the_device_follows_the_coordinator():
    floor = privacy.floor_of({}, None)
    assert floor == PrivacyFloor() and not floor.requires_dp
    floor.admit(PrivacySettings(epsilon=0.0))
    floor.admit(PrivacySettings(epsilon=1000.0))


def test_once_a_device_has_spent_under_dp_its_account_is_its_floor(tmp_path: Path):
    examples = load_examples("builtin")[:64]
    settings = TrainSettings(local_steps=4, batch_size=8, privacy=PrivacySettings(epsilon=4.0))
    device = DeviceState(tmp_path)
    plan = privacy.plan_round(None, settings, examples, round_number=1)
    privacy.spend(device, plan, settings.privacy, 4)
    floor = privacy.floor_of({}, privacy.load_account(device))
    with pytest.raises(FloorRefused, match="asked for DP off"):
        floor.admit(PrivacySettings(epsilon=0.0))
    with pytest.raises(FloorRefused, match="asks ε 8"):
        floor.admit(PrivacySettings(epsilon=8.0))
    floor.admit(PrivacySettings(epsilon=2.0))
    # The owner's own setting governs over the account's.
    privacy.floor_of(FLOOR, privacy.load_account(device)).admit(PrivacySettings(epsilon=8.0))


@pytest.mark.parametrize("value", [0, -1, "eight", True, math.nan])
def test_a_malformed_floor_is_a_config_error(value):
    with pytest.raises(ConfigError, match="dp-max-epsilon"):
        configured_floor({"dp-max-epsilon": value})


@pytest.mark.parametrize(("epsilon", "reason"), [(1000.0, "asks ε 1000"), (0.0, "asked for DP off")])
def test_the_device_declines_such_a_round_in_its_reply_and_spends_nothing(
    tmp_path: Path, tiny_spec: ModelSpec, epsilon: float, reason: str
):
    settings = TrainSettings(local_steps=2, batch_size=8, privacy=PrivacySettings(epsilon=epsilon))
    loaded = cached_model(tiny_spec)
    instructions = Instructions(tiny_spec, settings, round=1, version=0, base_sha256=loaded.base_sha256)
    content = RecordDict(
        {
            records.CONFIG: instructions.to_record(),
            records.ARRAYS: to_array_record(trainable_state(loaded.model)),
        }
    )
    node = {"data-path": "builtin", "state-dir": str(tmp_path), "upload-consent": True, **FLOOR}
    grid = LocalGrid(build_client_app(), 1, {}, node_configs=[node])

    (reply,) = grid.send_and_receive([grid.create_message(content, "train", grid.node_ids[0], "")])

    config = reply.content[records.CONFIG]
    assert config[records.DEVICE_ID] == f"node-{grid.node_ids[0]}"
    assert reason in str(config[records.DECLINED]) and "privacy floor" in str(config[records.DECLINED])
    assert not reply.content.array_records and not reply.content.metric_records  # no delta, no metrics
    assert not list(tmp_path.rglob("privacy-account*"))  # nothing spent


def test_a_floor_in_fleetlora_toml_reaches_the_supernodes_node_config(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text("[device]\ndp-max-epsilon = 8.0\ndp-max-delta = 1e-6\n")
    plain = tmp_path / "plain.toml"
    plain.write_text("[device]\nupload-consent = true\n")

    floored = tomllib.loads(node_config(load_host_config(config).device).replace(" ", "\n"))
    unfloored = tomllib.loads(node_config(load_host_config(plain).device).replace(" ", "\n"))

    assert configured_floor(floored) == PrivacyFloor(8.0, 1e-6, configured_floor(floored).source)
    assert configured_floor(unfloored) is None
