"""``fleetlora device ...``: what a device integrator runs on the device."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Light modules only: each command imports the heavy ones it needs (torch, the model, Flower) when it
# runs, so that --help and `device status` start without them (tests/test_cli_imports.py).
from fleetlora.client.corpus import cli as corpus_cli
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
) -> None:
    """Show what training this model costs a device: parameters, trainable share, adapter size."""
    from fleetlora.common.config import LoraSettings, ModelSpec, split_names
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
    )
    loaded = build_model(spec)
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
    }
    typer.echo(json.dumps(info, indent=2))


@app.command("enroll")
def enroll(
    state_dir: StateDirOption,
    device_id: Annotated[str, typer.Option(help="The id this device reports (its node config `device-id`).")],
) -> None:
    """Make this device's keys (once): Ed25519 to sign uploads, ECDSA for its SuperNode to authenticate;
    show what to hand to the coordinator's operator."""
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
) -> None:
    """Show the adapter this device runs (recovering from an interrupted apply first)."""
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.updates import UpdateSlots

    active = UpdateSlots(DeviceState(state_dir)).active()
    document = {k: v for k, v in dataclasses.asdict(active).items() if k != "model"} if active else None
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    elif document is None:
        typer.echo("no packaged adapter yet: the device runs the initial one until a package is applied")
    else:
        shown = {**document, "version": f"v{document['version']}"}  # as the coordinator labels versions
        typer.echo("\n".join(f"{k}: {v}" for k, v in shown.items()))
