"""Deployment commands of ``fleetlora coordinator``: up, certs, round start/stop, status.

They act on one coordinator host described by ``fleetlora.toml`` (:mod:`fleetlora.common.host_config`):
its SuperLink, its database and its keys. Rounds run the same ServerApp/ClientApp as a simulation,
launched on the SuperLink through Flower's Control API.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.columns import Columns
from rich.console import Group
from rich.progress_bar import ProgressBar

from fleetlora.common.host_config import CoordinatorHost, load_host_config
from fleetlora.common.run_config import DEFAULTS
from fleetlora.common.terminal import Column, command_group, console, duration, fitted_table, json_text

if TYPE_CHECKING:  # the SuperLink's modules and SQLAlchemy load inside the commands that use them
    from fleetlora.coordinator.storage import DeviceUpdateInfo

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="fleetlora.toml of this coordinator host (docs/operator.md).")
]
certs_app = command_group("TLS certificates for the SuperLink.")
round_app = command_group("Start and stop federated rounds on the deployed fleet.")


def up(config: ConfigOption = None) -> None:
    """Start the coordinator host: keys, TLS certificates and schema if missing, then the SuperLink
    (TLS, SuperNode authentication, durable state) in the foreground until stopped."""
    from fleetlora.common.logs import configure_json_logging
    from fleetlora.coordinator import flower_control, superlink

    host = load_host_config(config).coordinator
    host.state_dir.mkdir(parents=True, exist_ok=True)
    typer.echo(f"logs: {configure_json_logging(host.log_dir, 'coordinator')}")
    for made in superlink.prepare(host):
        typer.echo(f"made {made}")
    online = flower_control.OnlineNodes(host).start()  # asked of the SuperLink every 15 s, for both
    if host.metrics_port:  # Prometheus's /metrics, from a thread, before the SuperLink takes the foreground
        from fleetlora.coordinator.metrics import start_metrics

        typer.echo(f"metrics on {start_metrics(host, lambda: len(online()))}")
    if host.console_port:  # the operators' web console, the same way
        from fleetlora.coordinator.console import start_console

        typer.echo(f"console on {start_console(host, online)}")
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
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Show each round's phases live until the run ends; the exit status says how it ended.",
        ),
    ] = False,
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
    if not follow:
        typer.echo(f"started run {run_id}; follow it with `fleetlora coordinator status --watch`")
        return
    typer.echo(f"started run {run_id}; following it (Ctrl-C stops following, not the run)")
    raise typer.Exit(_follow(host, run_id, int(run_config.get("rounds", DEFAULTS.rounds))))


def _follow(host: CoordinatorHost, run_id: int, rounds: int) -> int:
    """Show the run's phases until it ends: 0 when it completed, 1 otherwise."""
    from fleetlora.coordinator import flower_control
    from fleetlora.coordinator.follow import follow_run
    from fleetlora.coordinator.storage import Storage

    def run_status() -> str:
        try:
            return str(next(iter(flower_control.list_runs(host, run_id)), {}).get("status", ""))
        except flower_control.ControlError:
            return ""  # the SuperLink restarting: keep following

    ledgers = Storage.open(host.database_url, host.tenant, create=False, reader=True).ledgers
    try:
        status = follow_run(ledgers, run_id, rounds, run_status, console())
    except KeyboardInterrupt:
        typer.echo(f"stopped following; run {run_id} goes on (`fleetlora coordinator round stop {run_id}`)")
        return 130
    typer.echo(f"run {run_id} {status}")
    if status != "finished:completed":
        typer.echo("see why with `fleetlora coordinator logs search round --since 1h`", err=True)
        return 1
    return 0


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
    watch: Annotated[
        bool, typer.Option("--watch", help="Redraw every few seconds, the round in progress with a bar.")
    ] = False,
    every: Annotated[
        float, typer.Option("--every", min=1.0, max=3600.0, help="Seconds between redraws with --watch.")
    ] = 5.0,
) -> None:
    """Show the round in progress, devices (online, version, last seen, ε spent, eligible or why not,
    accelerator, memory, last decline), recent rounds and versions, and runs."""
    host = load_host_config(config).coordinator
    if watch and not as_json:
        _watch_status(host, every)
        return
    report = fleet_status(host)
    if as_json:
        typer.echo(json_text(report))
        return
    console().print(status_view(report))


def _watch_status(host: CoordinatorHost, every: float) -> None:
    """Redraw ``status`` in place until Ctrl-C."""
    import time

    from rich.live import Live

    out = console()
    with Live(console=out, auto_refresh=False, screen=False) as live:
        try:
            while True:
                live.update(status_view(fleet_status(host), watching=every), refresh=True)
                time.sleep(every)
        except KeyboardInterrupt:
            pass


# How `status` shows a report's keys: headers other than the key with spaces, what goes first when the
# terminal is narrow, what may wrap; how a value is written on screen where JSON keeps it whole (seconds
# as "3 min 12 s", bytes as "7.5 GiB", a decline as "r3: why").
_HEADERS = {
    "epsilon_spent": "ε spent",
    "elapsed_seconds": "elapsed",
    "memory_bytes": "memory",
    "not_eligible": "why not",
    "accelerator": "runs on",
}
_DROP = {
    "node": 2,
    "last_seen": 1,
    "failures": 1,
    "pending_at": 1,
    "devices": 1,
    "accelerator": 3,
    "memory_bytes": 3,
    "last_decline": 2,
}
_WRAPPED = {"last_seen", "error", "status", "not_eligible", "last_decline"}
_SHOWN: dict[str, Callable[[Any], str]] = {
    "seconds": lambda value: duration(float(value)),
    "elapsed_seconds": lambda value: duration(float(value)),
    "memory_bytes": lambda value: _size(int(value)),
    "last_decline": lambda value: f"r{value['round']}: {value['reason']}",
    "eligible": lambda value: "yes" if value else "no",
}


