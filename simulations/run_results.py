"""Simulation runs read back from their results.json, and the series a report draws from them.

results.json is read as untrusted input: its size is capped before it is read, its shape is checked, and
a value of the wrong type becomes a gap (None), never a crash; a file that is not a run's results is one
error line (:class:`~fleetlora.common.errors.DataError`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlora.common.errors import DataError

if TYPE_CHECKING:
    pass

RESULTS = "results.json"
MAX_RESULTS_BYTES = 64 * 2**20  # a results.json of thousands of rounds is a few MiB; more is not one
ACCURACY_KEYS = ("central_accuracy", "federated_eval_accuracy")  # the held-out test set's first
PERPLEXITY_KEYS = ("central_perplexity", "federated_eval_perplexity")
_NOT_A_RUN = "give the folder a `fleetlora simulate --out` wrote"


@dataclass(frozen=True)
class Round:
    """One entry of results.json's ``rounds``, with every value the plots need (None: not reported)."""

    number: int
    failed: bool  # ``version: null``: no new version came of it
    metrics: dict[str, float]
    participants: int | None
    dropped: int
    upload_bytes: float | None
    package_bytes: float | None
    package_ratio: float | None
    epsilon: float | None  # the largest per-device ε in the round's privacy map
    bytes_down: float | None  # estimated from ``updates``; None when the round distributed nothing


@dataclass(frozen=True)
class Run:
    """One simulation run as the report shows it."""

    name: str  # its folder's name: the legend and the table call it so
    folder: Path
    devices: int | None
    run_config: dict[str, Any]
    initial_round: int
    initial_metrics: dict[str, float]
    rounds: list[Round]
    largest_epsilon: float | None
    peak_memory_mb: float | None

    @property
    def distributed(self) -> bool:
        """Whether results.json says what its rounds sent down (``updates``), not just the package size."""
        return any(r.bytes_down is not None for r in self.rounds)


def results_path(given: Path) -> Path:
    """The results.json of a run folder; a path to the file itself is taken as it is."""
    return given if given.name == RESULTS and not given.is_dir() else given / RESULTS


def read_results(path: Path, limit: int = MAX_RESULTS_BYTES) -> dict[str, Any]:
    """The parsed file; a missing, oversized or unparseable file is a :class:`DataError` naming it."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: {_NOT_A_RUN}.")
    if path.stat().st_size > limit:
        raise DataError(f"{path} is larger than {limit // 2**20} MiB: not a simulation's results.json.")
    with path.open("rb") as file:
        raw = file.read(limit + 1)  # the file may have grown since stat
    if len(raw) > limit:
        raise DataError(f"{path} is larger than {limit // 2**20} MiB: not a simulation's results.json.")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not JSON ({exc.msg}, line {exc.lineno}): restore it or rerun the simulation."
        ) from None
    except (ValueError, RecursionError):
        raise DataError(f"{path} is not JSON text: restore it or rerun the simulation.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds no JSON object: {_NOT_A_RUN}.")
    return data


def load_run(given: Path) -> Run:
    """Read and check one run: ``given`` is its folder (or its results.json)."""
    path = results_path(given)
    return parse_run(path.parent.resolve().name or str(path.parent), path.parent, read_results(path), path)


def parse_run(name: str, folder: Path, data: Mapping[str, Any], path: Path) -> Run:
    """A :class:`Run` from parsed results.json; the keys every run writes must be there."""
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("run_config"), dict):
        raise DataError(f"{path} has no config.run_config: {_NOT_A_RUN}.")
    entries = data.get("rounds")
    if not isinstance(entries, list):
        raise DataError(f"{path} has no list of rounds: {_NOT_A_RUN}.")
    rounds = [parse_round(entry, i, path) for i, entry in enumerate(entries)]
    initial = _mapping(data.get("initial"))
    devices = config.get("devices")
    return Run(
        name=name,
        folder=folder,
        devices=devices if isinstance(devices, int) and not isinstance(devices, bool) else None,
        run_config=dict(config["run_config"]),
        initial_round=_integer(initial.get("round")) or 0,
        initial_metrics=_metrics(initial.get("metrics")),
        rounds=rounds,
        largest_epsilon=_largest_epsilon(data.get("devices"), rounds),
        peak_memory_mb=_number(_mapping(data.get("memory")).get("tree_peak_mb")),
    )


def _training_drops(dropped: Any) -> int:
    """Sampled devices whose update did not count; a participant's failed evaluation is not one of them."""
    if not isinstance(dropped, list):
        return 0
    reasons = [d.get("reason") if isinstance(d, dict) else None for d in dropped]
    return sum(not (isinstance(r, str) and r.startswith("evaluation:")) for r in reasons)


