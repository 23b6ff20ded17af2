"""What the coordinator's defences at rest cost: the audit log, and encryption of blobs (issue 14).

Each against a baseline timed in the same run on the same database, on a SQLite file (what a simulation
uses) and, when it answers, the PostgreSQL at ``--postgres``:

- **audit**: ``append_per_second`` is ``AuditStore.record`` (one transaction each: lock the head, hash,
  insert); the baseline inserts the same rows into a plain table of the same columns, one transaction
  each, without the chain or the lock; ``append_over_plain_insert`` is the time ratio.
  ``verify_per_second``: entries a second that ``verify`` checks (read every row, recompute every
  hash, follow the chain, check the signed checkpoints);
- **encryption at rest**: storing a version (``VersionStore.add``, a MiniLM r = 8 LoRA adapter with its
  head and a FedAvgM state of the same size) with AES-256-GCM sealing against the same without a key;
  ``sealed_over_clear`` is the time ratio, and reading the adapter back likewise.

Run from the repository root (``--smoke``: 200 entries and 5 versions on SQLite only, which ``make
test`` runs)::

    .venv/bin/python benchmarks/security_costs.py [--entries 5000] [--versions 50] [--smoke]

``--quick`` (what ``make bench`` runs): 1,000 entries and 10 versions, written to
benchmarks/results/quick/security_costs.json; a smoke run writes nothing unless ``--json`` is given.

The JSON result (also written to ``--json``) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from results_io import default_path, machine
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from fleetlora.common.delta import State
from fleetlora.common.model import build_model
from fleetlora.coordinator.at_rest import AtRestKey, BlobCipher
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.keys import init_keys, load_signing_key
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import NewVersion, ServerOptimizerState, Storage, VersionStore
from fleetlora.coordinator.storage.audit import CHECKPOINTS_FILE, read_checkpoints, verify

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DETAILS = {"lineage": "0" * 32, "round": 7, "parent": 6, "adapter_sha256": "a" * 64, "participants": 20}


def measure_audit(url: str, entries: int, keys: Path) -> dict[str, float]:
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


def adapter_of(model: str) -> State:
    """A real adapter layout: the model's LoRA r = 8 adapter and head for BANKING77's 77 intents."""
    labels = tuple(f"intent_{i}" for i in range(77))
    settings = CoordinatorSettings.from_run_config(
        {"model": model, "labels": ",".join(labels), "regime": "lora", "dp-epsilon": 0.0}
    )
    return {n: t.clone() for n, t in build_model(settings.spec).initial_adapter.items()}


def measure_at_rest(url: str, versions: int, adapter: State, key: AtRestKey) -> dict[str, float]:
    """Versions stored and read back with and without sealing, alternated so both see the same load."""
    times: dict[str, list[float]] = {
        "clear_write": [],
        "sealed_write": [],
        "clear_read": [],
        "sealed_read": [],
    }
    stores = {
        "clear": VersionStore(Database(url, BlobCipher()).initialize()),
        "sealed": VersionStore(Database(url, BlobCipher([key])).initialize()),
    }
    moments = {f"m/{n}": t for n, t in adapter.items()}
    for index in range(versions):
        for kind, store in stores.items():
            version = NewVersion(
                lineage=kind, round=index, parent_id=None, base_model_sha256="b" * 64, adapter=adapter,
                participants={}, metrics={}, optimizer=ServerOptimizerState("fedavgm", moments),
            )  # fmt: skip
            started = time.perf_counter()
            stored = store.add(version)
            times[f"{kind}_write"].append(time.perf_counter() - started)
            started = time.perf_counter()
            store.adapter(stored.id)
            times[f"{kind}_read"].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "versions": versions,
        "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
        "clear_write_ms": round(1000 * median["clear_write"], 2),
        "sealed_write_ms": round(1000 * median["sealed_write"], 2),
        "sealed_over_clear_write": round(median["sealed_write"] / median["clear_write"], 3),
        "clear_read_ms": round(1000 * median["clear_read"], 2),
        "sealed_read_ms": round(1000 * median["sealed_read"], 2),
        "sealed_over_clear_read": round(median["sealed_read"] / median["clear_read"], 3),
    }


def fresh_postgres(admin_url: str) -> tuple[str, Callable[[], None]] | None:
    """A new database on the server at ``admin_url`` and a function that drops it; None if unreachable."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"fleetlora_bench_{uuid.uuid4().hex[:10]}"
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
    parser.add_argument("--entries", type=int, default=5000, help="audit entries to append and verify")
    parser.add_argument("--versions", type=int, default=50, help="versions to store with and without sealing")
    parser.add_argument("--postgres", default=POSTGRES, help="admin URL of a PostgreSQL server ('' to skip)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="200 entries, 5 versions, tiny model, SQLite only")
    mode.add_argument("--quick", action="store_true", help="1,000 entries, 10 versions; results/quick/")
    parser.add_argument("--json", type=Path, help="JSON to write (default results/security_costs.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.entries, args.versions, args.postgres = 200, 5, ""
    elif args.quick:
        args.entries, args.versions = 1000, 10
    if not args.smoke:
        args.json = args.json or default_path("security_costs", args.quick)
    result: dict[str, Any] = {
        "command": shlex.join(
            ["python", "benchmarks/security_costs.py", *(argv if argv is not None else sys.argv[1:])]
        )
    }
    adapter = adapter_of("tiny" if args.smoke else "minilm")
    with tempfile.TemporaryDirectory(prefix="security-costs-") as scratch:
        key = AtRestKey.create(Path(scratch) / "at-rest.key")
        databases: list[tuple[str, str, Callable[[], None] | None]] = [
            ("sqlite", f"sqlite:///{scratch}/bench.db", None)
        ]
        if args.postgres and (postgres := fresh_postgres(args.postgres)):
            databases.append(("postgresql", *postgres))
        for name, url, drop in databases:
            try:
                result[name] = {
                    "audit": measure_audit(url, args.entries, Path(scratch) / f"keys-{name}"),
                    "at_rest": measure_at_rest(url, args.versions, adapter, key),
                }
            finally:
                if drop:
                    drop()
    result["machine"] = machine()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
