"""``fleetlora device ...``: what a device integrator runs on the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleetlora.client.device_state import DeviceState
from fleetlora.client.enroll import ensure_device_key
from fleetlora.common.config import LoraSettings, ModelSpec, split_names
from fleetlora.common.delta import nbytes, trainable_state
from fleetlora.common.keys import DEVICE_SIGNING_PUB
from fleetlora.common.model import build_model

app = typer.Typer(help="Set up and inspect the device agent.", no_args_is_help=True)


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
) -> None:
    """Show what training this model costs a device: parameters, trainable share, adapter size."""
    label_names = split_names(labels)
    spec = ModelSpec(
        name=model,
        task="classify" if label_names else "causal-lm",
        labels=label_names,
        lora=LoraSettings(
            rank=lora_rank, target_modules=split_names(lora_targets), unfreeze=split_names(unfreeze)
        ),
    )
    loaded = build_model(spec)
    info = {
        "model": model,
        "task": spec.task,
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
    state_dir: Annotated[Path, typer.Option(help="The device's state folder (its node config `state-dir`).")],
    device_id: Annotated[str, typer.Option(help="The id this device reports (its node config `device-id`).")],
) -> None:
    """Make this device's Ed25519 signing key (once) and show what to hand to the coordinator's operator."""
    ensure_device_key(DeviceState(state_dir))
    public = state_dir / DEVICE_SIGNING_PUB
    typer.echo(f"public key: {public}")
    typer.echo(
        "On the coordinator run: fleetlora coordinator devices enroll "
        f"--device-id {device_id} --public-key {public.name}"
    )
