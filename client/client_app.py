"""The device's Flower ClientApp: train the global adapter locally, or evaluate it on held-out text.

The reply to a train message holds only the adapter delta (after − before), the number of local
examples and a few scalar metrics; text never leaves the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fleetlora.client import forgetting, personal_head, privacy
from fleetlora.client.accelerator import select_accelerator
from fleetlora.client.corpus import drift, simulated
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState, UserConfig
from fleetlora.client.enroll import signing_key
from fleetlora.client.gates import Gates, sensors_for
from fleetlora.client.local_data import CORPUS, corpus_examples, local_examples
from fleetlora.client.memory import (
    MemoryEstimate,
    choose_checkpointing,
    estimate_peak,
    memory_budget,
    supports_checkpointing,
)
from fleetlora.client.pacing import Pacer, RoundAbandoned, low_priority
from fleetlora.client.privacy_floor import Declined
from fleetlora.client.train import Runtime, train_locally
from fleetlora.client.updates import ActiveAdapter, UpdateSlots, apply_package
from fleetlora.common import chunks, records
from fleetlora.common.batches import evaluate as evaluate_model
from fleetlora.common.codec import UPLOAD_ZSTD_LEVEL, Codec, encode
from fleetlora.common.config import TrainSettings
from fleetlora.common.data import Example, split_holdout
from fleetlora.common.data.partition import phase_labels, phase_of_round
from fleetlora.common.delta import (
    State,
    diff,
    from_array_record,
    load_trainable_state,
    to_array_record,
    trainable_state,
)
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.envelope import SEALED, UploadContext, seal, to_records
from fleetlora.common.errors import ConfigError, ConsentError, IncompatibleStateError
from fleetlora.common.keys import COORDINATOR_HPKE_PUB, COORDINATOR_SIGNING_PUB, PublicKeyT, read_public_key
from fleetlora.common.logs import configure_json_logging
from fleetlora.common.messages import Instructions
from fleetlora.common.model import LoadedModel, cached_model
from fleetlora.common.package import MAX_CAP, PACKAGE, PackageError
from fleetlora.common.run_config import DEFAULTS

log = logging.getLogger(__name__)
# Set by the warm runner (client/warm_clientapp.py) in each child: when it took the message's task from
# the SuperNode, so a message's wait splits into the SuperNode's part and the ClientApp start's.
TASK_ACQUIRED_AT = "FLEETLORA_TASK_ACQUIRED_AT"


@dataclass(frozen=True)
class MessageJob:
    """What one train or evaluate message asks of this device, and what the device answers it with."""

    instructions: Instructions
    loaded: LoadedModel
    train_set: list[Example]
    held_out: list[Example]
    state: DeviceState | None  # set when the device keeps a personal head, a privacy account or keys
    run_config: Mapping  # the run config with in-process overrides
    read_at: datetime  # when the device's examples were read (a corpus device's drift reference time)


def build_client_app(run_config_overrides: UserConfig | None = None) -> ClientApp:
    """The ClientApp; ``run_config_overrides`` stand in for ``flwr run``'s run config in-process."""
    app = ClientApp(mods=[timed])
    overrides = dict(run_config_overrides or {})

    def run_config_of(context: Context) -> Mapping:
        """The run's config as this process sees it: Flower's, with the in-process overrides on top."""
        return {**context.run_config, **overrides}

    def prepare(message: Message, context: Context) -> MessageJob:
        run_config = run_config_of(context)
        check_consent(context, run_config)
        instructions = Instructions.from_record(message.content.config_records[records.CONFIG])
        loaded = cached_model(instructions.spec)
        if loaded.base_sha256 != instructions.base_sha256:
            raise IncompatibleStateError(
                f"Base model sha256 {loaded.base_sha256[:12]} differs from the coordinator's "
                f"{instructions.base_sha256[:12]}: install the same model package version."
            )
        load_trainable_state(loaded.model, from_array_record(message.content.array_records[records.ARRAYS]))
        read_at = datetime.now(UTC)
        examples = local_examples(context.node_config, run_config)
        if streams(context.node_config, run_config):  # the partition arrives round by round
            device = DeviceState.locate(context.node_config, run_config)
            phases = int(run_config.get("stream-phases", 0) or 0)
            if phases:  # class-incremental: each phase brings the partition's records of new labels
                labels = phase_labels(instructions.spec.labels, phases, instructions.spec.seed)
                phase = phase_of_round(instructions.round, int(run_config["phase-rounds"]), phases)
                simulated.catch_up_phases(device, device_id(context), examples, labels, phase)
            else:
                seed = f"{instructions.spec.seed}:{context.node_config['partition-id']}"
                per_round = int(run_config["stream-records"])
                simulated.catch_up(device, device_id(context), examples, per_round, instructions.round, seed)
            read_at = datetime.now(UTC)  # after the catch-up: what it took in now is not new next round
            examples = corpus_examples(device.root / CORPUS_FILE)
        if instructions.spec.task == "classify":
            # Unlabelled corpus records wait for their labels; a label outside the fleet's is skipped, so
            # one bad record cannot make the device fail every round (`device corpus delete` removes it).
            known = set(instructions.spec.labels)
            examples = [e for e in examples if e.label in known]
        train_set, held_out = split_holdout(examples, float(run_config.get("holdout", DEFAULTS.holdout)))
        settings = instructions.train
        keeps_state = (
            settings.personal_head
            or settings.privacy.enabled
            or instructions.seal_uploads
            or settings.forgetting.ewc_lambda > 0  # the Fisher is kept there
        )
        state = DeviceState.locate(context.node_config, run_config) if keeps_state else None
        return MessageJob(instructions, loaded, train_set, held_out, state, run_config, read_at)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        log_to_state_dir(context.node_config)
        identity = ConfigRecord({records.DEVICE_ID: device_id(context)})
        check_consent(context, run_config_of(context))  # before the gates: their reasons carry readings
        # A message whose round deadline passed before it got here (the Simulation Engine runs every
        # message it queued, expired or not) is declined before anything is read or loaded.
        deadline = deadline_of(message)
        if deadline is not None and (late := time.time() - deadline) >= 0:
            return decline(message, context, identity, EXPIRED.format(late=late))
        # Then the gates: a device that cannot afford the round declines it before loading anything.
        resources = DeviceSettings.from_node_config(context.node_config)
        gates = device_gates(context, resources)
        verdict = gates.look()
        gates.save(gates_state(context, resources), verdict, event="round check")
        if not verdict.open:
            return decline(message, context, identity, f"not eligible: {verdict.reason}")
        job = prepare(message, context)
        if not job.train_set:  # a device of a few examples may hold out all of them
            return decline(message, context, identity, "no local training examples")
        settings, loaded = job.instructions.train, job.loaded
        keys = None
        if job.instructions.seal_uploads:
            assert job.state is not None  # prepare locates it whenever uploads are sealed
            # Both keys before any training: a device that cannot seal must not spend privacy budget.
            keys = (
                coordinator_key(context.node_config, job.run_config, X25519PublicKey),
                signing_key(job.state),
            )
        # A simulated device's identity is its partition (Flower draws node ids at random per run).
        node_number = int(context.node_config.get("partition-id", context.node_id))
        seed = training_seed(job.instructions.spec.seed, job.instructions.round, node_number)
        try:
            job = dataclasses.replace(job, train_set=round_pool(job, context, seed))
            plan = privacy_plan(job, context)
        except Declined as exc:
            return decline(message, context, identity, str(exc))
        train_set = list(plan.examples) if plan else job.train_set  # under DP, the records not yet retired
        before = trainable_state(loaded.model)
        if settings.personal_head and job.state:
            personal_head.restore(loaded, job.state)
        fisher = None
        if settings.forgetting.ewc_lambda and job.state:
            fisher = forgetting.load_fisher(job.state, trainable_state(loaded.model))
        noise = plan.noise if plan else None
        pacer = Pacer(gates, steps=settings.steps_for(len(train_set)), deadline=deadline)
        runtime = device_runtime(resources, loaded, settings, pacer, noise is not None)
        try:
            with low_priority(resources) if not is_simulated(context) else contextlib.nullcontext():
                result = train_locally(
                    loaded, train_set, settings, seed=seed, noise=noise, fisher=fisher, runtime=runtime
                )
        except RoundAbandoned as exc:
            # Nothing trained is kept or sent: the next message loads its own adapter into the model.
            if plan and job.state:
                privacy.spend(job.state, plan, settings.privacy, exc.steps_taken)  # the steps taken only
            gates.save(gates_state(context, resources), pacer.verdict or verdict, event="round given up")
            return decline(message, context, identity, f"gave up after {exc.steps_taken} steps: {exc}")
        gates.save(gates_state(context, resources), pacer.verdict or verdict, event="round trained")
        metrics = MetricRecord(
            {
                records.NUM_EXAMPLES: result.examples,
                records.TRAIN_LOSS: result.loss,
                records.TRAIN_STEPS: result.steps,
                records.TRAIN_SECONDS: result.seconds,
                records.TRAIN_PAUSED_SECONDS: pacer.paused_seconds,
            }
        )
        if plan and job.state:
            # Spent as soon as trained: recorded before anything leaves the device.
            metrics.update(privacy.spend(job.state, plan, settings.privacy, result.steps))
        if result.fisher is not None and job.state:
            forgetting.save_fisher(job.state, result.fisher)
        if settings.personal_head and job.state:
            personal_head.keep(loaded, job.state)
        if uses_corpus(context.node_config, job.run_config):  # what it trained on is the drift reference
            corpus_device = DeviceState.locate(context.node_config, job.run_config)
            drift.save_reference(corpus_device, [e.text for e in train_set], job.read_at)
        delta = diff(trainable_state(loaded.model), before)  # the head's change is against the global head
        content = upload(delta, identity, job.instructions, keys)
        content[records.METRICS] = metrics
        log.info(
            "Trained round %d on %d examples (%d steps, %.1f s)",
            job.instructions.round,
            result.examples,
            result.steps,
            result.seconds,
            extra={
                "event": "round_trained",
                "device": device_id(context),
                "round": job.instructions.round,
                "version": f"v{job.instructions.version}",
                "examples": result.examples,
                "steps": result.steps,
                "loss": result.loss,
            },
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        job = prepare(message, context)
        if not job.held_out:  # a device of a few examples may have none: dropped from the mean, said why
            identity = ConfigRecord({records.DEVICE_ID: device_id(context)})
            return decline(message, context, identity, "no held-out examples to evaluate on")
        scores = {f"eval_{k}": v for k, v in evaluate_model(job.loaded, job.held_out).items()}
        if job.instructions.train.personal_head and job.state:
            # Before its first training round a device's own model is the global one.
            if personal_head.restore(job.loaded, job.state):
                personal = evaluate_model(job.loaded, job.held_out)
            else:
                personal = {k.removeprefix("eval_"): v for k, v in scores.items()}
            scores.update({f"eval_personal_{k}": v for k, v in personal.items()})
        metrics = MetricRecord({records.NUM_EXAMPLES: len(job.held_out), **scores})
        return Message(RecordDict({records.METRICS: metrics}), reply_to=message)

    @app.query(records.QUERY_IDENTITY.removeprefix("query."))
    def identity(message: Message, context: Context) -> Message:
        """Who this device is: the coordinator samples by it (node ids change from run to run)."""
        reply = ConfigRecord({records.DEVICE_ID: device_id(context)})
        return Message(RecordDict({records.CONFIG: reply}), reply_to=message)

    @app.query(records.QUERY_UPDATE_STATUS.removeprefix("query."))
    def update_status(message: Message, context: Context) -> Message:
        run_config = run_config_of(context)
        device = DeviceState.locate(context.node_config, run_config)
        reply = ConfigRecord({records.DEVICE_ID: device_id(context)})
        report_active(reply, UpdateSlots(device).active())
        report_eligibility(reply, context, upload_consent(context.node_config, run_config))
        if uses_corpus(context.node_config, run_config):
            with CorpusStore(device.root / CORPUS_FILE) as store:
                report = drift.measure(device, store)
            reply[records.WANTS_TRAIN] = report.wants_train
            if math.isfinite(report.score):  # infinite before its first training (no reference yet)
                reply[records.DRIFT] = report.score
        return Message(RecordDict({records.CONFIG: reply}), reply_to=message)

    @app.query(records.QUERY_UPDATE_APPLY.removeprefix("query."))
    def update_apply(message: Message, context: Context) -> Message:
        log_to_state_dir(context.node_config)
        run_config = run_config_of(context)
        device = DeviceState.locate(context.node_config, run_config)
        about = {"device": device_id(context)}
        try:
            applied = apply_package(
                io.BytesIO(chunks.array_record_to_bytes(message.content.array_records[PACKAGE])),
                device,
                coordinator_key(context.node_config, run_config, Ed25519PublicKey),
                tenant=str(message.content[records.CONFIG][records.TENANT]),
                cap=float(context.node_config.get("package-cap", MAX_CAP)),
            )
            outcome = {records.UPDATE_STATUS: "applied"}
            version = f"v{applied.active.version}"
            log.info(
                "Applied package: now %s",
                version,
                extra={"event": "package_applied", "version": version, **about},
            )
        except PackageError as exc:
            outcome = {
                records.UPDATE_STATUS: "rejected",
                records.UPDATE_REASON: f"{exc.reason}: {exc.detail}",
            }
            log.warning(
                "Refused package: %s",
                outcome[records.UPDATE_REASON],
                extra={"event": "package_refused", **about},
            )
        reply = ConfigRecord({records.DEVICE_ID: device_id(context), **outcome})
        report_active(reply, UpdateSlots(device).active())
        return Message(RecordDict({records.CONFIG: reply}), reply_to=message)

    return app


def report_eligibility(reply: ConfigRecord, context: Context, consent: bool) -> None:
    """Whether the device would train now (its gates, looked at afresh), and where and in how much memory
    it would, in a status reply. Without upload consent it would not, and its gates' readings (load,
    battery, temperature) stay on the device."""
    resources = DeviceSettings.from_node_config(context.node_config)
    if not consent:
        reply[records.ELIGIBLE] = False
        reply[records.NOT_ELIGIBLE] = "no upload consent"
    else:
        gates = device_gates(context, resources)
        verdict = gates.look()
        gates.save(gates_state(context, resources), verdict, event="status")
        reply[records.ELIGIBLE] = verdict.open
        if not verdict.open:
            reply[records.NOT_ELIGIBLE] = verdict.reason[:500]
    accelerator = select_accelerator(resources)
    reply[records.ACCELERATOR] = accelerator.kind
    reply[records.MEMORY_BYTES] = memory_budget(resources, accelerator.memory_bytes)


def decline(message: Message, context: Context, identity: ConfigRecord, reason: str) -> Message:
    """The reply of a device that does not train this round: its id and why (the coordinator records it)."""
    identity[records.DECLINED] = reason
    round_number = message.content.config_records[records.CONFIG].get(records.ROUND)
    log.info(
        "Declined round %s: %s",
        round_number,
        reason,
        extra={"event": "round_declined", "device": device_id(context), "round": round_number},
    )
    return Message(RecordDict({records.CONFIG: identity}), reply_to=message)


def device_gates(context: Context, resources: DeviceSettings) -> Gates:
    """The device's gates, with what their last look decided."""
    return Gates.load(resources, sensors_for(resources), gates_state(context, resources))


def gates_state(context: Context, resources: DeviceSettings) -> DeviceState | None:
    """Where the gates' decision is kept: the device's state folder, when it reads any sensor."""
    if resources.sensors == "none":
        return None  # a simulated fleet's thousands of devices write nothing for gates that never close
    return DeviceState.find(context.node_config, {})


EXPIRED = (
    "expired: the round's deadline had passed {late:.1f} s before it arrived (it waited in a queue, or this"
    " device's clock is ahead of the coordinator's)"
)


def deadline_of(message: Message) -> float | None:
    """When the SuperLink stops waiting for this message's reply (its time to live), as ``time.time()``."""
    created, ttl = message.metadata.created_at, message.metadata.ttl
    if not (math.isfinite(created) and math.isfinite(ttl) and ttl > 0):
        return None  # no deadline rather than a NaN one, which would never pass
    return created + ttl


def device_runtime(
    resources: DeviceSettings, loaded: LoadedModel, settings: TrainSettings, pacer: Pacer, dp: bool
) -> Runtime:
    """Where and how this round's steps run: the accelerator, its precision, checkpointing, the pacer.

    Under DP the steps stay in fp32: Opacus clips per-example gradients, whose norms bf16 would blur.
    The head regime never backpropagates through the encoder, so it has nothing to checkpoint.
    """
    accelerator = select_accelerator(resources)
    budget = memory_budget(resources, accelerator.memory_bytes)
    seq_len = loaded.spec.max_length

    def peak_without() -> MemoryEstimate:
        return estimate_peak(
            loaded, batch_size=settings.batch_size, seq_len=seq_len, dp=dp, checkpointing=False
        )

    checkpointing = loaded.spec.regime != "head" and choose_checkpointing(
        peak_without, resources.gradient_checkpointing, budget, supported=supports_checkpointing(loaded.model)
    )
    return Runtime(
        device=accelerator.device,
        autocast=None if dp else accelerator.autocast,
        checkpointing=checkpointing,
        between_steps=pacer,
    )


def is_simulated(context: Context) -> bool:
    """A virtual device of a simulation: it shares the researcher's process, whose priority it keeps."""
    return "partition-id" in context.node_config


def log_to_state_dir(node_config: UserConfig) -> bool:
    """A deployed device (its node config names its id and state folder) logs to ``state-dir/logs``,
    beside `device up`'s log; simulated devices do not. Whether it logs."""
    if "device-id" in node_config and "state-dir" in node_config:
        configure_json_logging(Path(str(node_config["state-dir"])) / "logs", "client-app")
        return True
    return False


def timed(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Every message a deployed device handles, logged with when it was sent, taken and handled: where a
    deployed round's time goes beyond the work itself (benchmarks/deployed_round.py reads them)."""
    started = time.time()
    try:
        return call_next(message, context)
    finally:
        seconds = time.time() - started
        if log_to_state_dir(context.node_config):
            acquired = os.environ.get(TASK_ACQUIRED_AT)
            log.info(
                "Handled a %s message in %.2f s",
                message.metadata.message_type,
                seconds,
                extra={
                    "event": "message_handled",
                    "device": device_id(context),
                    "message_type": message.metadata.message_type,
                    "sent_at": message.metadata.created_at,  # the coordinator's clock
                    "acquired_at": float(acquired) if acquired else None,
                    "started_at": started,
                    "seconds": seconds,
                },
            )


def round_pool(job: MessageJob, context: Context, seed: int) -> list[Example]:
    """The round's training set: every training record, or with ``train-on = "arrivals"`` the new ones plus
    the replayed share of older ones (client/forgetting.py). Raises :class:`Declined` when none is new.

    A device without a corpus has no arrival times: all of its records are new. Under DP, records the
    privacy account has retired are not replayed.
    """
    controls = job.instructions.train.forgetting
    if controls.train_on == "all":
        return job.train_set
    arrived = None
    if uses_corpus(context.node_config, job.run_config):
        arrived = forgetting.arrived_texts(DeviceState.locate(context.node_config, job.run_config))
    retired: frozenset[str] = frozenset()
    if job.instructions.train.privacy.enabled:
        device = job.state or DeviceState.find(context.node_config, job.run_config)
        retired = forgetting.retired_keys(privacy.load_account(device) if device else None)
    pool = forgetting.compose_pool(
        job.train_set, controls.replay_share, arrived=arrived, seed=seed, retired=retired
    )
    log.info(
        "Round %d pool: %d new records, %d replayed",
        job.instructions.round,
        pool.arrivals,
        pool.replayed,
        extra={"event": "round_pool", "round": job.instructions.round},
    )
    return pool.examples


def privacy_plan(job: MessageJob, context: Context) -> privacy.RoundPlan | None:
    """This round's DP plan (None: the round is not DP and the device allows that).

    Raises :class:`Declined` when the request is below the device's floor or no record can afford it.
    """
    device = job.state or DeviceState.find(context.node_config, job.run_config)
    account = privacy.load_account(device) if device else None
    privacy.floor_of(context.node_config, account).admit(job.instructions.train.privacy)
    if not job.instructions.train.privacy.enabled:
        return None
    return privacy.plan_round(
        account, job.instructions.train, job.train_set, round_number=job.instructions.round
    )


def upload(
    delta: State,
    identity: ConfigRecord,
    instructions: Instructions,
    keys: tuple[X25519PublicKey, Ed25519PrivateKey] | None,
) -> RecordDict:
    """The delta as a reply carries it: sealed to the coordinator and signed when ``keys`` are given."""
    if keys is None:
        return RecordDict({records.ARRAYS: to_array_record(delta), records.CONFIG: identity})
    claimed = UploadContext(
        tenant=instructions.tenant,
        device_id=str(identity[records.DEVICE_ID]),
        round=instructions.round,
        base_sha256=instructions.base_sha256,
        from_version=instructions.version,
    )
    plaintext = encode(delta, Codec.parse(instructions.upload_codec), level=UPLOAD_ZSTD_LEVEL)
    arrays, claim = to_records(seal(plaintext, claimed, *keys), claimed)
    identity.update(claim)
    return RecordDict({SEALED: arrays, records.CONFIG: identity})


def report_active(reply: ConfigRecord, active: ActiveAdapter | None) -> None:
    """The packaged adapter the device runs, in a reply: no version key when it holds none yet."""
    if active is not None:
        reply[records.ACTIVE_VERSION] = active.version
    reply[records.ACTIVE_SEQUENCE] = active.sequence if active else 0


def uses_corpus(node_config: UserConfig, run_config: UserConfig) -> bool:
    """Whether this device trains on its corpus store: ``data-path="corpus"``, or a streamed simulation."""
    return str(node_config.get("data-path", "")) == CORPUS or streams(node_config, run_config)


def streams(node_config: UserConfig, run_config: UserConfig) -> bool:
    """A simulated device whose partition arrives round by round (``stream-records`` > 0) or phase by
    phase (``stream-phases`` > 0)."""
    arriving = int(run_config.get("stream-records", 0) or 0) + int(run_config.get("stream-phases", 0) or 0)
    return "partition-id" in node_config and arriving > 0


def check_consent(context: Context, run_config: UserConfig) -> None:
    """Raise :class:`ConsentError` unless the device's owner lets things leave it."""
    if not upload_consent(context.node_config, run_config):
        raise ConsentError(
            "This device has no upload consent: nothing leaves it. Its owner grants it with "
            "--node-config 'upload-consent=true'."
        )


def upload_consent(node_config: UserConfig, run_config: UserConfig) -> bool:
    """Whether the owner allows uploads: the node config says; a simulated device follows the run."""
    if "upload-consent" in node_config:
        return node_config["upload-consent"] is True or str(node_config["upload-consent"]).lower() == "true"
    return "partition-id" in node_config and bool(run_config.get("simulated-consent", True))


def coordinator_key(node_config: UserConfig, run_config: UserConfig, kind: type[PublicKeyT]) -> PublicKeyT:
    """A coordinator public key: X25519 to seal uploads to, Ed25519 to verify update packages with.

    From the node config (``coordinator-key``, ``coordinator-signing-key``), else the run's ``keys``
    folder (a simulation's).
    """
    node_key, file_name = (
        ("coordinator-key", COORDINATOR_HPKE_PUB)
        if kind is X25519PublicKey
        else ("coordinator-signing-key", COORDINATOR_SIGNING_PUB)
    )
    if node_key in node_config:
        path = Path(str(node_config[node_key]))
    elif run_config.get("keys"):
        path = Path(str(run_config["keys"])) / file_name
    else:
        raise ConfigError(
            f"This device has no coordinator key to use: start the SuperNode with "
            f"--node-config '{node_key}=\"PATH/{file_name}\"'."
        )
    return read_public_key(path, kind)


def device_id(context: Context) -> str:
    """A stable name for this device: its node config ``device-id``, else its partition or node id."""
    if "device-id" in context.node_config:
        return str(context.node_config["device-id"])
    if "partition-id" in context.node_config:
        return f"partition-{context.node_config['partition-id']}"
    return f"node-{context.node_id}"


def training_seed(base: int, round_number: int, node_id: int) -> int:
    """A per-device, per-round training seed (shuffling order), reproducible from the run seed."""
    digest = hashlib.sha256(f"{base}:{round_number}:{node_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


app = build_client_app()
