"""What privacy costs a device and the coordinator (issue 3's measurements), in one run.

- **DP step cost**: one LoRA training step on MiniLM (r=8 on query/value, a 77-class head) on a batch
  of 32 × 64 tokens, plain (AdamW) against DP-SGD (Opacus hooks, per-example clipping, noise), on the
  same batch, alternated so both see the same machine load. Reports the median seconds and the ratio.
- **Crypto cost**: sealing the real adapter delta as the device does (upload codec → HPKE to the
  coordinator → Ed25519 signature) and opening it as the coordinator does (verify, decrypt, decode),
  for the default upload codec (fp32+zstd) and int8+zstd, against the time the device's default local
  round (20 steps of batch 16) takes in the same run.

Run from the repository root::

    .venv/bin/python benchmarks/privacy_cost.py [--repeats 10] [--json PATH]

``--quick`` (what ``make bench`` runs): 4 repeats, written to benchmarks/results/quick/privacy_cost.json.
``--smoke`` (what ``make test`` runs): the tiny model on the built-in corpus, 2 repeats, a local round
of 2 steps, nothing written unless ``--json`` is given.

Progress goes to stderr; the JSON result (also written to ``--json``, by default
benchmarks/results/privacy_cost.json) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from results_io import default_path, emit, load_average, machine

from fleetlora.client.train import train_locally
from fleetlora.common.codec import UPLOAD_ZSTD_LEVEL, Codec, decode, encode, inflated_bound
from fleetlora.common.config import ModelSpec, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.delta import nbytes, trainable_state
from fleetlora.common.envelope import SealedUpload, UploadContext, open_sealed, seal
from fleetlora.common.model import build_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
QUICK_REPEATS = 4
SMOKE_REPEATS = 2


def progress(text: str) -> None:
    print(f"[privacy_cost] {text}", file=sys.stderr, flush=True)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step(forward: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    forward(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per arm (default 10)")
    parser.add_argument("--data", type=Path, default=DATA, help="labelled CSV (default BANKING77 train.csv)")
    parser.add_argument("--json", type=Path, help=f"JSON to write (default {RESULTS / 'privacy_cost.json'})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats; results/quick/")
    mode.add_argument(
        "--smoke", action="store_true", help=f"tiny model, built-in corpus, {SMOKE_REPEATS} repeats"
    )
    args = parser.parse_args(argv)
    if args.smoke or args.quick:
        args.repeats = SMOKE_REPEATS if args.smoke else QUICK_REPEATS
    if not args.smoke:
        args.json = args.json or default_path("privacy_cost", args.quick)
    model_name = "tiny" if args.smoke else "minilm"
    examples = load_examples(str(args.data) if args.data.is_file() and not args.smoke else "builtin")
    spec = ModelSpec(model_name, "classify", labels_of(examples), max_length=64)
    loaded = build_model(spec)
    model = loaded.model
    model.train()
    batch = dict(
        loaded.tokenizer(
            [e.text for e in examples[:32]],
            padding="max_length",
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
    )
    index = {label: i for i, label in enumerate(spec.labels)}
    batch["labels"] = torch.tensor([index[e.label] for e in examples[:32]])
    trainable = [p for p in model.parameters() if p.requires_grad]

    plain_optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    # ---- DP step cost: alternate plain and DP steps on the same batch
    progress(f"{args.repeats} plain and {args.repeats} DP steps, batch 32 x 64 tokens, alternating")
    plain_times, dp_times = [], []
    for _ in range(args.repeats + 2):  # the first two pairs warm up and are dropped
        plain_times.append(median_seconds(partial(step, model, plain_optimizer, batch), 1))
        # Opacus' hooks are attached for the DP step only, so the plain step never pays for them.
        dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_optimizer = DPOptimizer(
            torch.optim.AdamW(trainable, lr=1e-4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=32,
        )
        dp_times.append(median_seconds(partial(step, dp_model, dp_optimizer, batch), 1))
        dp_model.to_standard_module()
    plain, dp = statistics.median(plain_times[2:]), statistics.median(dp_times[2:])
    progress(f"plain {plain:.3f} s, DP {dp:.3f} s, ratio {dp / plain:.3f}")

    # ---- crypto cost against one default local round
    # The device's default local round (a smoke run: 2 of its steps).
    settings = TrainSettings(local_steps=2) if args.smoke else TrainSettings()
    round_seconds = train_locally(loaded, examples[:400], settings, seed=0).seconds
    state = trainable_state(model)
    coordinator, device = X25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    context = UploadContext("default", "partition-0", 1, loaded.base_sha256, 1)
    bound = inflated_bound(state)

    def device_side(codec: Codec) -> SealedUpload:  # what the ClientApp does with a delta
        return seal(encode(state, codec, UPLOAD_ZSTD_LEVEL), context, coordinator.public_key(), device)

    def coordinator_side(sealed: SealedUpload, codec: Codec) -> None:  # what the unsealer does
        plaintext = open_sealed(
            sealed,
            claimed=context,
            expected=context,
            coordinator_key=coordinator,
            device_public=device.public_key(),
        )
        decode(plaintext, codec, max_bytes=bound)

    uploads = {}
    for codec in (Codec("fp32"), Codec("int8")):
        sealed = device_side(codec)
        seal_seconds = median_seconds(partial(device_side, codec), args.repeats)
        open_seconds = median_seconds(partial(coordinator_side, sealed, codec), args.repeats)
        uploads[codec.name] = {
            "sealed_bytes": len(sealed.ciphertext) + len(sealed.signature),
            "encode_and_seal_seconds": round(seal_seconds, 5),
            "open_and_decode_seconds": round(open_seconds, 5),
            "share_of_round": round((seal_seconds + open_seconds) / round_seconds, 5),
        }
        progress(
            f"{codec.name}: encode+seal {seal_seconds * 1e3:.2f} ms, "
            f"open+decode {open_seconds * 1e3:.2f} ms, round {round_seconds:.1f} s"
        )
    result = {
        "benchmark": "privacy_cost",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "model": f"{model_name} + LoRA r8 query,value, {len(spec.labels)}-class head",
        "dp_step": {
            "batch": "32 x 64 tokens",
            "plain_seconds": round(plain, 4),
            "dp_seconds": round(dp, 4),
            "ratio": round(dp / plain, 3),
            "target_ratio": 1.15,
        },
        "crypto": {
            "delta_bytes": nbytes(state),
            "local_round_seconds": round(round_seconds, 2),
            "by_upload_codec": uploads,
            "share_of_round": uploads[Codec("fp32").name]["share_of_round"],  # the default codec
            "target_share": 0.01,
        },
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": machine(),
        "load_average": load_average(),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
