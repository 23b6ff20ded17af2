"""What the audit log costs: appending an entry, and verifying the whole chain (issue 14).

Against a baseline timed in the same run on the same database: the same rows inserted into a plain
table of the same columns, one transaction each, without the hash chain or the head row's lock. Both on
a SQLite file (what a simulation uses) and, when it answers, the PostgreSQL at ``--postgres``.

- ``append_per_second``: ``AuditStore.record`` (one transaction each: lock the head, hash, insert),
  and the baseline's inserts a second; ``append_over_plain_insert`` is the time ratio;
- ``verify_per_second``: entries a second that ``verify`` checks (read every row, recompute every hash,
  follow the chain, check the signed checkpoints).

Run from the repository root (``--smoke``: 200 entries on SQLite only, which ``make test`` runs)::

    .venv/bin/python benchmarks/audit.py [--entries 5000] [--smoke]

The JSON result (also written to ``--json``) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from fleetlora.coordinator.keys import init_keys, load_signing_key
from fleetlora.coordinator.storage import Storage
from fleetlora.coordinator.storage.audit import CHECKPOINTS_FILE, read_checkpoints, verify

REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DETAILS = {"lineage": "0" * 32, "round": 7, "parent": 6, "adapter_sha256": "a" * 64, "participants": 20}


def measure(url: str, entries: int, keys: Path) -> dict[str, float]:
    init_keys(keys)  # each database its own checkpoint file
    storage = Storage.open(url)
    with storage.db.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE plain_log (seq INTEGER PRIMARY KEY, at VARCHAR(40), actor VARCHAR(200), "
                "action VARCHAR(64), subject VARCHAR(200), details TEXT, previous_hash VARCHAR(64), "
                "entry_hash VARCHAR(64))"
            )
        )
    details = json.dumps(DETAILS)
    started = time.perf_counter()
    for seq in range(1, entries + 1):
        with storage.db.engine.begin() as connection:
            connection.execute(
                text("INSERT INTO plain_log VALUES (:s, :at, 'a', 'version.created', :sub, :d, :p, :h)"),
                {
                    "s": seq,
                    "at": "2026-11-30T00:00:00",
                    "sub": f"v{seq}",
                    "d": details,
                    "p": "0" * 64,
                    "h": "1" * 64,
                },
            )
    plain = time.perf_counter() - started
    started = time.perf_counter()
    for seq in range(1, entries + 1):
        storage.audit.record("version.created", f"v{seq}", DETAILS, actor="benchmark")
    audited = time.perf_counter() - started
    storage.audit.checkpoint(load_signing_key(keys), keys)
    key = load_signing_key(keys).public_key()
    started = time.perf_counter()
    problems = verify(
        storage.audit.entries(), storage.audit.head(), read_checkpoints(keys / CHECKPOINTS_FILE), key
    )
    checked = time.perf_counter() - started
    if problems:
        raise RuntimeError(f"the benchmark's own log does not verify: {problems[:3]}")
    storage.close()
    return {
        "entries": entries,
        "append_per_second": round(entries / audited, 1),
        "plain_insert_per_second": round(entries / plain, 1),
        "append_over_plain_insert": round(audited / plain, 2),
        "verify_per_second": round((entries + 1) / checked, 1),
    }


def fresh_postgres(admin_url: str) -> tuple[str, Any] | None:
    """A new database on the server at ``admin_url`` and a function that drops it; None if unreachable."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"fleetlora_audit_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError:
        admin.dispose()
        return None

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), drop


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--postgres", default=POSTGRES, help="admin URL of a PostgreSQL server ('' to skip)")
    parser.add_argument("--smoke", action="store_true", help="200 entries, SQLite only")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "audit.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.entries, args.postgres = 200, ""
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "benchmarks/audit.py", *(argv if argv is not None else sys.argv[1:])]
        )
    }
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as scratch:
        result["sqlite"] = measure(
            f"sqlite:///{scratch}/audit.db", args.entries, Path(scratch) / "keys-sqlite"
        )
        postgres = fresh_postgres(args.postgres) if args.postgres else None
        if postgres is not None:
            url, drop = postgres
            try:
                result["postgresql"] = measure(url, args.entries, Path(scratch) / "keys-postgresql")
            finally:
                drop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
