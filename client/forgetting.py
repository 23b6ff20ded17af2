"""Forgetting control on the device: replay, distillation and EWC, each off by default and combinable.

A fleet that keeps learning from new records overwrites what it learned before. The run config
(:class:`~fleetlora.common.config.ForgettingSettings`) selects any of three controls; each is a small
change to one round's local training and each keeps DP-SGD's accounting honest (docs/security.md):

1. **the pool** (:func:`compose_pool`): with ``train-on = "arrivals"`` the round trains on the records
   that arrived since the device last trained, plus older records making up ``replay-share`` of the
   set (experience replay, Rolnick et al. 2019, "Experience Replay for Continual Learning"). Under DP
   the pool is the training set that :func:`fleetlora.client.privacy.plan_round` plans: retired
   records are never replayed, and every pool record is charged the round's (σ, q, steps);
2. **distillation** (:class:`Teacher`): the adapter the device received is the teacher; its logits on
   every pool example are computed once, before the first step, and each example's loss becomes
   (1−w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al. 2015; LwF, Li & Hoiem
   2017), on the full logits, also where the restricted softmax masks the CE;
3. **online EWC** (:class:`OnlineEWC`): the penalty λ/2 Σ F(θ−θ*)² towards θ*, the weights the round
   starts from, with a diagonal Fisher F kept in the device's state folder (Kirkpatrick et al. 2017,
   in the online form of Schwarz et al. 2018). The Fisher is estimated from the gradients the steps
   compute anyway, privatized ones under DP, and its penalty's gradient is added after privatization:
   EWC reads no record that DP-SGD did not already account for.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime

import torch
from opacus.optimizers import DPOptimizer

from fleetlora.client.corpus import drift
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.client.privacy_account import PrivacyAccount, record_key
from fleetlora.client.privacy_floor import Declined
from fleetlora.common.batches import encode, on_model_device
from fleetlora.common.data import Example
from fleetlora.common.delta import State, check_layout
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.common.model import LoadedModel

log = logging.getLogger(__name__)

FISHER_FILE = "ewc-fisher"  # in the device's state folder; never sent anywhere


class NothingArrived(Declined):
    """``train-on = "arrivals"`` and no training record arrived since the device last trained."""


# ---------------------------------------------------------------------------------------------
# The pool: arrivals plus replayed older records


@dataclass(frozen=True)
class Pool:
    """One round's training set under ``train-on = "arrivals"``."""

    examples: list[Example]  # the arrivals, then the replayed older records
    arrivals: int
    replayed: int


ARRIVALS_FILE = "arrivals"  # when the device's newest batch of records began arriving
ARRIVALS_MAX_BYTES = 4096  # one timestamp: anything larger is damage, refused before it is read


def arrived_texts(device: DeviceState) -> set[str] | None:
    """The texts of the device's newest batch of corpus records: those that arrived since it last trained
    (its drift reference), or, when none did, the same batch its previous round trained on. A device keeps
    learning its newest records, round after round, until newer ones come (as a task of continual
    learning is trained for several epochs). None while every record is new (before a first batch ends).

    A damaged drift reference or arrivals file is set aside (logged) and every record counts as new for
    the round: a round on more records than asked, rather than a device failing every round.
    """
    try:
        last = drift.last_trained(device)
    except IncompatibleStateError as exc:
        _set_aside(device, drift.REFERENCE_FILE, ".json", exc, "every record counts as new this round")
        return None
    if last is None:
        return None
    with CorpusStore(device.root / CORPUS_FILE) as store:
        if store.window(since=last, limit=1):  # a new batch began arriving after the last training
            device.save_json(ARRIVALS_FILE, {"since": last.isoformat()})
        try:
            since = _batch_start(device)
        except IncompatibleStateError as exc:
            _set_aside(device, ARRIVALS_FILE, ".json", exc, "every record counts as new this round")
            return None
        if since is None:
            return None
        return {r.text for r in store.window(since=since) if r.modality == "text"}


