"""``fleetlora simulate``: a whole fleet in one process, for researchers and the demo.

Its options are derived from the run-config table (:mod:`fleetlora.common.run_config`): one
``--key`` per key, in the table's help panels, plus the few that only a simulation has. An option
left unset takes the simulation's default, then the table's; ``--run-config 'key=value ...'``
(Flower's own form, TOML values) sets any key as well, and an explicit option wins over it.
"""

from __future__ import annotations

import inspect
import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetlora.common.errors import ConfigError
from fleetlora.common.run_config import SETTINGS, RunValue, Setting
from fleetlora.common.terminal import console as make_console

SIMULATION_PANEL = "Simulation"

# What a simulation fills in itself when the key is not set (see SimulationConfig.simulation_defaults).
_SIMULATION_DEFAULT_HELP = {
    "seal-uploads": "on in a simulation: keys are made under OUT/keys and every device is enrolled",
    "eval-data": "builtin-test for builtin data, else none",
    "db": "sqlite:///OUT/fleetlora.db",
    "keys": "OUT/keys",
    "device-state": "OUT/devices",
}


def _option(setting: Setting) -> inspect.Parameter:
    """``--key`` for one run-config key; None (unset) by default, so only what a user sets is passed."""
    shown = _SIMULATION_DEFAULT_HELP.get(setting.key, str(setting.default))
    kind: Any = setting.type
    flags = (f"--{setting.key}/--no-{setting.key}",) if setting.type is bool else (f"--{setting.key}",)
    option = typer.Option(*flags, help=setting.help, rich_help_panel=setting.group.value, show_default=shown)
    return inspect.Parameter(
        setting.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


_OWN_OPTIONS = [
    inspect.Parameter(
        "devices",
        inspect.Parameter.KEYWORD_ONLY,
        default=8,
        annotation=Annotated[
            int, typer.Option(help="Simulated devices in the fleet.", rich_help_panel=SIMULATION_PANEL)
        ],
    ),
    inspect.Parameter(
        "out",
        inspect.Parameter.KEYWORD_ONLY,
        default=Path("runs/latest"),
        annotation=Annotated[
            Path,
            typer.Option(
                help="Folder for results.json, the database, keys and device state.",
                rich_help_panel=SIMULATION_PANEL,
            ),
        ],
    ),
    inspect.Parameter(
        "client_cpus",
        inspect.Parameter.KEYWORD_ONLY,
        default=2,
        annotation=Annotated[
            int,
            typer.Option(
                help="CPUs per simulated device (2 = one at a time).", rich_help_panel=SIMULATION_PANEL
            ),
        ],
    ),
    inspect.Parameter(
        "ray_address",
        inspect.Parameter.KEYWORD_ONLY,
        default="",
        annotation=Annotated[
            str,
            typer.Option(
                help="An existing Ray cluster to run the devices on (HOST:PORT of its head, as `ray start "
                "--head` prints it, or auto); empty: a Ray instance of its own on this machine.",
                rich_help_panel=SIMULATION_PANEL,
            ),
        ],
    ),
    inspect.Parameter(
        "run_config",
        inspect.Parameter.KEYWORD_ONLY,
        default="",
        annotation=Annotated[
            str,
            typer.Option(
                help="Any keys as Flower takes them: 'key=value key2=\"text\"' (TOML values). "
                "An explicit option wins over a key set here.",
                rich_help_panel=SIMULATION_PANEL,
            ),
        ],
    ),
    inspect.Parameter(
        "scenario",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                help="incremental: a class-incremental stream (--stream-phases phases of new intents, "
                "--phase-rounds rounds each), scored after every phase on all intents seen and on the "
                "first phase's; writes retention into results.json and OUT/scenario.png.",
                rich_help_panel=SIMULATION_PANEL,
            ),
        ],
    ),
    inspect.Parameter(
        "report",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                help="Also write OUT/report.html and its plots (as `fleetlora report OUT` does).",
                rich_help_panel=SIMULATION_PANEL,
            ),
        ],
    ),
    inspect.Parameter(
        "verbose",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool, typer.Option(help="Show Flower's and Ray's logs.", rich_help_panel=SIMULATION_PANEL)
        ],
    ),
]


def parse_run_config(text: str) -> dict[str, RunValue]:
    """Flower's ``--run-config`` form: space-separated ``key=value`` pairs, each value in TOML."""
    parsed: dict[str, RunValue] = {}
    for pair in shlex.split(text, posix=False):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--run-config takes key=value pairs, got {pair!r}.")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f'--run-config {key}: {value!r} is not a TOML value (quote text: {key}="...").'
            ) from None
    return parsed


def simulate(**options: Any) -> None:
    """Simulate a fleet: split the data over devices, run federated rounds (DP by default), report each."""
    from fleetlora.simulations.report import ProgressReporter, phase_table, results_table
    from fleetlora.simulations.runner import SimulationConfig, with_scenario
    from fleetlora.simulations.runner import simulate as run_fleet

    explicit = {s.key: options[s.name] for s in SETTINGS if options[s.name] is not None}
    config = SimulationConfig(
        devices=options["devices"],
        out=options["out"],
        client_cpus=options["client_cpus"],
        ray_address=options["ray_address"],
        settings={**parse_run_config(options["run_config"]), **explicit},
    )
    if options["scenario"] is not None:
        config = with_scenario(config, options["scenario"])
    console = make_console()
    if not config.run.dp_epsilon:
        console.print(
            "[yellow]dp-epsilon 0: devices train without differential privacy; this run is not private.[/]"
        )
    reporter = ProgressReporter(config.run.rounds, console)
    try:
        results = run_fleet(config, reporter, verbose=options["verbose"], scenario=options["scenario"])
    finally:
        reporter.stop()
    console.print(results_table(results, console.width))
    if "scenario" in results:
        console.print(phase_table(results, console.width))
    console.print(f"results: {config.out / 'results.json'}")
    if options["report"]:
        from fleetlora.simulations.run_report import announce, write_report

        announce(write_report([config.out]), console.print)


simulate.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # typer reads the options from it
    [*_OWN_OPTIONS, *(_option(s) for s in SETTINGS)], return_annotation=None
)
