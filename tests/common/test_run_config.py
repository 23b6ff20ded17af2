"""The run-config table: one declaration per key, and everything derived from it agrees with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config
from fleetlora.common.run_config import BY_KEY, DEFAULTS, SETTINGS, Group, RunConfig
from fleetlora.simulations.cli import parse_run_config
from fleetlora.simulations.runner import SimulationConfig

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())


def test_pyproject_run_config_equals_the_tables_defaults_key_for_key():
    declared = PYPROJECT["tool"]["flwr"]["app"]["config"]

    assert declared == DEFAULTS.to_mapping()


def test_every_key_has_help_a_group_and_a_default_of_its_type():
    for setting in SETTINGS:
        assert setting.help.strip(), setting.key
        assert isinstance(setting.group, Group)
        assert type(setting.default) is setting.type, setting.key


def test_simulate_help_lists_every_key_of_the_table():
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}, terminal_width=200)

    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"--([a-z0-9-]+)", result.output))
    missing = {s.key for s in SETTINGS} - listed
    assert not missing, f"not in `simulate --help`: {sorted(missing)}"


def test_an_unknown_key_is_refused_by_name():
    with pytest.raises(ConfigError, match="'round'"):
        RunConfig.from_mapping({"round": 3})


def test_a_value_of_the_wrong_type_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="'rounds' expects int"):
        RunConfig.from_mapping({"rounds": "3"})
    with pytest.raises(ConfigError, match="'seal-uploads' expects bool"):
        RunConfig.from_mapping({"seal-uploads": 1})


def test_an_int_is_a_fine_float_and_keeps_the_float_type():
    run = RunConfig.from_mapping({"round-deadline": 30})

    assert run.round_deadline == 30.0 and type(run.round_deadline) is float


def test_choices_and_checks_name_every_bad_key_at_once():
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_mapping({"server-optimizer": "sgd", "stream-records": -1, "dp-epsilon": float("nan")})

    message = str(raised.value)
    assert "server-optimizer" in message and "stream-records" in message and "dp-epsilon" in message


def test_flowers_run_config_form_parses_toml_values():
    parsed = parse_run_config('rounds=2 model="tiny" learning-rate=0.01 seal-uploads=false')

    assert parsed == {"rounds": 2, "model": "tiny", "learning-rate": 0.01, "seal-uploads": False}
    with pytest.raises(ConfigError, match="TOML"):
        parse_run_config("model=tiny")  # text must be quoted, as flwr run wants it


def test_a_simulation_writes_only_table_keys_and_its_own_defaults(tmp_path: Path):
    config = SimulationConfig(devices=3, out=tmp_path, settings={"devices-per-round": 5, "model": "tiny"})

    written = config.run_config()
    assert set(written) == set(BY_KEY)
    assert written["devices-per-round"] == 3 and written["min-devices"] == 2  # no more than the fleet
    assert written["seal-uploads"] is True and written["keys"] == str((tmp_path / "keys").resolve())
    assert written["model"] == "tiny" and written["eval-data"] == "builtin-test"


def test_a_simulation_with_a_bad_key_fails_before_anything_starts(tmp_path: Path):
    with pytest.raises(ConfigError, match="'local-step'"):
        SimulationConfig(out=tmp_path, settings={"local-step": 3})


def test_a_mistyped_federation_key_in_a_host_config_is_named_with_the_file(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text('[federation]\nmodel = "tiny"\ndevices-per-rond = 2\n')

    with pytest.raises(ConfigError, match=r"fleetlora.toml \[federation\].*'devices-per-rond'"):
        load_host_config(config)


# Keys only devices read: they shape what a device trains on, not the coordinator's settings.
DEVICE_ONLY = {
    "data", "partition", "holdout", "stream-records", "stream-phases", "phase-rounds", "simulated-consent",
    "device-state",
    "simulated-dropout", "simulated-stragglers", "straggler-seconds",  # the simulated network's
}  # fmt: skip
OTHER_TEXT = {
    "model": "tiny", "task": "causal-lm", "labels": "a,b", "lora-targets": "query", "unfreeze": "layer.0",
    "pooling": "transformers", "eval-data": "", "tenant": "other", "db": "sqlite://", "keys": "elsewhere",
    "upload-codec": "int8+zstd", "server-optimizer": "fedadam", "dp-accountant": "prv", "sampling": "random",
    "regime": "lora", "dp-budget": "device", "aggregator": "median", "log-dir": "logs", "key-set": "key.csv",
    "train-on": "arrivals", "distribute-to": "sampled",
}  # fmt: skip
# Keys whose other value needs another key set with it (a replay share only means something on arrivals).
COMPANIONS = {"replay-share": {"train-on": "arrivals"}}


def _other_value(setting):
    if setting.type is bool:
        return not setting.default
    if setting.type is int:
        return setting.default + 1
    if setting.type is float:
        return setting.default / 2 if setting.default else 0.25
    return OTHER_TEXT[setting.key]


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.key not in DEVICE_ONLY], ids=lambda s: s.key)
def test_every_coordinator_key_reaches_the_coordinators_settings(setting):
    from fleetlora.coordinator.settings import CoordinatorSettings

    base = {"keys": "keys", "min-devices": 1}  # seal-uploads needs keys; min-devices may move either way
    changed = {**base, **COMPANIONS.get(setting.key, {}), setting.key: _other_value(setting)}

    assert CoordinatorSettings.from_run_config(changed) != CoordinatorSettings.from_run_config(base)


def test_auto_regime_trains_the_head_for_mean_pooled_classification_and_lora_otherwise():
    from fleetlora.coordinator.settings import CoordinatorSettings

    def regime(**config):
        return CoordinatorSettings.from_run_config({"model": "tiny", **config}).spec.regime

    assert regime(labels="a,b") == "head"
    assert regime(task="causal-lm") == "lora"
    assert regime(labels="a,b", pooling="transformers") == "lora"
    assert regime(labels="a,b", **{"ffa-lora": True}) == "lora"
    assert regime(labels="a,b", unfreeze="layer.0") == "lora"
    assert regime(labels="a,b", regime="lora") == "lora"


def test_zero_training_keys_take_the_regimes_defaults_and_set_ones_win():
    from fleetlora.common.config import REGIME_DEFAULTS
    from fleetlora.coordinator.settings import CoordinatorSettings

    def train(**config):
        return CoordinatorSettings.from_run_config({"model": "tiny", "labels": "a,b", **config}).train

    head, lora = REGIME_DEFAULTS["head"], REGIME_DEFAULTS["lora"]
    default = train()
    assert (default.learning_rate, default.batch_size, default.local_epochs) == (
        head.learning_rate,
        head.batch_size,
        head.local_epochs,
    )
    assert default.privacy.max_grad_norm == head.max_grad_norm and default.privacy.epsilon == 8.0
    as_lora = train(regime="lora")
    assert (as_lora.learning_rate, as_lora.batch_size, as_lora.local_steps, as_lora.local_epochs) == (
        lora.learning_rate,
        lora.batch_size,
        lora.local_steps,
        0.0,
    )
    assert train(**{"dp-epsilon": 0.0}).learning_rate == head.learning_rate_without_dp
    assert default.max_rate_noise == head.max_rate_noise  # the regime's own rate adapts to the noise
    assert train(**{"learning-rate": 2.0}).max_rate_noise == 0.0  # a rate the operator set is kept
    steps = train(**{"local-steps": 7, "batch-size": 32, "learning-rate": 2.0, "dp-max-grad-norm": 1.5})
    assert (steps.local_steps, steps.local_epochs, steps.batch_size, steps.learning_rate) == (7, 0.0, 32, 2.0)
    assert steps.privacy.max_grad_norm == 1.5


def test_the_server_optimizer_is_fedavgm_for_the_private_head_regime_and_fedavg_otherwise():
    from fleetlora.coordinator.settings import CoordinatorSettings

    def server(**config):
        config = {"model": "tiny", "labels": "a,b", "devices-per-round": 20, **config}
        settings = CoordinatorSettings.from_run_config(config).server
        return settings.name, settings.momentum

    assert server() == ("fedavgm", 0.5)  # the default: head regime, ε 8
    assert server(**{"dp-epsilon": 3.0}) == ("fedavgm", 0.5)
    assert server(**{"dp-epsilon": 2.0}) == ("fedavg", 0.0)  # the noise outweighs momentum's gain
    assert server(**{"devices-per-round": 5}) == ("fedavg", 0.0)  # so does a mean over few devices
    assert server(**{"dp-epsilon": 0.0}) == ("fedavg", 0.0)
    assert server(regime="lora") == ("fedavg", 0.0)
    assert server(**{"server-optimizer": "fedadam"}) == ("fedadam", 0.9)  # each optimizer's own default
    assert server(**{"server-optimizer": "fedavgm", "server-momentum": 0.8}) == ("fedavgm", 0.8)


def test_the_aggregator_trims_from_ten_devices_a_round_unless_central_dp_is_on():
    from fleetlora.coordinator.settings import CoordinatorSettings

    def aggregator(**config) -> str:
        return CoordinatorSettings.from_run_config(config).influence.aggregator

    assert aggregator() == "trimmed-mean"  # the default fleet: 20 a round
    assert aggregator(**{"devices-per-round": 9}) == "mean"
    assert aggregator(**{"devices-per-round": 10}) == "trimmed-mean"
    assert aggregator(**{"central-dp-noise": 1.0}) == "mean"  # its noise is calibrated to the mean's sum
    assert aggregator(**{"aggregator": "median", "devices-per-round": 3}) == "median"  # an explicit choice
