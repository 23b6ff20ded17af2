"""What a person watching a simulation sees: a progress bar, a line per round, a final table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fleetlora.common.terminal import Cell, Column, duration, fitted_table
from fleetlora.common.terminal import shown as plain
from fleetlora.coordinator.rounds import FederationStart, RoundOutcome

# Metric columns, in reading order, with their headers; absent metrics are left out.
_METRIC_COLUMNS = {
    "train_loss": "train loss",
    "federated_eval_loss": "fed. loss",
    "federated_eval_accuracy": "fed. acc",
    "federated_eval_personal_accuracy": "personal acc",
    "federated_eval_perplexity": "fed. ppl",
    "central_loss": "test loss",
    "central_accuracy": "test acc",
    "central_perplexity": "test ppl",
}
# Which the results table leaves out first when the terminal is narrow (0: never): losses before
# accuracies, the federated view before the held-out test set's.
_METRIC_DROP = {
    "train_loss": 5,
    "federated_eval_loss": 6,
    "federated_eval_accuracy": 3,
    "federated_eval_personal_accuracy": 4,
    "federated_eval_perplexity": 3,
    "central_loss": 5,
    "central_accuracy": 0,
    "central_perplexity": 0,
}


class ProgressReporter:
    """A rich progress bar over rounds, with one summary line printed as each round ends."""

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("rounds", total=rounds)
        self.largest_epsilon = 0.0  # over every device and round so far

    def started(self, start: FederationStart) -> None:
        how = "resuming from" if start.resumed else "starting at"
        self.console.print(
            f"{how} [bold]{start.version.label}[/] (round {start.version.round}); trainable share "
            f"{start.trainable_share:.2%} of {start.base_model_bytes / 2**20:.1f} MiB base model"
        )
        self.progress.start()

    def round_finished(self, outcome: RoundOutcome) -> None:
        self.progress.advance(self.task)
        if outcome.quarantined:  # device ids come from devices: never read as markup
            held = plain(", ".join(outcome.quarantined))
            self.console.print(f"round {outcome.round}: [yellow]quarantined[/] {held} (repeated anomalies)")
        if outcome.version is None:
            self.console.print(f"round {outcome.round}: [red]failed[/] ({plain(outcome.error or '')})")
        else:
            shown = ", ".join(
                f"{header} {_fmt(outcome.metrics[key])}"
                for key, header in _METRIC_COLUMNS.items()
                if key in outcome.metrics
            )
            self.largest_epsilon = max([self.largest_epsilon, *(s.epsilon for s in outcome.privacy)])
            spent = f", max ε {self.largest_epsilon:.2f}" if self.largest_epsilon else ""
            self.console.print(
                f"round {outcome.round}: {outcome.version.label} from "
                f"{len(outcome.participants)}/{outcome.sampled} devices; {shown}{spent}{_updates(outcome)}"
            )

    def stop(self) -> None:
        self.progress.stop()


def _updates(outcome: RoundOutcome) -> str:
    """The round's package and how the fleet took it, e.g. '; package 12 KiB (0.01%), 20 applied'."""
    if outcome.package_error:
        return "; [red]no package[/]: none fits under the cap"
    if outcome.package is None:
        return ""
    text = f"; package {outcome.package.package_bytes / 1024:.0f} KiB ({outcome.package.ratio:.2%})"
    if outcome.distribution:
        statuses = sorted(outcome.distribution.statuses.items())
        text += ", " + ", ".join(f"{n} {status}" for status, n in statuses)
    return text


def results_table(results: dict[str, Any], width: int) -> Table:
    """The per-round table of a results.json document, no wider than ``width``."""
    rows = [{"round": results["initial"]["round"], "version": results["initial"]["version"],
             "participants": "-", "examples": "-", "metrics": results["initial"]["metrics"],
             "upload_bytes": None, "package_bytes": None, "seconds": None}, *results["rounds"]]  # fmt: skip
    shown = [k for k in _METRIC_COLUMNS if any(k in row["metrics"] for row in rows)]
    spent = _largest_epsilon_so_far(rows)
    private = any(spent)
    columns = [
        Column("round", justify="right"),
        Column("version", justify="right"),
        Column("devices", justify="right", drop=2),
        Column("examples", justify="right", drop=7),
        *(Column(_METRIC_COLUMNS[k], justify="right", drop=_METRIC_DROP[k]) for k in shown),
        *([Column("max ε", justify="right", drop=1)] if private else []),
        Column("upload", justify="right", drop=4),
        Column("package", justify="right", drop=4),
        Column("time", justify="right", drop=2),
    ]
    body: list[list[Cell]] = [
        [
            str(row["round"]),
            row["version"] or Text("failed", style="red"),
            str(row["participants"]),
            str(row["examples"]),
            *(_fmt(row["metrics"].get(k)) for k in shown),
            *([f"{epsilon:.2f}" if epsilon else "-"] if private else []),
            "-" if row["upload_bytes"] is None else f"{row['upload_bytes'] / 1024:.0f} KiB",
            "-" if row.get("package_bytes") is None else f"{row['package_bytes'] / 1024:.0f} KiB",
            duration(row["seconds"]),
        ]
        for row, epsilon in zip(rows, spent, strict=True)
    ]
    return fitted_table(columns, body, width, "fleetlora simulation")


def _largest_epsilon_so_far(rows: list[dict[str, Any]]) -> list[float]:
    """After each row, the largest ε any device's records have spent (0 while nothing is private)."""
    largest, out = 0.0, []
    for row in rows:
        largest = max([largest, *row.get("privacy", {}).values()])
        out.append(largest)
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def phase_table(results: dict[str, Any], width: int) -> Table:
    """A class-incremental scenario's accuracy after each phase, and its retention."""
    scenario = results["scenario"]
    phases = scenario["phases"]
    count = len(phases[0]["accuracy_by_phase"]) if phases else 0
    columns = [
        Column("after phase", justify="right"),
        Column("round", justify="right", drop=2),
        *(Column(f"phase {k + 1}", justify="right", drop=3) for k in range(count)),
        Column("all seen", justify="right"),
        Column("all", justify="right", drop=1),
    ]
    body: list[list[Cell]] = [
        [
            str(row["phase"]),
            str(row["round"]),
            *(f"{a:.1%}" for a in row["accuracy_by_phase"]),
            f"{row['seen']:.1%}",
            f"{row['all']:.1%}",
        ]
        for row in phases
    ]
    kept = results["retention"].get(scenario["configuration"])
    title = f"{scenario['configuration']}: retention " + ("-" if kept is None else f"{kept:.1%}")
    return fitted_table(columns, body, width, title)
