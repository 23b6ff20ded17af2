"""The federation loop: resume from SQL, then run rounds that read top to bottom.

Each round (:meth:`Federation._round`):

1. **sample**: wait (until a ``round-deadline``) for at least ``min-devices`` connected devices and draw up
   to ``devices-per-round`` of them (more by ``over-select``, for those that drop out) by device id,
   devices that want to train first and those known not to be eligible last (:mod:`.sampling`: seeded,
   one seed trains one schedule; or from the OS's entropy);
2. **configure**: the round's instructions, how its uploads are opened (plain arrays, or sealed) and
   how accepted deltas are averaged (FedAvg, wrapped in central DP when it is on);
3. **exchange**: send each sampled device the global adapter and fold replies into the aggregator
   (:mod:`.aggregation`, every check of a reply) as they arrive, until all are in, a fresh deadline
   passes, or (over-selected) ``devices-per-round`` valid deltas are in; the devices' privacy spend
   goes to the ledger, and each decline to its device's row (not eligible, so sampled last until its
   next status reply), whatever happens next;
4. **aggregate**: with at least ``min-devices`` valid deltas, release the mean delta and take a
   server-optimizer step (plain FedAvg adds it); otherwise record a failed round and keep the version;
5. **evaluate** the candidate adapter: on the participants' held-out text (federated; its own
   deadline), when an evaluation set is configured on the coordinator, and on the tenant's pinned
   key-knowledge set, whose score decides whether the version is held (:mod:`.retention`);
6. **commit**: store the new version, its participants, the optimizer's state, the metrics, its key
   score and any hold, and the round record in one transaction, so a crash leaves the round whole or
   not at all (a round that was not committed is trained again after a restart);
7. **publish**: when the coordinator has keys, build the signed package parent → new version and
   bring connected devices up to it; a held version gets neither (the phase records why), and devices
   are brought instead to a version an operator released since, if that is the newest one allowed.

A restarted coordinator continues from the latest stored version of its lineage, so no completed
round is lost or repeated. Each phase is recorded as it begins, and training, evaluation and
distribution count their devices as they answer (:mod:`.progress`), so an operator can follow it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from flwr.app import MessageType
from flwr.serverapp import Grid

from fleetlora.common.batches import evaluate
from fleetlora.common.codec import inflated_bound
from fleetlora.common.config import to_config
from fleetlora.common.data import Example, load_examples
from fleetlora.common.delta import State, diff, is_finite, l2_norm, layout_fingerprint, load_trainable_state
from fleetlora.common.errors import QuorumError
from fleetlora.common.messages import Instructions
from fleetlora.common.model import LoadedModel, cached_model, canary_is_finite
from fleetlora.common.server_optim import server_step
from fleetlora.coordinator.aggregation import (
    DeltaAggregator,
    DeltaMean,
    Drop,
    ExampleWeightedMean,
    MetricAggregator,
)
from fleetlora.coordinator.central_dp import CentralDPAccountant, CentralDPMean
from fleetlora.coordinator.distribution import DistributionOutcome, Distributor
from fleetlora.coordinator.exchange import exchange, round_messages, wait_for_nodes
from fleetlora.coordinator.influence import Accepted, RoundBounds, accepted
from fleetlora.coordinator.keys import load_hpke_key, load_signing_key
from fleetlora.coordinator.packages import PackageTooLarge
from fleetlora.coordinator.progress import RoundProgress
from fleetlora.coordinator.quarantine import admitted, held_out
from fleetlora.coordinator.retention import RetentionGate
from fleetlora.coordinator.robust import CoordinateTrimmedMean
from fleetlora.coordinator.sampling import Sampler
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import (
    NewVersion,
    PackageInfo,
    RoundReport,
    ServerOptimizerState,
    Storage,
    VersionInfo,
)
from fleetlora.coordinator.uploads import PrivacySpend, SealedUploads, UploadOpener, open_plain

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationStart:
    """Where a federation run begins."""

    lineage: str
    version: VersionInfo  # the version round ``first_round`` trains from
    first_round: int
    base_model_bytes: int
    trainable_share: float
    resumed: bool


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did; ``version`` is None when it failed."""

    round: int
    version: VersionInfo | None
    sampled_devices: list[str]  # the sampled devices' ids, in the order drawn
    participants: dict[int, int]
    drops: list[Drop]
    upload_bytes: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    privacy: list[PrivacySpend] = field(default_factory=list)  # DP devices' cumulative spend
    package: PackageInfo | None = None  # the signed package from the parent version to this one
    distribution: DistributionOutcome | None = None
    package_error: str | None = None  # why no package was built (none fits under the cap)
    quarantined: list[str] = field(default_factory=list)  # devices this round's anomalies put in quarantine
    held: str | None = None  # why the retention gate held the version back (not packaged, not distributed)

    @property
    def sampled(self) -> int:
        return len(self.sampled_devices)

    @property
    def examples(self) -> int:
        return sum(self.participants.values())


