"""A simulated device's stream: records arrive round by round, with duplicates and noise mixed in.

In ``fleetlora simulate --stream-records N`` every virtual device takes, before each round it is
asked to train, the next ``N`` examples of its partition through the real ingest pipeline, as a
phone would receive them: about 10% of arrivals re-send an earlier record exactly, 5% are small edits
of one (near-duplicates), and 5% are junk (empty, a run of one character, another script). The device
then trains on its corpus store, so dedup, quality rules, quarantine and the tiered store all run in
a simulation. Everything is drawn from the run seed, the device and the round: a rerun sees the same
stream.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from fleetlora.client.corpus.dedup import near_duplicate
from fleetlora.client.corpus.pipeline import Pipeline
from fleetlora.client.corpus.records import Record
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.client.device_state import DeviceState
from fleetlora.common.data import Example
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.common.trusted_paths import make_trusted_folder

log = logging.getLogger(__name__)

EXACT_SHARE, NEAR_SHARE, JUNK_SHARE = 0.10, 0.05, 0.05
JUNK = ("", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "Где моя новая карта? Она не пришла.", "?!?!?!?!?!?!")


def arrivals(partition: Sequence[Example], per_round: int, round_number: int, seed: str) -> list[Record]:
    """What reaches the device before ``round_number``: its next slice plus injected copies and junk."""
    start = ((round_number - 1) * per_round) % max(1, len(partition))
    fresh = [partition[(start + i) % len(partition)] for i in range(min(per_round, len(partition)))]
    earlier = partition[:start] or fresh
    rng = random.Random(f"{seed}:{round_number}")
    source = f"simulation:round-{round_number}"
    records = [Record(e.text, source, "", label=e.label) for e in fresh]
    for _ in range(round(per_round * EXACT_SHARE)):
        e = rng.choice(earlier)
        records.append(Record(e.text, source, "", label=e.label))
    for _ in range(round(per_round * NEAR_SHARE)):
        e = rng.choice(earlier)
        records.append(Record(near_duplicate(e.text, rng)[0], source, "", label=e.label))
    for _ in range(round(per_round * JUNK_SHARE)):
        records.append(Record(rng.choice(JUNK), source, ""))
    rng.shuffle(records)
    return records


STREAM_FILE = "simulated-stream"  # the last round whose arrivals the device has taken in


def catch_up(
    device: DeviceState,
    device_id: str,
    partition: Sequence[Example],
    per_round: int,
    round_number: int,
    seed: str,
) -> Counter[str]:
    """Take in every round's arrivals the device has not seen yet, up to ``round_number``: a device
    that was not sampled for a while still received its records meanwhile."""
    state = device.load_json(STREAM_FILE) or {}
    last = int(state.get("round", 0))
    totals: Counter[str] = Counter()
    for number in range(last + 1, round_number + 1):
        totals += receive(device, device_id, arrivals(partition, per_round, number, seed))
        device.save_json(STREAM_FILE, {"round": number})
    return totals


PHASE_FILE = "simulated-phase"  # the last phase of a class-incremental stream the device has taken in
PHASE_MAX_BYTES = 4096  # one number: anything larger is damage, refused before it is read


def catch_up_phases(
    device: DeviceState,
    device_id: str,
    partition: Sequence[Example],
    phases: Sequence[Sequence[str]],
    phase: int,
) -> Counter[str]:
    """Take in the records of every phase up to ``phase`` (1-based) the device has not received yet:
    a class-incremental stream, where each phase brings the partition's records of new labels."""
    last = _last_phase(device, len(phases))
    totals: Counter[str] = Counter()
    for number in range(last + 1, phase + 1):
        labels = set(phases[number - 1])
        source = f"simulation:phase-{number}"
        records = [Record(e.text, source, "", label=e.label) for e in partition if e.label in labels]
        totals += receive(device, device_id, records)
        device.save_json(PHASE_FILE, {"phase": number})
    return totals


def _last_phase(device: DeviceState, phases: int) -> int:
    """The last phase taken in (0: none). A damaged file is set aside (logged) and the phases are taken
    in again from the first: the corpus pipeline drops what the device holds already."""
    try:
        last = (device.load_json(PHASE_FILE, max_bytes=PHASE_MAX_BYTES) or {}).get("phase", 0)
        if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= phases:
            raise IncompatibleStateError(f"{device.path(PHASE_FILE, '.json')} is damaged (phase {last!r}).")
    except IncompatibleStateError as exc:
        moved = device.set_aside(PHASE_FILE, ".json")
        log.warning(
            "Phases taken in again from the first: %s was set aside as %s (%s)",
            PHASE_FILE,
            moved,
            exc,
            extra={"event": "state_file_set_aside", "file": f"{PHASE_FILE}.json"},
        )
        return 0
    return last


def receive(device: DeviceState, device_id: str, records: Sequence[Record]) -> Counter[str]:
    """Ingest ``records`` into the device's corpus store; how many were stored, refused, quarantined."""
    make_trusted_folder(device.root)
    now = datetime.now(UTC)
    with CorpusStore(device.root / CORPUS_FILE) as store:
        pipeline = Pipeline(store)
        outcomes: Counter[str] = Counter(
            pipeline.ingest(Record(r.text, r.source, device_id, label=r.label, arrived_at=now)).status
            for r in records
        )
        store.maintain()
    return outcomes
