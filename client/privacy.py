"""A device's DP-SGD rounds against per-record budgets, kept on its own disk across rounds and restarts.

Each round:

1. **load** the account (``privacy-account.json``; :mod:`fleetlora.client.privacy_account`). A damaged or
   implausible account stops training: it is never started again at zero;
2. **admit** the request against the device's floor (:mod:`fleetlora.client.privacy_floor`);
3. **plan** (:func:`plan_round`, no I/O): the device's training records not yet in the account join a new
   cohort. A cohort takes part only if this round's steps keep its ε within the target; one that would
   pass it retires for good. Retiring shrinks the eligible set and so raises q = batch / eligible, so the
   check repeats until every remaining cohort fits. No eligible record left: :class:`BudgetSpent`;
4. **train** on the eligible records only, Poisson-sampled at that q (q must be the sampling rate of the
   records actually sampled from, or the accountant's amplification does not hold);
5. **spend** (:func:`spend`): append (σ, q, steps) to every cohort that trained, mark the retired ones,
   and write the account back atomically before anything leaves the device.

σ is chosen once, at the device's first DP round, so that ``planned_rounds`` rounds of its local steps at
q cost exactly the target ε at δ (Opacus' ``get_noise_multiplier``): with a fixed data set, its one
cohort retires when those rounds are spent, as a lifetime budget would; with records that keep
arriving, each new cohort brings a fresh budget, so the device keeps learning while no record's ε
passes the target. docs/security.md gives the result (a Rényi filter) this rests on and what it assumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from opacus.accountants.utils import get_noise_multiplier

from fleetlora.client.device_state import DeviceState, UserConfig
from fleetlora.client.privacy_account import Cohort, PrivacyAccount, from_document, record_key
from fleetlora.client.privacy_floor import Declined, PrivacyFloor, configured_floor
from fleetlora.client.train import NoisePlan
from fleetlora.common import records
from fleetlora.common.config import PrivacySettings, TrainSettings
from fleetlora.common.data import Example
from fleetlora.common.errors import DataError, IncompatibleStateError

ACCOUNT_FILE = "privacy-account"


class BudgetSpent(Declined):
    """Every training record has spent its ε (or this round would take it past the target)."""


@dataclass(frozen=True)
class RoundPlan:
    """One DP round: the records it may sample from, its noise, and the cohorts it trains and retires."""

    account: PrivacyAccount  # the stored account plus this round's new cohort; written by :func:`spend`
    noise: NoisePlan  # sample_rate = batch / len(examples), capped at 1
    examples: tuple[Example, ...]  # the eligible records: train on these and nothing else
    training: tuple[int, ...]  # indices into account.cohorts
    retiring: tuple[int, ...]


def load_account(device: DeviceState) -> PrivacyAccount | None:
    """The device's stored account, or None before its first DP round; refuses anything it cannot trust."""
    path = device.path(ACCOUNT_FILE, ".json")
    try:
        stored = device.load_json(ACCOUNT_FILE)
        return None if stored is None else from_document(stored)
    except (IncompatibleStateError, KeyError, TypeError, ValueError) as exc:
        # Never start over silently: a lost history would let ε restart from zero.
        raise IncompatibleStateError(
            f"{path} is unreadable ({exc}); this device's privacy spend is unknown, so it must not train "
            "until an operator restores or retires the file."
        ) from exc


def floor_of(node_config: UserConfig, account: PrivacyAccount | None) -> PrivacyFloor:
    """The device's floor: its node config's, else the ceiling its account was opened at, else none."""
    configured = configured_floor(node_config)
    if configured is not None:
        return configured
    if account is not None:
        return PrivacyFloor(
            account.ceiling_epsilon, account.ceiling_delta, "the ε and δ its privacy account was opened at"
        )
    return PrivacyFloor()


