"""What the device corpus costs and how well it works (issue 6's measurements), in one run.

- **Ingest latency**: the real agent (``fleetlora device ingest --http 0``, a subprocess) takes BANKING77
  texts POSTed one record per request at a steady rate (open loop: a pacing thread hands each request
  to a pool at its scheduled time, so a slow answer delays no later arrival). A record's latency runs
  from its scheduled arrival to the 201 answer, which the agent sends only after the store committed it
  (fsynced, ``synchronous=FULL``). Reports p50/p95/p99/max and the achieved rate; target p99 < 300 ms.
- **Agent memory**: the agent's resident set (psutil when installed, else ``/proc/PID/status``) right
  after start, at its peak under load and at the end, absolute and as a share of ``MemAvailable``;
  target ≤ 15 %. The CLI imports the training stack (torch, peft) at start, so also the RSS of a process
  that imports only the corpus modules and rebuilds the pipeline (dedup index) over the same store.
- **Dedup quality**: :func:`injected_near_duplicates` (BANKING77 originals plus small edits) scored with
  :func:`score` at thresholds 0.85, 0.9 and 0.95: precision, recall, recall by kind of edit.
- **Cold-tier compression**: every BANKING77 train text, arrived long before ``hot_days``, archived into
  zstd blocks: ``stats().compression_saved`` (target ≥ 0.60), ``verify()`` finding no damaged block, and
  ``window()`` returning every text and label intact.

Run from the repository root::

    .venv/bin/python benchmarks/corpus.py [--rate 100] [--seconds 25] [--json benchmarks/results/corpus.json]

``--quick`` (what ``make bench`` runs): 8 s of paced load, 1,000 dedup originals and 250
near-duplicates, every BANKING77 text archived, written to benchmarks/results/quick/corpus.json.
``--smoke`` (what ``make test`` runs): the built-in corpus, 2 s at 20 records a second, 200 originals
and 50 near-duplicates, nothing written unless ``--json`` is given.

Progress goes to stderr; the JSON result is the last line of stdout (and written to ``--json``).
There is no baseline to time against: each figure has its target instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from results_io import emit, machine

from fleetlora.client.corpus.cli import CORPUS_FILE
from fleetlora.client.corpus.dedup import injected_near_duplicates, score
from fleetlora.client.corpus.records import Record, content_hash, stamped
from fleetlora.client.corpus.store import CorpusStore
from fleetlora.common.data import load_examples

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
RESULTS = REPO / "benchmarks" / "results" / "corpus.json"
QUICK_JSON = REPO / "benchmarks" / "results" / "quick" / "corpus.json"
QUICK = {"seconds": 8.0, "originals": 1000, "duplicates": 250}
SMOKE = {"rate": 20.0, "seconds": 2.0, "warmup": 5, "originals": 200, "duplicates": 50}
THRESHOLDS = (0.85, 0.9, 0.95)
AGENT = (sys.executable, "-m", "fleetlora", "device", "ingest")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

try:  # not a fleetlora dependency: used when the environment has it
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None


def progress(text: str) -> None:
    print(f"[corpus] {text}", file=sys.stderr, flush=True)


# ---- machine facts -------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    facts = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        parts = value.split()
        facts[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return facts


def status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/{pid}/status has no {field}")
    return int(match.group(1)) * 1024


def rss(pid: int) -> int:
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    return status_bytes(pid, "VmRSS")


def filesystem_of(path: Path) -> str:
    """The type and device of the mount holding ``path``, from /proc/mounts."""
    best, found = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
            best, found = mount, f"{kind} ({device} on {mount})"
    return found


def listen_drops() -> int:
    """TcpExt ListenDrops (/proc/net/netstat): connections dropped at a full accept queue, machine-wide."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:" and "ListenDrops" in names:
            return int(values[names.index("ListenDrops")])
    return -1


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))]


def mb(value: float) -> float:
    return round(value / (1 << 20), 1)


# ---- (a) ingest latency and (b) agent memory -----------------------------------------------------


@dataclass
class Sent:
    scheduled: float
    started: float
    done: float
    status: int
    outcome: str
    record_id: str


