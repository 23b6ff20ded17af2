"""``fleetlora device ...``: what a device integrator runs on the device."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fleetlora.common.config import LoraSettings, ModelSpec, split_names
from fleetlora.common.delta import nbytes, trainable_state
from fleetlora.common.model import build_model

app = typer.Typer(help="Run and inspect the device agent.", no_args_is_help=True)


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
