"""A device's privacy spend under DP-SGD, kept on its own disk so ε adds up across rounds and restarts.

The noise multiplier σ is chosen once, at the device's first DP round, so that ``planned_rounds``
rounds of its local steps at Poisson sample rate q = batch / examples cost exactly the target ε at
δ (Opacus' ``get_noise_multiplier``). Every round then appends (σ, q, steps) to the accountant's
history and writes the whole account back atomically. Before training, the device works out what ε
would be after the round; if that passes the target it declines instead (:class:`BudgetSpent`), and
the round goes on without it.

The history, not a running ε, is what is stored: RDP and PRV compose from it exactly, so three
rounds in three processes give the same ε as one process running the same steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from opacus.accountants.utils import get_noise_multiplier

from fleetlora.client.device_state import DeviceState
from fleetlora.client.train import NoisePlan
from fleetlora.common import records
from fleetlora.common.config import PrivacySettings, TrainSettings
from fleetlora.common.dp_accounting import AccountantStep, epsilon_from_history
from fleetlora.common.errors import FleetloraError, IncompatibleStateError

ACCOUNT_FILE = "privacy-account"


class BudgetSpent(FleetloraError):
    """Training this round would pass the device's ε budget; the message says by how much."""


@dataclass
class PrivacyAccount:
    """σ fixed at first use, and every (σ, sample rate, steps) the device has spent since."""

    noise_multiplier: float
    accountant: str
    history: list[AccountantStep] = field(default_factory=list)

    def epsilon(self, delta: float, extra: tuple[float, int] | None = None) -> float:
        """ε spent at ``delta``; with ``extra`` = (sample rate, steps), ε if those steps were taken too."""
        history = list(self.history)
        if extra is not None:
            history.append((self.noise_multiplier, *extra))
        return epsilon_from_history(history, delta=delta, accountant=self.accountant)

    def record(self, sample_rate: float, steps: int) -> None:
        self.history.append((self.noise_multiplier, sample_rate, steps))


def open_account(
    device: DeviceState, privacy: PrivacySettings, sample_rate: float, steps_per_round: int
) -> PrivacyAccount:
    """The device's stored account, or a new one with σ calibrated for the planned rounds."""
    stored = device.load_json(ACCOUNT_FILE)
    if stored is None:
        sigma = get_noise_multiplier(
            target_epsilon=privacy.epsilon,
            target_delta=privacy.delta,
            sample_rate=sample_rate,
            steps=privacy.planned_rounds * steps_per_round,
            accountant=privacy.accountant,
        )
        return PrivacyAccount(noise_multiplier=float(sigma), accountant=privacy.accountant)
    try:
        history = [(float(s), float(q), int(n)) for s, q, n in stored["history"]]
        return PrivacyAccount(float(stored["noise_multiplier"]), str(stored["accountant"]), history)
    except (KeyError, TypeError, ValueError) as exc:
        # Never start over silently: a lost history would let ε restart from zero.
        raise IncompatibleStateError(
            f"{device.path(ACCOUNT_FILE, '.json')} is unreadable ({exc}); this device's privacy spend is "
            "unknown, so it must not train until an operator restores or retires the file."
        ) from exc


def check_budget(account: PrivacyAccount, privacy: PrivacySettings, sample_rate: float, steps: int) -> None:
    """Raise :class:`BudgetSpent` if this round's steps would take ε past the target."""
    after = account.epsilon(privacy.delta, extra=(sample_rate, steps))
    if after > privacy.epsilon:
        spent = account.epsilon(privacy.delta)
        raise BudgetSpent(
            f"privacy budget: ε {spent:.3f} spent, {after:.3f} after this round > target {privacy.epsilon:g}"
        )


def save_account(device: DeviceState, account: PrivacyAccount) -> None:
    device.save_json(ACCOUNT_FILE, asdict(account))


def plan_round(
    device: DeviceState, settings: TrainSettings, num_examples: int
) -> tuple[PrivacyAccount, NoisePlan]:
    """The device's account and this round's DP-SGD plan; :class:`BudgetSpent` if it must not train."""
    privacy = settings.privacy
    sample_rate = min(1.0, settings.batch_size / num_examples)
    steps = settings.steps_for(num_examples)
    account = open_account(device, privacy, sample_rate, steps)
    check_budget(account, privacy, sample_rate, steps)
    return account, NoisePlan(account.noise_multiplier, privacy.max_grad_norm, sample_rate)


def spend(
    device: DeviceState, account: PrivacyAccount, privacy: PrivacySettings, noise: NoisePlan, steps: int
) -> dict[str, float]:
    """Record the round's steps on disk; return the cumulative spend the reply reports."""
    account.record(noise.sample_rate, steps)
    save_account(device, account)
    return {
        records.DP_EPSILON: account.epsilon(privacy.delta),
        records.DP_DELTA: privacy.delta,
        records.DP_NOISE_MULTIPLIER: account.noise_multiplier,
        records.DP_SAMPLE_RATE: noise.sample_rate,
    }
