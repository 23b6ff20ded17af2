"""The device's corpus on disk: one SQLite file holding a sliding window of records, plus a quarantine.

Why SQLite, and why these settings:

* One file, no server, in Python's standard library: a phone or a gateway can run it, and
  ``sqlite3 corpus.db`` is enough to inspect it.
* ``journal_mode=WAL``: a reader (``fleetlora device quarantine list`` while the agent ingests)
  never blocks the writer, and a commit appends to the log instead of rewriting pages.
* ``synchronous=FULL``: a commit returns only after the log is fsynced. :meth:`CorpusStore.add`
  returns after its commit, so an acknowledged record survives a kill of the process and a power cut;
  a transaction cut short by a kill is rolled back on the next open, never half applied.

Layout. ``hashes`` holds the sha256 of every stored record of both tiers as its primary key (exact
dedup) and the record's cold block, NULL while hot: about 40 bytes a record, all that a cold record
costs besides its share of a block. ``hot`` holds records younger than ``hot_days`` in full.
:meth:`CorpusStore.archive` moves older ones into ``blocks``: zstd frames of JSON lines (one
self-contained record per line, oldest first), each with the sha256 of its compressed bytes, its
record count, uncompressed size and time span. Every read of a block checks its sha256 first
(against bit rot on flash, not against an attacker, who could rewrite both) and decompresses no more
than the recorded size (:mod:`fleetlora.common.compression`). A block that fails raises
:class:`CorruptCorpusError`; the agent then calls :meth:`CorpusStore.set_aside` (or sets aside all of
:meth:`CorpusStore.verify`'s findings): the block moves to ``set_aside`` for inspection, its records
leave the window (and may arrive again), and the rest reads again.

Size. "Stored bytes", which :meth:`CorpusStore.evict` keeps under the capacity, counts the payload:
the serialized (JSON line) size of each hot record, the compressed size of each cold block, and
set-aside blocks. SQLite's own overhead (``hashes``, the hot tier's indexes, page slack) is not
counted; pages freed by archiving or eviction go back to the file system
(``auto_vacuum=INCREMENTAL``, then a WAL checkpoint). Quarantined records are outside the window: they
are never evicted and do not count.

Arrival times are stored as fixed-width ISO 8601 UTC text, so text order is time order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from fleetlora.client.corpus.records import Modality, Record, short_repr
from fleetlora.common.compression import DecompressionError, compress, decompress
from fleetlora.common.errors import ConfigError, DataError, FleetloraError

SCHEMA_VERSION = 1
COLD_ZSTD_LEVEL = 9  # BANKING77: 77% saved at 9 vs 78% at 19, for a tenth of the CPU time
BLOCK_RECORDS = 2000  # at most this many records per cold block …
BLOCK_RAW_BYTES = 4 << 20  # … and at most this many uncompressed bytes
WAL_LIMIT_BYTES = 4 << 20
BUSY_TIMEOUT_MS = 5000  # a second process (the CLI) waits this long for the agent's write to end
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODALITIES = frozenset(get_args(Modality))
_FIELDS = ("id", "sha256", "arrived_at", "text", "source", "device", "modality", "label", "metadata")

_SCHEMA = """
CREATE TABLE blocks (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL,             -- zstd frame of JSON lines, one record per line, oldest first
    sha256 TEXT NOT NULL,           -- of data
    count INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,     -- uncompressed size
    oldest TEXT NOT NULL,
    newest TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE hashes (               -- every stored record, hot or cold: exact dedup across both tiers
    sha256 BLOB PRIMARY KEY,        -- 32 bytes
    block INTEGER                   -- its cold block; NULL while hot
) WITHOUT ROWID;
CREATE TABLE hot (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    sha256 BLOB NOT NULL,
    arrived_at TEXT NOT NULL,       -- ISO 8601 UTC, fixed width
    size INTEGER NOT NULL,          -- bytes of the record's JSON line
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    device TEXT NOT NULL,
    modality TEXT NOT NULL,
    label TEXT,
    metadata TEXT NOT NULL          -- JSON object
);
CREATE INDEX hot_age ON hot(arrived_at, seq);
CREATE TABLE set_aside (
    id INTEGER PRIMARY KEY,         -- the block's id when it was cold
    data BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    count INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    oldest TEXT NOT NULL,
    newest TEXT NOT NULL,
    created_at TEXT NOT NULL,
    reason TEXT NOT NULL,
    set_aside_at TEXT NOT NULL
);
CREATE TABLE quarantine (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,           -- the record as it came, as ASCII JSON
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""
_HOT_COLUMNS = "seq, id, sha256, arrived_at, text, source, device, modality, label, metadata"


CORPUS_FILE = "corpus.sqlite"  # the store's name in a device's state folder


class CorruptCorpusError(FleetloraError):
    """Stored corpus bytes do not match their checksum or do not decode; ``block_id`` names the block."""

    def __init__(self, message: str, block_id: int | None = None) -> None:
        super().__init__(message)
        self.block_id = block_id


class UnknownIdError(FleetloraError, LookupError):
    """No quarantined record or cold block has the given id."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Quarantined:
    """A record held back, why, and since when (UTC)."""

    record: Record
    reason: str
    at: datetime


@dataclass(frozen=True)
class StoreStats:
    """Counts and payload bytes of each part of the store."""

    hot_records: int
    cold_records: int
    cold_blocks: int
    quarantined: int
    set_aside_blocks: int
    hot_bytes: int  # serialized size of the hot records
    cold_raw_bytes: int  # uncompressed size of the cold blocks
    cold_compressed_bytes: int
    set_aside_bytes: int
    capacity_bytes: int

    @property
    def stored_bytes(self) -> int:
        """What :meth:`CorpusStore.evict` keeps under ``capacity_bytes``."""
        return self.hot_bytes + self.cold_compressed_bytes + self.set_aside_bytes

    @property
    def compression_saved(self) -> float:
        """1 − compressed / uncompressed over the cold tier (0 while it is empty)."""
        return 1 - self.cold_compressed_bytes / self.cold_raw_bytes if self.cold_raw_bytes else 0.0


class CorpusStore:
    """A device's records in one SQLite file: hot and cold tiers within a capacity, and a quarantine.

    ``capacity_bytes`` bounds the stored bytes (see the module docs); when not given it is
    ``free_disk_share`` of the free space on the file's volume, measured once at open. Records older
    than ``hot_days`` move to the compressed cold tier on :meth:`archive`; younger ones never do.
    Nothing is evicted or archived on :meth:`add`: the agent calls :meth:`maintain` (archive, then
    evict) after each ingested batch. One instance per thread; other processes may open the same file.
    """

    def __init__(
        self,
        path: Path,
        *,
        capacity_bytes: int | None = None,
        free_disk_share: float = 0.10,
        hot_days: float = 7.0,
    ) -> None:
        if capacity_bytes is not None and (
            isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0
        ):
            raise ConfigError(
                f"Corpus capacity must be a positive number of bytes, got {capacity_bytes!r}: "
                "give e.g. 500_000_000, or leave it unset to use a share of the free disk."
            )
        if isinstance(free_disk_share, bool) or not (
            isinstance(free_disk_share, int | float) and 0 < free_disk_share <= 1
        ):
            raise ConfigError(
                f"free_disk_share must be in (0, 1], got {free_disk_share!r}: "
                "e.g. 0.1 lets the corpus take a tenth of the free disk."
            )
        if isinstance(hot_days, bool) or not (
            isinstance(hot_days, int | float) and math.isfinite(hot_days) and hot_days >= 0
        ):
            raise ConfigError(
                f"hot_days must be a finite number of days ≥ 0, got {hot_days!r}: "
                "records younger than this stay uncompressed (7 keeps a week hot)."
            )
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"The corpus store {self.path} is a folder: name a file in it, e.g. corpus.db.")
        self.hot_days = float(hot_days)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if capacity_bytes is None:
            capacity_bytes = max(1, int(free_disk_share * shutil.disk_usage(self.path.parent).free))
        self.capacity_bytes = capacity_bytes
        # Transactions are explicit. One store may serve several threads (the inbox watcher, the HTTP
        # endpoint) as long as callers serialise access, as the ingest Pipeline does with its lock.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise CorruptCorpusError(
                f"{self.path} is damaged or not a corpus store ({exc}): move it aside and start a new one."
            ) from exc
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect only on a new, empty file
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")  # the log shrinks after a checkpoint
        with self._write():
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                _create(db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise DataError(
                    f"{self.path} has corpus schema {version}; this fleetlora reads {SCHEMA_VERSION}: "
                    "upgrade fleetlora, or move the file aside to start a new corpus."
                )

    # ---- lifecycle

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CorpusStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so two writers queue instead of deadlocking."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # also when COMMIT itself failed (a full disk)
                self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for a read of several statements."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            self._db.execute("COMMIT")

    # ---- ingest

    def add(self, record: Record) -> bool:
        """Store a stamped record; durable once this returns. False (nothing stored) for a duplicate.

        A duplicate is a record whose sha256 is already stored, hot or cold. A record that cannot be
        stored (no sha256, no time zone, text that is not UTF-8, metadata that is not JSON) raises
        :class:`DataError` with the reason, for the caller to :meth:`quarantine` it.
        """
        return self.add_many([record]) == 1

    def add_many(self, records: Iterable[Record]) -> int:
        """Store records in one transaction; how many were new. All or nothing if any is malformed."""
        rows = [_row(record) for record in records]
        added = 0
        with self._write() as db:
            for row in rows:
                new = db.execute("INSERT INTO hashes VALUES (?, NULL) ON CONFLICT DO NOTHING", row[1:2])
                if not new.rowcount:
                    continue  # this content is stored already
                try:
                    db.execute(
                        "INSERT INTO hot (id, sha256, arrived_at, size, text, source, device, modality, "
                        "label, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                except sqlite3.IntegrityError:
                    raise DataError(
                        f"Another record with id {row[0]} is already stored: give each record its own id."
                    ) from None
                added += 1
        return added

    def has_hash(self, sha256: str) -> bool:
        """Whether a record with this content hash (hex) is stored, hot or cold."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            return False
        found = self._db.execute("SELECT 1 FROM hashes WHERE sha256 = ?", (bytes.fromhex(sha256),))
        return found.fetchone() is not None

    def delete(self, record_ids: Iterable[str]) -> int:
        """Delete stored records, hot or cold, by id, in one transaction; how many went.

        For a record that must not be trained on (a wrong label, text that should never have been
        taken in). A cold block holding one is rewritten without it. Every id must be stored: an
        unknown one raises :class:`UnknownIdError` and nothing is deleted. Its content may arrive again.
        """
        wanted = set(record_ids)
        with self._write() as db:
            found: set[str] = set()
            for record_id in wanted:
                row = db.execute("DELETE FROM hot WHERE id = ? RETURNING sha256", (record_id,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM hashes WHERE sha256 = ?", row)
                    found.add(record_id)
            for (block,) in db.execute("SELECT id FROM blocks ORDER BY id").fetchall():
                if found == wanted:
                    break
                lines = self._block_lines(db, block)
                records = [_decode(line, block) for line in lines]
                gone = [r for r in records if r.id in wanted]
                if not gone:
                    continue
                db.executemany(
                    "DELETE FROM hashes WHERE sha256 = ?", [(bytes.fromhex(r.sha256),) for r in gone]
                )
                found.update(r.id for r in gone)
                kept = [line for line, r in zip(lines, records, strict=True) if r.id not in wanted]
                if kept:
                    db.execute(
                        "UPDATE blocks SET data = ?, sha256 = ?, count = ?, raw_bytes = ?, oldest = ?, "
                        "newest = ?, created_at = ? WHERE id = ?",
                        (*_pack(kept), block),
                    )
                else:
                    db.execute("DELETE FROM blocks WHERE id = ?", (block,))
            if missing := sorted(wanted - found):
                raise UnknownIdError(
                    f"No stored record has id {missing[0]!r} in {self.path} (nothing was deleted): "
                    "`fleetlora device corpus list` shows the ids."
                )
        self._reclaim()
        return len(found)

    # ---- quarantine

    def quarantine(self, record: Record, reason: str) -> str:
        """Hold back a record that failed a check, as it came; returns the id to release or drop it by.

        Never raises for the record's contents: values JSON cannot hold are kept as their ``repr``.
        Quarantining an id again replaces the entry (the latest reason wins).
        """
        document = _lenient(record)
        if not isinstance(document.get("id"), str) or not document["id"]:
            document["id"] = uuid.uuid4().hex
        with self._write() as db:
            db.execute(
                "INSERT INTO quarantine (id, record, reason, at) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET record = excluded.record, reason = excluded.reason, at = excluded.at",
                (document["id"], json.dumps(document, default=repr), str(reason), _iso(datetime.now(UTC))),
            )
        return document["id"]

    def quarantined(self) -> list[Quarantined]:
        """Every quarantined record, in the order it was quarantined."""
        rows = self._db.execute("SELECT record, reason, at FROM quarantine ORDER BY seq").fetchall()
        return [Quarantined(_from_lenient(r), reason, datetime.fromisoformat(at)) for r, reason, at in rows]

    def release(self, record_id: str) -> Record:
        """Remove a record from quarantine and return it; checking it again is the caller's job."""
        with self._write() as db:
            row = db.execute("DELETE FROM quarantine WHERE id = ? RETURNING record", (record_id,)).fetchone()
            if row is None:
                raise self._unknown_quarantined(record_id)
        return _from_lenient(row[0])

    def drop(self, record_id: str) -> None:
        """Delete a quarantined record for good."""
        with self._write() as db:
            if db.execute("DELETE FROM quarantine WHERE id = ?", (record_id,)).rowcount == 0:
                raise self._unknown_quarantined(record_id)

    def _unknown_quarantined(self, record_id: str) -> UnknownIdError:
        return UnknownIdError(
            f"No quarantined record has id {record_id!r} in {self.path}: "
            "`fleetlora device quarantine list` shows the ids."
        )

    # ---- labels (hot records: labels are proposed and reviewed while a record is recent)

    def unlabelled(self, limit: int | None = None) -> list[Record]:
        """Hot text records without a label, oldest first."""
        query = f"SELECT {_HOT_COLUMNS} FROM hot WHERE label IS NULL AND modality = 'text' ORDER BY seq"
        with self._read() as db:
            rows = db.execute(query + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [_hot_record(row) for row in rows]

    def relabel(self, record_id: str, label: str | None, metadata: dict[str, Any]) -> None:
        """Set a hot record's label and metadata (its provenance, or a pending review)."""
        blob = json.dumps(metadata, sort_keys=True)
        with self._write() as db:
            changed = db.execute(
                "UPDATE hot SET label = ?, metadata = ? WHERE id = ?", (label, blob, record_id)
            ).rowcount
        if not changed:
            raise UnknownIdError(f"No recent record has id {record_id!r} in {self.path}.")

    # ---- the window

    def window(self, *, since: datetime | None = None, limit: int | None = None) -> list[Record]:
        """The stored records, hot and cold, newest first; arrived at or after ``since``, at most ``limit``.

        Raises :class:`CorruptCorpusError` (with ``block_id``) when a cold block it needs fails its
        checksum; :meth:`set_aside` that block and read again.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"limit must be a whole number ≥ 0 or None, got {limit!r}.")
        floor = "" if since is None else _iso(_aware(since, "since"))
        if limit == 0:
            return []
        found: list[tuple[tuple[str, int, int], Record]] = []  # (arrival, tier and block, seq or line)
        with self._read() as db:
            for row in db.execute(
                f"SELECT {_HOT_COLUMNS} FROM hot WHERE arrived_at >= ? ORDER BY arrived_at DESC, seq DESC "
                "LIMIT ?",
                (floor, -1 if limit is None else limit),
            ):
                found.append(((row[3], 1 << 62, row[0]), _hot_record(row)))
            blocks = db.execute(
                "SELECT id, newest FROM blocks WHERE newest >= ? ORDER BY newest DESC, id DESC", (floor,)
            ).fetchall()
            for block, newest in blocks:
                if limit is not None and len(found) >= limit:
                    found.sort(key=lambda item: item[0], reverse=True)
                    del found[limit:]
                    if newest < found[-1][0][0]:  # this block and all after it are older than the last kept
                        break
                for line_number, line in enumerate(self._block_lines(db, block)):
                    record = _decode(line, block)
                    arrived_at = _iso(record.arrived_at)
                    if arrived_at >= floor:
                        found.append(((arrived_at, block, line_number), record))
        found.sort(key=lambda item: item[0], reverse=True)
        return [record for _, record in found[:limit]]

    def archive(self, now: datetime | None = None) -> int:
        """Move hot records older than ``hot_days`` into compressed cold blocks; how many moved.

        Each block is its own transaction (its hot rows go in the same one), so a kill mid-archive
        leaves every record either hot or in a committed block.
        """
        now = datetime.now(UTC) if now is None else _aware(now, "now")
        cutoff = _iso(now - timedelta(days=self.hot_days))
        moved = 0
        while True:
            with self._write() as db:
                rows = db.execute(
                    f"SELECT {_HOT_COLUMNS}, size FROM hot WHERE arrived_at < ? "
                    "ORDER BY arrived_at, seq LIMIT ?",
                    (cutoff, BLOCK_RECORDS),
                ).fetchall()
                total, taken = 0, 0
                for row in rows:  # at least one record, then as many as fit in BLOCK_RAW_BYTES
                    total += row[-1]
                    if taken and total > BLOCK_RAW_BYTES:
                        break
                    taken += 1
                rows = rows[:taken]
                if not rows:
                    break
                block = db.execute(
                    "INSERT INTO blocks (data, sha256, count, raw_bytes, oldest, newest, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    _pack([_line(_hot_record(row)) for row in rows]),
                ).lastrowid
                db.executemany("UPDATE hashes SET block = ? WHERE sha256 = ?", [(block, r[2]) for r in rows])
                db.executemany("DELETE FROM hot WHERE seq = ?", [(r[0],) for r in rows])
            moved += len(rows)
        if moved:
            self._reclaim()
        return moved

    def evict(self) -> int:
        """Delete the oldest records while the stored bytes exceed the capacity; how many went.

        Set-aside blocks go first, then cold blocks, oldest block first (a block only partly in the
        way is rewritten without its oldest records), then hot records, oldest first. A damaged cold
        block in the way raises :class:`CorruptCorpusError`; set it aside and evict again.
        """
        evicted = 0
        with self._write() as db:
            excess = _stored_bytes(db) - self.capacity_bytes
            for block, size in db.execute("SELECT id, length(data) FROM set_aside ORDER BY id").fetchall():
                if excess <= 0:
                    break
                db.execute("DELETE FROM set_aside WHERE id = ?", (block,))
                excess -= size
            while excess > 0:
                row = db.execute("SELECT id, length(data) FROM blocks ORDER BY oldest, id LIMIT 1").fetchone()
                if row is None:
                    break
                block, size = row
                lines = self._block_lines(db, block)  # oldest first
                drop = len(lines) if size <= excess else max(1, math.ceil(len(lines) * excess / size))
                gone = [(bytes.fromhex(_decode(line, block).sha256),) for line in lines[:drop]]
                db.executemany("DELETE FROM hashes WHERE sha256 = ?", gone)
                evicted += drop
                if drop == len(lines):
                    db.execute("DELETE FROM blocks WHERE id = ?", (block,))
                    excess -= size
                    continue
                packed = _pack(lines[drop:])
                db.execute(
                    "UPDATE blocks SET data = ?, sha256 = ?, count = ?, raw_bytes = ?, oldest = ?, "
                    "newest = ?, created_at = ? WHERE id = ?",
                    (*packed, block),
                )
                excess -= size - len(packed[0])
            if excess > 0:
                doomed, freed = [], 0
                oldest_first = db.execute("SELECT seq, sha256, size FROM hot ORDER BY arrived_at, seq")
                for seq, sha256, size in oldest_first:
                    if freed >= excess:
                        break
                    doomed.append((seq, sha256))
                    freed += size
                oldest_first.close()  # an unfinished statement would keep the table locked
                db.executemany("DELETE FROM hot WHERE seq = ?", [(seq,) for seq, _ in doomed])
                db.executemany("DELETE FROM hashes WHERE sha256 = ?", [(sha256,) for _, sha256 in doomed])
                evicted += len(doomed)
        if evicted:
            self._reclaim()
        return evicted

    def maintain(self, now: datetime | None = None) -> tuple[int, int]:
        """:meth:`archive`, then :meth:`evict`: (records moved cold, records evicted)."""
        return self.archive(now), self.evict()

    # ---- integrity

    def verify(self) -> list[int]:
        """Read every cold block; the ids of those that fail their checksum or do not decode."""
        damaged = []
        with self._read() as db:
            for (block,) in db.execute("SELECT id FROM blocks ORDER BY id").fetchall():
                try:
                    for line in self._block_lines(db, block):
                        _decode(line, block)
                except CorruptCorpusError:
                    damaged.append(block)
        return damaged

    def set_aside(self, block_id: int, reason: str = "checksum mismatch") -> int:
        """Take a damaged cold block out of the window (kept in ``set_aside``); how many records it held.

        Its records stop counting as stored, so the same texts are accepted again if they arrive again.
        """
        with self._write() as db:
            moved = db.execute(
                "INSERT INTO set_aside SELECT *, ?, ? FROM blocks WHERE id = ?",
                (reason, _iso(datetime.now(UTC)), block_id),
            ).rowcount
            if not moved:
                raise UnknownIdError(f"No cold block has id {block_id!r} in {self.path}.")
            lost = db.execute("DELETE FROM hashes WHERE block = ?", (block_id,)).rowcount  # a full scan: rare
            db.execute("DELETE FROM blocks WHERE id = ?", (block_id,))
        return lost

    def stats(self) -> StoreStats:
        """Counts and payload bytes of the hot and cold tiers, the quarantine and set-aside blocks."""
        with self._read() as db:
            hot, hot_bytes = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM hot").fetchone()
            blocks, cold, raw, compressed = db.execute(
                "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(raw_bytes), 0), "
                "coalesce(sum(length(data)), 0) FROM blocks"
            ).fetchone()
            aside, aside_bytes = db.execute(
                "SELECT count(*), coalesce(sum(length(data)), 0) FROM set_aside"
            ).fetchone()
            quarantined = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        return StoreStats(
            hot_records=hot,
            cold_records=cold,
            cold_blocks=blocks,
            quarantined=quarantined,
            set_aside_blocks=aside,
            hot_bytes=hot_bytes,
            cold_raw_bytes=raw,
            cold_compressed_bytes=compressed,
            set_aside_bytes=aside_bytes,
            capacity_bytes=self.capacity_bytes,
        )

    # ---- internals

    def _block_lines(self, db: sqlite3.Connection, block: int) -> list[bytes]:
        """A cold block's JSON lines, after checking its sha256 and inflating no more than its size."""
        data, sha256, count, raw_bytes = db.execute(
            "SELECT data, sha256, count, raw_bytes FROM blocks WHERE id = ?", (block,)
        ).fetchone()

        def corrupt(why: str) -> CorruptCorpusError:
            return CorruptCorpusError(
                f"Cold block {block} of {self.path} is damaged ({why}): set it aside "
                "(CorpusStore.set_aside) to read the rest.",
                block,
            )

        if hashlib.sha256(data).hexdigest() != sha256:
            raise corrupt("its bytes do not match their sha256")
        try:
            raw = decompress(data, max_bytes=raw_bytes)
        except DecompressionError as exc:
            raise corrupt(str(exc)) from None
        if len(raw) != raw_bytes:
            raise corrupt(f"it inflates to {len(raw)} bytes, not {raw_bytes}")
        lines = raw.split(b"\n")  # JSON escapes newlines inside strings
        if lines.pop() != b"" or len(lines) != count:
            raise corrupt(f"{len(lines)} records, not {count}")
        return lines

    def _reclaim(self) -> None:
        """Give pages freed by a move or an eviction back to the file system, and empty the log."""
        # executescript steps the pragma to its end; execute would free a single page.
        self._db.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")


def _create(db: sqlite3.Connection) -> None:
    """The schema, inside the caller's transaction (``executescript`` would commit first)."""
    statement = ""
    for line in _SCHEMA.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""


def _stored_bytes(db: sqlite3.Connection) -> int:
    return db.execute(
        "SELECT (SELECT coalesce(sum(size), 0) FROM hot) "
        "+ (SELECT coalesce(sum(length(data)), 0) FROM blocks) "
        "+ (SELECT coalesce(sum(length(data)), 0) FROM set_aside)"
    ).fetchone()[0]


def _pack(lines: list[bytes]) -> tuple[bytes, str, int, int, str, str, str]:
    """A cold block's column values for JSON lines, oldest first: data, sha256, count, sizes, times."""
    raw = b"\n".join(lines) + b"\n"
    data = compress(raw, level=COLD_ZSTD_LEVEL)
    oldest, newest = (json.loads(line)["arrived_at"] for line in (lines[0], lines[-1]))
    return (
        data,
        hashlib.sha256(data).hexdigest(),
        len(lines),
        len(raw),
        oldest,
        newest,
        _iso(datetime.now(UTC)),
    )


def _iso(moment: datetime) -> str:
    """Fixed-width ISO 8601 in UTC, so that text order is time order."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _aware(moment: Any, name: str) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError(
            f"{name} must be a datetime with a time zone (e.g. datetime.now(UTC)), got {moment!r}."
        )
    return moment


def _line(record: Record) -> bytes:
    """A record as one self-contained JSON line: the unit of a cold block, and of a record's size."""
    fields = {name: getattr(record, name) for name in _FIELDS}
    fields["arrived_at"] = _iso(record.arrived_at)
    return json.dumps(fields, ensure_ascii=False, allow_nan=False).encode()


def _row(record: Record) -> tuple[Any, ...]:
    """A record's ``hot`` columns; :class:`DataError` saying why it cannot be stored."""

    def refuse(why: str) -> DataError:
        return DataError(f"Record {getattr(record, 'id', None)!r} cannot be stored: {why}.")

    if not isinstance(record, Record):
        raise refuse(f"it is a {type(record).__name__}, not a Record")
    for name in ("id", "text", "source", "device"):
        if not isinstance(getattr(record, name), str):
            raise refuse(f"its {name} is a {type(getattr(record, name)).__name__}, not text")
    if not record.id:
        raise refuse("it has no id")
    if not isinstance(record.sha256, str) or not _SHA256.fullmatch(record.sha256):
        raise refuse("it has no sha256 of its content in lowercase hex (stamp it with records.stamped)")
    if record.modality not in _MODALITIES:
        raise refuse(f"its modality {record.modality!r} is not one of {sorted(_MODALITIES)}")
    if record.label is not None and not isinstance(record.label, str):
        raise refuse("its label is not text")
    if not isinstance(record.metadata, dict):
        raise refuse("its metadata is not a mapping")
    if not isinstance(record.arrived_at, datetime) or record.arrived_at.utcoffset() is None:
        raise refuse("its arrival time has no time zone")
    try:
        size = len(_line(record))
        metadata = json.dumps(record.metadata, ensure_ascii=False, allow_nan=False)
    except UnicodeEncodeError as exc:
        raise refuse(f"it holds text that is not valid Unicode ({exc.reason})") from None
    except (TypeError, ValueError) as exc:
        raise refuse(f"its metadata is not JSON ({exc})") from None
    except RecursionError:
        raise refuse("its metadata nests too deep") from None
    return (
        record.id,
        bytes.fromhex(record.sha256),
        _iso(record.arrived_at),
        size,
        record.text,
        record.source,
        record.device,
        record.modality,
        record.label,
        metadata,
    )


def _hot_record(row: tuple[Any, ...]) -> Record:
    """The record of a ``hot`` row selected as ``_HOT_COLUMNS``."""
    _, record_id, sha256, arrived_at, text, source, device, modality, label, metadata = row[:10]
    return Record(
        text=text,
        source=source,
        device=device,
        modality=modality,
        label=label,
        metadata=json.loads(metadata),
        id=record_id,
        arrived_at=datetime.fromisoformat(arrived_at),
        sha256=sha256.hex(),
    )


def _decode(line: bytes, block: int) -> Record:
    try:
        fields = json.loads(line)
        fields["arrived_at"] = datetime.fromisoformat(fields["arrived_at"])
        return Record(**fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptCorpusError(f"A record of cold block {block} does not decode ({exc}).", block) from None


def _lenient(record: Any) -> dict[str, Any]:
    """A record's fields as JSON values, whatever they hold: what JSON cannot hold becomes its repr."""
    document: dict[str, Any] = {}
    for field in dataclasses.fields(Record):
        value = getattr(record, field.name, None)
        if isinstance(value, datetime):
            value = value.isoformat()
        try:
            json.dumps(value, default=repr)  # ASCII output escapes even unpaired surrogates
        except (TypeError, ValueError, RecursionError):
            value = short_repr(value)  # depth- and length-limited: a hostile value cannot blow it up
        document[field.name] = value
    return document


def _from_lenient(text: str) -> Record:
    document = json.loads(text)
    fields = {f.name: document[f.name] for f in dataclasses.fields(Record) if f.name in document}
    if isinstance(fields.get("arrived_at"), str):
        with contextlib.suppress(ValueError):  # else kept as it came
            fields["arrived_at"] = datetime.fromisoformat(fields["arrived_at"])
    return Record(**fields)
