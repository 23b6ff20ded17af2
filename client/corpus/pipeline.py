"""One path every arriving record takes, whatever brought it: stamp → quality → conflicts → dedup → store.

A record is acknowledged only once the store has committed it (or its quarantine entry), so an
agent killed at any moment has lost nothing it acknowledged; a source that re-sends after a crash
finds its records already stored (exact dedup). Nothing a record contains can crash the agent: a
record that fails a rule, cannot be hashed or cannot be stored goes to quarantine with the reason.
"""

from __future__ import annotations

import hashlib
import mimetypes
import stat
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from fleetlora.client.corpus.dedup import Deduplicator
from fleetlora.client.corpus.quality import ConflictDetector, QualityRules, check
from fleetlora.client.corpus.records import FILE_STAND_IN, Record, stamped
from fleetlora.client.corpus.store import CorpusStore
from fleetlora.common.errors import DataError

Status = Literal["stored", "duplicate", "near-duplicate", "quarantined"]
MAX_MEDIA_BYTES = 1 << 30  # a media record names a file; larger ones are refused, not read


@dataclass(frozen=True)
class Outcome:
    record_id: str
    status: Status
    reason: str = ""


class Pipeline:
    """Ingests records into a device's store; the dedup index is rebuilt from the store on start."""

    def __init__(
        self, store: CorpusStore, *, threshold: float = 0.9, rules: QualityRules | None = None
    ) -> None:
        self.store = store
        self.rules = rules or QualityRules()
        kept = store.window()
        self.dedup = Deduplicator.from_records(kept, threshold=threshold)
        self.conflicts = ConflictDetector.from_records(kept, self.dedup)  # shares the index
        self._lock = threading.RLock()  # sources on several threads share one store and one index
        self.counts: Counter[str] = Counter()  # outcomes so far, by status

    def ingest(self, record: Record) -> Outcome:
        """Take one record to its durable end: stored, refused as a duplicate, or quarantined."""
        with self._lock:
            return self._count(self._ingest(record))

    def _ingest(self, record: Record) -> Outcome:
        try:
            record = _stamp(record)
        except (OSError, UnicodeError, ValueError) as exc:
            return self._hold(record, f"unreadable: {exc}")
        reason = check(record, self.rules)
        if reason:
            return self._hold(record, reason)
        conflict = self.conflicts.check(record) if record.modality == "text" else None
        if conflict:  # a copy that disagrees about the label: a person should look
            return self._hold(record, conflict)
        if self.store.has_hash(record.sha256):
            return Outcome(record.id, "duplicate", "exact")
        verdict = self.dedup.check(record) if record.modality == "text" else None  # media: by hash only
        if verdict is not None and verdict.kind == "exact":
            return Outcome(record.id, "duplicate", "exact")
        if verdict is not None and verdict.kind == "near":
            return Outcome(
                record.id, "near-duplicate", f"{verdict.similarity:.2f} similar to {verdict.match_id}"
            )
        return self._keep(record)

    def maintain(self) -> tuple[int, int]:
        """The store's archive and eviction, between ingests: (records moved cold, records evicted)."""
        with self._lock:
            return self.store.maintain()

    def release(self, record_id: str) -> Outcome:
        """Store a quarantined record as it is (a person overrode the rule); exact duplicates still count."""
        with self._lock:
            return self._count(self._release(record_id))

    def _release(self, record_id: str) -> Outcome:
        held = next((q for q in self.store.quarantined() if q.record.id == record_id), None)
        if held is not None and held.record.metadata.get(FILE_STAND_IN):
            raise DataError(
                f"{record_id} stands for the inbox file {held.record.text!r} ({held.reason}), not a record: "
                "fix the file and drop it into the inbox again; `quarantine drop` removes this entry."
            )
        record = self.store.release(record_id)
        try:
            record = _stamp(record)
        except (OSError, UnicodeError, ValueError) as exc:
            return self._hold(record, f"unreadable: {exc}")
        return self._keep(record)

    def _keep(self, record: Record) -> Outcome:
        """Commit a stamped record and index it; a record the store refuses goes to quarantine."""
        try:
            stored = self.store.add(record)
        except DataError as exc:
            return self._hold(record, f"malformed: {exc}")
        if not stored:
            return Outcome(record.id, "duplicate", "exact")
        if record.modality == "text":
            self.conflicts.add(record)  # indexes it in the shared Deduplicator too
        return Outcome(record.id, "stored")

    def quarantine(self, record: Record, reason: str) -> Outcome:
        """Hold the record aside with the reason; it can be released or dropped later."""
        with self._lock:
            return self._count(self._hold(record, reason))

    def _hold(self, record: Record, reason: str) -> Outcome:
        return Outcome(self.store.quarantine(record, reason), "quarantined", reason)

    def _count(self, outcome: Outcome) -> Outcome:
        self.counts[outcome.status] += 1
        return outcome


def _stamp(record: Record) -> Record:
    """The record with its content hash, by its modality's handler (:data:`HANDLERS`)."""
    handler = HANDLERS.get(record.modality)
    if handler is None:
        raise ValueError(f"no handler for modality {record.modality!r}; known: {', '.join(HANDLERS)}")
    return handler(record)


def _text(record: Record) -> Record:
    """A text record: hashed as UTF-8."""
    return stamped(record)


def _media_file(record: Record) -> Record:
    """An image or audio record: a reference to a regular file, hashed in chunks, with its size and type.

    Kept as a reference with metadata, so later models can use it; the text models here skip it.
    """
    path = Path(record.text)
    info = path.stat()  # OSError: a missing or unreadable file goes to quarantine
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > MAX_MEDIA_BYTES:
        raise ValueError(f"{path} is {info.st_size} bytes, more than {MAX_MEDIA_BYTES}")
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    kind, _ = mimetypes.guess_type(path.name)
    metadata = {**record.metadata, "bytes": info.st_size, "mime": kind or "application/octet-stream"}
    return stamped(replace(record, metadata=metadata), digest)


# Modality → how a record of it is stamped. A new modality registers its handler here.
HANDLERS: dict[str, Callable[[Record], Record]] = {"text": _text, "image": _media_file, "audio": _media_file}
