"""The coordinator's Flower ServerApp: reads its settings from the run config and runs the federation."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fleetlora.coordinator.rounds import Federation, FederationObserver
from fleetlora.coordinator.settings import CoordinatorSettings


def build_server_app(
    run_config_overrides: Mapping[str, bool | int | float | str] | None = None,
    observer: FederationObserver | None = None,
) -> ServerApp:
    """The ServerApp; in-process callers pass the run config and an observer for progress."""
    app = ServerApp()
    overrides = dict(run_config_overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = CoordinatorSettings.from_run_config({**context.run_config, **overrides})
        Federation(grid, settings, observer).run()

    return app


app = build_server_app()
