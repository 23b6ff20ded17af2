"""The federation loop: resume from SQL, then per round sample → train → aggregate → store → evaluate.

Each round:

1. wait (until the deadline) for at least ``min-devices`` connected devices, sample up to
   ``devices-per-round`` of them;
2. send each the global adapter and the round's instructions; fold replies into the weighted mean
   as they arrive, until all are in or the deadline passes;
3. with at least ``min-devices`` valid deltas, take a server-optimizer step with the mean delta
   (plain FedAvg adds it) and store the new version with its participants and the optimizer's
   state; otherwise record a failed round and keep the current version;
4. evaluate the new version on the participants' held-out text (federated; its own deadline, so a
   round lasts at most two deadlines) and, when an evaluation set is configured, on the coordinator;
5. store the metrics and the round record together, in one transaction.

A restarted coordinator continues from the latest stored version of its lineage, so no completed
round is lost or repeated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fleetlora.common import records
from fleetlora.common.batches import evaluate
from fleetlora.common.codec import Codec, CodecError, decode, inflated_bound
from fleetlora.common.config import to_config
from fleetlora.common.data import Example, load_examples
from fleetlora.common.delta import (
    State,
    layout_fingerprint,
    load_trainable_state,
    to_array_record,
)
from fleetlora.common.envelope import SEALED, EnvelopeError, UploadContext, from_records, open_sealed
from fleetlora.common.errors import QuorumError
from fleetlora.common.messages import Instructions
from fleetlora.common.model import LoadedModel, cached_model
from fleetlora.common.server_optim import server_step
from fleetlora.coordinator.central_dp import epsilon as central_epsilon
from fleetlora.coordinator.central_dp import privatize
from fleetlora.coordinator.distribution import DistributionOutcome, Distributor
from fleetlora.coordinator.exchange import exchange, wait_for_nodes
from fleetlora.coordinator.keys import load_hpke_key, load_signing_key
from fleetlora.coordinator.packages import PackageTooLarge
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import (
    NewVersion,
    PackageInfo,
    RoundReport,
    ServerOptimizerState,
    Storage,
    VersionInfo,
)
from fleetlora.coordinator.strategy import DeltaAggregator, Drop, MetricAggregator, PrivacySpend


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
    sampled: int
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

    @property
    def examples(self) -> int:
        return sum(self.participants.values())


# Version metrics of a round under central DP: the accountant's history is rebuilt from them.
CENTRAL_DP_EPSILON = "central_dp_epsilon"
CENTRAL_DP_NOISE = "central_dp_noise_multiplier"
CENTRAL_DP_RATE = "central_dp_sample_rate"


class FederationObserver(Protocol):
    """Receives progress (the CLI's table and progress bar, or a test)."""

    def started(self, start: FederationStart) -> None: ...

    def round_finished(self, outcome: RoundOutcome) -> None: ...


def lineage_of(loaded: LoadedModel) -> str:
    """Versions that can follow one another: same base weights, adapter layout, scale and labels.

    LoRA alpha is in the key because the same A/B weights compute another function at another
    alpha/rank scale; rank, targets and unfrozen layers are in the layout.
    """
    spec = loaded.spec
    layout = layout_fingerprint(loaded.initial_adapter)
    key = f"{loaded.base_sha256}|{layout}|{spec.task}|{','.join(spec.labels)}|alpha={spec.lora.alpha}"
    return hashlib.sha256(key.encode()).hexdigest()


class Federation:
    """Runs rounds for one lineage against a Flower Grid."""

    def __init__(
        self,
        grid: Grid,
        settings: CoordinatorSettings,
        observer: FederationObserver | None = None,
    ) -> None:
        self.grid = grid
        self.settings = settings
        self.observer = observer
        self.storage = Storage.open(settings.db_url)
        self.loaded = cached_model(settings.spec)
        self.lineage = lineage_of(self.loaded)
        self.eval_set: list[Example] = load_examples(settings.eval_data) if settings.eval_data else []
        self.optimizer_state: State = {}
        self.hpke_key = load_hpke_key(Path(settings.keys_dir)) if settings.seal_uploads else None
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

    def run(self) -> list[RoundOutcome]:
        """Run ``settings.rounds`` rounds after the latest stored version."""
        version, state, resumed = self._resume_or_initialize()
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
        for round_number in range(start.first_round, start.first_round + self.settings.rounds):
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
            stored = self.storage.versions.optimizer_state(latest.id)
            # Another optimizer's moments mean nothing to this one: it starts fresh.
            if stored is not None and stored.name == self.settings.server.name:
                self.optimizer_state = stored.state
            return latest, self.storage.versions.adapter(latest.id), True
        state = self.loaded.initial_adapter  # not the live weights: a cached model may have trained
        version = self.storage.versions.add(
            NewVersion(
                lineage=self.lineage,
                parent_id=None,
                round=0,
                base_model_sha256=self.loaded.base_sha256,
                adapter=state,
                participants={},
                metrics=self._central_metrics(state),
            )
        )
        return version, state, False

    # ---- one round ------------------------------------------------------------------------

    def _round(self, number: int, parent: VersionInfo, state: State) -> tuple[RoundOutcome, State]:
        started = time.monotonic()
        deadline = started + self.settings.round_deadline
        try:
            online = wait_for_nodes(self.grid, self.settings.min_devices, deadline)
        except QuorumError as exc:
            return self._failed(number, started, sampled=[], aggregator=None, error=str(exc)), state
        rng = random.Random(f"{self.settings.seed}:{number}")
        sampled = sample_devices(
            online,
            self.settings.devices_per_round,
            self.storage.devices.wanting_nodes() if self.distributor else set(),
            rng,
        )

        instructions = Instructions(
            spec=self.settings.spec,
            train=self.settings.train_for_round(number),
            round=number,
            version=parent.id,
            base_sha256=self.loaded.base_sha256,
            tenant=self.settings.tenant,
            seal_uploads=self.settings.seal_uploads,
            upload_codec=self.settings.upload_codec,
        )
        unseal = self._unsealer(instructions) if self.settings.seal_uploads else None
        central = self.settings.central_dp
        aggregator = DeltaAggregator(state, unseal, central.clip_norm if central.enabled else None)
        for reply in exchange(
            self.grid, self._messages(sampled, state, instructions, MessageType.TRAIN), deadline
        ):
            aggregator.add(reply)
        aggregator.mark_missing(sampled)
        self.storage.ledgers.record_privacy(self.lineage, number, aggregator.privacy)
        if len(aggregator.participants) < self.settings.min_devices:
            error = f"{len(aggregator.participants)} valid deltas, {self.settings.min_devices} needed"
            return self._failed(number, started, sampled, aggregator, error), state

        mean_delta = aggregator.mean_delta()
        train_metrics = aggregator.metrics()  # train_loss, train_steps, train_seconds
        if central.enabled:
            mean_delta = privatize(mean_delta, len(aggregator.participants), len(sampled), central)
            train_metrics.update(
                self._central_dp_spend(parent, len(sampled) / len(online), aggregator.clipped)
            )
        new_state, optimizer_state = server_step(
            self.settings.server, state, mean_delta, self.optimizer_state
        )
        version = self.storage.versions.add(
            NewVersion(
                lineage=self.lineage,
                parent_id=parent.id,
                round=number,
                base_model_sha256=self.loaded.base_sha256,
                adapter=new_state,
                participants={str(n): c for n, c in aggregator.participants.items()},
                metrics=train_metrics,
                optimizer=ServerOptimizerState(self.settings.server.name, optimizer_state),
            )
        )
        self.optimizer_state = optimizer_state
        eval_instructions = dataclasses.replace(instructions, version=version.id)
        federated = self._federated_evaluation(sorted(aggregator.participants), new_state, eval_instructions)
        metrics = {**train_metrics, **federated.metrics(), **self._central_metrics(new_state)}
        outcome = RoundOutcome(
            round=number,
            version=version,
            sampled=len(sampled),
            participants=dict(aggregator.participants),
            drops=[*aggregator.drops, *federated.drops],
            upload_bytes=aggregator.upload_bytes,
            seconds=time.monotonic() - started,
            metrics=metrics,
            privacy=list(aggregator.privacy),
        )
        version = self.storage.versions.finish_round(version.id, self._round_report(outcome), metrics)
        outcome = dataclasses.replace(outcome, version=version)
        if self.distributor:
            outcome = self._publish(outcome, parent)
        return outcome, new_state

    def _publish(self, outcome: RoundOutcome, parent: VersionInfo) -> RoundOutcome:
        """Build the round's package (parent → new version) and, if asked, bring connected devices up."""
        assert self.distributor is not None and outcome.version is not None
        try:
            package = self.distributor.package(outcome.version, parent.id)
        except PackageTooLarge as exc:
            # The version stands; no device is offered a package over the cap.
            return dataclasses.replace(outcome, package_error=str(exc))
        distribution = None
        if self.settings.distribute_updates:
            nodes = sorted(self.grid.get_node_ids())
            distribution = self.distributor.distribute(nodes, outcome.version)
        return dataclasses.replace(outcome, package=package, distribution=distribution)

    def _central_dp_spend(self, parent: VersionInfo, sample_rate: float, clipped: int) -> dict[str, float]:
        """This round's user-level DP metrics; ε composes every earlier noised round of the lineage."""
        central = self.settings.central_dp
        history = [
            (v.metrics[CENTRAL_DP_NOISE], v.metrics[CENTRAL_DP_RATE], 1)
            for v in self.storage.versions.chain(parent.id)
            if CENTRAL_DP_RATE in v.metrics
        ]
        history.append((central.noise_multiplier, sample_rate, 1))
        return {
            CENTRAL_DP_EPSILON: central_epsilon(history, central.delta),
            CENTRAL_DP_NOISE: central.noise_multiplier,
            CENTRAL_DP_RATE: sample_rate,
            "central_dp_clipped": float(clipped),
        }

    def _unsealer(self, instructions: Instructions) -> Callable[[Message], State]:
        """Opens one round's sealed uploads against the context this coordinator expects."""
        assert self.hpke_key is not None  # loaded in __init__ whenever seal_uploads is on

        codec = Codec.parse(instructions.upload_codec)
        bound = inflated_bound(self.loaded.initial_adapter)

        def unseal(reply: Message) -> State:
            arrays = reply.content.array_records.get(SEALED)
            if arrays is None:
                raise EnvelopeError("reply holds no sealed upload")
            sealed, claimed = from_records(arrays, reply.content.config_records.get(records.CONFIG, {}))
            enrolled = self.storage.devices.key(claimed.device_id, self.settings.tenant)
            if enrolled is None:
                raise EnvelopeError(f"unknown device {claimed.device_id!r}: enroll it first")
            public, node_id = enrolled.public_key, enrolled.node_id
            if node_id is not None and node_id != str(reply.metadata.src_node_id):
                # The SuperLink authenticated the sending node: it must be the one enrolled under this id.
                raise EnvelopeError(
                    f"device {claimed.device_id!r} is enrolled as node {node_id}, but this reply came from "
                    f"node {reply.metadata.src_node_id}"
                )
            expected = UploadContext(
                tenant=self.settings.tenant,
                device_id=claimed.device_id,  # proven by the signature against its enrolled key
                round=instructions.round,
                base_sha256=instructions.base_sha256,
                from_version=instructions.version,
            )
            plaintext = open_sealed(
                sealed,
                claimed=claimed,
                expected=expected,
                coordinator_key=self.hpke_key,
                device_public=public,
            )
            try:
                return decode(plaintext, codec, max_bytes=bound)
            except CodecError as exc:
                raise EnvelopeError(f"decrypted upload is not a delta ({exc})") from None

        return unseal

    def _messages(
        self, nodes: list[int], state: State, instructions: Instructions, kind: str
    ) -> list[Message]:
        # The TTL equals the deadline: a device that comes back late does not train a stale round.
        ttl = self.settings.round_deadline
        arrays, config = to_array_record(state), instructions.to_record()  # encoded once per round
        return [
            Message(
                RecordDict({records.ARRAYS: arrays, records.CONFIG: config}),
                dst_node_id=node,
                message_type=kind,
                ttl=ttl,
            )
            for node in nodes
        ]

    def _federated_evaluation(
        self, nodes: list[int], state: State, instructions: Instructions
    ) -> MetricAggregator:
        deadline = time.monotonic() + self.settings.round_deadline
        aggregator = MetricAggregator(prefix="federated_")
        messages = self._messages(nodes, state, instructions, MessageType.EVALUATE)
        for reply in exchange(self.grid, messages, deadline):
            aggregator.add(reply)
        aggregator.mark_missing(nodes)
        return aggregator

    def _central_metrics(self, state: State) -> dict[str, float]:
        if not self.eval_set:
            return {}
        load_trainable_state(self.loaded.model, state)
        return {f"central_{k}": v for k, v in evaluate(self.loaded, self.eval_set).items()}

    # ---- records --------------------------------------------------------------------------

    def _failed(
        self,
        number: int,
        started: float,
        sampled: list[int],
        aggregator: DeltaAggregator | None,
        error: str,
    ) -> RoundOutcome:
        outcome = RoundOutcome(
            round=number,
            version=None,
            sampled=len(sampled),
            participants=dict(aggregator.participants) if aggregator else {},
            drops=list(aggregator.drops) if aggregator else [],
            upload_bytes=aggregator.upload_bytes if aggregator else 0,
            seconds=time.monotonic() - started,
            error=error,
            privacy=list(aggregator.privacy) if aggregator else [],
        )
        self.storage.ledgers.record_failed_round(self.lineage, number, self._round_report(outcome))
        return outcome

    def _round_report(self, outcome: RoundOutcome) -> RoundReport:
        return RoundReport(
            sampled=outcome.sampled,
            received=len(outcome.participants),
            dropped=[d.as_dict() for d in outcome.drops],
            upload_bytes=outcome.upload_bytes,
            seconds=outcome.seconds,
            error=outcome.error,
        )


def sample_devices(online: list[int], count: int, wanting: set[int], rng: random.Random) -> list[int]:
    """``count`` of the ``online`` nodes, at random, those whose device wants to train (drift) first."""
    first = [n for n in online if n in wanting]
    rest = [n for n in online if n not in wanting]
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[: min(count, len(online))]


def summarize(outcome: RoundOutcome) -> dict[str, Any]:
    """The round as a plain dict: one entry of results.json's ``rounds``."""
    return {
        "round": outcome.round,
        "version": outcome.version.label if outcome.version else None,
        "participants": len(outcome.participants),
        "examples": outcome.examples,
        "dropped": [d.as_dict() for d in outcome.drops],
        "metrics": outcome.metrics,
        "upload_bytes": outcome.upload_bytes,
        "seconds": round(outcome.seconds, 3),
        **({"error": outcome.error} if outcome.error else {}),
        **({"privacy": {s.device_id: s.epsilon for s in outcome.privacy}} if outcome.privacy else {}),
        **(
            {
                "package_bytes": outcome.package.package_bytes,
                "package_ratio": round(outcome.package.ratio, 6),
                "package_codec": outcome.package.codec,
            }
            if outcome.package
            else {}
        ),
        **({"updates": outcome.distribution.as_dict()} if outcome.distribution else {}),
        **({"package_error": outcome.package_error} if outcome.package_error else {}),
    }
