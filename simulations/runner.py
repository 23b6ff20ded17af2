"""Run a simulated fleet on Flower's Simulation Engine and collect what each round did.

Everything that can be wrong with the inputs (data file, model, settings, partition) is checked
before the engine starts, so a mistake costs a second and a one-line error, not a Ray start-up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlora.client.client_app import build_client_app
from fleetlora.client.device_state import DeviceState
from fleetlora.client.enroll import ensure_device_key
from fleetlora.common.config import ModelSpec, PrivacySettings, ServerOptimizerSettings, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.data.partition import PartitionScheme, partition_indices
from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import COORDINATOR_HPKE_KEY
from fleetlora.common.model import cached_model
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.packages import MAX_CAP
from fleetlora.coordinator.registry import Registry
from fleetlora.coordinator.rounds import FederationObserver, FederationStart, RoundOutcome
from fleetlora.coordinator.server_app import build_server_app
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.simulations.results import summarize


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated fleet. Defaults: MiniLM intent classification on the built-in corpus."""

    devices: int = 8
    rounds: int = 3
    model: str = "minilm"
    data: str = "builtin"
    eval_data: str | None = None  # None: the built-in test split for builtin data, else none
    partition: str = "dirichlet:1.0"
    seed: int = 0
    out: Path = Path("runs/latest")
    db: str | None = None  # None: sqlite:///OUT/fleetlora.db
    devices_per_round: int = 4
    min_devices: int = 2
    local_steps: int = TrainSettings.local_steps
    batch_size: int = TrainSettings.batch_size
    learning_rate: float = TrainSettings.learning_rate
    local_epochs: float = TrainSettings.local_epochs
    lr_decay: float = 1.0
    max_length: int = 48
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: str = ""
    unfreeze: str = ""
    ffa_lora: bool = False
    pooling: str = ModelSpec.pooling
    personal_head: bool = TrainSettings.personal_head
    restricted_softmax: bool = TrainSettings.restricted_softmax
    dp_epsilon: float = PrivacySettings.epsilon
    dp_delta: float = PrivacySettings.delta
    dp_max_grad_norm: float = PrivacySettings.max_grad_norm
    dp_accountant: str = PrivacySettings.accountant
    dp_rounds: int = 0  # 0: --rounds
    central_dp_noise: float = 0.0
    central_dp_clip: float = 1.0
    seal_uploads: bool = True  # keys are made under OUT/keys and every simulated device is enrolled
    stream_records: int = 0  # > 0: each device's partition arrives this many records a round (its corpus)
    upload_codec: str = "fp32+zstd"  # sealed deltas: fp16+zstd or int8+zstd send less, lossily
    tenant: str = "default"
    package_cap: float = MAX_CAP  # update packages: at most this share of the base model's bytes
    distribute_updates: bool = True  # after each round, bring every device to the new version
    server_optimizer: str = ServerOptimizerSettings.name
    server_lr: float = ServerOptimizerSettings.lr
    server_momentum: float = ServerOptimizerSettings.momentum
    server_beta2: float = ServerOptimizerSettings.beta2
    server_tau: float = ServerOptimizerSettings.tau
    round_deadline: float = 600.0
    client_cpus: int = 2  # Flower's default: one virtual device at a time on 2 cores

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {self.devices}.")
        if self.client_cpus < 1:
            raise ConfigError(f"--client-cpus must be >= 1, got {self.client_cpus}.")

    def run_config(self) -> dict[str, bool | int | float | str]:
        """The Flower run config both apps read (the keys of ``[tool.flwr.app.config]``)."""
        if self.eval_data is not None:
            eval_data = self.eval_data
        else:
            eval_data = "builtin-test" if self.data == "builtin" else ""
        per_round = min(self.devices_per_round, self.devices)
        return {
            "model": self.model,
            "data": self.data,
            "eval-data": eval_data,
            "partition": self.partition,
            "seed": self.seed,
            "rounds": self.rounds,
            "devices-per-round": per_round,
            "min-devices": min(self.min_devices, per_round),
            "round-deadline": self.round_deadline,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "local-epochs": self.local_epochs,
            "lr-decay": self.lr_decay,
            "max-length": self.max_length,
            "lora-rank": self.lora_rank,
            "lora-alpha": self.lora_alpha,
            "lora-targets": self.lora_targets,
            "unfreeze": self.unfreeze,
            "ffa-lora": self.ffa_lora,
            "pooling": self.pooling,
            "personal-head": self.personal_head,
            "restricted-softmax": self.restricted_softmax,
            "dp-epsilon": self.dp_epsilon,
            "dp-delta": self.dp_delta,
            "dp-max-grad-norm": self.dp_max_grad_norm,
            "dp-accountant": self.dp_accountant,
            "dp-rounds": self.dp_rounds,
            "central-dp-noise": self.central_dp_noise,
            "central-dp-clip": self.central_dp_clip,
            "seal-uploads": self.seal_uploads,
            "stream-records": self.stream_records,
            "upload-codec": self.upload_codec,
            "tenant": self.tenant,
            "package-cap": self.package_cap,
            "distribute-updates": self.distribute_updates,
            "keys": str((self.out / "keys").resolve()),
            "device-state": str((self.out / "devices").resolve()),
            "server-optimizer": self.server_optimizer,
            "server-lr": self.server_lr,
            "server-momentum": self.server_momentum,
            "server-beta2": self.server_beta2,
            "server-tau": self.server_tau,
            "db": self.db or f"sqlite:///{(self.out / 'fleetlora.db').resolve()}",
        }


