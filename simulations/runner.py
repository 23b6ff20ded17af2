"""Run a simulated fleet on Flower's Simulation Engine and collect what each round did.

Everything that can be wrong with the inputs (data file, model, settings, partition) is checked
before the engine starts, so a mistake costs a second and a one-line error, not a Ray start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlora.client.client_app import build_client_app
from fleetlora.client.device_state import DeviceState
from fleetlora.client.enroll import ensure_device_key
from fleetlora.common.data import load_examples
from fleetlora.common.data.partition import PartitionScheme, partition_indices, phase_labels
from fleetlora.common.errors import ConfigError
from fleetlora.common.keys import COORDINATOR_HPKE_KEY
from fleetlora.common.model import cached_model
from fleetlora.common.run_config import DEFAULTS, RunConfig, RunValue
from fleetlora.coordinator.db import without_password
from fleetlora.coordinator.key_sets import read_key_set
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.rounds import FederationObserver, FederationStart, RoundOutcome
from fleetlora.coordinator.server_app import build_server_app
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import Storage
from fleetlora.simulations.churn import Churn, ChurnGrid
from fleetlora.simulations.peak_memory import watched
from fleetlora.simulations.results import summarize, with_earlier_rounds
from fleetlora.simulations.scenario import (
    SCENARIOS,
    PhaseVersions,
    configuration_name,
    incremental_settings,
    plot_phases,
    score_phases,
)

RAY_ADDRESS = re.compile(r"auto|(?:ray://)?(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated fleet: its size, where results go, and the run-config keys a caller set.

    ``settings`` holds only what was set, keyed as in ``[tool.flwr.app.config]`` (as
    ``flwr run --run-config`` takes it); every other key takes the simulation's own default
    (:meth:`simulation_defaults`), then the table's (:mod:`fleetlora.common.run_config`).
    Defaults: MiniLM intent classification on the built-in corpus.
    """

    devices: int = 8
    out: Path = Path("runs/latest")
    client_cpus: int = 2  # Flower's default: one virtual device at a time on 2 cores
    ray_address: str = ""  # an existing Ray cluster's head (HOST:PORT or "auto"); "": Ray of its own
    settings: Mapping[str, RunValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {self.devices}.")
        if self.client_cpus < 1:
            raise ConfigError(f"--client-cpus must be >= 1, got {self.client_cpus}.")
        if self.ray_address and not RAY_ADDRESS.fullmatch(self.ray_address):
            raise ConfigError(
                f"--ray-address must be HOST:PORT (as `ray start --head` prints it), ray://HOST:PORT or "
                f"auto; got {self.ray_address!r}."
            )
        self.run  # noqa: B018  # checks every key now, before anything starts

    def simulation_defaults(self) -> dict[str, RunValue]:
        """Where a simulation differs from the table: it seals (keys are made under OUT/keys and
        every device is enrolled), sends new versions to the round's devices only, and keeps its
        database, keys and device state under ``out``."""
        data = self.settings.get("data", DEFAULTS.data)
        return {
            "seal-uploads": True,
            "distribute-to": "sampled",  # a virtual device not in the round would apply packages for nothing
            "eval-data": "builtin-test" if data == "builtin" else "",
            "db": f"sqlite:///{(self.out / 'fleetlora.db').resolve()}",
            "keys": str((self.out / "keys").resolve()),
            "device-state": str((self.out / "devices").resolve()),
        }

    @property
    def run(self) -> RunConfig:
        """The whole run config, checked; a round samples no more devices than the fleet has."""
        config = {**DEFAULTS.to_mapping(), **self.simulation_defaults(), **self.settings}
        run = RunConfig.from_mapping(config)
        per_round = min(run.devices_per_round, self.devices)
        return dataclasses.replace(
            run, devices_per_round=per_round, min_devices=min(run.min_devices, per_round)
        )

    def run_config(self) -> dict[str, RunValue]:
        """The Flower run config both apps read (the keys of ``[tool.flwr.app.config]``)."""
        return self.run.to_mapping()


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
    run = config.run
    settings = CoordinatorSettings.from_run(run)
    examples = load_examples(run.data)
    partition_indices(
        [e.label for e in examples], config.devices, PartitionScheme.parse(run.partition), run.seed
    )
    if settings.eval_data:
        load_examples(settings.eval_data)
    if settings.key_set:
        read_key_set(Path(settings.key_set))
    if run.stream_phases:
        phase_labels(settings.spec.labels, run.stream_phases, settings.spec.seed)  # enough labels for them
    cached_model(settings.spec)
    return settings


def simulate(
    config: SimulationConfig,
    observer: FederationObserver | None = None,
    *,
    verbose: bool = False,
    scenario: str | None = None,
) -> dict[str, Any]:
    """Run the fleet; return (and write to ``OUT/results.json``) the per-round results.

    ``scenario="incremental"``: a class-incremental stream, scored phase by phase (:mod:`.scenario`);
    ``config`` comes from :func:`with_scenario`.
    """
    from flwr.simulation import run_simulation  # imports Ray: only when a simulation really runs

    phases: PhaseVersions | None = None
    if scenario is not None:
        if not config.settings.get("stream-phases"):
            raise ConfigError("A scenario's settings come from with_scenario(); call it first.")
        observer = phases = PhaseVersions(forward=observer)
    settings = preflight(config)
    check_ray_cluster(config.ray_address)
    config.out.mkdir(parents=True, exist_ok=True)
    run_config = config.run_config()
    provision_keys(config, settings)  # the signing key for update packages is needed even unsealed
    collector = ResultCollector(forward=observer)
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    run = config.run
    churn = Churn(run.simulated_dropout, run.simulated_stragglers, run.straggler_seconds, run.seed)
    network = functools.partial(ChurnGrid, churn=churn) if churn.any else None
    with watched() as memory:
        run_simulation(
            server_app=build_server_app(run_config, collector, network=network),
            client_app=build_client_app(run_config),
            num_supernodes=config.devices,
            backend_config={
                "client_resources": {"num_cpus": config.client_cpus, "num_gpus": 0.0},
                "init_args": {
                    "logging_level": level,
                    "log_to_driver": verbose,
                    **({"address": config.ray_address} if config.ray_address else {}),
                },
            },
            verbose_logging=verbose,
        )
    if collector.start is None:
        raise ConfigError("The simulation ended before the coordinator started; rerun with --verbose.")
    results = {
        "config": {
            "devices": config.devices,
            "out": str(config.out),
            "client_cpus": config.client_cpus,
            # A database URL's password never reaches a file that is shared with results.
            "settings": {k: without_password(str(v)) if k == "db" else v for k, v in config.settings.items()},
            "run_config": {k: without_password(str(v)) if k == "db" else v for k, v in run_config.items()},
        },
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
        "memory": memory.as_dict(),  # this run's, in MiB (simulations/peak_memory.py)
    }
    if phases is not None:
        results.update(scored_scenario(config, settings, phases))
    path = config.out / "results.json"
    results = with_earlier_rounds(path, results)
    path.write_text(json.dumps(results, indent=2, default=str))
    return results


def check_ray_cluster(address: str, timeout: float = 5.0) -> None:
    """A cluster named by HOST:PORT answers there, or a one-line error says so before Ray waits on it."""
    match = RAY_ADDRESS.fullmatch(address)
    if not address or address == "auto" or match is None:
        return
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"No Ray cluster answers at {address} ({exc.strerror or exc}): start its head with "
            f"`ray start --head --port {port}`, or leave --ray-address out to run on a Ray of its own."
        ) from None


