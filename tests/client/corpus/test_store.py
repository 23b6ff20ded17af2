"""The device's corpus store: dedup, durability under a kill, quarantine, tiers, eviction, integrity."""

import csv
import operator
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleetlora.client.corpus import store as store_module
from fleetlora.client.corpus.records import Record, content_hash, stamped
from fleetlora.client.corpus.store import CorpusStore, CorruptCorpusError, UnknownIdError
from fleetlora.common.errors import ConfigError, DataError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BIG = 1 << 30  # a capacity nothing here reaches
ACKS_BEFORE_KILL = 40


def _record(text: str, arrived_at: datetime = NOW, **fields) -> Record:
    fields = {"source": "stdin", "device": "dev-1", **fields}
    return stamped(Record(text=text, arrived_at=arrived_at, **fields))


def _open(tmp_path: Path, **options) -> CorpusStore:
    return CorpusStore(tmp_path / "corpus.db", **{"capacity_bytes": BIG, **options})


def test_an_exact_duplicate_is_refused_and_nothing_is_stored(tmp_path: Path):
    with _open(tmp_path) as store:
        first = _record("Where is my card?")
        assert store.add(first) is True
        again = _record("Where is my card?  ", NOW + timedelta(hours=1))  # same content, new id
        assert again.id != first.id and again.sha256 == first.sha256
        assert store.add(again) is False
        assert store.has_hash(first.sha256) and not store.has_hash(content_hash("something else"))
        assert store.window() == [first]
        assert store.stats().hot_records == 1


def test_add_many_counts_new_records_and_is_all_or_nothing(tmp_path: Path):
    with _open(tmp_path) as store:
        stored = _record("already here")
        store.add(stored)
        batch = [_record("one"), _record("two"), _record("already here"), _record("one")]
        assert store.add_many(batch) == 2
        assert {r.text for r in store.window()} == {"already here", "one", "two"}

        unstamped = Record(text="never stamped", source="stdin", device="dev-1")
        with pytest.raises(DataError, match="no sha256"):
            store.add_many([_record("three"), unstamped])
        assert not store.has_hash(content_hash("three"))  # the whole batch was refused
        assert store.stats().hot_records == 3


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (Record(text="no hash", source="stdin", device="d"), "no sha256"),
        (replace(_record("naive"), arrived_at=datetime(2025, 1, 1)), "time zone"),
        (replace(_record("broken"), text="broken \ud800 text"), "not valid Unicode"),
        (_record("odd metadata", metadata={"handle": object()}), "not JSON"),
        (_record("odd modality", modality="video"), "modality"),
    ],
)
def test_a_record_that_cannot_be_stored_says_why(tmp_path: Path, record: Record, why: str):
    with _open(tmp_path) as store:
        with pytest.raises(DataError, match=why):
            store.add(record)
        assert store.stats().hot_records == 0


def test_an_id_reused_for_other_content_is_refused(tmp_path: Path):
    with _open(tmp_path) as store:
        first = _record("first")
        store.add(first)
        with pytest.raises(DataError, match="id"):
            store.add_many([_record("second"), _record("third", id=first.id)])
        assert store.window() == [first]  # the transaction rolled back: "second" is not stored either
        assert not store.has_hash(content_hash("second"))


def test_records_survive_closing_and_reopening(tmp_path: Path):
    records = [_record(f"message {i}", NOW + timedelta(minutes=i), label="greeting") for i in range(3)]
    with _open(tmp_path) as store:
        assert store.add_many(records) == 3
    with _open(tmp_path) as store:
        assert store.window() == records[::-1]  # newest first


def test_the_window_is_newest_first_within_since_and_limit(tmp_path: Path):
    records = [_record(f"message {i}", NOW - timedelta(hours=i)) for i in range(6)]
    with _open(tmp_path) as store:
        store.add_many(records[::-1])  # stored oldest first; order comes from arrival, not insertion
        assert store.window() == records
        assert store.window(limit=2) == records[:2]
        assert store.window(since=NOW - timedelta(hours=3)) == records[:4]
        assert store.window(since=NOW - timedelta(hours=3), limit=0) == []


