"""Has what arrives drifted from what the device last trained on? Then it wants to train.

The reference is the token distribution of the device's last training set, kept in its state
folder after each round it trains. The recent window is every record that arrived since. Their
distance is the Jensen-Shannon divergence of the two unigram distributions (base 2: 0 for the same
distribution, 1 for disjoint vocabularies).

A small window is far from any reference by chance alone (on BANKING77, 20 texts drawn from the very
distribution of an 800-text reference sit at 0.31, 200 texts at 0.10), so the distance is judged against
that chance: the same number of tokens is drawn from the reference itself a few times, and the window
has drifted when its distance is ``threshold`` times those draws' mean distance. (Token draws are
smoother than real texts, so their spread would understate chance: a ratio, not a z-score.) Measured on
BANKING77 against that reference, as distance ÷ chance:

==========================================  =====  =====  =====
recent window                               20     50     200
==========================================  =====  =====  =====
same distribution                           1.04   1.08   1.33
the other half of the intents               1.06   1.38   2.41
Tiny Shakespeare                            2.07   2.65   5.50
==========================================  =====  =====  =====

With the default 1.5 a change of topic is caught at once and a shift between intents once about 200
records have arrived. Then the device *wants to train* and says so when the coordinator asks, so the
coordinator can sample it first. A device that never trained wants to as soon as it holds records.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from fleetlora.client.corpus.store import CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.common.errors import ConfigError, IncompatibleStateError

REFERENCE_FILE = "drift-reference"
DEFAULT_THRESHOLD = 1.5  # distance ÷ the mean distance of same-size draws from the reference
MIN_RECENT = 20  # fewer new records than this say too little to call drift
DRAWS = 20
_TOKEN = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass(frozen=True)
class DriftReport:
    distance: float  # Jensen-Shannon divergence, base 2, in [0, 1]
    chance: float  # mean distance of same-size draws from the reference
    score: float  # distance ÷ chance
    recent: int  # records that arrived since the reference was taken
    wants_train: bool


def token_counts(texts: Iterable[str]) -> Counter[str]:
    return Counter(token.lower() for text in texts for token in _TOKEN.findall(text))


def js_divergence(p: Counter[str], q: Counter[str]) -> float:
    """Jensen-Shannon divergence (base 2) of two token count tables; 0 when either is empty."""
    p_total, q_total = sum(p.values()), sum(q.values())
    if not p_total or not q_total:
        return 0.0
    divergence = 0.0
    for token in p.keys() | q.keys():
        a, b = p.get(token, 0) / p_total, q.get(token, 0) / q_total
        m = (a + b) / 2
        if a:
            divergence += a / 2 * math.log2(a / m)
        if b:
            divergence += b / 2 * math.log2(b / m)
    return max(0.0, min(1.0, divergence))


def save_reference(device: DeviceState, texts: Iterable[str], trained_at: datetime) -> None:
    """Remember what the device just trained on (token counts only: no text is kept twice)."""
    counts = dict(token_counts(texts))
    device.save_json(REFERENCE_FILE, {"trained_at": trained_at.isoformat(), "counts": counts})


def last_trained(device: DeviceState) -> datetime | None:
    """When the device last trained (its reference's time), or None before its first training."""
    reference = device.load_json(REFERENCE_FILE)
    if reference is None:
        return None
    try:
        moment = datetime.fromisoformat(str(reference["trained_at"]))
    except (KeyError, ValueError) as exc:
        raise IncompatibleStateError(
            f"{device.path(REFERENCE_FILE, '.json')} is damaged ({exc}): delete it, and the device counts "
            "every record as new once."
        ) from exc
    if moment.utcoffset() is None:
        raise IncompatibleStateError(
            f"{device.path(REFERENCE_FILE, '.json')} is damaged (trained_at has no time zone): delete it."
        )
    return moment


def measure(device: DeviceState, store: CorpusStore, threshold: float = DEFAULT_THRESHOLD) -> DriftReport:
    """Drift of the records that arrived since the device last trained, against what it trained on."""
    if not threshold > 0:
        raise ConfigError(
            f"drift threshold must be a ratio > 0 (default {DEFAULT_THRESHOLD}), got {threshold}."
        )
    reference = device.load_json(REFERENCE_FILE)
    if reference is None:
        recent = [r.text for r in store.window() if r.modality == "text"]
        return DriftReport(1.0, 0.0, math.inf if recent else 0.0, len(recent), bool(recent))
    since = datetime.fromisoformat(str(reference["trained_at"]))
    recent = [r.text for r in store.window(since=since) if r.modality == "text"]
    if len(recent) < MIN_RECENT:
        return DriftReport(0.0, 0.0, 0.0, len(recent), False)
    counts = Counter({str(k): int(v) for k, v in reference["counts"].items()})
    window = token_counts(recent)
    distance = js_divergence(counts, window)
    chance = _chance(counts, sum(window.values()))
    score = distance / chance if chance > 0 else math.inf
    return DriftReport(distance, chance, score, len(recent), score >= threshold)


def _chance(reference: Counter[str], tokens: int) -> float:
    """Mean distance of ``tokens``-token draws from ``reference`` to ``reference``."""
    vocabulary = list(reference)
    weights = np.array([reference[t] for t in vocabulary], dtype=float)
    rng = np.random.default_rng(0)  # the same draws every time: the verdict must not flicker
    distances = []
    for _ in range(DRAWS):
        drawn = rng.multinomial(tokens, weights / weights.sum())
        sample = Counter({vocabulary[i]: int(drawn[i]) for i in np.flatnonzero(drawn)})
        distances.append(js_divergence(reference, sample))
    return float(np.mean(distances))