@dataclass(frozen=True)
class _Evaluation:
    """The new version's scores: federated (``federated_*``) and on the coordinator (``central_*``)."""

    metrics: dict[str, float]
    drops: list[Drop]  # devices whose evaluation failed or never came


@dataclass(frozen=True)
class _Publication:
    """The round's package and its distribution, or why no package was built."""

    package: PackageInfo | None = None
    distribution: DistributionOutcome | None = None
    error: str | None = None


class FederationObserver(Protocol):
    """Receives progress (the CLI's table and progress bar, or a test)."""

    def started(self, start: FederationStart) -> None: ...

    def round_finished(self, outcome: RoundOutcome) -> None: ...


def lineage_of(loaded: LoadedModel, tenant: str) -> str:
    """Versions that can follow one another: one tenant's, same base weights, adapter layout, scale
    and labels.

    LoRA alpha is in the key because the same A/B weights compute another function at another
    alpha/rank scale; rank, targets and unfrozen layers are in the layout. The tenant is in it so
    two tenants training the same model never share a lineage.
    """
    spec = loaded.spec
    layout = layout_fingerprint(loaded.initial_adapter)
    labels = ",".join(spec.labels)
    key = f"{tenant}|{loaded.base_sha256}|{layout}|{spec.task}|{labels}|alpha={spec.lora.alpha}"
    return hashlib.sha256(key.encode()).hexdigest()


