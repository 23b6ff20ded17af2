"""``fleetlora device ...``: what a device integrator runs on the device."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Light modules only: each command imports the heavy ones it needs (torch, the model, Flower) when it
# runs, so that --help and `device status` start without them (tests/test_cli_imports.py).
from fleetlora.client.corpus import cli as corpus_cli
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config
from fleetlora.common.keys import COORDINATOR_SIGNING_PUB, DEVICE_SIGNING_PUB, read_public_key
from fleetlora.common.log_view import ComponentOption, JsonOption, SinceOption, TextArgument, search_command
from fleetlora.common.package import MAX_CAP
from fleetlora.common.terminal import command_group

app = command_group("Set up and inspect the device agent.")
app.command("ingest")(corpus_cli.ingest)
app.add_typer(corpus_cli.corpus_app, name="corpus")
app.add_typer(corpus_cli.quarantine_app, name="quarantine")
app.command("label")(corpus_cli.label)
app.add_typer(corpus_cli.review_app, name="review")
logs_app = command_group("This device's structured logs (JSON lines, kept 90 days).")
app.add_typer(logs_app, name="logs")
StateDirOption = Annotated[
    Path, typer.Option(help="The device's state folder (its node config `state-dir`).")
]
SettingsOption = Annotated[
    Path | None,
    typer.Option("--config", help="fleetlora.toml whose [device] section sets accelerator, mixed-precision."),
]


@app.command("model-info")
def model_info(
    model: Annotated[
        str, typer.Option(help="minilm, smollm2, tiny, or a local Hugging Face folder.")
    ] = "minilm",
    labels: Annotated[
        str, typer.Option(help="Comma-separated class labels; empty means causal language modelling.")
    ] = "",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated modules LoRA wraps.")] = "",
    unfreeze: Annotated[str, typer.Option(help="Comma-separated base modules trained in full.")] = "",
    regime: Annotated[
        str,
        typer.Option(
            help="head (the classifier alone), lora, or auto (head when there are labels and no unfreeze)."
        ),
    ] = "auto",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Sequences per step, for the memory estimate [default: the regime's].")
    ]
    | None = None,
    max_length: Annotated[
        int, typer.Option(min=8, max=4096, help="Tokens per sequence [default: the model spec's, 64].")
    ]
    | None = None,
    dp: Annotated[
        bool, typer.Option("--dp/--no-dp", help="Estimate for DP-SGD (per-example gradients).")
    ] = False,
    memory_budget_mb: Annotated[
        int,
        typer.Option(min=1, help="The device's memory budget in MiB [default: half the machine's memory]."),
    ]
    | None = None,
) -> None:
    """Show what training this model costs a device: parameters, trainable share, adapter size, and the
    estimated peak memory of a step without and with gradient checkpointing (and whether "auto" checkpoints
    under the budget)."""
    from fleetlora.client.memory import (
        MIB,
        MemoryEstimate,
        choose_checkpointing,
        estimate_peak,
        memory_budget,
    )
    from fleetlora.common.config import REGIME_DEFAULTS, LoraSettings, ModelSpec, split_names
    from fleetlora.common.delta import nbytes, trainable_state
    from fleetlora.common.model import build_model

    label_names = split_names(labels)
    if regime == "auto":
        regime = "head" if label_names and not unfreeze else "lora"
    spec = ModelSpec(
        name=model,
        task="classify" if label_names else "causal-lm",
        labels=label_names,
        lora=LoraSettings(
            rank=lora_rank, target_modules=split_names(lora_targets), unfreeze=split_names(unfreeze)
        ),
        regime=regime,  # type: ignore[arg-type]  # ModelSpec checks it
        max_length=max_length or ModelSpec.max_length,
    )
    loaded = build_model(spec)
    batch = batch_size or REGIME_DEFAULTS[spec.regime].batch_size
    budget = memory_budget(DeviceSettings(memory_budget_mb=memory_budget_mb or 0))

    def estimate(checkpointing: bool = False) -> MemoryEstimate:
        return estimate_peak(
            loaded, batch_size=batch, seq_len=spec.max_length, dp=dp, checkpointing=checkpointing
        )

    info = {
        "model": model,
        "task": spec.task,
        "regime": spec.regime,
        "total_params": loaded.total_params,
        "trainable_params": loaded.trainable_params,
        "trainable_share": round(loaded.trainable_share, 6),
        "base_model_bytes": loaded.base_bytes,
        "adapter_bytes": nbytes(trainable_state(loaded.model)),
        "base_model_sha256": loaded.base_sha256,
        "memory_estimate": {  # MiB, one step of `batch_size` sequences of `max_length` tokens
            "batch_size": batch,
            "max_length": spec.max_length,
            "dp": dp,
            "without_checkpointing": estimate().mib(),
            "with_checkpointing": estimate(checkpointing=True).mib(),
            "budget": round(budget / MIB, 1),
            "auto_checkpointing": choose_checkpointing(estimate, "auto", budget),
        },
    }
    typer.echo(json.dumps(info, indent=2))


def capability_report(settings: DeviceSettings) -> tuple[dict[str, Any], str]:
    """Where this device would train under ``settings``, as a document and as one line.

    It asks torch (seconds to import), so only the commands that show it on purpose call it.
    """
    from fleetlora.client.accelerator import capability, describe, select_accelerator

    accelerator = select_accelerator(settings)
    return capability(accelerator), describe(accelerator)


@app.command("enroll")
def enroll(
    state_dir: StateDirOption,
    device_id: Annotated[str, typer.Option(help="The id this device reports (its node config `device-id`).")],
    config: SettingsOption = None,
) -> None:
    """Make this device's keys (once): Ed25519 to sign uploads, ECDSA for its SuperNode to authenticate;
    show what to hand to the coordinator's operator, and where the device would train."""
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.enroll import ensure_auth_key, ensure_device_key

    device = DeviceState(state_dir)
    ensure_device_key(device)
    auth = ensure_auth_key(device)
    public = state_dir / DEVICE_SIGNING_PUB
    typer.echo(f"upload-signing key: {public}")
    typer.echo(f"SuperNode auth key: {auth}")
    typer.echo(
        "Hand both .pub files to the operator, who runs, beside the coordinator's fleetlora.toml: "
        f"fleetlora coordinator devices enroll --device-id {device_id} --public-key {public.name} "
        f"--auth-key {auth.name} --config fleetlora.toml"
    )
    typer.echo(capability_report(load_host_config(config).device.settings)[1])