def _batch_start(device: DeviceState) -> datetime | None:
    """When the newest batch began (its file), None before a second batch; a damaged file is refused."""
    stored = device.load_json(ARRIVALS_FILE, max_bytes=ARRIVALS_MAX_BYTES)
    if stored is None:
        return None
    try:
        moment = datetime.fromisoformat(str(stored["since"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleStateError(f"{device.path(ARRIVALS_FILE, '.json')} is damaged ({exc}).") from exc
    if moment.utcoffset() is None:
        raise IncompatibleStateError(f"{device.path(ARRIVALS_FILE, '.json')} is damaged (no time zone).")
    return moment


def _set_aside(device: DeviceState, name: str, suffix: str, problem: Exception, then: str) -> None:
    """Move a damaged state file out of the way (kept for inspection) and log why and what follows."""
    try:
        moved: object = device.set_aside(name, suffix)
    except OSError as exc:  # the next read finds the damage again, and lands here again
        moved = f"nowhere ({exc.strerror})"
    log.warning(
        "%s: %s%s was set aside as %s (%s)",
        then,
        name,
        suffix,
        moved,
        problem,
        extra={"event": "state_file_set_aside", "file": f"{name}{suffix}"},
    )


def retired_keys(account: PrivacyAccount | None) -> frozenset[str]:
    """The record keys the account has retired for good: they never train with DP again."""
    if account is None:
        return frozenset()
    return frozenset(key for cohort in account.cohorts if cohort.retired for key in cohort.records)


def compose_pool(
    train_set: Sequence[Example],
    replay_share: float,
    *,
    arrived: Set[str] | None,
    seed: int,
    retired: Set[str] = frozenset(),
) -> Pool:
    """The arrivals (``arrived`` None: every record is one) plus k older records, k = round(share / (1 −
    share) × arrivals), capped at the older records not retired.

    Which older records: the k whose SHA-256 keyed by ``seed`` (the round's training seed) ranks lowest.
    That is a seeded draw without replacement, with one more property: adding or removing one record
    changes the choice by at most one other record (the one at the cut), where a shuffled list would
    change it wholesale. Raises :class:`NothingArrived` when no arrival is in ``train_set``: with nothing
    new to learn, the round would spend privacy budget and weight in the average on records the fleet has
    already learned from, so the device declines it.
    """
    if arrived is None:
        new, older = list(train_set), []
    else:
        new = [e for e in train_set if e.text in arrived]
        older = [e for e in train_set if e.text not in arrived and record_key(e.text) not in retired]
    if not new:
        raise NothingArrived("train-on arrivals: no training record arrived since this device last trained")
    wanted = round(replay_share / (1.0 - replay_share) * len(new))
    salt = seed.to_bytes(8, "big", signed=True)
    replayed = sorted(older, key=lambda e: hashlib.sha256(salt + e.text.encode()).digest())[:wanted]
    return Pool([*new, *replayed], len(new), len(replayed))


# ---------------------------------------------------------------------------------------------
# Distillation from the adapter the device received


def distillation_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    *,
    weight: float,
    temperature: float,
    absent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of (1−w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), per example.

    ``student`` and ``teacher`` are (B, C) logits. ``absent`` (C,) masks classes out of the CE only (the
    restricted softmax); the KL sees every class, which is what keeps the teacher's knowledge of them.
    T² keeps the soft term's gradient on the CE's scale as T grows (Hinton et al. 2015). Under DP this is
    still a per-example loss: example i's term reads the teacher's logits of example i only.
    """
    masked = student if absent is None else student.masked_fill(absent, float("-inf"))
    cross_entropy = torch.nn.functional.cross_entropy(masked, labels, reduction="none")  # (B,)
    if weight == 0:
        return cross_entropy.mean()
    log_student = torch.log_softmax(student / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return ((1.0 - weight) * cross_entropy + weight * temperature**2 * kl).mean()


@dataclass(frozen=True)
class Teacher:
    """The received adapter's logits on every pool example (N, C), taken before the first step."""

    logits: torch.Tensor
    weight: float
    temperature: float

    def loss(
        self, student: torch.Tensor, labels: torch.Tensor, take: list[int], absent: torch.Tensor | None
    ) -> torch.Tensor:
        return distillation_loss(
            student,
            labels,
            self.logits[take],
            weight=self.weight,
            temperature=self.temperature,
            absent=absent,
        )


@torch.no_grad()
def pool_logits(loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 64) -> torch.Tensor:
    """The model's class logits (N, C) on ``examples``, in order, in eval mode (no dropout)."""
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(examples), batch_size):
            batch = on_model_device(encode(loaded, examples[start : start + batch_size]), model)
            batch.pop("labels")
            chunks.append(model(**batch).logits)
    finally:
        model.train(was_training)
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# Online EWC


class OnlineEWC:
    """One round of online EWC over the trainable parameters ``params`` (by name).

    :meth:`on_gradient` runs once a step's gradient is final: after backward without DP, after clipping
    and noise under DP (Opacus' step hook, :meth:`dp_step_hook`). It first adds the step's
    batch × squared gradient to the Fisher estimate, less the known noise variance (σ·C/B)² under DP, then
    adds the penalty's gradient λF(θ−θ*) to the gradient: derived from privatized outputs and public
    weights only, it costs no privacy. The Fisher from earlier rounds (None before the first) weighs this
    round's penalty; :meth:`updated_fisher` folds this round's estimate in.
    """

    def __init__(
        self, params: Mapping[str, torch.nn.Parameter], fisher: State | None, strength: float
    ) -> None:
        self.params = dict(params)
        self.anchor = {name: p.detach().clone() for name, p in self.params.items()}  # θ*
        self.fisher = (
            None if fisher is None else {n: fisher[n].to(p.device, p.dtype) for n, p in self.params.items()}
        )
        self.strength = strength  # λ
        self._squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in self.params.items()}
        self._steps = 0

    def penalty(self) -> torch.Tensor:
        """λ/2 Σ F(θ−θ*)²: 0 before the device has a Fisher."""
        total = torch.zeros(())
        if self.fisher is not None:
            for name, p in self.params.items():
                total = total + (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
        return self.strength / 2 * total

    @torch.no_grad()
    def on_gradient(self, batch_size: float, noise_variance: float = 0.0) -> None:
        """Record this step's gradient for the Fisher, then add the penalty's gradient λF(θ−θ*) to it."""
        for name, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._squares[name] += batch_size * (p.grad.double() ** 2 - noise_variance)
            if self.fisher is not None:
                p.grad += self.strength * self.fisher[name] * (p - self.anchor[name])
        self._steps += 1

    def dp_step_hook(self, optimizer: DPOptimizer) -> None:
        """For Opacus' ``DPOptimizer.attach_step_hook``: runs after clipping, noise and scaling, before the
        update.

        The privatized gradient is (Σ clipped + N(0, (σC)²)) / B per coordinate, so its noise variance
        is (σC/B)², which :meth:`on_gradient` takes off the squared gradient.
        """
        batch = optimizer.expected_batch_size * optimizer.accumulated_iterations
        std = optimizer.noise_multiplier * optimizer.max_grad_norm / batch
        self.on_gradient(batch, std**2)

    def updated_fisher(self) -> State:
        """F ← ½F_old + ½F_new (F_new alone in the first round); F_new floored at 0 per coordinate."""
        fresh = {
            name: (squares / max(self._steps, 1)).clamp(min=0.0).to(self.params[name].dtype).cpu()
            for name, squares in self._squares.items()
        }
        if self.fisher is None:
            return fresh
        return {name: 0.5 * self.fisher[name].cpu() + 0.5 * fresh[name] for name in fresh}


def load_fisher(device: DeviceState, reference: Mapping[str, torch.Tensor]) -> State | None:
    """The device's stored Fisher if it fits ``reference`` (the trainable layout) and holds only finite,
    non-negative values; otherwise None, with a damaged or mismatched file set aside and logged: EWC then
    starts fresh rather than fail the round."""
    try:
        stored = device.load_arrays(FISHER_FILE, max_bytes=fisher_bytes(reference))
        if stored is None:
            return None
        check_layout(stored, reference)
        bad = sorted(n for n, t in stored.items() if not bool(torch.isfinite(t).all() and (t >= 0).all()))
        if bad:
            raise IncompatibleStateError(f"not finite or negative in {len(bad)} arrays (e.g. {bad[0]})")
    except IncompatibleStateError as exc:
        moved = device.set_aside(FISHER_FILE)
        log.warning(
            "EWC starts fresh: the stored Fisher was set aside as %s (%s)",
            moved,
            exc,
            extra={"event": "ewc_fisher_set_aside"},
        )
        return None
    return stored


def fisher_bytes(reference: Mapping[str, torch.Tensor]) -> int:
    """The most bytes a Fisher of ``reference``'s layout takes: 8 per value, a header line per tensor."""
    return 4096 + sum(8 * t.numel() + 512 for t in reference.values())


def save_fisher(device: DeviceState, fisher: State) -> None:
    """Keep the Fisher for the next round (written atomically; it stays on the device)."""
    if not all(bool(torch.isfinite(t).all()) for t in fisher.values()):
        log.warning("EWC Fisher not kept: it is not finite", extra={"event": "ewc_fisher_not_finite"})
        return
    device.save_arrays(FISHER_FILE, fisher)
