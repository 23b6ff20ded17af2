"""A device's privacy account: each training record's spend, kept per arrival cohort.

A record's privacy loss under DP-SGD is the composition of the steps in which it could have been
sampled, each at that step's (σ, q); a step it was not eligible for (before it arrived, after it
retired) does not depend on it and costs it nothing. Records that first became eligible in the same
round have been eligible in exactly the same steps since, so one history per **cohort** is every
member's exact spend; an account per record would hold the same numbers thousands of times.

A record is known by :func:`record_key`, a hash of its text: the same on every read of a data file,
a simulated partition or a corpus store, and the same after a restart. The account keeps the keys
of retired records for good, so a record that leaves and comes back is still retired.

Pure: no I/O. :func:`from_document` refuses anything implausible (a negative step count, a σ or q that
is NaN, infinite, negative or, for q, above 1, a key in two cohorts) instead of guessing, because an
account read wrongly would let a record's ε restart from zero.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fleetlora.common.config import ACCOUNTANTS
from fleetlora.common.dp_accounting import AccountantStep, epsilon_from_history

SCHEMA = 2  # 1: one lifetime history per device (no cohorts)


def record_key(text: str) -> str:
    """A record's stable identity: 64 bits of the SHA-256 of its text (collisions only merge cohorts,
    which over-counts a record's spend, never under-counts it)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Cohort:
    """Records that first became eligible in round ``joined``, and the steps they have been eligible in."""

    joined: int
    records: list[str]
    history: list[AccountantStep] = field(default_factory=list)
    retired: bool = False  # for good: a retired record never trains with DP again

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's steps; consecutive rounds at one (σ, q) merge, which RDP and PRV compose alike."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))


@dataclass
class PrivacyAccount:
    """σ (fixed at the device's first DP round), the ceiling it was opened at, and every cohort's spend."""

    noise_multiplier: float
    accountant: str
    ceiling_epsilon: float  # the ε target at opening: without a node config floor, the most it accepts
    ceiling_delta: float
    cohorts: list[Cohort] = field(default_factory=list)

    def epsilon(self, cohort: Cohort, delta: float, extra: tuple[float, int] | None = None) -> float:
        """A cohort's ε at ``delta``; with ``extra`` = (sample rate, steps), ε if it took those steps too."""
        history = list(cohort.history)
        if extra is not None:
            history.append((self.noise_multiplier, *extra))
        if self.accountant == "rdp":
            return _rdp_epsilon(history, delta)
        return epsilon_from_history(history, delta=delta, accountant=self.accountant)

    def largest_epsilon(self, delta: float) -> float:
        """The largest ε any record has spent (0 before the first DP round)."""
        return max((self.epsilon(c, delta) for c in self.cohorts), default=0.0)

    def retired_records(self) -> int:
        return sum(len(c.records) for c in self.cohorts if c.retired)

    def cohort_of(self) -> dict[str, int]:
        """Each known record key → the index of its cohort."""
        return {key: i for i, cohort in enumerate(self.cohorts) for key in cohort.records}

    def to_document(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}


def _rdp_epsilon(history: Sequence[AccountantStep], delta: float) -> float:
    """What ``epsilon_from_history(history, accountant="rdp")`` returns, from cached per-step RDP curves.

    A device checks every cohort each round, and cohorts share their (σ, q): computing each curve once
    makes that a sum of vectors instead of a fresh accountant per cohort.
    """
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(sigma, rate) * steps for sigma, rate, steps in history)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """The RDP of one Poisson-subsampled Gaussian step at each of Opacus' default orders."""
    return rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


def from_document(document: Mapping[str, Any]) -> PrivacyAccount:
    """The account a stored document describes; ``ValueError`` saying what is wrong if it is implausible."""
    if document.get("schema") != SCHEMA:
        raise ValueError(f"schema {document.get('schema')!r}, this device reads {SCHEMA}")
    accountant = document["accountant"]
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} is not one of {ACCOUNTANTS}")
    account = PrivacyAccount(
        noise_multiplier=_positive(document["noise_multiplier"], "noise_multiplier"),
        accountant=accountant,
        ceiling_epsilon=_positive(document["ceiling_epsilon"], "ceiling_epsilon"),
        ceiling_delta=_rate(document["ceiling_delta"], "ceiling_delta"),
        cohorts=[_cohort(c) for c in _list(document["cohorts"], "cohorts")],
    )
    keys = [key for cohort in account.cohorts for key in cohort.records]
    if len(set(keys)) != len(keys):
        raise ValueError("a record is in two cohorts")
    return account


def _cohort(stored: Any) -> Cohort:
    if not isinstance(stored, dict):
        raise ValueError(f"a cohort is a {type(stored).__name__}, not an object")
    records = _list(stored["records"], "records")
    if not all(isinstance(key, str) and key for key in records):
        raise ValueError("a record key is not a non-empty string")
    if not isinstance(stored["retired"], bool):
        raise ValueError(f"retired is {stored['retired']!r}, not true or false")
    history: list[AccountantStep] = []
    for entry in _list(stored["history"], "history"):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError(f"history entry {entry!r} is not [σ, q, steps]")
        sigma, rate, steps = entry
        history.append((_positive(sigma, "σ"), _rate(rate, "q"), _count(steps, "steps")))
    return Cohort(_count(stored["joined"], "joined"), records, history, stored["retired"])


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{name} is a {type(value).__name__}, not a list")
    return value


def _positive(value: Any, name: str) -> float:
    """A finite float > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} is {value!r}, not a finite number > 0")
    return float(value)


def _rate(value: Any, name: str) -> float:
    """A probability in (0, 1]."""
    if _positive(value, name) > 1:
        raise ValueError(f"{name} is {value!r}, above 1")
    return float(value)


def _count(value: Any, name: str) -> int:
    """An integer ≥ 0 (JSON's 3.0 is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is {value!r}, not an integer ≥ 0")
    return value
