"""Deployment commands of ``fleetlora coordinator``: up, certs, round start/stop, status.

They act on one coordinator host described by ``fleetlora.toml`` (:mod:`fleetlora.common.host_config`):
its SuperLink, its database and its keys. Rounds run the same ServerApp/ClientApp as a simulation,
launched on the SuperLink through Flower's Control API.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleetlora.common.host_config import CoordinatorHost, load_host_config

if TYPE_CHECKING:  # the SuperLink's modules and SQLAlchemy load inside the commands that use them
    from fleetlora.coordinator.storage import DeviceUpdateInfo

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="fleetlora.toml of this coordinator host (docs/operator.md).")
]
certs_app = typer.Typer(help="TLS certificates for the SuperLink.", no_args_is_help=True)
round_app = typer.Typer(help="Start and stop federated rounds on the deployed fleet.", no_args_is_help=True)


def up(config: ConfigOption = None) -> None:
    """Start the coordinator host: keys, TLS certificates and schema if missing, then the SuperLink
    (TLS, SuperNode authentication, durable state) in the foreground until stopped."""
    from fleetlora.coordinator import superlink

    host = load_host_config(config).coordinator
    host.state_dir.mkdir(parents=True, exist_ok=True)
    for made in superlink.prepare(host):
        typer.echo(f"made {made}")
    typer.echo(
        f"SuperLink on {host.host}:{host.port}; give devices {host.certs_dir / 'ca.crt'} and the .pub "
        f"files in {host.keys_dir}. Stop with Ctrl-C."
    )
    raise typer.Exit(superlink.run_foreground(host))


@certs_app.command("init")
def certs_init(
    folder: Annotated[
        Path, typer.Option("--dir", help="Folder for ca.crt/ca.key/server.crt/server.key.")
    ] = Path("certs"),
    hosts: Annotated[
        list[str] | None,
        typer.Option("--host", help="A DNS name or IP address devices dial (repeat the option)."),
    ] = None,
) -> None:
    """Make a private CA and a SuperLink certificate it signs (`coordinator up` does this itself)."""
    from fleetlora.coordinator.certs import DEFAULT_HOSTS, init_certs

    for path in init_certs(folder, tuple(hosts) if hosts else DEFAULT_HOSTS):
        typer.echo(str(path))
    typer.echo(f"Give devices {folder / 'ca.crt'}; keep ca.key offline once certificates are made.")


@round_app.command("start")
def round_start(
    rounds: Annotated[int | None, typer.Option(help="Rounds to run [default: the config's].")] = None,
    min_devices: Annotated[int | None, typer.Option(help="Devices a round needs to count.")] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Share of registered devices sampled per round (0 < F <= 1).")
    ] = None,
    deadline: Annotated[float | None, typer.Option(help="Seconds a round waits for devices.")] = None,
    config: ConfigOption = None,
) -> None:
    """Launch a run of federated rounds on the SuperLink; it continues from the latest stored version."""
    from fleetlora.coordinator import flower_control

    settings = load_host_config(config)
    host = settings.coordinator
    run_config = {**DEPLOYED_DEFAULTS, **settings.federation, **deployment_run_config(host)}
    overrides = {"rounds": rounds, "min-devices": min_devices, "round-deadline": deadline}
    run_config.update({key: value for key, value in overrides.items() if value is not None})
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise typer.BadParameter(f"--fraction must be in (0, 1], got {fraction}.")
        registered = len(flower_control.list_nodes(host))
        run_config["devices-per-round"] = max(
            run_config.get("min-devices", 1), math.ceil(fraction * registered)
        )
    run_id = flower_control.start_run(host, run_config)
    typer.echo(f"started run {run_id}; watch it with `fleetlora coordinator status`")


@round_app.command("stop")
def round_stop(
    run_id: Annotated[int | None, typer.Argument(help="The run to stop [default: the one running].")] = None,
    config: ConfigOption = None,
) -> None:
    """Stop a run; the versions its finished rounds stored stay."""
    from fleetlora.coordinator import flower_control

    host = load_host_config(config).coordinator
    if run_id is None:
        running = [
            r for r in flower_control.list_runs(host) if not str(r.get("status", "")).startswith("finished")
        ]
        if not running:
            raise typer.BadParameter("No run is in progress.")
        run_id = int(running[-1]["run-id"])
    flower_control.stop_run(host, run_id)
    typer.echo(f"stopped run {run_id}")


def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show devices (online, version, last seen, ε spent), recent rounds and versions, and runs."""
    host = load_host_config(config).coordinator
    report = fleet_status(host)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    for title, rows in report.items():
        table = Table(title=title, title_justify="left")
        columns = list(rows[0]) if rows else ["(none)"]
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in columns))
        console.print(table)


