"""``fleetlora simulate``: a whole fleet in one process, for researchers and the demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fleetlora.simulations.report import ProgressReporter, results_table
from fleetlora.simulations.runner import SimulationConfig
from fleetlora.simulations.runner import simulate as run_fleet

_DEFAULTS = SimulationConfig()


def simulate(
    devices: Annotated[int, typer.Option(help="Simulated devices in the fleet.")] = _DEFAULTS.devices,
    rounds: Annotated[
        int, typer.Option(help="Federated rounds to run (after any stored ones).")
    ] = _DEFAULTS.rounds,
    model: Annotated[
        str, typer.Option(help="Base model: minilm, smollm2, tiny, or a local Hugging Face folder.")
    ] = _DEFAULTS.model,
    data: Annotated[
        str, typer.Option(help="Training data: 'builtin' or a CSV/JSONL/TXT file, split over the devices.")
    ] = _DEFAULTS.data,
    eval_data: Annotated[
        str | None,
        typer.Option(help="Coordinator-side test set (default: built-in test split for builtin data)."),
    ] = None,
    partition: Annotated[
        str, typer.Option(help="How data is split over devices: iid or dirichlet:ALPHA (by label).")
    ] = _DEFAULTS.partition,
    seed: Annotated[
        int, typer.Option(help="Seed for partitions, sampling and initial weights.")
    ] = _DEFAULTS.seed,
    out: Annotated[Path, typer.Option(help="Folder for results.json and the default database.")] = Path(
        "runs/latest"
    ),
    db: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the version store (default sqlite:///OUT/fleetlora.db)."),
    ] = None,
    devices_per_round: Annotated[
        int, typer.Option(help="Devices sampled each round.")
    ] = _DEFAULTS.devices_per_round,
    min_devices: Annotated[
        int, typer.Option(help="Valid replies needed for a round to count.")
    ] = _DEFAULTS.min_devices,
    local_steps: Annotated[
        int, typer.Option(help="Optimizer steps per device per round.")
    ] = _DEFAULTS.local_steps,
    batch_size: Annotated[int, typer.Option(help="Examples per local step.")] = _DEFAULTS.batch_size,
    learning_rate: Annotated[
        float, typer.Option(help="Local AdamW learning rate.")
    ] = _DEFAULTS.learning_rate,
    local_epochs: Annotated[
        float, typer.Option(help="Passes over the local data per round; > 0 replaces --local-steps.")
    ] = _DEFAULTS.local_epochs,
    lr_decay: Annotated[
        float, typer.Option(help="Round r trains at learning-rate × lr-decay^(r-1).")
    ] = _DEFAULTS.lr_decay,
    max_length: Annotated[
        int, typer.Option(help="Tokens per example (longer texts are cut).")
    ] = _DEFAULTS.max_length,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = _DEFAULTS.lora_rank,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).")] = _DEFAULTS.lora_alpha,
    lora_targets: Annotated[
        str, typer.Option(help="Comma-separated module names LoRA wraps (default: attention q/v).")
    ] = _DEFAULTS.lora_targets,
    unfreeze: Annotated[
        str, typer.Option(help="Comma-separated base modules trained in full on top of LoRA.")
    ] = _DEFAULTS.unfreeze,
    ffa_lora: Annotated[
        bool, typer.Option(help="FFA-LoRA: keep A at its shared seeded init, train only B and the head.")
    ] = _DEFAULTS.ffa_lora,
    pooling: Annotated[
        str,
        typer.Option(
            help="Classification head: mean (mean of the last hidden states) or transformers "
            "(the architecture's own, BERT: pooler over [CLS])."
        ),
    ] = _DEFAULTS.pooling,
    personal_head: Annotated[
        bool,
        typer.Option(
            help="Each device trains and keeps its own classification head (in OUT/devices); "
            "evaluation reports global and personalised accuracy."
        ),
    ] = _DEFAULTS.personal_head,
    restricted_softmax: Annotated[
        bool,
        typer.Option(
            help="Classification: each device's loss covers only its own classes (FedRS-style, against "
            "label skew). Ignored for causal LM."
        ),
    ] = _DEFAULTS.restricted_softmax,
    dp_epsilon: Annotated[
        float,
        typer.Option(
            help="DP-SGD on every device with this ε budget per device (0 = no DP).",
            rich_help_panel="Privacy",
        ),
    ] = _DEFAULTS.dp_epsilon,
    dp_delta: Annotated[float, typer.Option(help="DP δ.", rich_help_panel="Privacy")] = _DEFAULTS.dp_delta,
    dp_max_grad_norm: Annotated[
        float, typer.Option(help="Per-example gradient clipping bound (L2).", rich_help_panel="Privacy")
    ] = _DEFAULTS.dp_max_grad_norm,
    dp_accountant: Annotated[
        str, typer.Option(help="Privacy accountant: rdp or prv.", rich_help_panel="Privacy")
    ] = _DEFAULTS.dp_accountant,
    dp_rounds: Annotated[
        int,
        typer.Option(
            help="Rounds the ε budget must last (0 = --rounds); sets the noise.", rich_help_panel="Privacy"
        ),
    ] = _DEFAULTS.dp_rounds,
    central_dp_noise: Annotated[
        float,
        typer.Option(
            help="User-level DP at the coordinator: noise multiplier on the sum of clipped deltas (0 = off).",
            rich_help_panel="Privacy",
        ),
    ] = _DEFAULTS.central_dp_noise,
    central_dp_clip: Annotated[
        float,
        typer.Option(help="L2 bound on each device's delta under central DP.", rich_help_panel="Privacy"),
    ] = _DEFAULTS.central_dp_clip,
    seal_uploads: Annotated[
        bool,
        typer.Option(
            help="Devices encrypt each delta to the coordinator (HPKE) and sign it (Ed25519); keys are "
            "made under OUT/keys and every device is enrolled.",
            rich_help_panel="Privacy",
        ),
    ] = _DEFAULTS.seal_uploads,
    stream_records: Annotated[
        int,
        typer.Option(
            help="Feed each device its partition as a stream: this many records a round, with duplicates "
            "and junk mixed in, through the device's corpus pipeline (0: the whole partition at once).",
            rich_help_panel="Data",
        ),
    ] = _DEFAULTS.stream_records,
    upload_codec: Annotated[
        str,
        typer.Option(
            help="How a sealed delta is encoded: fp32+zstd (lossless), fp16+zstd or int8+zstd (smaller).",
            rich_help_panel="Privacy",
        ),
    ] = _DEFAULTS.upload_codec,
    package_cap: Annotated[
        float,
        typer.Option(
            help="Largest update package as a share of the base model's bytes (at most 0.10); lossier "
            "codecs are used to fit.",
            rich_help_panel="Updates",
        ),
    ] = _DEFAULTS.package_cap,
    distribute_updates: Annotated[
        bool,
        typer.Option(
            help="After each round, send every device the signed package to the new version.",
            rich_help_panel="Updates",
        ),
    ] = _DEFAULTS.distribute_updates,
    server_optimizer: Annotated[
        str, typer.Option(help="Server update: fedavg, fedavgm (momentum), fedadam or fedyogi.")
    ] = _DEFAULTS.server_optimizer,
    server_lr: Annotated[
        float, typer.Option(help="Server learning rate (1 = plain FedAvg).")
    ] = _DEFAULTS.server_lr,
    server_momentum: Annotated[
        float, typer.Option(help="FedAvgM momentum, or beta1 of FedAdam/FedYogi.")
    ] = _DEFAULTS.server_momentum,
    server_beta2: Annotated[float, typer.Option(help="beta2 of FedAdam/FedYogi.")] = _DEFAULTS.server_beta2,
    server_tau: Annotated[
        float, typer.Option(help="tau (adaptivity) of FedAdam/FedYogi.")
    ] = _DEFAULTS.server_tau,
    round_deadline: Annotated[
        float, typer.Option(help="Seconds a round waits for devices.")
    ] = _DEFAULTS.round_deadline,
    client_cpus: Annotated[
        int, typer.Option(help="CPUs per simulated device (2 = one at a time).")
    ] = _DEFAULTS.client_cpus,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Simulate a fleet: partition the data over devices, run federated LoRA rounds, report each."""
    config = SimulationConfig(
        devices=devices,
        rounds=rounds,
        model=model,
        data=data,
        eval_data=eval_data,
        partition=partition,
        seed=seed,
        out=out,
        db=db,
        devices_per_round=devices_per_round,
        min_devices=min_devices,
        local_steps=local_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        local_epochs=local_epochs,
        lr_decay=lr_decay,
        max_length=max_length,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        unfreeze=unfreeze,
        ffa_lora=ffa_lora,
        pooling=pooling,
        personal_head=personal_head,
        restricted_softmax=restricted_softmax,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        dp_max_grad_norm=dp_max_grad_norm,
        dp_accountant=dp_accountant,
        dp_rounds=dp_rounds,
        central_dp_noise=central_dp_noise,
        central_dp_clip=central_dp_clip,
        seal_uploads=seal_uploads,
        stream_records=stream_records,
        upload_codec=upload_codec,
        package_cap=package_cap,
        distribute_updates=distribute_updates,
        server_optimizer=server_optimizer,
        server_lr=server_lr,
        server_momentum=server_momentum,
        server_beta2=server_beta2,
        server_tau=server_tau,
        round_deadline=round_deadline,
        client_cpus=client_cpus,
    )
    console = Console(width=None if sys.stdout.isatty() else 140)  # logs and CI get the whole table
    reporter = ProgressReporter(rounds, console)
    try:
        results = run_fleet(config, reporter, verbose=verbose)
    finally:
        reporter.stop()
    console.print(results_table(results))
    console.print(f"results: {out / 'results.json'}")
