"""Semi-automatic labels: the current model proposes, a second one may confirm, a person settles the rest.

For each recent unlabelled text the device's model (and optionally a second model) gives class
probabilities. With one model the proposal's confidence is its top probability; with two that agree
on the top class it is ``1 − (1 − p₁)(1 − p₂)`` (two independent agreeing guesses are surer than
either); when they disagree the record goes to review whatever their confidence, since a person
should settle what the models dispute. A proposal at or above ``floor`` becomes the record's label,
with its provenance (which model version, when, how sure) in the record's metadata; below it, the
record joins the review queue with the proposals, and ``fleetlora device review`` lets a person
accept or correct it (provenance: human).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fleetlora.client.corpus.records import Record
from fleetlora.client.corpus.store import CorpusStore
from fleetlora.common.errors import ConfigError, DataError

if TYPE_CHECKING:  # torch and the model load where labels are proposed: `review list` reads the store alone
    import torch

    from fleetlora.common.model import LoadedModel

PROVENANCE, REVIEW = "label_provenance", "review"  # metadata keys
DEFAULT_FLOOR = 0.8


@dataclass(frozen=True)
class Labeller:
    """A model that proposes labels, and the name its proposals are recorded under (e.g. ``model:v7``)."""

    loaded: LoadedModel
    name: str


def probabilities(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Class probabilities, one row per text, in the order of the model's labels."""
    import torch

    if loaded.spec.task != "classify":
        raise ConfigError("Labels are proposed by a classification model; this one is a causal LM.")
    loaded.model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = loaded.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=loaded.spec.max_length,
                return_tensors="pt",
            )
            rows.append(torch.softmax(loaded.model(**batch).logits.float(), dim=-1))
    return torch.cat(rows) if rows else torch.empty(0, len(loaded.spec.labels))


def propose(
    store: CorpusStore,
    first: Labeller,
    second: Labeller | None = None,
    *,
    floor: float = DEFAULT_FLOOR,
    limit: int | None = None,
) -> Counter[str]:
    """Label what the models are sure of, queue the rest for review; counts of ``labelled``/``review``."""
    if not 0 < floor < 1:
        raise ConfigError(f"label confidence floor must be in (0, 1), got {floor}.")
    if second is not None and second.loaded.spec.labels != first.loaded.spec.labels:
        raise ConfigError("Both labelling models must know the same labels, in the same order.")
    records = store.unlabelled(limit)
    if not records:
        return Counter()
    labels = first.loaded.spec.labels
    texts = [r.text for r in records]
    p1 = probabilities(first.loaded, texts)
    p2 = probabilities(second.loaded, texts) if second else None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    counts: Counter[str] = Counter()
    for i, record in enumerate(records):
        proposals = [_proposal(p1[i], labels, first.name)]
        if p2 is not None and second is not None:
            proposals.append(_proposal(p2[i], labels, second.name))
        label, confidence, agreed = _combine(proposals)
        metadata = {k: v for k, v in record.metadata.items() if k != REVIEW}
        if agreed and confidence >= floor:
            by = "+".join(p["by"] for p in proposals)
            metadata[PROVENANCE] = {"by": by, "at": now, "confidence": round(confidence, 4)}
            store.relabel(record.id, label, metadata)
            counts["labelled"] += 1
        else:
            metadata[REVIEW] = {"proposals": proposals, "confidence": round(confidence, 4), "at": now}
            store.relabel(record.id, None, metadata)
            counts["review"] += 1
    return counts


def review_queue(store: CorpusStore) -> list[Record]:
    """Records waiting for a person: unlabelled, with the models' proposals."""
    return [r for r in store.unlabelled() if REVIEW in r.metadata]


def settle(
    store: CorpusStore,
    record_id: str,
    label: str | None = None,
    *,
    known: Sequence[str] = (),
    new_label: bool = False,
    reviewer: str = "human",
) -> str:
    """Accept the top proposal (``label`` None) or correct it; the label is recorded as a person's.

    A corrected label must be one the fleet has (``known``, else the labels proposed for the record)
    unless ``new_label`` says a new one is meant: a typo would otherwise become a class of its own.
    """
    record = next((r for r in store.unlabelled() if r.id == record_id), None)
    if record is None or REVIEW not in record.metadata:
        raise DataError(
            f"No record {record_id!r} is waiting for review: `fleetlora device review list` shows them."
        )
    proposals = record.metadata[REVIEW]["proposals"]
    allowed = list(known) or sorted({str(p["label"]) for p in proposals})
    if label is not None and not new_label and label not in allowed:
        shown_labels = ", ".join(allowed[:10]) + (" ..." if len(allowed) > 10 else "")
        raise DataError(
            f"{label!r} is not one of the fleet's labels ({shown_labels}): check the spelling, or pass "
            "--new-label if a new label is meant."
        )
    chosen = label or str(max(proposals, key=lambda p: p["confidence"])["label"])
    metadata = {k: v for k, v in record.metadata.items() if k != REVIEW}
    metadata[PROVENANCE] = {"by": reviewer, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    store.relabel(record.id, chosen, metadata)
    return chosen


def _proposal(row: torch.Tensor, labels: Sequence[str], by: str) -> dict[str, Any]:
    confidence, index = (float(v) for v in row.max(dim=0))
    return {"label": labels[int(index)], "confidence": round(confidence, 4), "by": by}


def _combine(proposals: list[dict[str, Any]]) -> tuple[str, float, bool]:
    """One label, its confidence (raised when two models agree), and whether the models agree."""
    best = max(proposals, key=lambda p: p["confidence"])
    if len(proposals) == 1:
        return best["label"], best["confidence"], True
    a, b = proposals
    if a["label"] == b["label"]:
        return a["label"], 1 - (1 - a["confidence"]) * (1 - b["confidence"]), True
    return best["label"], min(a["confidence"], b["confidence"]), False