def status_view(report: dict[str, list[dict[str, Any]]], watching: float | None = None) -> Group:
    """Each section of :func:`fleet_status` as a table (a column any row has is shown; none: "(none)"),
    under a bar for the round in progress."""
    width = console().width
    parts: list[Any] = []
    current = report.get("current_round") or []
    if current and current[0]["total"] and current[0]["phase"] not in ("completed", "failed"):
        row = current[0]
        bar = ProgressBar(total=row["total"], completed=row["done"], width=min(40, width // 3))
        parts.append(Columns([f"round {row['round']} {row['phase']}", bar, f"{row['done']}/{row['total']}"]))
    for title, rows in report.items():
        keys = list(dict.fromkeys(key for row in rows for key in row)) or ["(none)"]
        columns = [
            Column(_HEADERS.get(k, k.replace("_", " ")), drop=_DROP.get(k, 0), wrap=k in _WRAPPED)
            for k in keys
        ]
        cells = [[_cell(row.get(k), _SHOWN.get(k, str)) for k in keys] for row in rows]
        parts.append(fitted_table(columns, cells, width, title.replace("_", " ")))
    if watching:
        parts.append(f"redrawn every {watching:g} s; Ctrl-C to stop")
    return Group(*parts)


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
        "log-dir": str(host.log_dir.resolve()),
    }


def fleet_status(host: CoordinatorHost) -> dict[str, list[dict[str, Any]]]:
    """Devices, rounds, versions and runs as rows, from fleetlora's database and the SuperLink."""
    from fleetlora.coordinator import flower_control
    from fleetlora.coordinator.follow import CurrentRound
    from fleetlora.coordinator.storage import Storage

    storage = Storage.open(host.database_url, host.tenant, create=False, reader=True)
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
                "last_seen": _last_seen(node, update),
                "version": f"v{update.version_id}" if update and update.version_id else None,
                "epsilon_spent": round(latest_epsilon[device.device_id], 3)
                if device.device_id in latest_epsilon
                else None,
                **_eligibility(update),
            }
        )
    current = CurrentRound.of(storage.ledgers.phases(last_rounds=1))
    return {
        "current_round": [current.as_row()] if current else [],
        "devices": devices,
        "rounds": [
            {
                "round": r.round,
                "state": r.status,
                "participants": f"{r.received}/{r.sampled}",
                "failures": len(r.dropped or []),
                "version": f"v{r.version_id}" if r.version_id else None,
                "seconds": round(r.seconds, 1),
                "error": r.error or "",
            }
            for r in storage.ledgers.rounds(last=10)
        ],
        "versions": [
            {
                "version": v.label,
                "round": v.round,
                "devices": len(v.participants),
                **_accuracy(v.metrics),
                **({"key_score": round(v.key_score, 4)} if v.key_score is not None else {}),
                **({"gate": "held" if v.held else "released"} if v.hold else {}),
            }
            for v in storage.versions.all()[-5:]
        ],
        "runs": [_run_row(r) for r in runs] if runs and "error" not in runs[0] else runs,
    }


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One of Flower's runs with snake_case keys and its elapsed time as a number of seconds."""
    try:
        elapsed: float | None = float(run.get("elapsed", ""))
    except (TypeError, ValueError):
        elapsed = None
    return {
        "run_id": run.get("run-id"),
        "status": run.get("status"),
        "elapsed_seconds": elapsed,
        "pending_at": run.get("pending-at"),
    }


def _last_seen(node: dict[str, Any], update: DeviceUpdateInfo | None) -> Any:
    """Online since (the SuperLink's word), else when the device last reported its version."""
    if node.get("status") == "online":
        return f"online since {node.get('online-at')}"
    return update.reported_at if update else "-"


def _eligibility(update: DeviceUpdateInfo | None) -> dict[str, Any]:
    """Whether the device may train now (None: it never reported), why not, on what, and its last
    decline; a device from before contract 6 reports no accelerator or memory."""
    if update is None:
        return dict.fromkeys(("eligible", "not_eligible", "accelerator", "memory_bytes", "last_decline"))
    last_decline = None
    if update.declined_round is not None:
        last_decline = {"round": update.declined_round, "reason": update.declined_reason}
    return {
        "eligible": update.eligible,
        "not_eligible": update.eligibility_reason if not update.eligible else None,
        "accelerator": update.accelerator,
        "memory_bytes": update.memory_bytes,
        "last_decline": last_decline,
    }


def _accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("central_accuracy", "federated_eval_accuracy")
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}


def _cell(value: Any, show: Callable[[Any], str]) -> str:
    if value is None or value == "":
        return "-"
    return show(value)


def _size(count: int) -> str:
    """``512 B``, ``1000 MiB``, ``7.5 GiB``: bytes as a person reads them (one decimal at most)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} B"
