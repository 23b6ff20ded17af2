"""Key-knowledge sets: labelled examples an operator pins for a tenant, stored sealed like adapters.

Each set is stored whole: its examples as canonical JSON ``[[text, label], ...]`` (sealed at rest
when the coordinator has a key: the texts are the operator's data), their sha256 (over those bytes,
so the same examples give the same hash whatever file they came from), the distinct labels, and who
added it. A tenant's newest set is its pinned one: adding a set pins it, older ones stay listed, and
no set is ever deleted, so the scores made on an older set keep their meaning. "Newest" is by id, so
two concurrent adds can never leave two sets pinned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetlora.common.canonical import canonical_json
from fleetlora.common.data import Example
from fleetlora.common.errors import DataError, FleetloraError
from fleetlora.coordinator.models import KeySet, Lineage
from fleetlora.coordinator.storage import audit
from fleetlora.coordinator.storage.rows import TenantScoped, checked_blob, info_of

NAME_CHARS = 200  # the column's width


@dataclass(frozen=True)
class KeySetInfo:
    """A stored key set without its examples (load those with :meth:`KeySetStore.examples`)."""

    id: int
    tenant: str
    name: str
    examples_sha256: str
    example_count: int
    labels: list[str]
    added_at: datetime
    added_by: str
    pinned: bool  # the tenant's newest set: the one versions are scored on


def encode_examples(examples: Sequence[Example]) -> bytes:
    """The stored form of ``examples``; its sha256 names the set."""
    return canonical_json([[e.text, e.label] for e in examples])


def examples_sha256(examples: Sequence[Example]) -> str:
    return hashlib.sha256(encode_examples(examples)).hexdigest()


class KeySetStore(TenantScoped):
    """Key sets in the coordinator's database; a scoped store sees and pins only its tenant's."""

    def add(self, name: str, examples: Sequence[Example]) -> KeySetInfo:
        """Store ``examples`` as the tenant's pinned key set (checked by coordinator/key_sets.py first).

        Refused when a label is unknown to every classification lineage the tenant has, or the set is
        unlabelled while it has one: such a set could not be scored.
        """
        if self.tenant is None:
            raise FleetloraError("A key set belongs to one tenant: open the store for a tenant.")
        if not examples:
            raise FleetloraError("A key set needs at least one example.")
        blob = encode_examples(examples)
        labels = sorted({e.label for e in examples if e.label is not None})
        with self.db.session() as session:
            _check_labels(session, self.tenant, labels)
            row = KeySet(
                tenant=self.tenant,
                name=name[:NAME_CHARS],
                examples=b"",  # the sealed blob is bound to the row's id: written once the id is known
                examples_sha256=hashlib.sha256(blob).hexdigest(),
                example_count=len(examples),
                labels=labels,
                added_by=audit.default_actor(),
            )
            session.add(row)
            session.flush()
            row.examples = self.db.cipher.seal(blob, key_set_binding(row))
            audit.append(
                session,
                "key-set.added",
                f"key set {row.id}",
                {
                    "tenant": row.tenant,
                    "name": row.name,
                    "sha256": row.examples_sha256,
                    "examples": row.example_count,
                    "labels": len(labels),
                },
            )
            return _info(row, pinned=True)

    def all(self) -> list[KeySetInfo]:
        """Every key set of the tenant (every tenant's when unscoped), oldest first; the newest of each
        tenant is pinned."""
        with self.db.session() as session:
            query = select(KeySet).where(self.is_tenant(KeySet.tenant)).order_by(KeySet.id)
            rows = list(session.scalars(query))
        newest = {row.tenant: row.id for row in rows}
        return [_info(row, pinned=newest[row.tenant] == row.id) for row in rows]

    def pinned(self) -> KeySetInfo | None:
        """The tenant's pinned key set; None while it has none."""
        if self.tenant is None:
            raise FleetloraError("Each tenant pins its own key set: open the store for a tenant.")
        query = select(KeySet).where(KeySet.tenant == self.tenant).order_by(KeySet.id.desc()).limit(1)
        with self.db.session() as session:
            row = session.scalars(query).first()
            return _info(row, pinned=True) if row else None

    def examples(self, key_set_id: int) -> list[Example]:
        """The key set's examples, after checking them against their recorded sha256."""
        with self.db.session() as session:
            row = session.scalars(
                select(KeySet).where(KeySet.id == key_set_id, self.is_tenant(KeySet.tenant))
            ).first()
            if row is None:
                raise FleetloraError(f"No key set {key_set_id} in the database: `key-set list` shows them.")
            blob, expected = self.db.cipher.open(row.examples, key_set_binding(row)), row.examples_sha256
        corrupt = f"Key set {key_set_id}: stored examples do not match their sha256; add the set again."
        pairs = json.loads(checked_blob(blob, expected, lambda: FleetloraError(corrupt)))
        return [Example(text, label) for text, label in pairs]


def _check_labels(session: Session, tenant: str, labels: list[str]) -> None:
    """Refuse a set that no classification lineage of ``tenant`` could score (while the tenant has
    none, the labels are checked when a round first scores the set)."""
    models = session.scalars(select(Lineage.model).where(Lineage.tenant == tenant))
    known = [set(m.get("model.labels") or ()) for m in models if m.get("model.task") == "classify"]
    if not known:
        return
    if not labels:
        raise DataError(
            "The key set has no labels, but this tenant's fleet classifies: give a CSV/JSONL file with a "
            "label column (text,label)."
        )
    if any(set(labels) <= lineage_labels for lineage_labels in known):
        return
    unknown = sorted(set(labels) - set().union(*known))
    problem = (
        f"labels {', '.join(map(repr, unknown[:5]))} are not among this tenant's fleet's labels"
        if unknown
        else "labels come from several lineages and none of them has them all"
    )
    raise DataError(f"The key set's {problem}: fix or drop those examples and add the file again.")


def _info(row: KeySet, *, pinned: bool) -> KeySetInfo:
    return info_of(KeySetInfo, row, labels=list(row.labels or []), pinned=pinned)


def key_set_binding(row: KeySet) -> dict[str, object]:
    """What a sealed key set is bound to (coordinator/at_rest.py): it opens in this row only."""
    return {"kind": "key-set", "id": row.id, "tenant": row.tenant}
