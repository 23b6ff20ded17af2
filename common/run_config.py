"""Every key of a fleetlora run, declared once: its type, default, help text, group and check.

A Flower run config is a flat table of ``key = value`` (``[tool.flwr.app.config]`` in
pyproject.toml, ``flwr run . --run-config``, a host's ``[federation]`` section, or what
``fleetlora simulate`` writes). :class:`RunConfig` is that table as a typed, self-checking
dataclass, modelled on PEFT's ``LoraConfig``: each field carries its default and
``metadata={"help": ..., "group": ...}``. Everything else is derived from it: the ``simulate``
options and their help panels, the reading of a run config into the coordinator's and the
devices' settings, the run config a simulation writes, and the test that pyproject.toml's table
equals these defaults. Adding a setting is one field here plus its use.

A key is the field's name with ``-`` for ``_`` (``devices_per_round`` → ``devices-per-round``).
Ranges that the wire settings (:mod:`fleetlora.common.config`) already check are checked there,
once, when the coordinator builds them; what nothing downstream checks is checked here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleetlora.common.errors import ConfigError

RunValue = bool | int | float | str


class Group(StrEnum):
    """The help panels of ``fleetlora simulate``, in the order a reader meets them."""

    MODEL = "Model"
    DATA = "Data"
    FLEET = "Fleet"
    TRAINING = "Local training"
    FORGETTING = "Forgetting control"
    PRIVACY = "Privacy"
    UPLOADS = "Uploads and packages"
    SERVER = "Server"


Check = Callable[[Any], str | None]  # the problem with a value, or None when it is fine


def setting(
    default: RunValue, help: str, group: Group, *, choices: tuple[str, ...] = (), check: Check | None = None
) -> Any:
    """One run-config key's declaration (a dataclass field with its metadata)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "group": group, "choices": choices, "check": check}
    )


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def below(limit: float) -> Check:
    """A share in [0, limit)."""
    return lambda value: None if 0 <= value < limit else f"must be in [0, {limit:g})"


def up_to(limit: float) -> Check:
    """A value in [0, limit]."""
    return lambda value: None if 0 <= value <= limit else f"must be in [0, {limit:g}]"