def plan_round(
    account: PrivacyAccount | None, settings: TrainSettings, examples: Sequence[Example], *, round_number: int
) -> RoundPlan:
    """This round's DP-SGD over the records that can still afford it; :class:`BudgetSpent` if none can.

    Leaves ``account`` as it is: the plan holds a copy with this round's new cohort, if it trains.
    """
    if not examples:
        raise DataError("No local training examples: this device has nothing to learn from.")
    privacy = settings.privacy
    if account is None:
        account = _open_account(privacy, settings, len(examples))
    keys = [record_key(e.text) for e in examples]
    known = account.cohort_of()
    new = sorted({k for k in keys if k not in known})
    if privacy.budget == "device" and account.cohorts:
        # One lifetime budget: later records share the first cohort's spend (and its retirement).
        account = replace(account, cohorts=_joined_first(account.cohorts, new))
        known, new = account.cohort_of(), []
    arrivals = Cohort(joined=round_number, records=new)
    cohorts = [*account.cohorts, arrivals]  # the last one is this round's arrivals
    known.update(dict.fromkeys(arrivals.records, len(cohorts) - 1))
    eligible = {known[k] for k in keys if not cohorts[known[k]].retired}
    retiring: set[int] = set()
    after = math.inf  # ε after this round of the cheapest cohort that could not afford it
    while eligible:
        chosen = tuple(e for e, k in zip(examples, keys, strict=True) if known[k] in eligible)
        sample_rate = min(1.0, settings.batch_size / len(chosen))
        steps = settings.steps_for(len(chosen))
        costs = {i: account.epsilon(cohorts[i], privacy.delta, (sample_rate, steps)) for i in eligible}
        over = {i for i, epsilon in costs.items() if epsilon > privacy.epsilon}
        if not over:
            break
        after = min(costs[i] for i in over)
        eligible -= over  # fewer records: a larger q for the rest, so check again
        retiring |= {i for i in over if cohorts[i].history}  # arrivals that never trained wait instead
    if not eligible:
        spent = account.largest_epsilon(privacy.delta)
        raise BudgetSpent(
            f"privacy budget: every record is spent: largest record ε {spent:.3f}, "
            + (
                f"{after:.3f} after this round > target {privacy.epsilon:g}"
                if after < math.inf
                else "all retired"
            )
        )
    if len(cohorts) - 1 not in eligible:
        cohorts.pop()  # no arrivals, or they cannot afford this round: they join a later round's cohort
    noise = NoisePlan(account.noise_multiplier, privacy.max_grad_norm, sample_rate)
    return RoundPlan(
        replace(account, cohorts=cohorts), noise, chosen, tuple(sorted(eligible)), tuple(sorted(retiring))
    )


def spend(device: DeviceState, plan: RoundPlan, privacy: PrivacySettings, steps: int) -> dict[str, float]:
    """Record the round on disk (steps of the cohorts that trained, retirements); return the dp_* metrics."""
    account, noise = plan.account, plan.noise
    for i in plan.retiring:
        account.cohorts[i].retired = True
    for i in plan.training:
        account.cohorts[i].record(noise.noise_multiplier, noise.sample_rate, steps)
    device.save_json(ACCOUNT_FILE, account.to_document())
    return {
        records.DP_EPSILON: account.largest_epsilon(privacy.delta),
        records.DP_DELTA: privacy.delta,
        records.DP_NOISE_MULTIPLIER: account.noise_multiplier,
        records.DP_SAMPLE_RATE: noise.sample_rate,
        records.DP_RECORDS_RETIRED: account.retired_records(),
    }


def _joined_first(cohorts: Sequence[Cohort], records: list[str]) -> list[Cohort]:
    """The cohorts with ``records`` added to the first (copies: the stored account is left as it was)."""
    first = replace(cohorts[0], records=sorted({*cohorts[0].records, *records}))
    return [first, *cohorts[1:]]


def _open_account(privacy: PrivacySettings, settings: TrainSettings, num_examples: int) -> PrivacyAccount:
    """A new account, σ calibrated so ``planned_rounds`` rounds of this round's steps cost the target ε."""
    sigma = get_noise_multiplier(
        target_epsilon=privacy.epsilon,
        target_delta=privacy.delta,
        sample_rate=min(1.0, settings.batch_size / num_examples),
        steps=privacy.planned_rounds * settings.steps_for(num_examples),
        accountant=privacy.accountant,
    )
    return PrivacyAccount(float(sigma), privacy.accountant, privacy.epsilon, privacy.delta)
