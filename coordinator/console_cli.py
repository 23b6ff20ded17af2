"""``fleetlora coordinator console ...``: serve the operators' web console, and log in to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import CoordinatorHost, load_host_config
from fleetlora.common.terminal import command_group
from fleetlora.coordinator.deploy_cli import ConfigOption

app = command_group("The operators' read-only web console: the fleet, its rounds, versions and packages.")

HostOption = Annotated[
    str | None, typer.Option("--host", help="Address to listen on [default: the config's console-host].")
]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Port to listen on [default: the config's console-port].")
]


@app.command("serve")
def serve(config: ConfigOption = None, host: HostOption = None, port: PortOption = None) -> None:
    """Serve the console in the foreground until stopped (Ctrl-C)."""
    from fleetlora.coordinator.console import serve_console

    settings = _console_host(config, host, port)
    server = serve_console(settings)
    bound_host, bound_port = server.server_address[:2]
    typer.echo(
        f"Console on http://{_url_host(bound_host)}:{bound_port}/ (read-only). Once the coordinator has "
        "operators, log in with `fleetlora coordinator console login`. Stop with Ctrl-C."
    )
    server.serve_forever()


@app.command("login")
def login(
    operator: Annotated[str, typer.Option("--operator", help="Your operator name.")],
    operator_key: Annotated[
        Path, typer.Option("--operator-key", help="Your operator key file (`operator add` wrote it).")
    ],
    otp: Annotated[str, typer.Option("--otp", help="The one-time code your authenticator app shows.")],
    config: ConfigOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Print a one-time link that logs your browser in to the console (valid for a minute, once)."""
    from fleetlora.coordinator.console_auth import LOGIN_SECONDS, ConsoleTokens, session_secret
    from fleetlora.coordinator.db import Database
    from fleetlora.coordinator.operators import Credentials, Operators

    settings = _console_host(config, host, port)
    if not settings.console_port:
        raise ConfigError("The console is off (console-port = 0): set console-port in [coordinator].")
    database = Database(settings.database_url).initialize()
    try:
        name = Operators(database).authorize(Credentials(operator, operator_key, otp), "console login")
    finally:
        database.close()
    if name is None:
        raise ConfigError(
            "This coordinator has no operators: the console needs no login yet (it is open on this host "
            "only). `fleetlora coordinator operator add` makes the first."
        )
    token = ConsoleTokens(session_secret(settings.keys_dir), settings.tenant).login_token(name)
    url_host = _url_host(settings.console_host)
    typer.echo(f"Open within {LOGIN_SECONDS} s (it works once):")
    typer.echo(f"http://{url_host}:{settings.console_port}/login?token={token}")


def _console_host(config: Path | None, host: str | None, port: int | None) -> CoordinatorHost:
    """The host config with the command line's --host/--port over its console settings."""
    settings = load_host_config(config).coordinator
    return dataclasses.replace(
        settings,
        console_host=settings.console_host if host is None else host,
        console_port=settings.console_port if port is None else port,
    )


def _url_host(host: str) -> str:
    """How a browser on this host reaches an address the console listens on."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
