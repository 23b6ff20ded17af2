"""Every benchmark in quick mode, one after another, and a table of their latest figures (``make bench``).

Discovers ``benchmarks/*.py`` (this script and modules without a ``main`` left out) and runs each as
``python benchmarks/NAME.py --quick`` in a fresh process from the repository root, one at a time, so no
run's load skews another's timings. A progress line per benchmark gives its wall time; a failing one
(non-zero exit, or no JSON on the last line of stdout) is reported with its stderr's tail and the rest
go on. The exit code is non-zero when any failed.

Each quick run writes ``benchmarks/results/quick/NAME.json``. From those files (the latest figures of
each benchmark, whether or not it ran this time) the script writes a Markdown table into README.md,
between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` at the end of its "## Measured" section:
benchmark, headline figure, the baseline measured in the same run, their ratio, the date and the
machine. :data:`HEADLINES` says which figure is each benchmark's headline, and why.

Run from the repository root::

    .venv/bin/python benchmarks/run_all.py [--only aggregation,corpus] [--no-readme] [--timeout 900]
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
QUICK = BENCHMARKS / "results" / "quick"
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SECTION = "## Measured"
TAIL = 3000  # characters of a failing benchmark's stderr shown


@dataclass(frozen=True)
class Headline:
    """Where a benchmark's quick JSON keeps its headline: ``/``-separated key paths (keys may hold dots
    and spaces). ``ratio`` None: figure ÷ baseline; ``baseline`` None: the benchmark has none."""

    figure: str
    unit: str
    reason: str
    baseline: str | None = None
    ratio: str | None = None


HEADLINES: dict[str, Headline] = {
    "aggregation": Headline(
        "bytes_per_s", "B/s", "docstring's target: aggregation ≥ 0.5 × AES-GCM on the same bytes",
        "aes_gcm_bytes_per_s", "throughput_ratio_vs_aes_gcm",
    ),
    "aggregation_attacks": Headline(
        "default_worst_final_with_one", "accuracy",
        "target: the default aggregator within 2 points of its clean run with one attacker",
        "default_clean_final", "default_worst_over_clean",
    ),
    "cli_latency": Headline(
        "slowest_listing_s", "s", "target: every listing under 2 s (the slowest of them; no baseline)"
    ),
    "convergence": Headline(
        "arms/fedavg/final_accuracy", "accuracy",
        "issue 7 asks what buys accuracy over its anchor, plain FedAvg at lr 1e-3",
        "arms/fedavg-anchor/final_accuracy", "final_accuracy_over_baseline/ratios/fedavg",
    ),
    "corpus": Headline("ingest_p99_ms", "ms", "target: ingest p99 < 300 ms (no baseline)"),
    "deployed_round": Headline(
        "steady_round_seconds/warm", "s", "what deployment costs against simulation, with the warm runner",
        "steady_round_seconds/simulation", "ratio_deployed_over_simulated/warm",
    ),
    "device_resources": Headline(
        "training_memory/minilm/with_checkpointing/training_mb", "MiB",
        "target: checkpointing cuts MiniLM's training memory by ≥ 0.3",
        "training_memory/minilm/without_checkpointing/training_mb",
    ),
    "dp_utility": Headline(
        "cost/dp_round_seconds", "s", "target: a device's DP round ≤ 1.15 × the same round without DP",
        "cost/plain_round_seconds", "cost/dp_over_plain",
    ),
    "failover": Headline(
        "superlink_back_seconds_worst", "s", "target: the SuperLink back within 15 s of a kill (no baseline)"
    ),
    "fleet_sizing": Headline(
        "superlink/devices_at_burst_rate", "devices",
        "sizing: idle devices (a pull every 3 s) one SuperLink answers at the peak pull rate measured with"
        " the run's largest fleet; the rate falls as the fleet grows (no baseline)",
    ),
    "forgetting": Headline(
        "arms/replay, no DP/retention", "retention",
        "target: the default configuration (replay) retains ≥ 0.95 without DP; none is the baseline",
        "arms/none, no DP/retention",
    ),
    "packages": Headline(
        "headline/apply_delta_seconds", "s",
        "the figure timed against a baseline: applying a delta package vs loading the plain adapter file",
        "headline/baseline_delta_seconds", "headline/delta_over_baseline",
    ),
    "privacy_cost": Headline(
        "dp_step/dp_seconds", "s", "target: a DP-SGD step ≤ 1.15 × the plain step on the same batch",
        "dp_step/plain_seconds", "dp_step/ratio",
    ),
    "round_overhead": Headline(
        "fleetlora_round_seconds", "s", "the round's cost over a bare Flower app doing the same training",
        "bare_flower_round_seconds", "round_ratio",
    ),
    "security_costs": Headline(
        "sqlite/audit/append_per_second", "/s",
        "the audit log is paid on every write; ratio is the time of an append over a plain insert",
        "sqlite/audit/plain_insert_per_second", "sqlite/audit/append_over_plain_insert",
    ),
}  # fmt: skip


def progress(text: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {text}", flush=True)


def discover() -> list[str]:
    """benchmarks/*.py with a top-level ``main``, this script left out (read, not imported)."""
    names = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            names.append(path.stem)
    return names


def run_one(name: str, timeout: float) -> tuple[bool, float, str]:
    """``python benchmarks/NAME.py --quick`` in a fresh process: ok, wall seconds, why it failed."""
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return False, time.perf_counter() - started, f"timed out after {timeout:g} s\n{stderr[-TAIL:]}"
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return False, wall, f"exit code {done.returncode}\n{done.stderr[-TAIL:]}"
    lines = done.stdout.strip().splitlines()
    try:
        json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return False, wall, f"no JSON on the last line of stdout\n{done.stderr[-TAIL:]}"
    return True, wall, ""


# ---- the README table -----------------------------------------------------------------------------


def lookup(result: Any, path: str | None) -> Any:
    """The value at a ``/``-separated key path, or None."""
    if path is None:
        return None
    for key in path.split("/"):
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def shown(value: Any, unit: str = "") -> str:
    """A figure for the table: 4 significant digits, large rates in SI steps."""
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        for scale, prefix in ((1e9, "G"), (1e6, "M")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {prefix}{unit}".strip()
    return f"{value:.4g} {unit}".strip()


def machine_of(result: dict[str, Any]) -> str:
    machine = result.get("machine")
    cores = machine.get("cores") if isinstance(machine, dict) else result.get("cpus")
    threads = machine.get("torch_threads") if isinstance(machine, dict) else None
    return f"{cores} cores" + (f", {threads} torch threads" if threads is not None else "")


def row(name: str) -> list[str]:
    """One benchmark's row, from its latest quick result."""
    headline = HEADLINES.get(name)
    path = QUICK / f"{name}.json"
    if not path.is_file():
        return [f"`{name}`", "no quick result yet", "—", "—", "—", "—"]
    result = json.loads(path.read_text())
    if headline is None:
        return [
            f"`{name}`",
            "no headline chosen (run_all.HEADLINES)",
            "—",
            "—",
            date_of(path),
            machine_of(result),
        ]
    figure, baseline = number(lookup(result, headline.figure)), number(lookup(result, headline.baseline))
    ratio = number(lookup(result, headline.ratio))
    if ratio is None and headline.ratio is None and figure is not None and baseline:
        ratio = figure / baseline
    return [
        f"`{name}`",
        f"{shown(figure, headline.unit)} ({headline.figure})",
        "none" if headline.baseline is None else f"{shown(baseline, headline.unit)} ({headline.baseline})",
        "—" if ratio is None else f"{ratio:.3g}×",
        date_of(path),
        machine_of(result),
    ]


def date_of(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d")


def table(names: list[str]) -> str:
    lines = [
        "Quick runs (`make bench`: `python benchmarks/run_all.py`, each benchmark's `--quick`; "
        "its JSON in `benchmarks/results/quick/`), written by the script. They are cut down to run "
        "in under 20 minutes in all: they show that every benchmark still runs and the order of "
        "its figure, while the rows above, from full runs, are the results. Two are too short to "
        "compare anything: `convergence` (2 rounds) and `forgetting` (the tiny model, near chance).",
        "",
        "| benchmark | headline figure | baseline (same run) | ratio | date | machine |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row(name)) + " |" for name in names]
    return "\n".join(lines)


def update_readme(text: str, block: str) -> str:
    """``text`` with ``block`` between the markers; they are added at the end of "## Measured" when
    missing. Nothing else changes."""
    fenced = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + fenced + rest.split(END, 1)[1]
    at = ("\n" + text).index(f"\n{SECTION}\n")  # where the heading starts in ``text``
    following = text.find("\n## ", at + len(SECTION))
    end = len(text) if following == -1 else following + 1
    section = text[at:end].rstrip("\n")
    return text[:at] + section + "\n\n" + fenced + "\n\n" + text[end:].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmarks to run (the table still lists all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one benchmark may take")
    parser.add_argument("--no-readme", action="store_true", help="print the table, leave README.md alone")
    args = parser.parse_args(argv)
    names = discover()
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := sorted(set(chosen) - set(names)):
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(names)}")
    started = time.perf_counter()
    failed: list[str] = []
    walls: dict[str, float] = {}
    for index, name in enumerate(chosen, 1):
        progress(f"[{index}/{len(chosen)}] {name} --quick ...")
        ok, wall, why = run_one(name, args.timeout)
        walls[name] = wall
        progress(f"[{index}/{len(chosen)}] {name}: {'ok' if ok else 'FAILED'} in {wall:.1f} s")
        if not ok:
            failed.append(name)
            print(f"--- {name} failed: {why.rstrip()}\n---", flush=True)
    total = time.perf_counter() - started
    progress("wall seconds: " + ", ".join(f"{n} {w:.1f}" for n, w in walls.items()))
    progress(f"total {total:.1f} s ({total / 60:.1f} min); {len(failed)} failed{': ' if failed else ''}"
             + ", ".join(failed))  # fmt: skip
    block = table(names)
    if args.no_readme:
        print(block)
    else:
        README.write_text(update_readme(README.read_text(encoding="utf-8"), block), encoding="utf-8")
        progress(f"wrote the table into {README.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