def with_scenario(config: SimulationConfig, scenario: str) -> SimulationConfig:
    """``config`` with a scenario's run-config keys (and the data files it writes under ``out``)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}.")
    if (config.out / "results.json").exists():
        raise ConfigError(f"{config.out} holds an earlier run: give a scenario a new --out.")
    return dataclasses.replace(config, settings=incremental_settings(config.settings, config.out))


def scored_scenario(
    config: SimulationConfig, settings: CoordinatorSettings, phases: PhaseVersions
) -> dict[str, Any]:
    """results.json's scenario part: accuracy per phase, retention by configuration, the plot."""
    run = config.run
    scored = score_phases(settings, phases, run.stream_phases, run.phase_rounds)
    name = configuration_name(config.settings)
    plot = config.out / "scenario.png"
    if scored["phases"]:
        plot_phases(scored["phases"], plot, f"Class-incremental, {name}: accuracy after each phase")
    return {
        "scenario": {
            "name": "incremental",
            "configuration": name,
            "phases": scored["phases"],
            "held_rounds": phases.held,
            **({"plot": str(plot)} if scored["phases"] else {}),
        },
        # By configuration, as the benchmark compares them; the first phase's alone beside it.
        "retention": {name: scored["retention"]["mean"], "first_phase": scored["retention"]["first"]},
    }


def device_privacy(outcomes: list[RoundOutcome]) -> dict[str, dict[str, float]]:
    """Each DP device's spend after its last round in this run (empty without DP)."""
    latest: dict[str, dict[str, float]] = {}
    for outcome in outcomes:
        for spend in outcome.privacy:
            latest[spend.device_id] = {
                "epsilon": spend.epsilon,  # the largest ε any of the device's records has spent
                "delta": spend.delta,
                "records_retired": spend.records_retired,
                "round": outcome.round,
            }
    return dict(sorted(latest.items()))


def provision_keys(config: SimulationConfig, settings: CoordinatorSettings) -> None:
    """What an operator and each device do once before a fleet runs: coordinator keys (kept if there),
    a signing key in every simulated device's state folder, each public key enrolled."""
    keys = Path(settings.keys_dir)
    if not (keys / COORDINATOR_HPKE_KEY).exists():
        init_keys(keys)
    devices = Storage.open(settings.db_url, settings.tenant).devices
    for partition in range(config.devices):
        device = DeviceState.locate({"partition-id": partition}, config.run_config())
        devices.enroll(f"partition-{partition}", settings.tenant, ensure_device_key(device))