def post_record(url: str, document: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(document).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def start_agent(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    agent = subprocess.Popen(
        [*AGENT, "--state-dir", str(state_dir), "--device-id", "bench-device", "--http", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=CHILD_ENV,
    )
    line = agent.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/records", line)
    if match is None:
        agent.kill()
        raise RuntimeError(f"the agent did not start: {line!r} {agent.stderr.read()[-2000:]}")
    return agent, match.group(0)


def measure_ingest(
    rows: list[tuple[str, str]], state_dir: Path, rate: float, seconds: float, warmup: int
) -> dict[str, Any]:
    started = time.perf_counter()
    agent, url = start_agent(state_dir)
    startup = time.perf_counter() - started
    progress(f"agent up in {startup:.1f} s at {url}; {warmup} warm-up records")
    try:
        for text, label in rows[:warmup]:
            post_record(url, {"text": text, "label": label})
        time.sleep(0.5)
        rss_start = rss(agent.pid)
        peak = [rss_start]
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.25):
                peak[0] = max(peak[0], rss(agent.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        total = int(rate * seconds)
        load = rows[warmup : warmup + total]
        sent: list[Sent] = []
        lock = threading.Lock()

        def send(scheduled: float, text: str, label: str) -> None:
            begun = time.perf_counter()
            status, answer = post_record(url, {"text": text, "label": label})
            finished = time.perf_counter()
            [outcome] = answer["outcomes"]
            with lock:
                sent.append(Sent(scheduled, begun, finished, status, outcome["status"], outcome["record_id"]))

        progress(f"{len(load)} records at {rate:g}/s for {seconds:g} s, one record per POST")
        drops_before = listen_drops()
        failures: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=32) as pool:
            origin = time.perf_counter() + 0.1
            futures = []
            for i, (text, label) in enumerate(load):
                scheduled = origin + i / rate
                pause = scheduled - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                futures.append(pool.submit(send, scheduled, text, label))
            for future in futures:
                if future.exception() is not None:
                    failures.append(future.exception())
        drops = listen_drops() - drops_before
        stop_sampling.set()
        sampler.join()
        rss_end = rss(agent.pid)
        hwm = status_bytes(agent.pid, "VmHWM")
        memory = meminfo()
    finally:
        agent.send_signal(signal.SIGINT)  # Ctrl-C: the agent stops serving, maintains its store, exits
        try:
            out, err = agent.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            out, err = agent.communicate()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]!r}")
    if agent.returncode != 0:
        raise RuntimeError(f"the agent exited {agent.returncode}: {err[-2000:]}")

    latencies = [(s.done - s.scheduled) * 1e3 for s in sent]
    service = [(s.done - s.started) * 1e3 for s in sent]
    span = max(s.done for s in sent) - min(s.scheduled for s in sent)
    outcomes: dict[str, int] = {}
    for s in sent:
        outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    with CorpusStore(state_dir / CORPUS_FILE) as store:
        kept = {r.id for r in store.window()}
    acknowledged = {s.record_id for s in sent if s.outcome == "stored"}
    result = {
        "records": len(sent),
        "target_rate_per_s": rate,
        "achieved_rate_per_s": round(len(sent) / span, 2),
        "seconds": round(span, 2),
        "answers_201": sum(s.status == 201 for s in sent),
        "outcomes": dict(sorted(outcomes.items())),
        "acknowledged_stored_all_in_window": acknowledged <= kept,
        "latency_ms": {
            "p50": round(statistics.median(latencies), 2),
            "p95": round(percentile(latencies, 0.95), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies), 2),
            "mean": round(statistics.fmean(latencies), 2),
        },
        "over_500_ms": sum(x > 500 for x in latencies),
        "listen_drops_during_load": drops,  # a dropped SYN is retried after 1 s
        "service_ms_p50": round(statistics.median(service), 2),  # from the request's start, not its arrival
        "target_p99_ms": 300,
        "agent": "fleetlora device ingest --http 0 (subprocess)",
        "agent_startup_seconds": round(startup, 2),
        "agent_exit_line": out.strip().splitlines()[-1] if out.strip() else "",
    }
    available, total_memory = memory["MemAvailable"], memory["MemTotal"]
    memory_result = {
        "rss_mb": mb(rss_end),
        "rss_after_start_mb": mb(rss_start),
        "rss_peak_sampled_mb": mb(peak[0]),
        "vm_hwm_mb": mb(hwm),
        "mem_available_mb": mb(available),
        "mem_total_mb": mb(total_memory),
        "rss_share_of_available": round(rss_end / available, 4),
        "peak_share_of_available": round(hwm / available, 4),
        "rss_share_of_total": round(rss_end / total_memory, 4),
        "target_share": 0.15,
        "measured_with": "psutil" if psutil is not None else "/proc/PID/status VmRSS",
    }
    corpus_only, torch = corpus_only_rss(state_dir)
    memory_result["rss_corpus_only_mb"] = mb(corpus_only)
    memory_result["corpus_only_imports_torch"] = torch  # through fleetlora.common.delta
    memory_result["target_breaks_below_available_mb"] = mb(hwm / 0.15)
    return {"ingest": result, "memory": memory_result}


