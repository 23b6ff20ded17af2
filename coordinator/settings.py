"""The coordinator's settings, read from a Flower run config (``[tool.flwr.app.config]``).

``fleetlora simulate`` writes the same keys, so the CLI, ``flwr run .`` and the deployed
coordinator share one reading of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from fleetlora.common.codec import Codec
from fleetlora.common.config import (
    LoraSettings,
    ModelSpec,
    PrivacySettings,
    ServerOptimizerSettings,
    TrainSettings,
    split_names,
)
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.central_dp import CentralDPSettings
from fleetlora.coordinator.packages import DEFAULT_MAX_ERROR, DEFAULT_TTL, MAX_CAP, PackagePolicy

DEFAULT_DB = "sqlite:///fleetlora.db"


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the coordinator runs: the model, the rounds, and where it keeps versions."""

    spec: ModelSpec
    train: TrainSettings
    rounds: int
    devices_per_round: int
    min_devices: int
    round_deadline: float  # seconds to wait for devices to connect and then to answer
    db_url: str
    eval_data: str  # coordinator-side evaluation set; "" for none
    seed: int
    server: ServerOptimizerSettings = dataclasses.field(default_factory=ServerOptimizerSettings)
    lr_decay: float = 1.0  # round r trains at learning_rate × lr_decay^(r-1)
    seal_uploads: bool = False  # devices encrypt their deltas to this coordinator and sign them
    upload_codec: str = "fp32+zstd"  # how devices encode a sealed delta (fp16 or int8 to send less)
    tenant: str = "default"
    keys_dir: str = ""  # the coordinator's keys (fleetlora coordinator keys init)
    central_dp: CentralDPSettings = dataclasses.field(default_factory=CentralDPSettings)
    package_policy: PackagePolicy = dataclasses.field(default_factory=PackagePolicy)
    distribute_updates: bool = True  # after each round, send connected devices the newest package

    @property
    def builds_packages(self) -> bool:
        """Packages are signed with the coordinator's key, so they are built when its keys are set."""
        return bool(self.keys_dir)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}.")
        if not 1 <= self.min_devices <= self.devices_per_round:
            raise ConfigError(
                f"Need 1 <= min-devices ({self.min_devices}) <= devices-per-round ({self.devices_per_round})."
            )
        if self.round_deadline <= 0:
            raise ConfigError(f"round-deadline must be > 0 seconds, got {self.round_deadline}.")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr-decay must be in (0, 1], got {self.lr_decay}.")
        if self.seal_uploads and not self.keys_dir:
            raise ConfigError(
                "seal-uploads needs the coordinator's keys: set `keys` to the `keys init` folder."
            )
        if self.train.personal_head and self.spec.task != "classify":
            raise ConfigError("personal-head keeps a classification head per device; this task has none.")

    def train_for_round(self, round_number: int) -> TrainSettings:
        """The local training settings sent in ``round_number``, with the decayed learning rate."""
        lr = self.train.learning_rate * self.lr_decay ** (round_number - 1)
        return dataclasses.replace(self.train, learning_rate=lr)

    @classmethod
    def from_run_config(cls, config: Mapping[str, bool | int | float | str]) -> CoordinatorSettings:
        def get(key: str, default: bool | int | float | str) -> bool | int | float | str:
            return config.get(key, default)

        seed = int(get("seed", 0))
        labels = split_names(str(get("labels", "")))
        task = str(get("task", "auto"))
        if task == "auto":
            if not labels and get("data", ""):
                labels = labels_of(load_examples(str(get("data", ""))))
            task = "classify" if labels else "causal-lm"
        spec = ModelSpec(
            name=str(get("model", "minilm")),
            task=task,  # type: ignore[arg-type]  # validated by ModelSpec
            labels=labels,
            max_length=int(get("max-length", ModelSpec.max_length)),
            pooling=str(get("pooling", ModelSpec.pooling)),  # type: ignore[arg-type]  # validated
            seed=seed,
            lora=LoraSettings(
                rank=int(get("lora-rank", 8)),
                alpha=int(get("lora-alpha", 16)),
                target_modules=split_names(str(get("lora-targets", ""))),
                unfreeze=split_names(str(get("unfreeze", ""))),
                ffa=bool(get("ffa-lora", False)),
            ),
        )
        train = TrainSettings(
            local_steps=int(get("local-steps", TrainSettings.local_steps)),
            batch_size=int(get("batch-size", TrainSettings.batch_size)),
            learning_rate=float(get("learning-rate", TrainSettings.learning_rate)),
            local_epochs=float(get("local-epochs", TrainSettings.local_epochs)),
            personal_head=bool(get("personal-head", TrainSettings.personal_head)),
            # Classes only exist in classification: a causal LM trains on the plain loss whatever is set.
            restricted_softmax=task == "classify"
            and bool(get("restricted-softmax", TrainSettings.restricted_softmax)),
            privacy=PrivacySettings(
                epsilon=float(get("dp-epsilon", PrivacySettings.epsilon)),
                delta=float(get("dp-delta", PrivacySettings.delta)),
                max_grad_norm=float(get("dp-max-grad-norm", PrivacySettings.max_grad_norm)),
                accountant=str(get("dp-accountant", PrivacySettings.accountant)),  # type: ignore[arg-type]
                # 0: the budget must last this run's rounds.
                planned_rounds=int(get("dp-rounds", 0)) or int(get("rounds", 3)),
            ),
        )
        defaults = ServerOptimizerSettings()
        server = ServerOptimizerSettings(
            name=str(get("server-optimizer", defaults.name)),  # type: ignore[arg-type]  # validated
            lr=float(get("server-lr", defaults.lr)),
            momentum=float(get("server-momentum", defaults.momentum)),
            beta2=float(get("server-beta2", defaults.beta2)),
            tau=float(get("server-tau", defaults.tau)),
        )
        return cls(
            spec=spec,
            train=train,
            rounds=int(get("rounds", 3)),
            devices_per_round=int(get("devices-per-round", 4)),
            min_devices=int(get("min-devices", 2)),
            round_deadline=float(get("round-deadline", 600.0)),
            db_url=str(get("db", DEFAULT_DB)),
            eval_data=str(get("eval-data", "")),
            seed=seed,
            server=server,
            lr_decay=float(get("lr-decay", 1.0)),
            seal_uploads=bool(get("seal-uploads", False)),
            upload_codec=Codec.parse(str(get("upload-codec", "fp32+zstd"))).name,  # validated here
            tenant=str(get("tenant", "default")),
            keys_dir=str(get("keys", "")),
            package_policy=PackagePolicy(
                cap=float(get("package-cap", MAX_CAP)),
                ttl=timedelta(hours=float(get("package-ttl-hours", DEFAULT_TTL.total_seconds() / 3600))),
                max_error=float(get("package-max-error", DEFAULT_MAX_ERROR)),
            ),
            distribute_updates=bool(get("distribute-updates", True)),
            central_dp=CentralDPSettings(
                noise_multiplier=float(get("central-dp-noise", 0.0)),
                clip_norm=float(get("central-dp-clip", 1.0)),
                delta=float(get("central-dp-delta", 1e-5)),
            ),
        )
