"""Bring connected devices to the newest version: ask each what it holds, send the package it needs.

Two exchanges, each bounded by a deadline: a status query (the device answers with its id and
active version), then one message per device carrying the package from that version to the newest
(the full adapter when the device has none, or holds a version of another lineage). Packages are
built once per starting version and reused from SQL while unexpired. Each device's answer (applied,
or rejected with the reason) is recorded in ``device_updates``, with what its status answer said of
its drift, its gates (eligible, or why not) and its capability (:func:`read_status_report`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fleetlora.common import chunks, records
from fleetlora.common.errors import FleetloraError
from fleetlora.common.package import PACKAGE
from fleetlora.coordinator.exchange import exchange
from fleetlora.coordinator.identities import read_device_id
from fleetlora.coordinator.packages import PackagePolicy, build_package
from fleetlora.coordinator.storage import PackageInfo, StatusReport, Storage, VersionInfo

APPLY_STATUSES = ("applied", "current", "rejected", "failed")  # what a device may answer to a package
MAX_REASON = 500  # characters of a device's reason kept
ACCELERATORS = frozenset({"cuda", "mps", "xpu", "cpu"})  # where a device may say it trains
MAX_MEMORY_BYTES = 2**50  # 1 PiB: a larger memory budget is a lie, not a device


@dataclass
class DistributionOutcome:
    """How one distribution went: devices by status, and the packages sent."""

    target: int
    statuses: Counter[str] = field(default_factory=Counter)
    packages: dict[int | None, PackageInfo] = field(default_factory=dict)  # by starting version
    reasons: dict[str, str] = field(default_factory=dict)  # device id → why it refused or failed
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "version": f"v{self.target}",
            "devices": dict(self.statuses),
            "packages": {
                (f"v{start}" if start is not None else "full"): {
                    "codec": p.codec,
                    "bytes": p.package_bytes,
                    "ratio": round(p.ratio, 6),
                }
                for start, p in self.packages.items()
            },
            **({"reasons": self.reasons} if self.reasons else {}),
            "seconds": round(self.seconds, 3),
        }


class Distributor:
    """Sends update packages to connected devices and records what they report."""

    def __init__(
        self,
        grid: Grid,
        storage: Storage,
        key: Ed25519PrivateKey,
        policy: PackagePolicy,
        *,
        tenant: str,
        timeout: float,
    ) -> None:
        self.grid, self.storage, self.key, self.policy = grid, storage, key, policy
        self.tenant, self.timeout = tenant, timeout

    def package(self, target: VersionInfo, start: int | None) -> PackageInfo:
        """The stored package ``start`` → ``target``, built if none is stored and unexpired."""
        stored = self.storage.packages.find(target.id, start)
        return stored or build_package(self.storage, target.id, start, self.key, self.policy)

    def distribute(
        self, nodes: list[int], target: VersionInfo, answered: Callable[[int], None] | None = None
    ) -> DistributionOutcome:
        """Offer ``target`` to ``nodes``; both exchanges together end within ``timeout`` seconds.

        ``answered`` hears how many devices hold ``target`` so far (current, or applied just now).
        """
        started = time.monotonic()
        outcome = DistributionOutcome(target=target.id)
        config = ConfigRecord({records.TENANT: self.tenant, records.CONTRACT_VERSION: records.CONTRACT})
        holding: dict[int, Holding] = {}  # node → what its device reports holding
        reports: dict[str, StatusReport] = {}  # device id → its drift, gates and capability
        status_messages = [self._message(node, records.QUERY_UPDATE_STATUS, config, None) for node in nodes]
        for reply in exchange(self.grid, status_messages, started + self.timeout):
            if reply.has_error():
                outcome.statuses["unreachable"] += 1
                continue
            answer = reply.content.config_records.get(records.CONFIG, ConfigRecord())
            held = Holding.read(answer)
            if held is None:
                outcome.statuses["malformed"] += 1
                continue
            if not self._speaks_for(reply.metadata.src_node_id, held.device_id):
                outcome.statuses["impostor"] += 1  # would repoint another device's row: not recorded
                continue
            holding[reply.metadata.src_node_id] = held
            reports[held.device_id] = read_status_report(answer)
        offers = []
        for node, held in holding.items():
            if held.version == target.id:
                outcome.statuses["current"] += 1
                self._record(node, held, "current", None)
                if answered:
                    answered(outcome.statuses["current"])
                continue
            # What it holds now, whoever put it there (a package applied by hand counts too), even if
            # the offer below goes unanswered.
            self._record(node, held, "reported", None)
            start = held.version if self._same_lineage(held.version, target) else None
            if start not in outcome.packages:
                outcome.packages[start] = self.package(target, start)
            blob = self.storage.packages.blob(outcome.packages[start].id)
            offers.append(self._message(node, records.QUERY_UPDATE_APPLY, config, blob))
        for reply in exchange(self.grid, offers, started + self.timeout):
            node = reply.metadata.src_node_id
            device = holding[node].device_id
            if reply.has_error():
                failure = reply.error.reason or "the device reported an error without a reason"
                outcome.statuses["failed"] += 1
                outcome.reasons[device] = failure
                self._record(node, dataclasses.replace(holding[node], version=None), "failed", failure)
                continue
            answer = reply.content.config_records.get(records.CONFIG, ConfigRecord())
            status, reason, after = (
                answer.get(records.UPDATE_STATUS),
                answer.get(records.UPDATE_REASON),
                Holding.read(answer),
            )
            if (
                not isinstance(status, str)
                or status not in APPLY_STATUSES
                or after is None
                or after.device_id != device
            ):
                outcome.statuses["malformed"] += 1
                continue
            reason = reason[:MAX_REASON] if isinstance(reason, str) and reason else None
            outcome.statuses[status] += 1
            if reason:
                outcome.reasons[device] = reason
            self._record(node, after, status, reason)
            if answered:
                answered(outcome.statuses["current"] + outcome.statuses["applied"])
        self.storage.devices.record_status_reports(reports)
        outcome.statuses["no-answer"] += len(nodes) - sum(outcome.statuses.values())
        outcome.statuses = +outcome.statuses  # drop zero counts
        outcome.seconds = time.monotonic() - started
        return outcome

    def _speaks_for(self, node: int, device_id: str) -> bool:
        """Whether ``node`` may report for ``device_id``: not when the device is enrolled in another
        tenant, or from another node (the SuperLink authenticated this one). A device that is not
        enrolled, or not bound to a node, is taken at its word."""
        enrolled = self.storage.devices.enrolment(device_id)
        if enrolled is None:
            return True
        return enrolled.tenant == self.tenant and enrolled.node_id in (None, str(node))

    def _same_lineage(self, version: int | None, target: VersionInfo) -> bool:
        if version is None:
            return False
        try:
            return self.storage.versions.get(version).lineage == target.lineage
        except FleetloraError:
            return False  # a version this database never stored: send the full adapter

    def _message(self, node: int, kind: str, config: ConfigRecord, blob: bytes | None) -> Message:
        content = RecordDict({records.CONFIG: config})
        if blob is not None:
            content[PACKAGE] = chunks.bytes_to_array_record(blob)
        return Message(content, dst_node_id=node, message_type=kind, ttl=self.timeout)

    def _record(self, node: int, held: Holding, status: str, reason: str | None) -> None:
        """Store the device's report; a version of None leaves the one last recorded in place."""
        self.storage.devices.record_update(
            held.device_id,
            tenant=self.tenant,
            node_id=node,
            status=status,
            reason=reason,
            version_id=held.version,
            sequence=held.sequence if held.version is not None else 0,
        )