@app.command("up")
def up(
    config: Annotated[
        Path | None, typer.Option("--config", help="fleetlora.toml with a [device] section.")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option(help="HOST:PORT of the coordinator's SuperLink [default: the config's].")
    ] = None,
) -> None:
    """Start this device's SuperNode (TLS, its auth key) in the foreground; it trains when sampled."""
    from fleetlora.client import supernode
    from fleetlora.common.logs import configure_json_logging

    device = load_host_config(config).device
    if coordinator:
        device = dataclasses.replace(device, coordinator=coordinator)
    typer.echo(f"{device.device_id}: joining {device.coordinator} (upload consent: {device.upload_consent})")
    typer.echo(f"logs: {configure_json_logging(device.log_dir, 'agent')}")
    raise typer.Exit(supernode.run_foreground(device))


@logs_app.command("search")
def logs_search(
    text: TextArgument = "",
    since: SinceOption = None,
    component: ComponentOption = None,
    as_json: JsonOption = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="fleetlora.toml with a [device] section.")
    ] = None,
) -> None:
    """Find this device's log entries (`device up`, its ClientApp), oldest first, rotated files included."""
    search_command(load_host_config(config).device.log_dir, text, since, None, component, as_json)


@app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="An update package file.", exists=True, dir_okay=False)],
    state_dir: StateDirOption,
    coordinator_key: Annotated[
        Path | None,
        typer.Option(help="The coordinator's signing key [default: STATE_DIR/coordinator-signing.pub]."),
    ] = None,
    tenant: Annotated[str, typer.Option(help="The fleet this device belongs to.")] = "default",
    cap: Annotated[
        float, typer.Option(help="Refuse packages larger than this share of the base model.")
    ] = MAX_CAP,
) -> None:
    """Verify an update package and make it this device's active adapter (atomically; old one kept)."""
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.updates import apply_package

    key_file = coordinator_key or state_dir / COORDINATOR_SIGNING_PUB
    if not key_file.is_file():
        raise ConfigError(
            f"No coordinator signing key at {key_file}: pass --coordinator-key FILE (the coordinator's "
            f"{COORDINATOR_SIGNING_PUB}), or copy that file to {state_dir}."
        )
    key = read_public_key(key_file, Ed25519PublicKey)
    with file.open("rb") as stream:
        applied = apply_package(stream, DeviceState(state_dir), key, tenant=tenant, cap=cap)
    before = f"v{applied.previous}" if applied.previous is not None else "no adapter"
    typer.echo(
        f"applied: {before} → v{applied.active.version} ({applied.active.codec}, slot "
        f"{applied.active.slot}) in {applied.seconds:.2f} s"
    )