def in_unit_interval(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


@dataclass(frozen=True)
class RunConfig:
    """A fleetlora run, key by key. Defaults are ``[tool.flwr.app.config]``'s (a test keeps them equal)."""

    # ---- model
    model: str = setting(
        "minilm", "Base model: minilm, smollm2, tiny, or a local Hugging Face folder.", Group.MODEL
    )
    task: str = setting(
        "auto",
        "classify, causal-lm, or auto (classify when labels are given or found in the data).",
        Group.MODEL,
        choices=("auto", "classify", "causal-lm"),
    )
    labels: str = setting(
        "", "Comma-separated class names, in order (empty: read them from --data).", Group.MODEL
    )
    max_length: int = setting(48, "Tokens per example (longer texts are cut).", Group.MODEL)
    lora_rank: int = setting(8, "LoRA rank r.", Group.MODEL)
    lora_alpha: int = setting(16, "LoRA alpha (scale = alpha / r).", Group.MODEL)
    lora_targets: str = setting(
        "", "Comma-separated module names LoRA wraps (empty: the attention query and value).", Group.MODEL
    )
    unfreeze: str = setting("", "Comma-separated base modules trained in full on top of LoRA.", Group.MODEL)
    ffa_lora: bool = setting(
        False, "FFA-LoRA: keep A at its shared seeded init, train only B and the head.", Group.MODEL
    )
    pooling: str = setting(
        "mean",
        "Classification head: mean (of the last hidden states) or transformers (the architecture's own).",
        Group.MODEL,
        choices=("mean", "transformers"),
    )
    regime: str = setting(
        "auto",
        "What devices train: head (the classifier alone on the frozen encoder, started from the label "
        "names: the DP default), lora (LoRA and the head), or auto (head for classification with mean "
        "pooling, lora otherwise).",
        Group.MODEL,
        choices=("auto", "head", "lora"),
    )

    # ---- data
    data: str = setting(
        "builtin", "Training data: 'builtin' or a CSV/JSONL/TXT file, split over the devices.", Group.DATA
    )
    eval_data: str = setting(
        "builtin-test", "Coordinator-side test set ('builtin-test', a file, or empty for none).", Group.DATA
    )
    key_set: str = setting(
        "",
        "Key knowledge: a labelled CSV/JSONL file (text,label) pinned for the tenant when the run starts, "
        "as `fleetlora coordinator key-set add` does, unless the same examples are pinned already; every "
        "version is scored on the tenant's pinned set (empty: pin nothing new).",
        Group.DATA,
    )
    partition: str = setting(
        "dirichlet:1.0", "How data is split over devices: iid or dirichlet:ALPHA (by label).", Group.DATA
    )
    holdout: float = setting(
        0.2,
        "Share of each device's records kept out of training for its federated evaluation (by a hash of "
        "the text, so a record stays on its side as the corpus grows).",
        Group.DATA,
        check=below(1),
    )
    stream_records: int = setting(
        0,
        "Simulated devices receive their partition this many records a round, with duplicates and junk "
        "mixed in, through their corpus pipeline (0: the whole partition at once).",
        Group.DATA,
        check=at_least(0),
    )
    stream_phases: int = setting(
        0,
        "Class-incremental stream: the labels are split into this many phases (seeded), and simulated "
        "devices receive each phase's records of their partition through their corpus pipeline when it "
        "begins (0: off; fleetlora simulate --scenario incremental sets it).",
        Group.DATA,
        check=at_least(0),
    )
    phase_rounds: int = setting(
        3, "Rounds each phase of a class-incremental stream lasts.", Group.DATA, check=at_least(1)
    )

    # ---- fleet
    seed: int = setting(0, "Seed for partitions, sampling and initial weights.", Group.FLEET)
    sampling: str = setting(
        "seeded",
        "How each round's devices are drawn: seeded (from seed and round, by device id: one seed, one "
        "schedule) or random (OS entropy; a deployed fleet's default).",
        Group.FLEET,
        choices=("seeded", "random"),
    )
    rounds: int = setting(
        3, "Federated rounds to run (after any stored ones).", Group.FLEET, check=at_least(1)
    )
    devices_per_round: int = setting(
        20,
        "Devices sampled each round. Each device's DP noise is independent, so averaging more of them "
        "shrinks it (docs/research.md).",
        Group.FLEET,
        check=at_least(1),
    )
    min_devices: int = setting(
        2, "Valid replies needed for a round to count.", Group.FLEET, check=at_least(1)
    )
    round_deadline: float = setting(
        600.0, "Seconds a round waits for devices to connect and answer.", Group.FLEET
    )
    tenant: str = setting(
        "default", "The fleet's tenant: devices, versions and packages belong to it.", Group.FLEET
    )
    device_state: str = setting(
        "runs/flwr/devices",
        "Simulated devices' state folders (a SuperNode sets its own state-dir).",
        Group.FLEET,
    )
    simulated_consent: bool = setting(
        True, "Simulated devices' upload consent (a real device's owner sets upload-consent).", Group.FLEET
    )
    over_select: float = setting(
        0.0,
        "Extra share of devices sampled beyond devices-per-round (0.3: 130%, for the ones that drop out); "
        "the round closes once devices-per-round valid deltas are in, or at its deadline.",
        Group.FLEET,
        check=up_to(4),
    )
    simulated_dropout: float = setting(
        0.0,
        "Share of a simulated round's sampled devices whose train message is lost: they never answer.",
        Group.FLEET,
        check=below(1),
    )
    simulated_stragglers: float = setting(
        0.0,
        "Share of a simulated round's sampled devices that answer straggler-seconds late.",
        Group.FLEET,
        check=below(1),
    )
    straggler_seconds: float = setting(
        30.0, "How late a simulated straggler's answer arrives.", Group.FLEET, check=at_least(0)
    )
    db: str = setting(
        "sqlite:///runs/flwr/fleetlora.db", "SQLAlchemy URL of the coordinator's version store.", Group.FLEET
    )
    log_dir: str = setting(
        "",
        "Folder for the coordinator's JSON log (a deployed run: the host's state folder's logs/); "
        "empty: no log file.",
        Group.FLEET,
    )

    # ---- local training
    local_steps: int = setting(
        0,
        "Optimizer steps per device per round (0: the regime's default).",
        Group.TRAINING,
        check=at_least(0),
    )
    batch_size: int = setting(
        0,
        "Examples per local step; under DP the expected Poisson batch (0: the regime's default).",
        Group.TRAINING,
        check=at_least(0),
    )
    learning_rate: float = setting(
        0.0,
        "Local learning rate: AdamW for lora, plain SGD for head (0: the regime's default).",
        Group.TRAINING,
        check=at_least(0),
    )
    local_epochs: float = setting(
        0.0,
        "Passes over the local data per round; > 0 replaces local-steps (both 0: the regime's default).",
        Group.TRAINING,
        check=at_least(0),
    )
    lr_decay: float = setting(1.0, "Round r trains at learning-rate × lr-decay^(r-1).", Group.TRAINING)
    personal_head: bool = setting(
        False,
        "Each device trains and keeps its own classification head (in its state folder); evaluation "
        "reports global and personalised accuracy.",
        Group.TRAINING,
    )
    restricted_softmax: bool = setting(
        True,
        "Classification: each device's loss covers only its own classes (FedRS-style, against label "
        "skew). Ignored for causal LM.",
        Group.TRAINING,
    )

    # ---- forgetting control (client/forgetting.py; docs/research.md "Forgetting control")
    train_on: str = setting(
        "all",
        "What a device trains on each round: all (every record it holds) or arrivals (only the records that "
        "arrived since it last trained; a device without a corpus counts all of its records as arrivals).",
        Group.FORGETTING,
        choices=("all", "arrivals"),
    )
    replay_share: float = setting(
        0.0,
        "With train-on arrivals: the share of each round's training set drawn from the device's older "
        "records (experience replay), at most 0.9 (0: off).",
        Group.FORGETTING,
    )
    distill_weight: float = setting(
        0.0,
        "Weight w of distillation from the adapter the device received: loss = (1-w)·CE + w·T²·KL, in "
        "[0, 1) (0: off). Classification only.",
        Group.FORGETTING,
    )
    distill_temperature: float = setting(2.0, "Distillation temperature T, in [0.01, 100].", Group.FORGETTING)
    ewc_lambda: float = setting(
        0.0,
        "Online EWC: the penalty λ/2·Σ F(θ-θ*)², with the diagonal Fisher F kept in each device's state "
        "folder and θ* the adapter it received, at most 1e6 (0: off).",
        Group.FORGETTING,
    )

    # ---- privacy
    dp_epsilon: float = setting(
        8.0,
        "DP-SGD on every device: the ε each training record may spend at most (0: no DP, not private).",
        Group.PRIVACY,
        check=at_least(0),
    )
    dp_delta: float = setting(1e-5, "DP δ.", Group.PRIVACY)
    dp_max_grad_norm: float = setting(
        0.0,
        "Per-example gradient clipping bound (L2; 0: the regime's default).",
        Group.PRIVACY,
        check=at_least(0),
    )
    dp_accountant: str = setting(
        "rdp", "Privacy accountant: rdp or prv.", Group.PRIVACY, choices=("rdp", "prv")
    )
    dp_rounds: int = setting(
        0,
        "Participations a device's noise is planned for (0: the rounds this run's schedule gives it). "
        "A record never passes dp-epsilon either way: it retires first.",
        Group.PRIVACY,
        check=at_least(0),
    )
    dp_budget: str = setting(
        "record",
        "Whose spend dp-epsilon bounds: record (each arrival cohort has its own, so new text brings a fresh "
        "budget) or device (one lifetime budget; later records share it).",
        Group.PRIVACY,
        choices=("record", "device"),
    )
    central_dp_noise: float = setting(
        0.0,
        "User-level DP at the coordinator: noise multiplier on the sum of clipped deltas (0: off).",
        Group.PRIVACY,
    )
    central_dp_clip: float = setting(1.0, "L2 bound on each device's delta under central DP.", Group.PRIVACY)
    central_dp_delta: float = setting(1e-5, "δ of the coordinator's user-level DP.", Group.PRIVACY)

    # ---- uploads and packages
    seal_uploads: bool = setting(
        False,
        "Devices encrypt each delta to the coordinator (HPKE) and sign it (Ed25519); needs keys and "
        "enrolled devices.",
        Group.UPLOADS,
    )
    upload_codec: str = setting(
        "fp32+zstd",
        "How a sealed delta is encoded: fp32+zstd (lossless), fp16+zstd or int8+zstd (smaller).",
        Group.UPLOADS,
    )
    keys: str = setting(
        "",
        "The coordinator's keys folder (fleetlora coordinator keys init); signs update packages.",
        Group.UPLOADS,
    )
    package_cap: float = setting(
        0.10,
        "Largest update package as a share of the base model's bytes (at most 0.10); lossier codecs are "
        "used to fit.",
        Group.UPLOADS,
    )
    package_ttl_hours: float = setting(
        168.0, "Devices refuse a package this long after it was built.", Group.UPLOADS
    )
    package_max_error: float = setting(
        0.10,
        "A lossy package codec is used only while the rebuilt adapter stays this close (relative L2).",
        Group.UPLOADS,
    )
    distribute_updates: bool = setting(
        True, "After each round, send connected devices the signed package to the new version.", Group.UPLOADS
    )
    distribute_to: str = setting(
        "connected",
        "Which devices a new version is sent to: connected (every online one) or sampled (the round's own; "
        "a simulation's default, so a large simulated fleet's other devices cost nothing).",
        Group.UPLOADS,
        choices=("connected", "sampled"),
    )

    # ---- server
    weight_cap: float = setting(
        2.0,
        "A device's weight in the mean is at most this × the last round's median example count (0: off).",
        Group.SERVER,
    )
    norm_cap: float = setting(
        10.0,
        "A delta whose L2 norm passes this × the last round's median norm is dropped (0: off).",
        Group.SERVER,
    )
    norm_ratio: float = setting(
        100.0,
        "A delta whose L2 norm passes this × the global adapter's norm (at least 1) is dropped, in every "
        "round (0: off).",
        Group.SERVER,
    )
    quarantine_after: int = setting(
        3,
        "A device with this many anomalies (a delta out of bounds or broken, an inflated count) since its "
        "last release is kept out of rounds until an operator releases it (0: never).",
        Group.SERVER,
        check=at_least(0),
    )
    retention_threshold: float = setting(
        0.95,
        "A version whose key-knowledge score falls below this × the best earlier version's is held: "
        "stored, but not distributed until an operator releases it (0: never held).",
        Group.SERVER,
        check=up_to(1),
    )
    aggregator: str = setting(
        "auto",
        "How a round's deltas are combined: mean (example-weighted, streamed), trimmed-mean or median "
        "(coordinate-wise, every device counts once; they keep the round's deltas in memory); auto: "
        "trimmed-mean from 10 devices a round without central DP, else mean.",
        Group.SERVER,
        choices=("auto", "mean", "trimmed-mean", "median"),
    )
    aggregator_trim: float = setting(
        0.2,
        "trimmed-mean: share of each coordinate's values cut from each end.",
        Group.SERVER,
        check=lambda v: None if 0 < v < 0.5 else "must be in (0, 0.5)",
    )
    server_optimizer: str = setting(
        "auto",
        "Server update: fedavg, fedavgm (momentum), fedadam, fedyogi, or auto (fedavgm for the head regime "
        "under DP at ε ≥ 3 with 20 or more devices a round, fedavg otherwise).",
        Group.SERVER,
        choices=("auto", "fedavg", "fedavgm", "fedadam", "fedyogi"),
    )
    server_lr: float = setting(1.0, "Server learning rate (1: plain FedAvg).", Group.SERVER)
    server_momentum: float = setting(
        0.0, "FedAvgM momentum, or beta1 of FedAdam/FedYogi (0: the optimizer's, 0.5 or 0.9).", Group.SERVER
    )
    server_beta2: float = setting(0.99, "beta2 of FedAdam/FedYogi.", Group.SERVER)
    server_tau: float = setting(0.001, "tau (adaptivity) of FedAdam/FedYogi.", Group.SERVER)

    def __post_init__(self) -> None:
        problems = [f"{s.key}: {problem}" for s in SETTINGS if (problem := s.problem(getattr(self, s.name)))]
        if problems:
            raise ConfigError("Invalid run configuration: " + "; ".join(problems) + ".")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> RunConfig:
        """Read a Flower run config; missing keys take their defaults, unknown keys are refused by name."""
        unknown = sorted(set(config) - set(BY_KEY))
        if unknown:
            raise ConfigError(
                f"Unknown run-config key(s) {', '.join(map(repr, unknown))}; "
                f"the keys are listed by `fleetlora simulate --help` and in pyproject.toml."
            )
        values: dict[str, Any] = {}
        for key, value in config.items():
            spec = BY_KEY[key]
            values[spec.name] = spec.coerce(value)
        return cls(**values)

    def to_mapping(self) -> dict[str, RunValue]:
        """The run config Flower carries, keyed as in ``[tool.flwr.app.config]``."""
        return {s.key: getattr(self, s.name) for s in SETTINGS}


@dataclass(frozen=True)
class Setting:
    """One key of the table, as the CLI, the readers and the tests see it."""

    name: str  # the field name
    type: type
    default: RunValue
    help: str
    group: Group
    choices: tuple[str, ...]
    check: Check | None

    @property
    def key(self) -> str:
        return self.name.replace("_", "-")

    def coerce(self, value: object) -> RunValue:
        """``value`` as this key's type; a clear error for anything else (an int is a fine float)."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, bool | int | float | str) or type(value) is not self.type:
            raise ConfigError(
                f"Run-config key {self.key!r} expects {self.type.__name__}, got {value!r} "
                f"({type(value).__name__})."
            )
        return value

    def problem(self, value: object) -> str | None:
        if type(value) is not self.type:
            return f"expects {self.type.__name__}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.check is not None and (problem := self.check(value)):
            return f"{problem}, got {value!r}"
        return None


def _settings() -> Iterator[Setting]:
    types = {"bool": bool, "int": int, "float": float, "str": str}
    for field in dataclasses.fields(RunConfig):
        yield Setting(
            name=field.name,
            type=types[str(field.type)],
            default=field.default,  # type: ignore[arg-type]  # every field has a plain default
            help=field.metadata["help"],
            group=field.metadata["group"],
            choices=field.metadata["choices"],
            check=field.metadata["check"],
        )


SETTINGS: tuple[Setting, ...] = tuple(_settings())
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
DEFAULTS = RunConfig()