def parse_round(entry: Any, index: int, path: Path) -> Round:
    """One round's entry (written by ``summarize``); only its round number is required."""
    number = _integer(entry.get("round")) if isinstance(entry, dict) else None
    if number is None:
        raise DataError(f"{path}: rounds[{index}] has no round number: {_NOT_A_RUN}.")
    privacy = [_number(v) for v in _mapping(entry.get("privacy")).values()]
    spent = [e for e in privacy if e is not None]
    dropped = entry.get("dropped")
    return Round(
        number=number,
        failed=entry.get("version") is None,
        metrics=_metrics(entry.get("metrics")),
        participants=_integer(entry.get("participants")),
        dropped=_training_drops(dropped),
        upload_bytes=_number(entry.get("upload_bytes")),
        package_bytes=_number(entry.get("package_bytes")),
        package_ratio=_number(entry.get("package_ratio")),
        epsilon=max(spent) if spent else None,
        bytes_down=bytes_down(entry.get("updates")),
    )


def bytes_down(updates: Any) -> float | None:
    """Bytes the round sent to devices, estimated from its ``updates`` (``DistributionOutcome.as_dict``).

    ``updates`` counts devices by status and lists the packages built, by starting version, but not which
    device got which: the devices that applied the new version times the package they were sent (the
    mean when packages from several starting versions went out). Devices that refused or failed a package
    it still reached are not counted, so this is a lower bound.
    """
    if not isinstance(updates, dict):
        return None
    applied = _integer(_mapping(updates.get("devices")).get("applied")) or 0
    sizes = [_number(_mapping(p).get("bytes")) for p in _mapping(updates.get("packages")).values()]
    known = [s for s in sizes if s is not None]
    return applied * sum(known) / len(known) if known else 0.0


def _largest_epsilon(devices: Any, rounds: Sequence[Round]) -> float | None:
    """The largest ε any device spent: results.json's ``devices`` map, or the rounds' privacy maps."""
    spent = [_number(_mapping(d).get("epsilon")) for d in _mapping(devices).values()]
    spent += [r.epsilon for r in rounds]
    known = [e for e in spent if e is not None]
    return max(known) if known else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    """A JSON number as float; anything else (text, null, true) as None, so a plot shows a gap."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _metrics(value: Any) -> dict[str, float]:
    return {str(k): n for k, v in _mapping(value).items() if (n := _number(v)) is not None}


# ---- what the plots and the table show -----------------------------------------------------------


def quality_key(run: Run, kind: str) -> str | None:
    """The metric that scores ``run`` for ``kind`` (accuracy or perplexity), the test set's first."""
    keys = ACCURACY_KEYS if kind == "accuracy" else PERPLEXITY_KEYS
    reported = [*(r.metrics for r in run.rounds), run.initial_metrics]
    return next((k for k in keys if any(k in m for m in reported)), None)


def quality_kind(run: Run) -> str | None:
    """Perplexity for a causal LM (or a run reporting no accuracy), accuracy otherwise."""
    lm = run.run_config.get("task") == "causal-lm"
    order = ("perplexity", "accuracy") if lm else ("accuracy", "perplexity")
    return next((kind for kind in order if quality_key(run, kind)), None)


def quality_series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """``key`` per round, the starting version's at its round first; a failed round is NaN (a gap)."""
    xs, ys = [], []
    if key in run.initial_metrics:
        xs.append(run.initial_round)
        ys.append(run.initial_metrics[key])
    for r in run.rounds:
        xs.append(r.number)
        ys.append(r.metrics.get(key, math.nan))
    return xs, ys


def final_quality(run: Run, key: str) -> float | None:
    """The last value of ``key`` a round reported (the start's when no round did)."""
    values = [r.metrics[key] for r in run.rounds if key in r.metrics]
    return values[-1] if values else run.initial_metrics.get(key)


def cumulative_epsilon(run: Run) -> list[float]:
    """The largest ε spent by any device so far, per round (NaN before the first private round)."""
    most, series = math.nan, []
    for r in run.rounds:
        if r.epsilon is not None:
            most = r.epsilon if math.isnan(most) else max(most, r.epsilon)
        series.append(most)
    return series


def byte_unit(largest: float) -> tuple[float, str]:
    """A divisor and unit that keep ``largest`` between 1 and 1024 on an axis or in a table."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 1024**power:
            return float(1024**power), unit
    return 1.0, "B"
