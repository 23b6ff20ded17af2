"""The report's plots: one PNG per figure, every run's line on each, in the same colour throughout.

Only these functions import matplotlib (the Agg backend), so ``fleetlora --help`` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleetlora.simulations.run_results import (
    Run,
    byte_unit,
    cumulative_epsilon,
    quality_key,
    quality_kind,
    quality_series,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import XAxis, YAxis
    from matplotlib.figure import Figure


def _nan(value: float | None) -> float:
    """A value matplotlib leaves a gap for when there is none."""
    return math.nan if value is None else value


@dataclass(frozen=True)
class Plot:
    """A PNG the report wrote, and what its caption says it shows."""

    path: Path
    caption: str


def _colour(index: int) -> str:
    return f"C{index % 10}"  # a run keeps its colour on every plot


def _figure(title: str) -> tuple[Figure, Axes]:
    """A figure in the house style (scenario.py, benchmarks): 8×4.5 in, integer rounds on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.set_title(title)
    axes.set_xlabel("round")
    _integer_axis(axes.xaxis)
    axes.grid(alpha=0.3)
    return figure, axes


def _integer_axis(axis: XAxis | YAxis) -> None:
    """Ticks on whole numbers only: there is no round 1.5, nor half a device."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(figure: Figure, axes: Axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _mark_failed(axes: Axes, run: Run, colour: str) -> None:
    """An ✕ at the foot of the plot for each failed round, so a gap reads as a failure."""
    failed = [r.number for r in run.rounds if r.failed]
    if failed:
        foot = axes.get_xaxis_transform()  # x in rounds, y in axes fractions: right on any scale
        label = f"{run.name}: failed round"
        axes.plot(failed, [0.03] * len(failed), "x", color=colour, markersize=9, transform=foot, label=label)


def _absent(axes: Axes, colour: str, label: str) -> None:
    """A legend entry for a run with nothing to draw here: every plot names every run."""
    axes.plot([], [], color=colour, linestyle=":", label=label)


def plot_quality(runs: Sequence[Run], kind: str, path: Path) -> Path:
    """Accuracy or perplexity per round, one line per run; ✕ marks a failed round."""
    figure, axes = _figure(f"{kind} per round")
    for i, run in enumerate(runs):
        key = quality_key(run, kind) if quality_kind(run) == kind else None
        if key is None:
            _absent(axes, _colour(i), f"{run.name}: no {kind}")
            continue
        xs, ys = quality_series(run, key)
        axes.plot(xs, ys, marker="o", color=_colour(i), label=f"{run.name} ({key})")
        _mark_failed(axes, run, _colour(i))
    if kind == "accuracy":
        axes.set_ylabel("accuracy (share of test examples)")
        axes.set_ylim(0, 1)
    else:
        axes.set_ylabel("perplexity (lower is better)")
    return _save(figure, axes, path)


def plot_epsilon(runs: Sequence[Run], path: Path) -> Path:
    """The largest ε any device has spent, after each round (it never falls)."""
    figure, axes = _figure("privacy spent: largest device ε so far")
    for i, run in enumerate(runs):
        if run.largest_epsilon is None:
            _absent(axes, _colour(i), f"{run.name}: no DP")
            continue
        xs = [r.number for r in run.rounds]
        axes.plot(xs, cumulative_epsilon(run), marker="o", color=_colour(i), label=run.name)
        _mark_failed(axes, run, _colour(i))
    axes.set_ylabel("ε (per record, largest over devices)")
    axes.set_ylim(bottom=0)
    return _save(figure, axes, path)


def plot_bytes(runs: Sequence[Run], path: Path) -> Path:
    """Bytes up (the round's uploads) and down (packages × devices that applied them) per round.

    A run whose results hold no ``updates`` (distribution off) shows its package size instead, and says so.
    """
    largest = max(
        (v for run in runs for r in run.rounds for v in (r.upload_bytes, r.bytes_down, r.package_bytes) if v),
        default=1.0,
    )
    scale, unit = byte_unit(largest)
    figure, axes = _figure("bytes per round: up (solid), down (dashed)")
    for i, run in enumerate(runs):
        xs = [r.number for r in run.rounds]
        up = [_nan(r.upload_bytes) / scale for r in run.rounds]
        axes.plot(xs, up, marker="o", color=_colour(i), label=f"{run.name} up")
        down = [_nan(r.bytes_down if run.distributed else r.package_bytes) / scale for r in run.rounds]
        what = "down" if run.distributed else "package size (no distribution)"
        axes.plot(xs, down, marker="s", linestyle="--", color=_colour(i), label=f"{run.name} {what}")
        _mark_failed(axes, run, _colour(i))
    axes.set_ylabel(f"{unit} per round")
    axes.set_ylim(bottom=0)
    return _save(figure, axes, path)


def plot_package_ratio(runs: Sequence[Run], path: Path) -> Path:
    """Each round's update package as a share of the base model's bytes (the cap is 0.10 by default)."""
    figure, axes = _figure("update package size ÷ base model size")
    for i, run in enumerate(runs):
        if all(r.package_ratio is None for r in run.rounds):
            _absent(axes, _colour(i), f"{run.name}: no packages")
            continue
        xs = [r.number for r in run.rounds]
        axes.plot(
            xs, [_nan(r.package_ratio) for r in run.rounds], marker="o", color=_colour(i), label=run.name
        )
        _mark_failed(axes, run, _colour(i))
    axes.set_ylabel("package ratio (share of base model bytes)")
    axes.set_ylim(bottom=0)
    return _save(figure, axes, path)


def plot_devices(runs: Sequence[Run], path: Path) -> Path:
    """Devices whose update counted (solid) against devices dropped (dashed), per round."""
    figure, axes = _figure("devices per round: answered (solid), dropped (dashed)")
    for i, run in enumerate(runs):
        xs = [r.number for r in run.rounds]
        answered = [_nan(r.participants) for r in run.rounds]
        axes.plot(xs, answered, marker="o", color=_colour(i), label=f"{run.name} answered")
        dropped = [r.dropped for r in run.rounds]
        axes.plot(xs, dropped, marker="s", linestyle="--", color=_colour(i), label=f"{run.name} dropped")
        _mark_failed(axes, run, _colour(i))
    axes.set_ylabel("devices")
    axes.set_ylim(bottom=0)
    _integer_axis(axes.yaxis)
    return _save(figure, axes, path)


def write_plots(runs: Sequence[Run], out: Path) -> list[Plot]:
    """Every plot the runs have data for, as PNGs in ``out``; ε only when some run used DP."""
    plots = []
    kinds = [k for k in ("accuracy", "perplexity") if any(quality_kind(run) == k for run in runs)]
    for kind in kinds:
        caption = (
            f"{kind.capitalize()} per round, round 0 being the starting version; ✕ marks a failed round."
        )
        plots.append(Plot(plot_quality(runs, kind, out / f"{kind}.png"), caption))
    if any(run.largest_epsilon is not None for run in runs):
        caption = (
            "The largest ε any device has spent so far (DP-SGD's per-record guarantee), after each round."
        )
        plots.append(Plot(plot_epsilon(runs, out / "epsilon.png"), caption))
    caption = (
        "Bytes up: the round's uploads. Bytes down: devices that applied the new version × the package "
        "they were sent (a lower bound: refusals are not counted)."
    )
    plots.append(Plot(plot_bytes(runs, out / "bytes.png"), caption))
    if any(r.package_ratio is not None for run in runs for r in run.rounds):
        caption = "The round's update package as a share of the base model's bytes."
        plots.append(Plot(plot_package_ratio(runs, out / "package_ratio.png"), caption))
    caption = (
        "Devices whose updates were aggregated, and sampled devices whose update did not count, per round."
    )
    plots.append(Plot(plot_devices(runs, out / "devices.png"), caption))
    return plots