class Federation:
    """Runs rounds for one lineage against a Flower Grid."""

    def __init__(
        self,
        grid: Grid,
        settings: CoordinatorSettings,
        observer: FederationObserver | None = None,
        run_id: int | None = None,
    ) -> None:
        self.grid = grid
        self.settings = settings
        self.observer = observer
        self.run_id = run_id  # Flower's run, recorded with each round's phases
        self.storage = Storage.open(settings.db_url, settings.tenant)
        self.loaded = cached_model(settings.spec)
        self.lineage = lineage_of(self.loaded, settings.tenant)
        self.progress = RoundProgress(self.storage.ledgers, self.lineage, 0, run_id)  # one per round
        self.eval_set: list[Example] = load_examples(settings.eval_data) if settings.eval_data else []
        self.optimizer_state: State = {}
        self.hpke_key = load_hpke_key(Path(settings.keys_dir)) if settings.seal_uploads else None
        self.upload_bound = inflated_bound(self.loaded.initial_adapter)  # bytes a decoded upload may reach
        self.delta_mean: Callable[[State], DeltaMean] = ExampleWeightedMean  # set again on resume
        self.held_nodes: set[int] = set()  # this run's nodes proven to belong to a quarantined device
        self.accepted: Accepted | None = None  # the last round's participants: bounds the next one
        self.sampler = Sampler(  # over-selected: more than the round needs, for those that drop out
            grid,
            count=math.ceil(settings.devices_per_round * (1 + settings.over_select)),
            seed=settings.sampling_seed,
            ttl=settings.round_deadline,
        )
        self.storage.versions.register_lineage(
            self.lineage,
            settings.tenant,
            to_config(settings.spec, "model"),
            self.loaded.base_sha256,
            self.loaded.base_bytes,
        )
        self.distributor = (
            Distributor(
                grid,
                self.storage,
                load_signing_key(Path(settings.keys_dir)),
                settings.package_policy,
                tenant=settings.tenant,
                timeout=settings.round_deadline,
            )
            if settings.builds_packages
            else None
        )
        self.retention = RetentionGate(
            self.storage,
            self.loaded,
            self.lineage,
            threshold=settings.retention_threshold,
            pin=settings.key_set,
        )

    def run(self) -> list[RoundOutcome]:
        """Run ``settings.rounds`` rounds after the latest stored version."""
        version, state, resumed = self._resume_or_initialize()
        self.delta_mean = self._averaging(version)
        start = FederationStart(
            lineage=self.lineage,
            version=version,
            first_round=version.round + 1,
            base_model_bytes=self.loaded.base_bytes,
            trainable_share=self.loaded.trainable_share,
            resumed=resumed,
        )
        if self.observer:
            self.observer.started(start)
        outcomes = []
        self.run_rounds = range(start.first_round, start.first_round + self.settings.rounds)
        for round_number in self.run_rounds:
            outcome, state = self._round(round_number, version, state)
            version = outcome.version or version
            outcomes.append(outcome)
            if self.observer:
                self.observer.round_finished(outcome)
        return outcomes

    # ---- set-up ---------------------------------------------------------------------------

    def _resume_or_initialize(self) -> tuple[VersionInfo, State, bool]:
        latest = self.storage.versions.latest(self.lineage)
        if latest is not None:
            # A resumed run's first round is bounded by the stored round's counts (its norms are not kept).
            self.accepted = Accepted(tuple(latest.participants.values()), ()) if latest.participants else None
            stored = self.storage.versions.optimizer_state(latest.id)
            # Another optimizer's moments mean nothing to this one: it starts fresh.
            if stored is not None and stored.name == self.settings.server.name:
                self.optimizer_state = stored.state
            state = self.storage.versions.adapter(latest.id)
            self.retention.baseline(latest, state)  # the first new version's key score has one to match
            return latest, state, True
        state = self.loaded.initial_adapter  # not the live weights: a cached model may have trained
        version = self.storage.versions.add(
            self.retention.judge(
                NewVersion(
                    lineage=self.lineage,
                    round=0,
                    parent_id=None,
                    base_model_sha256=self.loaded.base_sha256,
                    adapter=state,
                    participants={},
                    metrics=self._evaluate_on_coordinator(state),
                )
            )
        )
        return version, state, False

    def _averaging(self, latest: VersionInfo) -> Callable[[State], DeltaMean]:
        """FedAvg's example-weighted mean, wrapped in central DP (ε composing the lineage's history) if on,
        or the coordinate-wise trimmed mean or median the operator chose (never with central DP)."""
        trim = self.settings.influence.trim
        if trim is not None:
            return lambda reference: CoordinateTrimmedMean(reference, trim)
        central = self.settings.central_dp
        if not central.enabled:
            return ExampleWeightedMean
        chain = [v.metrics for v in self.storage.versions.chain(latest.id)]
        accountant = CentralDPAccountant.from_version_metrics(central, chain)
        return lambda reference: CentralDPMean(ExampleWeightedMean(reference), accountant)

    # ---- one round ------------------------------------------------------------------------

    def _round(self, number: int, parent: VersionInfo, state: State) -> tuple[RoundOutcome, State]:
        started = time.monotonic()
        deadline = started + self.settings.round_deadline  # for connecting and sampling
        self.progress = RoundProgress(self.storage.ledgers, self.lineage, number, self.run_id)
        self.progress.enter("sampling")
        try:
            online = wait_for_nodes(self.grid, self.settings.min_devices, deadline)
        except QuorumError as exc:
            return self._failed(number, started, [], None, str(exc)), state
        held = held_out(self.storage.devices)
        if held:
            online = admitted(online, self.sampler.names.of(online, deadline), held, self.storage.devices)
            # and the nodes whose uploads proved a held device, whatever name they give now
            online = [node for node in online if node not in self.held_nodes]
            if len(online) < self.settings.min_devices:
                error = (
                    f"{len(online)} devices online outside quarantine, {self.settings.min_devices} needed: "
                    "`fleetlora coordinator devices quarantined` lists the others"
                )
                return self._failed(number, started, [], None, error), state
        sampled = self._sample(number, online, deadline)
        # configure
        instructions = self._configure(number, parent)
        planned = self._plan_privacy(instructions, sampled, online, deadline)
        # exchange: each reply is checked and folded in as it arrives. Training has a round-deadline of
        # its own: waiting for devices and round 1's identity queries (one per node) must not eat it.
        training_deadline = time.monotonic() + self.settings.round_deadline
        train = self._exchange(sampled, state, instructions, planned, training_deadline, held)
        self.held_nodes |= train.held_nodes
        sampled_devices = self.sampler.named(sampled, online)  # as known now that the replies named them
        quarantined = self.storage.devices.flag(
            self.lineage, number, train.anomalies, quarantine_after=self.settings.influence.quarantine_after
        )
        if len(train.participants) < self.settings.min_devices:
            error = f"{len(train.participants)} valid deltas, {self.settings.min_devices} needed"
            return self._failed(number, started, sampled_devices, train, error, quarantined), state
        self.progress.enter("aggregating")
        update = train.release(sampled=len(sampled), online=len(online))
        new_state, optimizer_state = server_step(
            self.settings.server, state, update.delta, self.optimizer_state
        )
        # never stored, so never sent: no device is left with a broken adapter
        if unhealthy := self._unhealthy(state, new_state):
            return self._failed(number, started, sampled_devices, train, unhealthy, quarantined), state
        # evaluate the candidate (the messages carry the round's instructions, the arrays are new)
        self.progress.enter("evaluating", total=len(train.participants))
        evaluation = self._evaluate(train, new_state, planned)
        # scored on the key set: held back if it forgot (retention.py)
        candidate = self.retention.judge(
            NewVersion(
                lineage=self.lineage,
                round=number,
                parent_id=parent.id,
                base_model_sha256=self.loaded.base_sha256,
                adapter=new_state,
                participants={str(n): c for n, c in train.participants.items()},
                metrics={**update.metrics, **evaluation.metrics},
                optimizer=ServerOptimizerState(self.settings.server.name, optimizer_state),
            )
        )
        metrics = dict(candidate.metrics)
        drops = [*train.drops, *evaluation.drops]
        seconds = time.monotonic() - started
        # commit: the version, its hold if any, and its round, in one transaction
        version = self.storage.versions.commit_round(candidate, _report(len(sampled), train, drops, seconds))
        self.optimizer_state = optimizer_state
        self.accepted = accepted(train.participants, train.norms)  # the next round's bounds follow it
        publication = self._publish(version, parent, sampled)
        if self.distributor is not None:  # the round's entries, signed outside the database
            try:
                self.storage.audit.checkpoint(self.distributor.key, Path(self.settings.keys_dir))
            except OSError as exc:  # the version stands; the next round's checkpoint covers it too
                LOG.warning("audit checkpoint not written to %s: %s", self.settings.keys_dir, exc)
        outcome = RoundOutcome(
            round=number,
            version=version,
            sampled_devices=sampled_devices,
            participants=dict(train.participants),
            drops=drops,
            upload_bytes=train.upload_bytes,
            seconds=seconds,
            metrics=metrics,
            privacy=list(train.privacy),
            package=publication.package,
            distribution=publication.distribution,
            package_error=publication.error,
            quarantined=quarantined,
            held=candidate.hold,
        )
        self.progress.completed(version.label)
        return outcome, new_state

    def _unhealthy(self, state: State, new_state: State) -> str | None:
        """Why the round's new global adapter must not be stored, if it must not: it holds NaN or inf,
        it moved further than ``norm-ratio`` × the adapter it came from (at least 1) allows, or the
        model gives NaN or inf on the canary input with it."""
        if not is_finite(new_state):
            return "the new global adapter holds NaN or inf: not stored"
        ratio = self.settings.influence.norm_ratio
        moved, bound = l2_norm(diff(new_state, state)), ratio * max(1.0, l2_norm(state))
        if ratio and moved > bound:
            return f"the new global adapter moved {moved:.4g}, above the bound {bound:.4g}: not stored"
        load_trainable_state(self.loaded.model, new_state)
        if not canary_is_finite(self.loaded):
            return "the new global adapter gives NaN or inf on the canary input: not stored"
        return None

    def _sample(self, number: int, online: list[int], deadline: float) -> list[int]:
        # Both come from the status replies the distributor records: none without it.
        if self.distributor is None:
            return self.sampler.draw(number, online, set(), deadline)
        devices = self.storage.devices
        return self.sampler.draw(
            number, online, devices.wanting_nodes(), deadline, ineligible=devices.ineligible_nodes()
        )

    def _configure(self, number: int, parent: VersionInfo) -> Instructions:
        return Instructions(
            spec=self.settings.spec,
            train=self.settings.train_for_round(number),
            round=number,
            version=parent.id,
            base_sha256=self.loaded.base_sha256,
            tenant=self.settings.tenant,
            seal_uploads=self.settings.seal_uploads,
            upload_codec=self.settings.upload_codec,
        )

    def _plan_privacy(
        self, instructions: Instructions, sampled: list[int], online: list[int], deadline: float
    ) -> dict[int, Instructions]:
        """Each sampled device's instructions: under DP with ``dp-rounds`` 0, its noise is planned for
        the rounds of this run the schedule gives it (:meth:`Sampler.participations`), not for all."""
        privacy = instructions.train.privacy
        if not privacy.enabled or not self.settings.plan_dp_by_schedule:
            return dict.fromkeys(sampled, instructions)
        remaining = range(instructions.round, self.run_rounds.stop)
        counts = self.sampler.participations(online, remaining, deadline)
        return {
            node: dataclasses.replace(
                instructions,
                train=dataclasses.replace(
                    instructions.train,
                    privacy=dataclasses.replace(privacy, planned_rounds=max(1, counts[node])),
                ),
            )
            for node in sampled
        }

    def _upload_opener(self, instructions: Instructions) -> UploadOpener:
        """Sealed uploads are opened against this round's context and the devices' enrolled keys."""
        if self.hpke_key is None:
            return open_plain
        return SealedUploads(
            instructions,
            coordinator_key=self.hpke_key,
            enrolled_key=partial(self.storage.devices.key, tenant=self.settings.tenant),
            max_bytes=self.upload_bound,
        )

    def _exchange(
        self,
        sampled: list[int],
        state: State,
        instructions: Instructions,
        planned: dict[int, Instructions],
        deadline: float,
        held: frozenset[str],
    ) -> DeltaAggregator:
        """Train on the sampled devices; each reply is checked and folded in as it arrives."""
        bounds = RoundBounds.for_round(self.settings.influence, l2_norm(state), self.accepted)
        opener = self._upload_opener(instructions)
        aggregator = DeltaAggregator(state, self.delta_mean(state), opener, bounds, held)
        self.progress.enter("training", total=len(sampled))
        # The devices' deadline is the coordinator's: what is left of the round's, not a fresh one (a
        # device gives a round up that it cannot finish by then: client/pacing.py).
        ttl = max(1.0, deadline - time.monotonic())
        messages = round_messages(sampled, state, planned, MessageType.TRAIN, ttl=ttl)
        # Over-selected, the round closes as soon as it has the deltas it needs: the rest are not waited for.
        enough = self.settings.devices_per_round if self.settings.over_select else None
        closed_early = False
        for answered, reply in enumerate(exchange(self.grid, messages, deadline), start=1):
            self.sampler.learn(reply)  # its device id: the round's record, and no need to ask it later
            aggregator.add(reply)
            self.progress.advance(answered)
            if enough is not None and aggregator.accepted >= enough and answered < len(sampled):
                closed_early = True
                break
        aggregator.mark_missing(sampled, closed_early=closed_early)
        # Spent (or declined) whether or not the round reaches its quorum, so recorded before the check.
        self.storage.ledgers.record_privacy(self.lineage, instructions.round, aggregator.privacy)
        self.storage.devices.record_declines(instructions.round, aggregator.declines)
        return aggregator

    def _evaluate(
        self, train: DeltaAggregator, state: State, planned: dict[int, Instructions]
    ) -> _Evaluation:
        """Score the new version on the participants' held-out text, then on the coordinator's set."""
        deadline = time.monotonic() + self.settings.round_deadline
        participants = sorted(train.participants)
        federated = MetricAggregator(prefix="federated_")
        messages = round_messages(
            participants, state, planned, MessageType.EVALUATE, ttl=self.settings.round_deadline
        )
        for answered, reply in enumerate(exchange(self.grid, messages, deadline), start=1):
            federated.add(reply)
            self.progress.advance(answered)
        federated.mark_missing(participants)
        metrics = {**federated.metrics(), **self._evaluate_on_coordinator(state)}
        return _Evaluation(metrics, list(federated.drops))

    def _evaluate_on_coordinator(self, state: State) -> dict[str, float]:
        if not self.eval_set:
            return {}
        load_trainable_state(self.loaded.model, state)
        return {f"central_{k}": v for k, v in evaluate(self.loaded, self.eval_set).items()}

    def _publish(self, version: VersionInfo, parent: VersionInfo, sampled: list[int]) -> _Publication:
        """Build the round's package (parent → new version) and, if asked, bring connected devices up.

        A held version is neither packaged nor distributed; connected devices are brought instead to
        the newest version not held if an operator released it (they may not hold it yet)."""
        if version.hold is not None and version.held:
            self.progress.enter("publishing", detail=f"{version.label} held: {version.hold.reason}")
            released = self.storage.versions.latest(self.lineage, distributable=True)
            if released is None or released.hold is None:
                return _Publication()
            return self._distribute(released, sampled)
        if self.distributor is None:
            return _Publication()
        self.progress.enter("publishing")
        try:
            package = self.distributor.package(version, parent.id)
        except PackageTooLarge as exc:
            # The version stands; no device is offered a package over the cap.
            return _Publication(error=str(exc))
        return dataclasses.replace(self._distribute(version, sampled), package=package)

    def _distribute(self, version: VersionInfo, sampled: list[int]) -> _Publication:
        """Bring connected devices (or, with ``distribute-to = "sampled"``, the round's) to ``version`` (a
        package each needs is built, or found, on the way)."""
        if self.distributor is None or not self.settings.distribute_updates:
            return _Publication()
        connected = self.settings.distribute_to == "connected"
        nodes = sorted(self.grid.get_node_ids()) if connected else sorted(sampled)
        self.progress.enter("distributing", total=len(nodes))
        return _Publication(distribution=self.distributor.distribute(nodes, version, self.progress.advance))

    # ---- records --------------------------------------------------------------------------

    def _failed(
        self,
        number: int,
        started: float,
        sampled_devices: list[str],
        train: DeltaAggregator | None,
        error: str,
        quarantined: list[str] | None = None,
    ) -> RoundOutcome:
        """Record a round that produced no version; the next one trains from the same parent."""
        drops = list(train.drops) if train else []
        seconds = time.monotonic() - started
        self.storage.ledgers.record_failed_round(
            self.lineage, number, _report(len(sampled_devices), train, drops, seconds, error)
        )
        self.progress.failed(error)
        return RoundOutcome(
            round=number,
            version=None,
            sampled_devices=sampled_devices,
            participants=dict(train.participants) if train else {},
            drops=drops,
            upload_bytes=train.upload_bytes if train else 0,
            seconds=seconds,
            error=error,
            privacy=list(train.privacy) if train else [],
            quarantined=quarantined or [],
        )


def _report(
    sampled: int, train: DeltaAggregator | None, drops: list[Drop], seconds: float, error: str | None = None
) -> RoundReport:
    """The round record's figures (its lineage, round and version come with it from the caller)."""
    return RoundReport(
        sampled=sampled,
        received=len(train.participants) if train else 0,
        dropped=[d.as_dict() for d in drops],
        upload_bytes=train.upload_bytes if train else 0,
        seconds=seconds,
        error=error,
    )
