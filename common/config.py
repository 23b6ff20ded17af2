"""Settings that travel from the coordinator to every device, as self-validating dataclasses.

The coordinator sends a :class:`ModelSpec` and :class:`TrainSettings` with every message, so a
device builds exactly the model the coordinator expects. They cross the wire as flat Flower
ConfigRecord entries (``model.rank`` ...), produced by :func:`to_config` and read back by
:func:`from_config`. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args

from fleetlora.common.errors import ConfigError

TaskKind = Literal["classify", "causal-lm"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
PoolingKind = Literal["mean", "transformers"]  # see fleetlora.common.heads
POOLING_KINDS: tuple[str, ...] = get_args(PoolingKind)
MAX_LABELS, MAX_LABEL_CHARS = 10_000, 200
RegimeKind = Literal["lora", "head"]  # what a device trains (ModelSpec.regime)
REGIMES: tuple[str, ...] = get_args(RegimeKind)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """How the base model is adapted.

    ``target_modules`` empty means the architecture's default (attention query/value projections,
    the choice of the LoRA paper). ``unfreeze`` names base-model modules (for example
    ``backbone.encoder.layer.5``) trained in full on top of LoRA; their weights then travel in the
    delta too, which is why the trainable share is reported. ``ffa`` is FFA-LoRA (Sun et al. 2024,
    arXiv:2403.12313): every A stays at its shared seeded initialisation and only B (and the head)
    is trained, so averaging B averages the products B·A exactly.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    unfreeze: tuple[str, ...] = ()
    ffa: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}.")
        if self.alpha < 1:
            raise ConfigError(f"LoRA alpha must be >= 1, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which base model, for which task, adapted how.

    ``name`` is ``minilm``, ``smollm2``, ``tiny`` or a local Hugging Face folder. ``labels`` fixes
    the class order for ``classify`` and must be empty for ``causal-lm``. ``seed`` fixes the
    initialisation of everything not pretrained (classification head, LoRA A matrices, the tiny
    model), so every device and the coordinator build identical starting weights. ``pooling`` picks
    the classification head: ``mean`` over the last hidden states (the default, see
    :mod:`fleetlora.common.heads` for the evidence) or ``transformers`` (the architecture's own).

    ``regime`` is what a device trains: ``lora`` (the LoRA matrices and the head, with AdamW) or
    ``head`` (the classification head alone on the frozen encoder's centred, unit-length features,
    started from the label names, with plain SGD; :mod:`fleetlora.common.heads`). Under DP the head
    regime clips and noises the head alone, on features whose every example's gradient is bounded
    without looking at the data; docs/research.md measures what each regime keeps.
    """

    name: str
    task: TaskKind
    labels: tuple[str, ...] = ()
    max_length: int = 64
    seed: int = 0
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    pooling: PoolingKind = "mean"
    regime: RegimeKind = "lora"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Model name is empty: use minilm, smollm2, tiny or a folder path.")
        if self.task not in TASK_KINDS:
            raise ConfigError(f"Task must be one of {TASK_KINDS}, got {self.task!r}.")
        if self.task == "classify" and len(self.labels) < 2:
            raise ConfigError(f"A classification task needs at least 2 labels, got {len(self.labels)}.")
        if self.task == "causal-lm" and self.labels:
            raise ConfigError("A causal-lm task takes no labels; drop the labels setting.")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("Labels must be unique.")
        # The head has a row per label and the head regime encodes every name: both sized by the sender.
        if len(self.labels) > MAX_LABELS or any(len(label) > MAX_LABEL_CHARS for label in self.labels):
            raise ConfigError(
                f"At most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each, "
                f"got {len(self.labels)} (longest {max(map(len, self.labels))})."
            )
        if not 8 <= self.max_length <= 4096:
            raise ConfigError(f"max_length must be in [8, 4096] tokens, got {self.max_length}.")
        if self.pooling not in POOLING_KINDS:
            raise ConfigError(f"Pooling must be one of {POOLING_KINDS}, got {self.pooling!r}.")
        if self.regime not in REGIMES:
            raise ConfigError(f"Regime must be one of {REGIMES}, got {self.regime!r}.")
        if self.regime == "head" and (self.task != "classify" or self.pooling != "mean"):
            raise ConfigError(
                "The head regime trains a classifier on mean-pooled features: it needs task classify "
                "and pooling mean (use regime lora otherwise)."
            )
        if self.regime == "head" and self.lora.unfreeze:
            raise ConfigError("The head regime keeps the encoder frozen: drop unfreeze, or use regime lora.")


AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = get_args(AccountantName)
MAX_PLANNED_ROUNDS = 100_000  # a plan only sets σ; beyond this it is a mistake (or a device's DoS)
BudgetKind = Literal["record", "device"]
BUDGETS: tuple[str, ...] = get_args(BudgetKind)


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """Example-level DP-SGD on every device (Opacus), with a per-device budget.

    ``epsilon`` 0 turns DP off. Otherwise each device picks its noise multiplier once, for
    ``planned_rounds`` rounds of its local steps at Poisson sample rate batch / examples, so that
    spending all of them costs ``epsilon`` at ``delta``; it then keeps its accountant on its own
    disk and declines to train once another round would pass ``epsilon``.

    ``budget`` is whose spend ``epsilon`` bounds: ``record`` (each arrival cohort has its own, so new
    records bring a fresh budget; client/privacy.py) or ``device`` (one lifetime budget: records that
    arrive later share the first cohort's spend, and the device stops for good when it is spent).
    Both keep every record within ``epsilon``; ``device`` is the older, more conservative behaviour.
    """

    epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-example clipping bound (L2)
    accountant: AccountantName = "rdp"
    planned_rounds: int = 10
    budget: BudgetKind = "record"

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ConfigError(f"DP budget must be one of {BUDGETS}, got {self.budget!r}.")
        if self.epsilon < 0:
            raise ConfigError(f"DP epsilon must be >= 0 (0 = off), got {self.epsilon}.")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"DP delta must be in (0, 1), got {self.delta}.")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"DP max-grad-norm must be > 0, got {self.max_grad_norm}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"DP accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}.")
        if not 1 <= self.planned_rounds <= MAX_PLANNED_ROUNDS:
            raise ConfigError(
                f"DP planned rounds must be in [1, {MAX_PLANNED_ROUNDS}], got {self.planned_rounds}."
            )

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0


TrainOn = Literal["all", "arrivals"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
MAX_REPLAY_SHARE = 0.9  # above it the round is nearly all replay: the new records barely count
# Beyond these, logits / T or T² and λ·F overflow float32: the loss turns inf or NaN, every round.
DISTILL_TEMPERATURES = (0.01, 100.0)
MAX_EWC_LAMBDA = 1e6


@dataclasses.dataclass(frozen=True)
class ForgettingSettings:
    """How a device keeps what the fleet learned while it learns what is new (client/forgetting.py).

    All off by default, and combinable. ``train_on`` ``arrivals`` trains on the records that arrived
    since the device last trained (the continual-learning setting); ``replay_share`` of that round's
    training set is then older records (experience replay, Rolnick et al. 2019). ``distill_weight`` w
    mixes in distillation from the adapter the device received (Hinton et al. 2015; LwF, Li & Hoiem
    2017): loss = (1−w)·CE + w·T²·KL, at ``distill_temperature`` T; classification only. ``ewc_lambda``
    λ adds online EWC's penalty λ/2 Σ F(θ−θ*)² (Kirkpatrick et al. 2017; Schwarz et al. 2018). The
    messages name the run-config keys, which is what an operator sets.
    """

    train_on: TrainOn = "all"
    replay_share: float = 0.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    ewc_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"train-on must be one of {TRAIN_ON}, got {self.train_on!r}.")
        numbers = {
            "replay-share": self.replay_share,
            "distill-weight": self.distill_weight,
            "distill-temperature": self.distill_temperature,
            "ewc-lambda": self.ewc_lambda,
        }
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}.")
        if not 0.0 <= self.replay_share <= MAX_REPLAY_SHARE:
            raise ConfigError(f"replay-share must be in [0, {MAX_REPLAY_SHARE}], got {self.replay_share}.")
        if not 0.0 <= self.distill_weight < 1.0:
            raise ConfigError(f"distill-weight must be in [0, 1) (0: off), got {self.distill_weight}.")
        low, high = DISTILL_TEMPERATURES
        if not low <= self.distill_temperature <= high:
            raise ConfigError(
                f"distill-temperature must be in [{low}, {high:g}] (Hinton et al. use 1 to 20), "
                f"got {self.distill_temperature}."
            )
        if not 0 <= self.ewc_lambda <= MAX_EWC_LAMBDA:
            raise ConfigError(
                f"ewc-lambda must be in [0, {MAX_EWC_LAMBDA:g}] (0: off), got {self.ewc_lambda}."
            )
        if self.replay_share > 0 and self.train_on == "all":
            raise ConfigError(
                f'replay-share {self.replay_share} replays older records, but train-on = "all" already '
                'trains on every record: set train-on = "arrivals", or replay-share = 0.'
            )


MAX_LEARNING_RATE = 1000.0


@dataclasses.dataclass(frozen=True)
class RegimeDefaults:
    """How a regime trains where the run config leaves a training key at 0.

    ``lora``: AdamW at 3e-3, 20 steps of 16, measured on the built-in corpus (:class:`TrainSettings`).
    ``head``: plain SGD at 40 on unit-length features, expected batches of 256, 5 passes a round and
    clipping at 0.5 (every example's gradient norm is at most 2): large batches, many steps at a high rate
    and a small clipping norm, as DP-SGD wants (De et al. 2022, arXiv:2204.13650). Without DP, whose
    gradients are neither clipped nor noised, rate 160. Both measured on BANKING77 (docs/research.md).
    The noise a DP step adds to the head is rate × σ × clip / batch, so at a small ε (a large σ) the
    rate that suits ε = 8 drowns the head in noise: a device lowers its rate to keep rate × σ ≤ 160
    (rate 40 up to σ = 4, which covers ε = 8 with 20 devices a round).
    """

    learning_rate: float  # under DP
    learning_rate_without_dp: float
    max_rate_noise: float  # under DP, a device lowers its rate to keep rate × σ at most this (0: never)
    batch_size: int
    local_steps: int
    local_epochs: float
    max_grad_norm: float


REGIME_DEFAULTS: dict[str, RegimeDefaults] = {
    "lora": RegimeDefaults(
        learning_rate=3e-3,
        learning_rate_without_dp=3e-3,
        max_rate_noise=0.0,
        batch_size=16,
        local_steps=20,
        local_epochs=0.0,
        max_grad_norm=1.0,
    ),
    "head": RegimeDefaults(
        learning_rate=40.0,
        learning_rate_without_dp=160.0,
        max_rate_noise=160.0,
        batch_size=256,
        local_steps=20,
        local_epochs=5.0,
        max_grad_norm=0.5,
    ),
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One device's local work per round.

    Defaults chosen on the built-in corpus with MiniLM + LoRA r=8 (8 devices, 4 a round): 20 steps
    at 3e-3 reached 89.8% test accuracy after 3 rounds where 15 steps at 1e-3 reached 50.8%.
    """

    local_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 3e-3
    local_epochs: float = 0.0  # > 0: passes over the local data instead of local_steps
    personal_head: bool = False  # each device trains and keeps its own head (client/personal_head.py)
    # Local loss over the device's own classes only (client/train.py). On by default: on BANKING77 over
    # 20 Dirichlet(0.5) devices it took test accuracy after 10 rounds from 72.7% to 81.1% (docs/research.md).
    restricted_softmax: bool = True
    privacy: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    # Under DP the device trains at min(learning_rate, max_rate_noise / σ) (0: at learning_rate).
    max_rate_noise: float = 0.0
    forgetting: ForgettingSettings = dataclasses.field(default_factory=ForgettingSettings)

    def __post_init__(self) -> None:
        if self.local_epochs < 0:
            raise ConfigError(f"local_epochs must be >= 0, got {self.local_epochs}.")
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be >= 1, got {self.local_steps}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        # The head regime's plain SGD on unit-length features takes rates in the tens (docs/research.md).
        if not 0.0 <= self.max_rate_noise < math.inf:
            raise ConfigError(f"max_rate_noise must be >= 0 and finite, got {self.max_rate_noise}.")
        if not 0.0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ConfigError(
                f"learning_rate must be in (0, {MAX_LEARNING_RATE:g}], got {self.learning_rate}."
            )

    def rate_for(self, noise_multiplier: float | None) -> float:
        """The learning rate of a round at this σ (None: without DP): capped so rate × σ ≤ max_rate_noise."""
        if noise_multiplier and self.max_rate_noise:
            return min(self.learning_rate, self.max_rate_noise / noise_multiplier)
        return self.learning_rate

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps this round: ``local_epochs`` passes when set, else ``local_steps``."""
        if self.local_epochs > 0:
            return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))
        return self.local_steps


# ---------------------------------------------------------------------------------------------
# Flat wire form: {"model.name": "tiny", "model.lora.rank": 8, ...}

ConfigValue = int | float | str | bool | list[str]
_D = TypeVar("_D")


def to_config(obj: Any, prefix: str) -> dict[str, ConfigValue]:
    """Flatten a settings dataclass into ConfigRecord-compatible entries under ``prefix``."""
    out: dict[str, ConfigValue] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}.{field.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_config(value, key))
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


def from_config(cls: type[_D], config: Mapping[str, Any], prefix: str) -> _D:
    """Rebuild a settings dataclass from :func:`to_config` entries; validation re-runs."""
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is one of the settings dataclasses
        key = f"{prefix}.{field.name}"
        default = field.default
        if isinstance(field.type, str) and field.type in {c.__name__ for c in _NESTED}:
            nested = next(c for c in _NESTED if c.__name__ == field.type)
            kwargs[field.name] = from_config(nested, config, key)
        elif key in config:
            value = config[key]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        elif default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"Message config lacks required key {key!r}.")
    return cls(**kwargs)


_NESTED: tuple[type, ...] = (LoraSettings, PrivacySettings, ForgettingSettings)


def split_names(value: str) -> tuple[str, ...]:
    """Parse a comma-separated setting (``"query,value"``) into a tuple, ignoring blanks."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
# The momentum (FedAvgM) or beta1 (FedAdam, FedYogi) each optimizer gets when none is set. FedAvgM's 0.5
# is what DP's noisy means were measured best with on BANKING77 (docs/research.md); Adam's is the usual.
DEFAULT_SERVER_MOMENTUM: dict[str, float] = {"fedavg": 0.0, "fedavgm": 0.5, "fedadam": 0.9, "fedyogi": 0.9}


MOMENTUM_MIN_EPSILON = 3.0  # below it, server momentum cost accuracy on BANKING77 …
MOMENTUM_MIN_DEVICES = 20  # … and with fewer devices a round (a noisier mean) it cost 5-8 points


def default_server_optimizer(regime: str, epsilon: float, devices_per_round: int) -> ServerOptimizerName:
    """``server-optimizer = "auto"``: FedAvgM for the head regime under device DP at ε ≥ 3 with at least 20
    devices a round, FedAvg otherwise.

    Server momentum averages each round's noisy mean with the ones before it; on BANKING77 it added
    1–1.5 points at ε 8 with 20 devices a round in every pair of 10-round runs measured, but where the
    noise in the round's mean is larger (ε 1 and 2, or 5 devices a round) it fell well below FedAvg
    (docs/research.md). Without DP it is not needed.
    """
    quiet_enough = epsilon >= MOMENTUM_MIN_EPSILON and devices_per_round >= MOMENTUM_MIN_DEVICES
    return "fedavgm" if regime == "head" and quiet_enough else "fedavg"


@dataclasses.dataclass(frozen=True)
class ServerOptimizerSettings:
    """How the coordinator turns the mean delta into the next global adapter.

    ``fedavg`` adds ``lr × mean delta`` (lr 1: plain FedAvg). ``fedavgm`` keeps server momentum
    (Hsu et al. 2019, arXiv:1909.06335). ``fedadam`` and ``fedyogi`` treat the mean delta as a
    pseudo-gradient for Adam/Yogi on the server (Reddi et al. 2021, arXiv:2003.00295), whose
    paper suggests ``tau`` = 1e-3 and a server learning rate well below 1.
    """

    name: ServerOptimizerName = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9  # beta1 for fedadam/fedyogi; momentum for fedavgm (default 0.5 there)
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: keeps the update finite where the second moment is ~0

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ConfigError(f"Server optimizer must be one of {SERVER_OPTIMIZERS}, got {self.name!r}.")
        if not self.lr > 0:
            raise ConfigError(f"Server learning rate must be > 0, got {self.lr}.")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.beta2 < 1.0:
            raise ConfigError(
                f"Server momentum and beta2 must be in [0, 1), got {self.momentum} and {self.beta2}."
            )
        if not self.tau > 0:
            raise ConfigError(f"Server tau must be > 0, got {self.tau}.")
