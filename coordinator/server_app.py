"""The coordinator's Flower ServerApp: reads its settings from the run config and runs the federation."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid

from fleetlora.common.flower_env import retry_pulls_sooner
from fleetlora.common.logs import JsonFormatter, configure_json_logging
from fleetlora.coordinator.progress import LOG as ROUNDS_LOG
from fleetlora.coordinator.rounds import Federation, FederationObserver
from fleetlora.coordinator.settings import CoordinatorSettings


def build_server_app(
    run_config_overrides: Mapping[str, bool | int | float | str] | None = None,
    observer: FederationObserver | None = None,
    *,
    phases_to_stderr: bool = False,
    network: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """The ServerApp; in-process callers pass the run config and an observer for progress, and a
    simulation its network (``network(grid)`` wraps the engine's grid: simulations/churn.py).

    A deployed run prints each round phase as a JSON line on stderr, which Flower forwards to
    ``flwr log RUN_ID``; with ``log-dir`` set, every fleetlora record also goes to its JSON log there.
    """
    app = ServerApp()
    overrides = dict(run_config_overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = CoordinatorSettings.from_run_config({**context.run_config, **overrides})
        if settings.log_dir:
            configure_json_logging(Path(settings.log_dir), "rounds")
        if phases_to_stderr:
            _print_phases()
        if isinstance(grid, http_grid.HttpGrid):  # deployed: replies come through the SuperLink
            retry_pulls_sooner(http_grid, "pull_objects")
        Federation(network(grid) if network else grid, settings, observer, run_id=context.run_id).run()

    return app


class _PhaseLines(logging.StreamHandler[TextIO]):
    """Round phases as JSON lines on stderr (its class marks it as added once)."""


def _print_phases() -> None:
    if not any(isinstance(h, _PhaseLines) for h in ROUNDS_LOG.handlers):
        handler = _PhaseLines(sys.stderr)
        handler.setFormatter(JsonFormatter("rounds"))
        handler.setLevel(logging.INFO)
        ROUNDS_LOG.addHandler(handler)
        if ROUNDS_LOG.getEffectiveLevel() > logging.INFO:
            ROUNDS_LOG.setLevel(logging.INFO)


app = build_server_app(phases_to_stderr=True)