_CORPUS_ONLY = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path

    from fleetlora.client.corpus.cli import open_store
    from fleetlora.client.corpus.ingest import http_server
    from fleetlora.client.corpus.pipeline import Pipeline

    store = open_store(Path(sys.argv[1]))
    pipeline = Pipeline(store)  # rebuilds the dedup index from the store
    server = http_server(pipeline, port=0, device="bench-device")
    status = Path("/proc/self/status").read_text()
    rss = re.search(r"^VmRSS:\\s+(\\d+) kB", status, re.MULTILINE).group(1)
    print(len(pipeline.dedup), rss, "torch" in sys.modules)
    """
)


def corpus_only_rss(state_dir: Path) -> tuple[int, bool]:
    """RSS of a process that imports only the corpus modules and rebuilds the pipeline over the store."""
    done = subprocess.run(
        [sys.executable, "-c", _CORPUS_ONLY, str(state_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=CHILD_ENV,
        timeout=120,
        check=True,
    )
    indexed, kilobytes, torch = done.stdout.split()
    progress(f"corpus-only process: {indexed} records indexed, RSS {int(kilobytes) / 1024:.0f} MiB")
    return int(kilobytes) * 1024, torch == "True"


# ---- (c) dedup quality ---------------------------------------------------------------------------


def measure_dedup(texts: list[str], originals: int, duplicates: int) -> dict[str, Any]:
    progress(f"dedup: {originals} originals + {duplicates} injected near-duplicates")
    started = time.perf_counter()
    injected = injected_near_duplicates(texts, originals=originals, duplicates=duplicates, seed=0)
    by_threshold = {}
    for threshold in THRESHOLDS:
        result = score(injected, threshold)
        by_threshold[str(threshold)] = {
            "precision": round(result.precision, 4),
            "recall": round(result.recall, 4),
            "true_positives": result.true_positives,
            "false_positives": result.false_positives,
            "false_negatives": result.false_negatives,
            "recall_by_kind": {k: round(v, 4) for k, v in result.recall_by_kind.items()},
        }
        progress(f"  {threshold}: precision {result.precision:.3f}, recall {result.recall:.3f}")
    return {
        "originals": originals,
        "duplicates": duplicates,
        "seed": 0,
        "by_threshold": by_threshold,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---- (d) cold-tier compression -------------------------------------------------------------------


def measure_compression(rows: list[tuple[str, str]], workdir: Path) -> dict[str, Any]:
    now = datetime.now(UTC)
    old = now - timedelta(days=30)
    records, seen = [], set()
    for i, (text, label) in enumerate(rows):
        arrived_at = old + timedelta(microseconds=i)  # oldest first, all older than hot_days
        record = stamped(
            Record(text=text, source="benchmark", device="bench-device", label=label, arrived_at=arrived_at)
        )
        if record.sha256 not in seen:  # the store keeps the first of identical texts
            seen.add(record.sha256)
            records.append(record)
    path = workdir / "cold.sqlite"
    with CorpusStore(path, capacity_bytes=1 << 40, hot_days=7) as store:
        added = store.add_many(records)
        started = time.perf_counter()
        moved = store.archive(now)
        archive_seconds = time.perf_counter() - started
        stats = store.stats()
        damaged = store.verify()
        window = store.window()
    intact = {(r.text, r.label) for r in window} == {(r.text, r.label) for r in records}
    progress(
        f"compression: {moved} records in {stats.cold_blocks} blocks, "
        f"{stats.cold_raw_bytes} -> {stats.cold_compressed_bytes} bytes, saved {stats.compression_saved:.3f}"
    )
    return {
        "texts": len(rows),
        "distinct_texts": len(records),
        "added": added,
        "archived": moved,
        "cold_blocks": stats.cold_blocks,
        "hot_records_left": stats.hot_records,
        "cold_raw_bytes": stats.cold_raw_bytes,
        "cold_compressed_bytes": stats.cold_compressed_bytes,
        "compression_saved": round(stats.compression_saved, 4),
        "target_saved": 0.60,
        "archive_seconds": round(archive_seconds, 2),
        "verify_damaged_blocks": damaged,
        "window_records": len(window),
        "window_intact": intact and len(window) == len(records),
        "content_hashes_intact": all(r.sha256 == content_hash(r.text) for r in window),
        "file_bytes": path.stat().st_size,
    }


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="BANKING77 train.csv (text,category)")
    parser.add_argument("--rate", type=float, default=100.0, help="records per second (default 100)")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of the paced load (default 25)")
    parser.add_argument("--warmup", type=int, default=50, help="records sent before timing (default 50)")
    parser.add_argument("--originals", type=int, default=2000, help="dedup originals (default 2000)")
    parser.add_argument("--duplicates", type=int, default=500, help="injected near-duplicates (default 500)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the stores go (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help=f"result file (default {RESULTS})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"{QUICK}; results/quick/corpus.json")
    mode.add_argument("--smoke", action="store_true", help=f"built-in corpus, {SMOKE}; nothing written")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else QUICK if args.quick else {}).items():
        setattr(args, name, value)
    if not args.smoke:
        args.json = args.json or (QUICK_JSON if args.quick else RESULTS)
    if args.smoke:
        rows = [(e.text, str(e.label)) for e in load_examples("builtin")]
        args.data = Path("builtin")
    elif not args.data.is_file():
        parser.error(f"{args.data} not found: the benchmark needs BANKING77's train.csv (text,category)")
    else:
        with args.data.open(newline="") as handle:
            rows = [(row["text"], row["category"]) for row in csv.DictReader(handle)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    needed = args.warmup + int(args.rate * args.seconds)
    if needed > len(shuffled):
        parser.error(f"{needed} records needed for the paced load; {args.data} has {len(shuffled)}")

    with tempfile.TemporaryDirectory(prefix="fleetlora-corpus-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        load = measure_ingest(shuffled, workdir / "state", args.rate, args.seconds, args.warmup)
        latency = load["ingest"]["latency_ms"]
        progress(
            f"latency p50 {latency['p50']} ms, p99 {latency['p99']} ms at "
            f"{load['ingest']['achieved_rate_per_s']}/s; agent RSS {load['memory']['rss_mb']} MiB "
            f"({load['memory']['rss_share_of_available']:.1%} of available)"
        )
        dedup = measure_dedup([text for text, _ in rows], args.originals, args.duplicates)
        compression = measure_compression(rows, workdir)
        store_fs = filesystem_of(workdir)

    result = {
        "benchmark": "corpus",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "ingest_p50_ms": latency["p50"],
        "ingest_p99_ms": latency["p99"],
        "ingest_rate_per_s": load["ingest"]["achieved_rate_per_s"],
        "agent_rss_mb": load["memory"]["rss_mb"],
        "agent_rss_share": load["memory"]["rss_share_of_available"],
        "compression_saved": compression["compression_saved"],
        "dedup_precision_recall": {
            t: [v["precision"], v["recall"]] for t, v in dedup["by_threshold"].items()
        },
        "ingest": load["ingest"],
        "memory": load["memory"],
        "dedup": dedup,
        "compression": compression,
        "data": str(args.data),
        "store_filesystem": store_fs,
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
