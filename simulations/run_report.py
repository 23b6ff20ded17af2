"""``fleetlora report``: one page and a few plots that compare simulation runs, read from their results.json.

A researcher compares arms by looking, not by reading JSON: accuracy (or perplexity) per round, the ε each
run spent, the bytes it moved, its package ratio and how many devices answered. Every run's line is on
every plot, in the same colour, named by its folder. The page (``report.html``) embeds the plots as
base64 PNG, so it is one file to mail or attach; the PNGs are written beside it for slides and papers.

results.json is read as untrusted input: its size is capped before it is read, its shape is checked,
and every string from it is escaped on the page (a run's settings are whatever its user typed). A value
of the wrong type is a gap in a plot, never a crash; a file that is not a run's results is one error line.
Only the plotting functions import matplotlib, so ``fleetlora --help`` stays fast.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fleetlora.common.errors import DataError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import XAxis, YAxis
    from matplotlib.figure import Figure

RESULTS = "results.json"
PAGE = "report.html"
MAX_RESULTS_BYTES = 64 * 2**20  # a results.json of thousands of rounds is a few MiB; more is not one
DEFAULT_MANY_OUT = Path("report")  # several runs: no one run's folder is the right place
ACCURACY_KEYS = ("central_accuracy", "federated_eval_accuracy")  # the held-out test set's first
PERPLEXITY_KEYS = ("central_perplexity", "federated_eval_perplexity")
LOCATION_KEYS = frozenset({"db", "keys", "device-state"})  # under each run's --out: always differ
_NOT_A_RUN = "give the folder a `fleetlora simulate --out` wrote"


# ---- reading results.json ------------------------------------------------------------------------


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


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


# ---- plots ---------------------------------------------------------------------------------------


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


# ---- the page ------------------------------------------------------------------------------------


def _bytes_text(value: float | None) -> str:
    if value is None:
        return "—"
    scale, unit = byte_unit(value)
    return f"{value / scale:.1f} {unit}" if unit != "B" else f"{value:.0f} B"


def _number_text(value: float | None, form: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, form)


def summary_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """The summary table: a header and one row per run, every cell already text."""
    kinds = [k for k in ("accuracy", "perplexity") if any(quality_kind(run) == k for run in runs)]
    headers = ["run", "devices", "rounds", *(f"final {k}" for k in kinds)]
    headers += ["largest ε", "bytes up", "bytes down", "mean package ratio", "rounds failed", "peak memory"]
    rows = []
    for run in runs:
        finals = []
        for kind in kinds:
            key = quality_key(run, kind) if quality_kind(run) == kind else None
            value = final_quality(run, key) if key else None
            finals.append(_number_text(value, ".1%" if kind == "accuracy" else ".2f"))
        ratios = [r.package_ratio for r in run.rounds if r.package_ratio is not None]
        ups = [r.upload_bytes for r in run.rounds if r.upload_bytes is not None]
        downs = [r.bytes_down for r in run.rounds if r.bytes_down is not None]
        rows.append(
            [
                run.name,
                "—" if run.devices is None else str(run.devices),
                str(len(run.rounds)),
                *finals,
                _number_text(run.largest_epsilon, ".2f") if run.largest_epsilon is not None else "no DP",
                _bytes_text(sum(ups) if ups else None),
                _bytes_text(sum(downs) if run.distributed else None),
                _number_text(sum(ratios) / len(ratios) if ratios else None, ".4f"),
                str(sum(r.failed for r in run.rounds)),
                "—" if run.peak_memory_mb is None else f"{run.peak_memory_mb:.0f} MiB",
            ]
        )
    return headers, rows


def _setting_text(value: Any) -> str:
    """A setting as its user wrote it: text as is, everything else as JSON (true, 0.5, null)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def config_differences(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """The settings (``devices`` and each run-config key) whose values differ between the runs.

    One run: all of them. Several: the paths every run keeps under its own folder (``db``, ``keys``,
    ``device-state``) are left out, since they always differ and say nothing about the arm.
    """
    settings = [{"devices": run.devices, **run.run_config} for run in runs]
    keys = sorted({k for s in settings for k in s})
    rows = []
    for key in keys:
        values = [_setting_text(s.get(key)) if key in s else "(not set)" for s in settings]
        if len(runs) == 1 or (key not in LOCATION_KEYS and len(set(values)) > 1):
            rows.append((key, values))
    return rows


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """An HTML table; every cell is escaped here, since names and values come from results.json."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _image(plot: Plot) -> str:
    """The plot embedded as base64, so the page is one file that shows anywhere."""
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    caption = html.escape(plot.caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
        f"<figcaption>{caption} ({html.escape(plot.path.name)})</figcaption></figure>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
"""


def render_page(runs: Sequence[Run], plots: Sequence[Plot]) -> str:
    """report.html: the runs, the summary table, the configuration differences, then the plots."""
    headers, rows = summary_rows(runs)
    differences = config_differences(runs)
    if differences:
        changed = _table(["setting", *(run.name for run in runs)], ([k, *v] for k, v in differences))
    else:
        changed = (
            "<p>identical: every setting is the same in every run (paths under each run's folder aside).</p>"
        )
    sources = "".join(
        f"<li>{html.escape(run.name)}: {html.escape(str(run.folder.resolve()))}</li>" for run in runs
    )
    title = "configuration" if len(runs) == 1 else "configuration differences"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>fleetlora report: {html.escape(', '.join(run.name for run in runs))}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>fleetlora report</h1>\n"
        f"<ul>{sources}</ul>\n<h2>summary</h2>\n{_table(headers, rows)}\n"
        f"<h2>{title}</h2>\n{changed}\n<h2>plots</h2>\n"
        + "\n".join(_image(plot) for plot in plots)
        + "\n</body>\n</html>\n"
    )


# ---- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """Where a report went: its page, and the plots beside it."""

    page: Path
    plots: list[Plot]


def named_uniquely(runs: list[Run]) -> list[Run]:
    """Runs whose folders share a name (``a/latest``, ``b/latest``) are named by their paths instead."""
    names = [run.name for run in runs]
    return [
        run if names.count(run.name) == 1 else dataclasses.replace(run, name=str(run.folder)) for run in runs
    ]


def default_out(folders: Sequence[Path]) -> Path:
    """One run: its own folder, beside its results.json. Several: ``report/`` in the working folder."""
    return results_path(folders[0]).parent if len(folders) == 1 else DEFAULT_MANY_OUT


def write_report(folders: Sequence[Path], out: Path | None = None) -> Written:
    """Read every run (all before writing anything), write the plots and report.html into ``out``."""
    runs = named_uniquely([load_run(folder) for folder in folders])
    out = default_out(folders) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out)
    page = out / PAGE
    page.write_text(render_page(runs, plots), encoding="utf-8")
    return Written(page, plots)


def announce(written: Written, say: Callable[[str], None]) -> None:
    """The one line a command prints after writing a report."""
    say(f"report: {written.page} ({len(written.plots)} plots beside it)")


def report(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders (each holds the results.json `fleetlora simulate` wrote).", metavar="RUN_DIR..."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for report.html and the plots.", show_default="the run's folder; report/ for several"
        ),
    ] = None,
) -> None:
    """Compare simulation runs: report.html with a summary table, the settings that differ, and plots."""
    from fleetlora.common.terminal import console, shown

    written = write_report(runs, out)
    terminal = console()
    announce(written, lambda line: terminal.print(shown(line)))