# Where a deployed run differs from the table unless [federation] says otherwise: who trains when is
# drawn from the OS's entropy, not from a seed anyone with the run config knows; and a fleet lives
# through many short runs, so a device's DP noise is planned for DEPLOYED_DP_ROUNDS participations, not
# for one run's schedule, after which a device with fixed data would be spent for good.
DEPLOYED_DP_ROUNDS = 100
DEPLOYED_DEFAULTS: dict[str, Any] = {"sampling": "random", "dp-rounds": DEPLOYED_DP_ROUNDS}


def deployment_run_config(host: CoordinatorHost) -> dict[str, Any]:
    """What a deployed run must know about this host, as absolute paths (the ServerApp runs elsewhere)."""
    return {
        "db": host.database_url,
        "keys": str(host.keys_dir.resolve()),
        "tenant": host.tenant,
        "seal-uploads": True,
    }


def fleet_status(host: CoordinatorHost) -> dict[str, list[dict[str, Any]]]:
    """Devices, rounds, versions and runs as rows, from fleetlora's database and the SuperLink."""
    from fleetlora.coordinator import flower_control
    from fleetlora.coordinator.storage import Storage

    storage = Storage.open(host.database_url, host.tenant)
    try:
        nodes = {str(n.get("node-id")): n for n in flower_control.list_nodes(host)}
        runs = flower_control.list_runs(host)
    except flower_control.ControlError as exc:
        nodes, runs = {}, [{"error": str(exc)}]
    updates = {u.device_id: u for u in storage.devices.updates()}
    latest_epsilon = storage.ledgers.epsilon_spent()
    devices = []
    for device in storage.devices.enrolled():
        node = nodes.get(device.node_id or "", {})
        update = updates.get(device.device_id)
        devices.append(
            {
                "device": device.device_id,
                "node": device.node_id or "-",
                "status": node.get("status", "not registered" if not device.node_id else "unknown"),
                "last seen": _last_seen(node, update),
                "version": f"v{update.version_id}" if update and update.version_id else "-",
                "ε spent": round(latest_epsilon[device.device_id], 3)
                if device.device_id in latest_epsilon
                else "-",
            }
        )
    return {
        "devices": devices,
        "rounds": [
            {
                "round": r.round,
                "state": r.status,
                "participants": f"{r.received}/{r.sampled}",
                "failures": len(r.dropped or []),
                "version": f"v{r.version_id}" if r.version_id else "-",
                "seconds": round(r.seconds, 1),
                "error": r.error or "",
            }
            for r in storage.ledgers.rounds(last=10)
        ],
        "versions": [
            {"version": v.label, "round": v.round, "devices": len(v.participants), **_accuracy(v.metrics)}
            for v in storage.versions.all()[-5:]
        ],
        "runs": [{k: r.get(k, "") for k in ("run-id", "status", "elapsed", "pending-at")} for r in runs]
        if runs and "error" not in runs[0]
        else runs,
    }


def _last_seen(node: dict[str, Any], update: DeviceUpdateInfo | None) -> Any:
    """Online since (the SuperLink's word), else when the device last reported its version."""
    if node.get("status") == "online":
        return f"online since {node.get('online-at')}"
    return update.reported_at if update else "-"


def _accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("central_accuracy", "federated_eval_accuracy")
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