@app.command("status")
def status(
    state_dir: StateDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    with_capability: Annotated[
        bool,
        typer.Option("--capability", help="Also show where it would train (asks torch: a few seconds more)."),
    ] = False,
    gates_now: Annotated[
        bool,
        typer.Option(
            "--gates-now", help="Take a live look at the sensors, with the thresholds from --config."
        ),
    ] = False,
    config: SettingsOption = None,
) -> None:
    """Show the adapter this device runs (recovering from an interrupted apply first), and its gates as it
    last saw them."""
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.updates import UpdateSlots

    device = DeviceState(state_dir)
    active = UpdateSlots(device).active()
    document = {k: v for k, v in dataclasses.asdict(active).items() if k != "model"} if active else None
    gates = _live_gates(device, config) if gates_now else _saved_gates(device)
    capability = capability_report(load_host_config(config).device.settings) if with_capability else None
    if as_json:  # the adapter's fields (null before its first package), "capability" and "gates" beside them
        extra = {"capability": capability[0]} if capability else {}
        extra |= {"gates": gates} if gates else {}
        typer.echo(json.dumps({**(document or {}), **extra} if extra else document, indent=2))
        return
    if document is None:
        typer.echo("no packaged adapter yet: the device runs the initial one until a package is applied")
    else:
        shown = {**document, "version": f"v{document['version']}"}  # as the coordinator labels versions
        typer.echo("\n".join(f"{k}: {v}" for k, v in shown.items()))
    if gates:
        typer.echo("\n".join(_gates_lines(gates)))
    if capability:
        typer.echo(capability[1])


def _saved_gates(device: Any) -> dict[str, Any] | None:
    """The gates as ``gates.json`` left them, in ``status --json``'s shape (None: none kept, or damaged).

    The file is hostile input: anything but the shape :meth:`Gates.save` writes counts as damage.
    """

    from fleetlora.client.gates import SensorError, finite_number, last_decision, readings_from

    kept = last_decision(device)
    if kept is None:
        return None
    closed, at, event, readings = (kept.get(k) for k in ("closed", "at", "event", "readings"))
    if not isinstance(closed, dict) or not all(isinstance(v, str) for v in closed.values()):
        return None
    if finite_number(at) is None or not isinstance(event, str):
        return None
    try:
        checked = None if readings is None else dataclasses.asdict(readings_from(readings))
    except SensorError:
        return None
    return {
        "open": not closed,
        "closed": closed,
        "event": event,
        "at": at,
        "readings": checked,
        "live": False,
    }


def _live_gates(device: Any, config: Path | None) -> dict[str, Any]:
    """One look at the sensors now, with the device's kept decision for hysteresis; nothing is saved."""
    import time

    from fleetlora.client.gates import Gates, sensors_for

    settings = load_host_config(config).device.settings
    verdict = Gates.load(settings, sensors_for(settings), device).look()  # an unreadable sensor: a reason
    readings = dataclasses.asdict(verdict.readings) if verdict.readings else None
    return {
        "open": verdict.open,
        "closed": dict(verdict.closed),
        "event": None,
        "at": time.time(),
        "readings": readings,
        "live": True,
    }


def _gates_lines(gates: dict[str, Any]) -> list[str]:
    """``gates: open (round trained, 3 min 5 s ago)`` and, when there are any, the readings behind it."""
    import time

    from fleetlora.common.terminal import duration, printable

    def plain(text: object) -> str:  # text from gates.json: no control characters, no line breaks
        return printable(text).replace("\n", "\\x0a")

    state = "open" if gates["open"] else "closed: " + "; ".join(plain(v) for v in gates["closed"].values())
    if gates["live"]:
        when = "now"
    else:
        age = time.time() - gates["at"]
        ago = f"{duration(age)} ago" if age >= 0 else "dated ahead of this clock"
        when = f"{plain(gates['event'])}, {ago}"
    lines = [f"gates: {state} ({when})"]
    if gates["readings"] is not None:
        lines.append("readings: " + (_readings_text(gates["readings"]) or "none"))
    return lines


def _readings_text(r: dict[str, Any]) -> str:
    """``foreground 0.12, own 0.40, on battery 54%, 41.0 °C, metered no``: the readings there are."""
    parts = []
    if r["foreground_load"] is not None:
        parts.append(f"foreground {r['foreground_load']:.2f}")
    if r["own_load"] is not None:
        parts.append(f"own {r['own_load']:.2f}")
    power = {True: "on battery", False: "on mains", None: "battery"}[r["on_battery"]]
    if r["battery_percent"] is not None:
        parts.append(f"{power} {r['battery_percent']:.0f}%")
    elif r["on_battery"] is not None:
        parts.append(power)
    if r["temperature_c"] is not None:
        parts.append(f"{r['temperature_c']:.1f} °C")
    if r["metered"] is not None:
        parts.append(f"metered {'yes' if r['metered'] else 'no'}")
    return ", ".join(parts)
