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
from typing import Any, TypeVar

from fleetlora.common.codec import Codec
from fleetlora.common.config import (
    DEFAULT_SERVER_MOMENTUM,
    REGIME_DEFAULTS,
    ForgettingSettings,
    LoraSettings,
    ModelSpec,
    PrivacySettings,
    ServerOptimizerSettings,
    TrainSettings,
    default_server_optimizer,
    split_names,
)
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.errors import ConfigError
from fleetlora.common.run_config import RunConfig
from fleetlora.coordinator.central_dp import CentralDPSettings
from fleetlora.coordinator.influence import InfluenceSettings, default_aggregator
from fleetlora.coordinator.packages import PackagePolicy


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
    log_dir: str  # the coordinator's JSON log folder; "" writes none
    eval_data: str  # coordinator-side evaluation set; "" for none
    key_set: str  # a key-knowledge file pinned for the tenant when the run starts; "" pins none
    retention_threshold: float  # a version below this × the best earlier key score is held; 0: never
    seed: int
    sampling: str  # "seeded": each round's devices follow seed and round; "random": OS entropy
    over_select: float  # extra share sampled beyond devices-per-round; the round closes at devices-per-round
    server: ServerOptimizerSettings
    lr_decay: float  # round r trains at learning_rate × lr_decay^(r-1)
    seal_uploads: bool  # devices encrypt their deltas to this coordinator and sign them
    upload_codec: str  # how devices encode a sealed delta (fp16 or int8 to send less)
    tenant: str
    keys_dir: str  # the coordinator's keys (fleetlora coordinator keys init); "" builds no packages
    central_dp: CentralDPSettings
    package_policy: PackagePolicy
    distribute_updates: bool  # after each round, send connected devices the newest package
    distribute_to: str  # "connected": every online device; "sampled": the round's devices only
    # dp-rounds 0: each device's DP noise is planned for the rounds the schedule gives it (Sampler)
    plan_dp_by_schedule: bool
    influence: InfluenceSettings  # how far one device can move a round (coordinator/influence.py)

    @property
    def sampling_seed(self) -> int | None:
        """The seed rounds sample devices with; None draws from the OS's entropy."""
        return self.seed if self.sampling == "seeded" else None

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
        if self.influence.trim is not None and self.central_dp.enabled:
            raise ConfigError(
                f"aggregator {self.influence.aggregator!r} cannot be combined with central DP, whose noise "
                'is calibrated to a clipped sum: use aggregator = "mean" or central-dp-noise = 0.'
            )
        if self.train.personal_head and self.spec.task != "classify":
            raise ConfigError("personal-head keeps a classification head per device; this task has none.")
        if self.train.forgetting.distill_weight and self.spec.task != "classify":
            raise ConfigError(
                "distill-weight distils a classifier's outputs; a causal LM is not supported: set "
                "distill-weight = 0 (replay and EWC work for both)."
            )

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
        regime = run.regime
        if regime == "auto":
            head_fits = task == "classify" and run.pooling == "mean" and not run.unfreeze and not run.ffa_lora
            regime = "head" if head_fits else "lora"
        defaults = REGIME_DEFAULTS[regime]
        spec = fill_from_run(
            ModelSpec,
            run,
            name=run.model,
            task=task,
            labels=labels,
            regime=regime,
            lora=fill_from_run(
                LoraSettings,
                run,
                prefix="lora_",
                target_modules=split_names(run.lora_targets),
                unfreeze=split_names(run.unfreeze),
                ffa=run.ffa_lora,
            ),
        )
        # 0 dp-rounds: the budget must last this run's rounds.
        privacy = fill_from_run(
            PrivacySettings,
            run,
            prefix="dp_",
            planned_rounds=run.dp_rounds or run.rounds,
            max_grad_norm=run.dp_max_grad_norm or defaults.max_grad_norm,
        )
        # Classes only exist in classification: a causal LM trains on the plain loss whatever is set.
        restricted = task == "classify" and run.restricted_softmax
        # Steps or passes: whichever is set; neither, the regime's.
        local_steps, local_epochs = run.local_steps, run.local_epochs
        if not local_steps and not local_epochs:
            local_steps, local_epochs = defaults.local_steps, defaults.local_epochs
        train = fill_from_run(
            TrainSettings,
            run,
            privacy=privacy,
            restricted_softmax=restricted,
            local_steps=local_steps or defaults.local_steps,
            local_epochs=local_epochs,
            batch_size=run.batch_size or defaults.batch_size,
            learning_rate=run.learning_rate
            or (defaults.learning_rate if privacy.enabled else defaults.learning_rate_without_dp),
            # Only the regime's own rate adapts to the noise; a rate the operator set is kept.
            max_rate_noise=0.0 if run.learning_rate else defaults.max_rate_noise,
            forgetting=fill_from_run(ForgettingSettings, run),
        )
        server = run.server_optimizer
        if server == "auto":
            server = default_server_optimizer(regime, privacy.epsilon, run.devices_per_round)
        momentum = run.server_momentum or DEFAULT_SERVER_MOMENTUM[server]
        aggregator = run.aggregator
        if aggregator == "auto":
            aggregator = default_aggregator(run.devices_per_round, central_dp=run.central_dp_noise > 0)
        return fill_from_run(
            cls,
            run,
            spec=spec,
            train=train,
            server=fill_from_run(
                ServerOptimizerSettings, run, prefix="server_", name=server, momentum=momentum
            ),
            db_url=run.db,
            log_dir=run.log_dir,
            upload_codec=Codec.parse(run.upload_codec).name,  # validated here
            keys_dir=run.keys,
            plan_dp_by_schedule=run.dp_rounds == 0,
            influence=fill_from_run(InfluenceSettings, run, aggregator=aggregator),
            package_policy=fill_from_run(
                PackagePolicy, run, prefix="package_", ttl=timedelta(hours=run.package_ttl_hours)
            ),
            central_dp=CentralDPSettings(
                noise_multiplier=run.central_dp_noise,
                clip_norm=run.central_dp_clip,
                delta=run.central_dp_delta,
            ),
        )


_T = TypeVar("_T")


def fill_from_run(target: type[_T], run: RunConfig, *, prefix: str = "", **explicit: Any) -> _T:
    """``target`` built from the run-config keys named like its fields (after ``prefix``), then ``explicit``.

    A setting whose key matches its field (``local-steps`` → ``TrainSettings.local_steps``) needs no
    line here; the caller passes what is renamed, converted or derived. The target validates.
    """
    named = {
        f.name: getattr(run, prefix + f.name)
        for f in dataclasses.fields(target)  # type: ignore[arg-type]  # every target is a dataclass
        if hasattr(run, prefix + f.name)
    }
    return target(**{**named, **explicit})
