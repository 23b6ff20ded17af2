"""The audit log: every change to parameters or settings, as an append-only hash chain.

Each entry (``audit_log``) holds its number, time, actor, action, subject and details, the previous
entry's hash, and its own hash: sha256 over the canonical JSON of all the rest. An entry is written in
the same transaction as the change it records (a new version, a revert, a package, an enrolment, a
quarantine or release, a lineage), so a change is never stored without its entry. Editing, deleting,
inserting or reordering rows breaks the chain at that row.

Removing the newest rows (truncation), or restoring an older copy of the database, leaves a shorter
chain that is still whole. Checkpoints catch those: :meth:`AuditStore.checkpoint` signs the newest
entry's number and hash with the coordinator's Ed25519 key and appends the signed line to a file
outside the database (``audit-checkpoints.jsonl`` in the keys folder), then records the checkpoint as
an entry of its own. :func:`verify` then also detects a log that ends before a checkpoint or differs
from what one signed, a checkpoint line that is forged, replayed or out of order, and a checkpoint file
rolled back to before a checkpoint the log records. What it cannot detect: the database and the
checkpoint file restored together to one earlier state (keep a copy of the checkpoint file elsewhere).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleetlora.common.canonical import canonical_json
from fleetlora.common.errors import FleetloraError
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.models import AuditEntry, AuditHead

GENESIS = "0" * 64  # the "previous hash" of the first entry
CHECKPOINTS_FILE = "audit-checkpoints.jsonl"
CHECKPOINT_ACTION = "audit.checkpoint"
_SIGNED_PREFIX = b"fleetlora audit checkpoint v1\0"


_OPERATOR: ContextVar[str | None] = ContextVar("fleetlora_audit_operator", default=None)


@contextmanager
def acting_as(operator: str | None) -> Iterator[None]:
    """Entries written inside name ``operator`` (proven by coordinator/operators.py) as their actor."""
    token = _OPERATOR.set(operator)
    try:
        yield
    finally:
        _OPERATOR.reset(token)


def default_actor() -> str:
    """Who is acting: the operator a command proved, else the OS user and the command it runs."""
    if (operator := _OPERATOR.get()) is not None:
        return f"operator {operator}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:4]]) if sys.argv and sys.argv[0] else "python"
    return f"{user}: {command}"[:200]


@dataclass(frozen=True)
class Entry:
    """One audit entry as stored."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str
    details: str  # canonical JSON
    previous_hash: str
    entry_hash: str

    def computed_hash(self) -> str:
        content = {k: v for k, v in asdict(self).items() if k != "entry_hash"}
        return hashlib.sha256(canonical_json(content)).hexdigest()