@dataclass
class ResultCollector:
    """Keeps what the federation reports, for results.json; forwards to another observer."""

    forward: FederationObserver | None = None
    start: FederationStart | None = None
    outcomes: list[RoundOutcome] = field(default_factory=list)

    def started(self, start: FederationStart) -> None:
        self.start = start
        if self.forward:
            self.forward.started(start)

    def round_finished(self, outcome: RoundOutcome) -> None:
        self.outcomes.append(outcome)
        if self.forward:
            self.forward.round_finished(outcome)


def preflight(config: SimulationConfig) -> CoordinatorSettings:
    """Check inputs and build the model once (the coordinator reuses it) before the engine starts."""
    run_config = config.run_config()
    settings = CoordinatorSettings.from_run_config(run_config)
    examples = load_examples(config.data)
    partition_indices(
        [e.label for e in examples], config.devices, PartitionScheme.parse(config.partition), config.seed
    )
    if settings.eval_data:
        load_examples(settings.eval_data)
    cached_model(settings.spec)
    return settings


def simulate(
    config: SimulationConfig, observer: FederationObserver | None = None, *, verbose: bool = False
) -> dict[str, Any]:
    """Run the fleet; return (and write to ``OUT/results.json``) the per-round results."""
    from flwr.simulation import run_simulation  # imports Ray: only when a simulation really runs

    settings = preflight(config)
    config.out.mkdir(parents=True, exist_ok=True)
    run_config = config.run_config()
    provision_keys(config, settings)  # the signing key for update packages is needed even unsealed
    collector = ResultCollector(forward=observer)
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    run_simulation(
        server_app=build_server_app(run_config, collector),
        client_app=build_client_app(run_config),
        num_supernodes=config.devices,
        backend_config={
            "client_resources": {"num_cpus": config.client_cpus, "num_gpus": 0.0},
            "init_args": {"logging_level": level, "log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )
    if collector.start is None:
        raise ConfigError("The simulation ended before the coordinator started; rerun with --verbose.")
    results = {
        "config": {**asdict(config), "out": str(config.out), "run_config": run_config},
        "base_model_bytes": collector.start.base_model_bytes,
        "trainable_share": collector.start.trainable_share,
        "lineage": collector.start.lineage,
        "initial": {
            "version": collector.start.version.label,
            "round": collector.start.version.round,
            "resumed": collector.start.resumed,
            "metrics": collector.start.version.metrics,
        },
        "rounds": [summarize(o) for o in collector.outcomes],
        "devices": device_privacy(collector.outcomes),
    }
    (config.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def device_privacy(outcomes: list[RoundOutcome]) -> dict[str, dict[str, float]]:
    """Each DP device's spend after its last round in this run (empty without DP)."""
    latest: dict[str, dict[str, float]] = {}
    for outcome in outcomes:
        for spend in outcome.privacy:
            latest[spend.device_id] = {"epsilon": spend.epsilon, "delta": spend.delta, "round": outcome.round}
    return dict(sorted(latest.items()))


def provision_keys(config: SimulationConfig, settings: CoordinatorSettings) -> None:
    """What an operator and each device do once before a fleet runs: coordinator keys (kept if there),
    a signing key in every simulated device's state folder, each public key enrolled."""
    keys = Path(settings.keys_dir)
    if not (keys / COORDINATOR_HPKE_KEY).exists():
        init_keys(keys)
    registry = Registry(Database(settings.db_url).initialize())
    for partition in range(config.devices):
        device = DeviceState.locate({"partition-id": partition}, config.run_config())
        registry.enroll_device(f"partition-{partition}", settings.tenant, ensure_device_key(device))
