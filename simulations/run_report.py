"""``fleetlora report``: one page and a few plots that compare simulation runs, read from their results.json.

A researcher compares arms by looking, not by reading JSON: accuracy (or perplexity) per round, the ε each
run spent, the bytes it moved, its package ratio and how many devices answered. Every run's line is on
every plot, in the same colour, named by its folder. The page (``report.html``) embeds the plots as
base64 PNG, so it is one file to mail or attach; the PNGs are written beside it for slides and papers.

The runs are read by :mod:`.run_results` (results.json is untrusted input there) and drawn by
:mod:`.run_plots`; this module writes the page, where every string from a results.json is escaped (a
run's settings are whatever its user typed), and is the command.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetlora.simulations.run_plots import Plot, write_plots
from fleetlora.simulations.run_results import (
    Run,
    byte_unit,
    final_quality,
    load_run,
    quality_key,
    quality_kind,
    results_path,
)

PAGE = "report.html"
DEFAULT_MANY_OUT = Path("report")  # several runs: no one run's folder is the right place
LOCATION_KEYS = frozenset({"db", "keys", "device-state"})  # under each run's --out: always differ


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
