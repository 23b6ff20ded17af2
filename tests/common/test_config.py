import pytest
from flwr.app import ConfigRecord

from fleetlora.common import records
from fleetlora.common.config import (
    LoraSettings,
    ModelSpec,
    PrivacySettings,
    TrainSettings,
    from_config,
    to_config,
)
from fleetlora.common.errors import ConfigError
from fleetlora.common.messages import Instructions


def test_instructions_round_trip_through_a_config_record():
    spec = ModelSpec("tiny", "classify", ("a", "b"), lora=LoraSettings(rank=4, target_modules=("query",)))
    sent = Instructions(spec, TrainSettings(local_steps=3), round=2, version=7, base_sha256="ab" * 32)
    received = Instructions.from_record(ConfigRecord(dict(sent.to_record())))
    assert received == sent


def test_unknown_contract_version_is_refused():
    record = Instructions(ModelSpec("tiny", "causal-lm"), TrainSettings(), 1, 1, "0" * 64).to_record()
    record[records.CONTRACT_VERSION] = records.CONTRACT + 1
    with pytest.raises(ConfigError, match="upgrade"):
        Instructions.from_record(record)


def test_missing_required_key_is_named():
    entries = to_config(ModelSpec("tiny", "causal-lm"), "model")
    del entries["model.name"]
    with pytest.raises(ConfigError, match=r"model\.name"):
        from_config(ModelSpec, entries, "model")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LoraSettings(rank=0), "rank must be >= 1"),
        (lambda: LoraSettings(dropout=1.0), "dropout"),
        (lambda: ModelSpec("tiny", "classify", ("only",)), "at least 2 labels"),
        (lambda: ModelSpec("tiny", "causal-lm", ("a", "b")), "takes no labels"),
        (lambda: ModelSpec("tiny", "regression"), "Task must be one of"),  # type: ignore[arg-type]
        (lambda: ModelSpec("tiny", "classify", ("a", "a")), "unique"),
        (lambda: ModelSpec("tiny", "classify", tuple(map(str, range(10_001)))), "At most 10000 labels"),
        (lambda: ModelSpec("tiny", "classify", ("a", "b" * 201)), "at most 200 characters"),
        (lambda: ModelSpec("tiny", "classify", ("a", "b"), pooling="max"), "Pooling must be one of"),  # type: ignore[arg-type]
        (lambda: TrainSettings(learning_rate=0), "learning_rate"),
        (lambda: TrainSettings(local_steps=0), "local_steps"),
        (lambda: TrainSettings(learning_rate=1e4), "learning_rate"),
        (lambda: PrivacySettings(planned_rounds=10**9), "planned rounds"),
        (lambda: PrivacySettings(budget="family"), "DP budget must be one of"),  # type: ignore[arg-type]
    ],
)
def test_settings_validate_themselves(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_local_epochs_replace_local_steps():
    assert TrainSettings(local_steps=7).steps_for(1000) == 7
    assert TrainSettings(local_epochs=1.0, batch_size=16).steps_for(100) == 7  # ceil(100 / 16)
    assert TrainSettings(local_epochs=0.01, batch_size=16).steps_for(10) == 1
    with pytest.raises(ConfigError, match="local_epochs"):
        TrainSettings(local_epochs=-1)


def test_under_dp_the_rate_is_lowered_to_keep_rate_times_sigma_within_the_cap():
    settings = TrainSettings(learning_rate=40.0, max_rate_noise=160.0)
    assert settings.rate_for(None) == 40.0  # without DP
    assert settings.rate_for(3.7) == 40.0  # 40 × 3.7 is within 160
    assert settings.rate_for(20.0) == 8.0
    assert TrainSettings(learning_rate=40.0).rate_for(20.0) == 40.0  # no cap sent: the rate as given