def test_the_window_merges_both_tiers_newest_first(tmp_path: Path):
    start = NOW - timedelta(days=30)
    records = [_record(f"message {i}", start + timedelta(hours=13 * i)) for i in range(50)]
    with _open(tmp_path) as store:
        store.add_many(records[:20])
        assert store.archive(NOW - timedelta(days=12)) > 0  # one block
        store.add_many(records[20:45])
        assert store.archive(NOW) > 0  # a second block
        store.add_many(records[45:])
        late = _record("arrived late, stamped long ago", start + timedelta(hours=13 * 30, minutes=1))
        store.add(late)  # hot, yet older than records already cold
        assert store.stats().cold_blocks == 2 and store.stats().hot_records > 1
        expected = sorted([*records, late], key=lambda r: r.arrived_at, reverse=True)
        assert store.window() == expected
        for limit in (1, 5, 17, 60):
            assert store.window(limit=limit) == expected[:limit]
        for days in (3, 11, 20, 40):
            since = NOW - timedelta(days=days)
            assert store.window(since=since) == [r for r in expected if r.arrived_at >= since]
            assert store.window(since=since, limit=4) == [r for r in expected if r.arrived_at >= since][:4]


_INGEST = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from fleetlora.client.corpus.records import Record, stamped
    from fleetlora.client.corpus.store import CorpusStore

    store = CorpusStore(Path(sys.argv[1]), capacity_bytes=1 << 30)
    for i in range(1_000_000):
        record = stamped(Record(text=f"message {i}", source="stdin", device="dev-1"))
        store.add(record)  # durable once it returns
        print(record.id, flush=True)
    """
)


def test_a_kill_during_ingest_loses_nothing_acknowledged(tmp_path: Path):
    script = tmp_path / "ingest.py"
    script.write_text(_INGEST)
    path = tmp_path / "corpus.db"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < ACKS_BEFORE_KILL:
            line = child.stdout.readline()
            assert line.endswith("\n"), f"the ingest child died: {child.stderr.read()[-2000:]}"
            acknowledged.append(line.strip())
        child.send_signal(signal.SIGKILL)  # mid-ingest: it is adding the next record
        child.wait(timeout=30)
        # Through child.stdout, not communicate(): that reads the pipe itself and would skip the lines
        # readline() already buffered, which a child running ahead on a loaded machine leaves there.
        rest = child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    acknowledged += [line for line in rest.splitlines(keepends=True) if line.endswith("\n")]
    acknowledged = [line.strip() for line in acknowledged]

    with CorpusStore(path, capacity_bytes=BIG) as store:
        stored = {r.id for r in store.window()}
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert set(acknowledged) <= stored
    assert len(stored) - len(acknowledged) in (0, 1)  # at most the record committed but not yet printed


def test_quarantine_keeps_even_malformed_records_until_released_or_dropped(tmp_path: Path):
    good = _record("fine text", label="card_arrival", metadata={"line": 4})
    malformed = Record(
        text="bad \ud800 text",
        source="inbox:x.txt",
        device="dev-1",
        metadata={"handle": object()},
        arrived_at=datetime(2025, 1, 1),  # no time zone
    )
    with _open(tmp_path) as store:
        with pytest.raises(DataError):
            store.add(malformed)
        assert store.quarantine(malformed, "not valid Unicode") == malformed.id
        assert store.quarantine(good, "too short") == good.id
        assert store.quarantine(good, "language") == good.id  # again: the latest reason wins
    with _open(tmp_path) as store:
        held = store.quarantined()
        assert [(q.record.id, q.reason) for q in held] == [
            (malformed.id, "not valid Unicode"),
            (good.id, "language"),
        ]
        assert held[0].record.text == "bad \ud800 text"
        assert held[0].record.metadata["handle"].startswith("<object")
        assert held[0].record.arrived_at == datetime(2025, 1, 1)
        assert all(q.at.tzinfo is not None for q in held)
        assert store.window() == [] and store.stats().quarantined == 2

        assert store.release(good.id) == good
        store.drop(malformed.id)
        assert store.quarantined() == []
        for action in (store.release, store.drop):
            with pytest.raises(UnknownIdError, match="quarantine list"):
                action(good.id)


def test_eviction_removes_the_oldest_records_first(tmp_path: Path):
    records = [_record(f"message number {i:04d}", NOW - timedelta(hours=10 - i)) for i in range(10)]
    with _open(tmp_path) as store:
        store.add_many(records[::-1])
        size = store.stats().hot_bytes // 10  # equal-length records: equal sizes
        assert store.evict() == 0
    with CorpusStore(tmp_path / "corpus.db", capacity_bytes=3 * size + size // 2) as store:
        assert store.evict() == 7
        assert store.window() == records[:-4:-1]  # the three newest
        assert store.stats().stored_bytes <= store.capacity_bytes
        assert store.evict() == 0


def test_cold_records_go_before_hot_ones_and_a_block_can_go_in_part(tmp_path: Path):
    start = NOW - timedelta(days=30)
    old = [_record(f"old message {i} about card {i % 7}", start + timedelta(minutes=i)) for i in range(300)]
    hot = [_record(f"new message {i}", NOW - timedelta(hours=1, minutes=i)) for i in range(20)]
    with _open(tmp_path) as store:
        store.add_many(old + hot)
        assert store.maintain(NOW) == (300, 0)
        full = store.stats()
    capacity = full.hot_bytes + full.cold_compressed_bytes // 2
    with CorpusStore(tmp_path / "corpus.db", capacity_bytes=capacity) as store:
        evicted = store.evict()
        after = store.stats()
        assert 0 < evicted < 300
        assert (after.hot_records, after.cold_records) == (20, 300 - evicted)
        assert after.stored_bytes <= capacity
        kept = {r.id for r in store.window()}
        assert kept == {r.id for r in hot + old[evicted:]}  # the oldest cold records went
        assert store.verify() == []  # the rewritten block carries a valid checksum


def test_records_stay_hot_for_hot_days_and_then_move_cold(tmp_path: Path):
    young = _record("six point nine days old", NOW - timedelta(days=6.9))
    old = _record("seven point one days old", NOW - timedelta(days=7.1))
    with _open(tmp_path, hot_days=7) as store:
        store.add_many([young, old])
        assert store.archive(NOW) == 1
        stats = store.stats()
        assert (stats.hot_records, stats.cold_records, stats.cold_blocks) == (1, 1, 1)
        assert store.archive(NOW) == 0
        assert store.window() == [young, old]
    with sqlite3.connect(tmp_path / "corpus.db") as db:
        assert db.execute("SELECT id FROM hot").fetchall() == [(young.id,)]
    db.close()


def test_cold_records_come_back_exactly_as_stored(tmp_path: Path):
    records = [
        _record("plain", NOW - timedelta(days=20)),
        _record("labelled", NOW - timedelta(days=19, microseconds=7), label="card_arrival"),
        _record(
            "with metadata ünïcödé 🙂",
            datetime(2025, 2, 5, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
            metadata={"size": 12, "nested": {"a": [1, 2.5, None]}, "ok": True},
            source="inbox:notes.txt",
        ),
        _record("/media/photo.jpg", NOW - timedelta(days=10), modality="image", metadata={"bytes": 2048}),
    ]
    with _open(tmp_path, hot_days=1) as store:
        store.add_many(records)
        before = store.window()
        assert store.archive(NOW) == 4 and store.stats().hot_records == 0
        assert store.window() == before
        assert store.add(_record("labelled", NOW)) is False  # dedup reaches the cold tier
    with _open(tmp_path) as store:
        assert sorted(store.window(), key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


def test_a_damaged_cold_block_is_detected_and_can_be_set_aside(tmp_path: Path):
    first = [_record(f"first batch {i}", NOW - timedelta(days=20, minutes=i)) for i in range(5)]
    second = [_record(f"second batch {i}", NOW - timedelta(days=12, minutes=i)) for i in range(5)]
    recent = [_record(f"recent {i}", NOW - timedelta(hours=i)) for i in range(3)]
    with _open(tmp_path) as store:
        store.add_many(first)
        assert store.archive(NOW - timedelta(days=10)) == 5
        store.add_many(second + recent)
        assert store.archive(NOW) == 5
    with sqlite3.connect(tmp_path / "corpus.db") as db:
        (block, data), _ = db.execute("SELECT id, data FROM blocks ORDER BY oldest").fetchall()
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte, as a worn flash cell would
        db.execute("UPDATE blocks SET data = ? WHERE id = ?", (bytes(damaged), block))
    db.close()

    with _open(tmp_path) as store:
        with pytest.raises(CorruptCorpusError, match="sha256") as caught:
            store.window()
        assert caught.value.block_id == block
        assert store.window(since=NOW - timedelta(days=1)) == recent  # reads not touching it still work
        assert store.verify() == [block]
        assert store.set_aside(block) == 5
        assert {r.id for r in store.window()} == {r.id for r in second + recent}
        assert store.verify() == []
        assert not store.has_hash(first[0].sha256) and store.add(first[0])  # may arrive again
        stats = store.stats()
        assert (stats.set_aside_blocks, stats.cold_records) == (1, 5) and stats.set_aside_bytes > 0
        with pytest.raises(UnknownIdError):
            store.set_aside(block)


def test_the_cold_tier_saves_more_than_half_on_banking77_text(tmp_path: Path, banking77: Path):
    with (banking77 / "train.csv").open(newline="") as handle:
        rows = [row for _, row in zip(range(2000), csv.DictReader(handle), strict=False)]
    records = [
        _record(row["text"], NOW - timedelta(days=30) + timedelta(seconds=37 * i), label=row["category"])
        for i, row in enumerate(rows)
    ]
    with _open(tmp_path) as store:
        first_of_each = {}  # a few texts repeat up to surrounding whitespace: the first one stays
        for record in records:
            first_of_each.setdefault(record.sha256, record)
        assert store.add_many(records) == len(first_of_each)
        assert store.archive(NOW) == len(first_of_each)
        stats = store.stats()
        assert stats.compression_saved > 0.5, stats
        assert stats.cold_compressed_bytes < stats.cold_raw_bytes
        by_id = operator.attrgetter("id")
        assert sorted(store.window(), key=by_id) == sorted(first_of_each.values(), key=by_id)


def test_capacity_is_a_share_of_the_free_disk_unless_configured(tmp_path: Path, monkeypatch):
    with CorpusStore(tmp_path / "real.db") as store:
        assert 0 < store.capacity_bytes <= 0.1 * store_module.shutil.disk_usage(tmp_path).free * 1.01

    class Usage:
        total, used, free = 10_000_000, 2_000_000, 8_000_000

    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: Usage)
    with CorpusStore(tmp_path / "a.db") as store:
        assert store.capacity_bytes == 800_000
    with CorpusStore(tmp_path / "b.db", free_disk_share=0.25) as store:
        assert store.stats().capacity_bytes == 2_000_000
    with CorpusStore(tmp_path / "c.db", capacity_bytes=12_345) as store:
        assert store.capacity_bytes == 12_345


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"capacity_bytes": 0}, "positive number of bytes"),
        ({"capacity_bytes": -5}, "positive number of bytes"),
        ({"capacity_bytes": 1.5}, "positive number of bytes"),
        ({"free_disk_share": 0}, r"\(0, 1\]"),
        ({"free_disk_share": 1.5}, r"\(0, 1\]"),
        ({"free_disk_share": float("nan")}, r"\(0, 1\]"),
        ({"hot_days": -1}, "hot_days"),
        ({"hot_days": float("inf")}, "hot_days"),
    ],
)
def test_bad_settings_raise_config_error(tmp_path: Path, options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        CorpusStore(tmp_path / "corpus.db", **options)
    assert not (tmp_path / "corpus.db").exists()


def test_bad_arguments_and_files_are_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match="folder"):
        CorpusStore(tmp_path)
    with _open(tmp_path) as store:
        with pytest.raises(ConfigError, match="time zone"):
            store.archive(datetime(2025, 1, 1))
        with pytest.raises(ConfigError, match="limit"):
            store.window(limit=-1)
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_bytes(b"these are notes, not a database" * 100)
    with pytest.raises(CorruptCorpusError, match="not a corpus store"):
        CorpusStore(not_a_store, capacity_bytes=BIG)