@dataclass(frozen=True)
class Holding:
    """What a device reports holding, read field by field: a reply is untrusted input."""

    device_id: str
    version: int | None  # None: no packaged adapter yet (the device leaves the key out)
    sequence: int

    @classmethod
    def read(cls, answer: ConfigRecord) -> Holding | None:
        """The report, or None when any field has the wrong type or range."""
        device = read_device_id(answer)
        version = answer.get(records.ACTIVE_VERSION)
        sequence = answer.get(records.ACTIVE_SEQUENCE, 0)
        if device is None:
            return None
        if version is not None and (type(version) is not int or version < 1):
            return None
        if type(sequence) is not int or sequence < 0:
            return None
        return cls(device, version, sequence)


def read_status_report(answer: Mapping[str, object]) -> StatusReport:
    """What a status answer says beyond the version, each value checked on its own: one of the wrong
    type or range counts as not said (eligible; no reason, accelerator or memory), as from a device
    before contract 6, rather than refusing the version it reported."""
    eligible = answer.get(records.ELIGIBLE)
    reason = answer.get(records.NOT_ELIGIBLE)
    accelerator = answer.get(records.ACCELERATOR)
    memory = answer.get(records.MEMORY_BYTES)
    said_no = eligible is False  # a bool, not a falsy 0 or ""
    return StatusReport(
        wants_train=answer.get(records.WANTS_TRAIN) is True,
        eligible=not said_no,
        eligibility_reason=reason[:MAX_REASON] if said_no and isinstance(reason, str) and reason else None,
        accelerator=accelerator if isinstance(accelerator, str) and accelerator in ACCELERATORS else None,
        memory_bytes=memory if type(memory) is int and 0 <= memory <= MAX_MEMORY_BYTES else None,
    )
