"""Key knowledge and the retention gate: a version that forgot what the fleet must keep is held back.

An operator pins a key set for a tenant (``fleetlora coordinator key-set add FILE``; or the run-config
key ``key-set``, which pins its file when a run starts unless the same examples are pinned already).
Every new version, a lineage's round-0 version included, is scored on the pinned set at the
coordinator by the evaluation that scores ``eval-data`` (:func:`fleetlora.common.batches.evaluate`),
as a number where higher is better:

- classify: accuracy;
- causal-lm: exp(−mean token loss) = 1 / perplexity, the geometric mean of the probability the model
  gives each next token; in (0, 1] like an accuracy, so "95% of the best" reads the same way.

The score is stored with the version and the set it was made on, and goes into the round's metrics
(``key_score``, and ``key_accuracy`` or ``key_perplexity`` and ``key_loss``). A version stored before
the set was pinned is scored when a run starts from it, or when its child is judged (a set pinned while
the coordinator runs), so the first new version has a baseline.

The gate: with *best* the highest score an earlier version of the lineage made on the same set, a
version scoring below ``retention-threshold`` × best (default 0.95; 0 turns the gate off) is committed
**held**: stored, flagged, never packaged or distributed until an operator releases it (``fleetlora
coordinator versions release N --reason ...``). The round still completes, and the next one trains
from the newest version, held or not, so the fleet keeps learning toward a version that passes;
devices stay on the last version distributed to them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from fleetlora.common.batches import evaluate
from fleetlora.common.config import ModelSpec
from fleetlora.common.data import Example
from fleetlora.common.delta import State, load_trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.model import LoadedModel
from fleetlora.coordinator.key_sets import read_key_set
from fleetlora.coordinator.storage import KeySetInfo, NewVersion, Storage, VersionInfo
from fleetlora.coordinator.storage.key_sets import examples_sha256


@dataclass(frozen=True)
class KeyScore:
    """A version's score on a key set, and the evaluation it came from (as round metrics)."""

    key_set_id: int
    score: float  # higher is better: accuracy, or 1 / perplexity
    metrics: dict[str, float]


class RetentionGate:
    """Scores a lineage's versions on its tenant's pinned key set and holds back one that forgot."""

    def __init__(
        self, storage: Storage, loaded: LoadedModel, lineage: str, *, threshold: float, pin: str = ""
    ) -> None:
        """``threshold``: ``retention-threshold`` (checked in [0, 1] with the run config); ``pin``: a
        key-set file to pin first unless its examples are pinned already ("": none)."""
        self.storage, self.loaded, self.lineage, self.threshold = storage, loaded, lineage, threshold
        self.key_set: KeySetInfo | None = None
        self.examples: list[Example] = []
        if pin:
            read = read_key_set(Path(pin))
            pinned = storage.key_sets.pinned()
            if pinned is None or pinned.examples_sha256 != examples_sha256(read.examples):
                storage.key_sets.add(read.name, read.examples)

    def score(self, state: State) -> KeyScore | None:
        """``state``'s score on the pinned key set; None while the tenant has none pinned."""
        self._follow_pinned()
        if self.key_set is None:
            return None
        load_trainable_state(self.loaded.model, state)
        measured = evaluate(self.loaded, self.examples)
        classify = self.loaded.spec.task == "classify"
        value = measured["accuracy"] if classify else math.exp(-min(measured["loss"], 50.0))
        if not math.isfinite(value):  # a NaN loss: the worst score, never a best (SQL sorts NaN first)
            value = 0.0
        metrics = {"key_score": value, **{f"key_{name}": v for name, v in measured.items()}}
        return KeyScore(self.key_set.id, value, metrics)

    def judge(self, version: NewVersion) -> NewVersion:
        """``version`` with its key score (in its metrics too) and, if it forgot, the hold's reason.

        A parent not scored on the pinned set (one pinned since) is scored first: the set's baseline."""
        self._follow_pinned()
        if self.key_set is not None and version.parent_id is not None:
            parent = self.storage.versions.get(version.parent_id)
            if parent.key_set_id != self.key_set.id:
                self.baseline(parent, self.storage.versions.adapter(parent.id))
        score = self.score(version.adapter)
        if score is None:
            return version
        return dataclasses.replace(
            version,
            metrics={**version.metrics, **score.metrics},
            key_set_id=score.key_set_id,
            key_score=score.score,
            hold=self.hold_reason(score),
        )

    def hold_reason(self, score: KeyScore) -> str | None:
        """Why a new version with ``score`` must be held; None when it keeps enough of the best."""
        if not self.threshold:
            return None
        best = self.storage.versions.best_key_score(self.lineage, score.key_set_id)
        if best is None or score.score >= self.threshold * best[1]:
            return None
        return (
            f"key score {score.score:.4f} is below {self.threshold:g} × {best[1]:.4f}, the best earlier "
            f"(v{best[0]}) on key set {score.key_set_id}"
        )

    def baseline(self, version: VersionInfo, state: State) -> None:
        """Score a stored version that was not scored on the pinned set (a run resuming from it)."""
        self._follow_pinned()
        if self.key_set is None or version.key_set_id == self.key_set.id:
            return
        score = self.score(state)
        if score is not None:
            self.storage.versions.score(version.id, score.key_set_id, score.score)

    def _follow_pinned(self) -> None:
        """Load the tenant's pinned set when it changed (an operator may pin another between rounds)."""
        pinned = self.storage.key_sets.pinned()
        if pinned is None:
            self.key_set, self.examples = None, []
        elif self.key_set is None or pinned.id != self.key_set.id:
            examples = self.storage.key_sets.examples(pinned.id)
            check_scorable(pinned, examples, self.loaded.spec)
            self.key_set, self.examples = pinned, examples


def check_scorable(key_set: KeySetInfo, examples: list[Example], spec: ModelSpec) -> None:
    """Refuse a key set this lineage cannot score: unlabelled, or with a label the fleet lacks."""
    if spec.task != "classify":
        return  # a causal LM is scored on the texts; labels, if any, are not read
    if any(e.label is None for e in examples):
        problem = "no labels, which a classification fleet needs"
    elif unknown := sorted({str(e.label) for e in examples} - set(spec.labels)):
        problem = f"labels {', '.join(map(repr, unknown[:5]))} that this fleet's {len(spec.labels)} lack"
    else:
        return
    raise ConfigError(
        f"The pinned key set {key_set.id} ({key_set.name}) has {problem}, so no version can be scored on "
        "it: pin a set labelled with the fleet's labels (`fleetlora coordinator key-set add FILE`)."
    )