def append(
    session: Session, action: str, subject: str, details: Mapping[str, Any], *, actor: str | None = None
) -> None:
    """Add an entry in ``session``'s transaction: it commits, or rolls back, with the change it records."""
    head = session.get(AuditHead, 1, with_for_update=True)  # serializes concurrent appenders
    if head is None:  # the first entry: make the head row, or wait for the one a concurrent appender made
        try:
            with session.begin_nested():
                session.add(AuditHead(id=1, seq=0, entry_hash=GENESIS))
        except IntegrityError:
            pass  # theirs is committed now (the insert waited for it): lock it like any other
        head = session.get(AuditHead, 1, with_for_update=True, populate_existing=True)
        if head is None:
            raise FleetloraError("The audit log's head row could not be made: check the database.")
    seq, previous = head.seq + 1, head.entry_hash
    entry = Entry(
        seq=seq,
        at=datetime.now(UTC).isoformat(timespec="microseconds"),
        actor=(actor or default_actor())[:200],
        action=action,
        subject=subject[:200],
        details=canonical_json(dict(details)).decode(),
        previous_hash=previous,
        entry_hash="",
    )
    digest = entry.computed_hash()
    session.add(AuditEntry(**{**asdict(entry), "entry_hash": digest}))
    head.seq, head.entry_hash = seq, digest
    session.flush()


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that entry ``seq`` had hash ``entry_hash`` at ``at``."""

    seq: int
    entry_hash: str
    at: str
    signature: str  # base64 Ed25519 over the prefix and the canonical JSON of the other fields

    def signed_bytes(self) -> bytes:
        return _SIGNED_PREFIX + canonical_json(
            {"seq": self.seq, "entry_hash": self.entry_hash, "at": self.at}
        )

    def verifies(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True


def read_checkpoints(path: Path) -> list[Checkpoint | str]:
    """The checkpoint file's lines, each a :class:`Checkpoint` or why it is not one (a missing file: [])."""
    if not path.is_file():
        return []
    out: list[Checkpoint | str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            document = json.loads(line)
            out.append(
                Checkpoint(
                    seq=int(document["seq"]),
                    entry_hash=str(document["entry_hash"]),
                    at=str(document["at"]),
                    signature=str(document["signature"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            out.append(f"checkpoint line {number} is not a checkpoint")
    return out


class AuditStore:
    """The audit log in the coordinator's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self, action: str, subject: str, details: Mapping[str, Any], *, actor: str | None = None
    ) -> None:
        """An entry of its own (for changes that are not a row of another store)."""
        with self.db.session() as session:
            append(session, action, subject, details, actor=actor)

    def entries(self) -> list[Entry]:
        """Every entry, in the order of their numbers."""
        with self.db.session() as session:
            rows = session.scalars(select(AuditEntry).order_by(AuditEntry.seq))
            return [Entry(**{c: getattr(row, c) for c in Entry.__dataclass_fields__}) for row in rows]

    def head(self) -> tuple[int, str]:
        """The newest entry's number and hash, as the head row records them ((0, GENESIS) when empty)."""
        with self.db.session() as session:
            head = session.get(AuditHead, 1)
            return (head.seq, head.entry_hash) if head else (0, GENESIS)

    def checkpoint(self, key: Ed25519PrivateKey, folder: Path) -> Checkpoint:
        """Sign the newest entry, append the line to ``folder``/audit-checkpoints.jsonl (fsynced), then
        record the checkpoint in the log itself: all under the head's lock, so two checkpoints never
        interleave their lines."""
        with self.db.session() as session:
            head = session.get(AuditHead, 1, with_for_update=True)
            seq, entry_hash = (head.seq, head.entry_hash) if head else (0, GENESIS)
            at = datetime.now(UTC).isoformat(timespec="microseconds")
            unsigned = Checkpoint(seq, entry_hash, at, "")
            signature = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
            signed = Checkpoint(seq, entry_hash, at, signature)
            with (folder / CHECKPOINTS_FILE).open("a") as handle:
                handle.write(json.dumps(asdict(signed), sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            append(
                session, CHECKPOINT_ACTION, f"entry {seq}", {"seq": seq, "entry_hash": entry_hash, "at": at}
            )
        return signed


def verify(
    entries: Sequence[Entry],
    head: tuple[int, str],
    checkpoints: Sequence[Checkpoint | str],
    key: Ed25519PublicKey | None,
) -> list[str]:
    """Every problem found, first to last; an empty list means the log is whole.

    ``key`` is the coordinator's signing public key; without it checkpoints are not checked.
    """
    problems: list[str] = []
    previous = GENESIS
    for position, entry in enumerate(entries, start=1):
        if entry.seq != position:
            problems.append(
                f"entry {entry.seq} stands where entry {position} belongs (deleted, inserted or renumbered)"
            )
        elif entry.previous_hash != previous:
            problems.append(
                f"entry {entry.seq} does not follow the entry before it (deleted, inserted or reordered)"
            )
        if entry.computed_hash() != entry.entry_hash:
            problems.append(f"entry {entry.seq}'s content does not match its hash (edited)")
        previous = entry.entry_hash
    last = (entries[-1].seq, entries[-1].entry_hash) if entries else (0, GENESIS)
    if head != last:
        problems.append(
            f"the log ends at entry {last[0]} but its head records entry {head[0]} (truncated or edited)"
        )
    if key is None:
        return problems
    by_seq = {entry.seq: entry for entry in entries}
    newest = 0
    signed: set[tuple[int, str]] = set()
    for number, checkpoint in enumerate(checkpoints, start=1):
        if isinstance(checkpoint, str):
            problems.append(checkpoint)
            continue
        if not checkpoint.verifies(key):
            problems.append(
                f"checkpoint {number} (entry {checkpoint.seq}) has a bad signature (forged or edited)"
            )
            continue
        if checkpoint.seq < newest or (checkpoint.seq, checkpoint.entry_hash) in signed:
            problems.append(
                f"checkpoint {number} (entry {checkpoint.seq}) follows a later one (replayed or reordered)"
            )
        newest = max(newest, checkpoint.seq)
        signed.add((checkpoint.seq, checkpoint.entry_hash))
        signed_entry = by_seq.get(checkpoint.seq)
        if signed_entry is None and checkpoint.seq > last[0]:
            problems.append(
                f"checkpoint {number} signed entry {checkpoint.seq}, but the log ends at entry {last[0]} "
                "(truncated, or the database was restored to an older state)"
            )
        elif signed_entry is not None and signed_entry.entry_hash != checkpoint.entry_hash:
            problems.append(f"entry {checkpoint.seq} is not what checkpoint {number} signed (rewritten)")
    for entry in entries:
        if entry.action != CHECKPOINT_ACTION:
            continue
        try:
            details = json.loads(entry.details)
            recorded = (details.get("seq"), details.get("entry_hash"))
        except (ValueError, AttributeError):
            problems.append(f"entry {entry.seq} records a checkpoint that does not parse (edited)")
            continue
        if recorded not in signed:
            problems.append(
                f"entry {entry.seq} records a checkpoint of entry {details.get('seq')} that the checkpoint "
                "file does not hold (the file was rolled back or edited)"
            )
    return problems
