"""The coordinator's settings, read from a Flower run config (``[tool.flwr.app.config]``).

The keys, their types and defaults are declared once in :mod:`fleetlora.common.run_config`;
this module only turns a checked :class:`RunConfig` into what the coordinator runs, and checks
what depends on more than one key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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
from fleetlora.common.run_config import RunConfig
from fleetlora.coordinator.central_dp import CentralDPSettings
from fleetlora.coordinator.packages import PackagePolicy

DEFAULT_DB = "sqlite:///fleetlora.db"  # the operator CLI's database when neither --db nor --config is given


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
    server: ServerOptimizerSettings
    lr_decay: float  # round r trains at learning_rate × lr_decay^(r-1)
    seal_uploads: bool  # devices encrypt their deltas to this coordinator and sign them
    upload_codec: str  # how devices encode a sealed delta (fp16 or int8 to send less)
    tenant: str
    keys_dir: str  # the coordinator's keys (fleetlora coordinator keys init); "" builds no packages
    central_dp: CentralDPSettings
    package_policy: PackagePolicy
    distribute_updates: bool  # after each round, send connected devices the newest package

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
    def from_run_config(cls, config: Mapping[str, Any]) -> CoordinatorSettings:
        """Read a Flower run config (checked key by key by :class:`RunConfig`) into the settings."""
        return cls.from_run(RunConfig.from_mapping(config))

    @classmethod
    def from_run(cls, run: RunConfig) -> CoordinatorSettings:
        labels = split_names(run.labels)
        task = run.task
        if task == "auto":
            if not labels and run.data:
                labels = labels_of(load_examples(run.data))
            task = "classify" if labels else "causal-lm"
        spec = ModelSpec(
            name=run.model,
            task=task,  # type: ignore[arg-type]  # one of RunConfig.task's choices
            labels=labels,
            max_length=run.max_length,
            pooling=run.pooling,  # type: ignore[arg-type]  # one of RunConfig.pooling's choices
            seed=run.seed,
            lora=LoraSettings(
                rank=run.lora_rank,
                alpha=run.lora_alpha,
                target_modules=split_names(run.lora_targets),
                unfreeze=split_names(run.unfreeze),
                ffa=run.ffa_lora,
            ),
        )
        train = TrainSettings(
            local_steps=run.local_steps,
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            local_epochs=run.local_epochs,
            personal_head=run.personal_head,
            # Classes only exist in classification: a causal LM trains on the plain loss whatever is set.
            restricted_softmax=task == "classify" and run.restricted_softmax,
            privacy=PrivacySettings(
                epsilon=run.dp_epsilon,
                delta=run.dp_delta,
                max_grad_norm=run.dp_max_grad_norm,
                accountant=run.dp_accountant,  # type: ignore[arg-type]  # one of RunConfig's choices
                planned_rounds=run.dp_rounds or run.rounds,  # 0: the budget must last this run's rounds
            ),
        )
        server = ServerOptimizerSettings(
            name=run.server_optimizer,  # type: ignore[arg-type]  # one of RunConfig's choices
            lr=run.server_lr,
            momentum=run.server_momentum,
            beta2=run.server_beta2,
            tau=run.server_tau,
        )
        return cls(
            spec=spec,
            train=train,
            rounds=run.rounds,
            devices_per_round=run.devices_per_round,
            min_devices=run.min_devices,
            round_deadline=run.round_deadline,
            db_url=run.db,
            eval_data=run.eval_data,
            seed=run.seed,
            server=server,
            lr_decay=run.lr_decay,
            seal_uploads=run.seal_uploads,
            upload_codec=Codec.parse(run.upload_codec).name,  # validated here
            tenant=run.tenant,
            keys_dir=run.keys,
            package_policy=PackagePolicy(
                cap=run.package_cap,
                ttl=timedelta(hours=run.package_ttl_hours),
                max_error=run.package_max_error,
            ),
            distribute_updates=run.distribute_updates,
            central_dp=CentralDPSettings(
                noise_multiplier=run.central_dp_noise,
                clip_norm=run.central_dp_clip,
                delta=run.central_dp_delta,
            ),
        )
