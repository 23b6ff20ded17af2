"""What update packages cost: size and error by codec, build and apply time, crash recovery (issue 4).

For each model (``smollm2``: SmolLM2-135M causal LM on Tiny Shakespeare; ``minilm``: all-MiniLM-L6-v2
classifying BANKING77's 77 intents) and each LoRA rank, in one process:

- **Realistic versions**: the model's seeded initial adapter is trained for a few real local steps
  with ``train_locally`` on a fixed sample of the real text (version A), then for a few more (version
  B). All three are stored in a real SQLite registry with the lineage record packages need.
- **Size and error per codec**: for every codec of ``fleetlora.common.codec.LADDER``, for the full
  adapter B and for the delta B − A, the whole signed package (header, manifest, signature, payload,
  in the format of ``fleetlora.common.package``) as a share of the base model's bytes, and the
  reconstruction error: relative L2 of the rebuilt adapter (decoded, plus A for the delta) against
  the true B. ``payload_error`` is the same against the payload itself (B, or B − A).
- **What the builder picks**: ``build_package`` at the default cap (10% of the base model) and at
  a tight cap (0.1%), for the full adapter and the delta; a refusal (``PackageTooLarge``) is recorded.
  Its ``build_seconds`` is the package build time.
- **Device apply**: ``apply_package`` of the full package A then the delta package A → B (default
  cap) into a fresh device folder, with the model already loaded as on a running device (median of
  ``--repeats`` fresh devices), against a baseline timed alongside: reading the same adapter's plain
  safetensors file, deserializing it and loading it into the model. The health check (slot read
  back, hash, load, one canary forward pass) is timed alone too, since it is most of the gap.
- **Recovery after a kill** (once per model, at its largest rank): a child process applies the delta
  package with ``os.replace`` patched to SIGKILL it on its first call, i.e. after the new slot's
  temporary file is written and fsynced but before its rename. A fresh process then opens
  ``UpdateSlots(DeviceState(dir)).active()``, loads the adapter into a freshly loaded model and runs
  ``health_check``; its wall time includes Python start, imports and the model load, which is what a
  restarted device pays. Target: at most 30 s, back on version A exactly.

Run from the repository root (both models, three ranks: a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/packages.py [--models smollm2,minilm] [--ranks 4,8,16] [--json PATH]
        [--repeats 5]

``--quick`` (what ``make bench`` runs): MiniLM at rank 8, 3 repeats, written to
benchmarks/results/quick/packages.json. ``--smoke`` (what ``make test`` runs): the tiny model on the
built-in corpus at rank 2, 1 repeat, every part once, nothing written unless ``--json`` is given.

Data: ``../shared/data/banking77/train.csv`` and ``../shared/data/tinyshakespeare/input.txt``
(falling back to the built-in corpus without them). Progress and a table go to stderr; the JSON
result is written to ``--json`` (after every model and rank, so a stopped run keeps what finished)
and is the last line of stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from results_io import default_path, emit, load_average, load_before_after, machine, write_json
from rich.console import Console
from rich.table import Table

from fleetlora.client.device_state import DeviceState
from fleetlora.client.train import train_locally
from fleetlora.client.updates import UpdateSlots, apply_package, health_check
from fleetlora.common.codec import LADDER, decode, encode, inflated_bound, relative_error
from fleetlora.common.config import LoraSettings, ModelSpec, TrainSettings, from_config, to_config
from fleetlora.common.data import Example, load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.delta import (
    apply_delta,
    deserialize,
    diff,
    load_trainable_state,
    nbytes,
    serialize,
    sha256_hex,
    trainable_state,
)
from fleetlora.common.keys import (
    COORDINATOR_SIGNING_KEY,
    COORDINATOR_SIGNING_PUB,
    read_private_key,
    read_public_key,
)
from fleetlora.common.model import cached_model
from fleetlora.common.package import MAX_CAP, Manifest, sign, utc_iso
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.models import utcnow
from fleetlora.coordinator.packages import PackagePolicy, PackageTooLarge, build_package
from fleetlora.coordinator.storage import NewVersion, PackageInfo, Storage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results")
MODELS: dict[str, tuple[str, Path]] = {
    "smollm2": ("causal-lm", SHARED / "tinyshakespeare" / "input.txt"),
    "minilm": ("classify", SHARED / "banking77" / "train.csv"),
    "tiny": ("classify", Path("builtin")),  # --smoke: the two-layer test model on the built-in corpus
}
DEFAULT_MODELS = ["smollm2", "minilm"]
QUICK = {"models": ["minilm"], "ranks": [8], "repeats": 3}
SMOKE = {"models": ["tiny"], "ranks": [2], "repeats": 1}
RANKS = (4, 8, 16)
TIGHT_CAP = 0.001
LOCAL_STEPS = 4  # per version: A is 4 steps from the initial adapter, B 4 more
BATCH_SIZE = 8
MAX_LENGTH = 64
SAMPLE = 256  # examples drawn (seed 0) from the data set to train on
TENANT = "bench"
RECOVERY_TARGET_SECONDS = 30.0

# The process the benchmark kills: a running device (model loaded) applying a package, SIGKILLed at
# the first os.replace, i.e. once the new slot's temporary file is written and fsynced.
KILL_CHILD = """
import os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fleetlora.client.device_state import DeviceState
from fleetlora.client.updates import apply_package
from fleetlora.common.config import ModelSpec, from_config
from fleetlora.common.keys import read_public_key
from fleetlora.common.model import cached_model
from fleetlora.common.package import read_manifest

device, package, public, tenant = sys.argv[1:5]
trusted = read_public_key(Path(public), Ed25519PublicKey)
with open(package, "rb") as stream:
    manifest, _ = read_manifest(stream, trusted)
cached_model(from_config(ModelSpec, manifest.model, "model"))  # a running device has its model loaded


def killed(source, target):
    print(f"SIGKILL at os.replace({os.path.basename(source)} -> {os.path.basename(target)})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


os.replace = killed
with open(package, "rb") as stream:
    apply_package(stream, DeviceState(Path(device)), trusted, tenant=tenant)
print("apply finished: the kill never came", flush=True)
"""

# The restarted device: find the active adapter, load the model and the adapter, health-check it.
RECOVER_CHILD = """
import time
started = time.perf_counter()
import json, sys
from pathlib import Path
from fleetlora.client.device_state import DeviceState
from fleetlora.client.updates import UpdateSlots, health_check
from fleetlora.common.model import cached_model

imported = time.perf_counter()
slots = UpdateSlots(DeviceState(Path(sys.argv[1])))
active = slots.active()
summary = {"version": None}
if active is not None:
    state = slots.load(active)
    found = time.perf_counter()
    loaded = cached_model(active.spec)
    built = time.perf_counter()
    health_check(loaded, state, active.adapter_sha256, slots.files.path(active.slot))
    checked = time.perf_counter()
    summary = {
        "version": active.version,
        "sequence": active.sequence,
        "generation": active.generation,
        "slot": active.slot,
        "import_seconds": round(imported - started, 3),
        "find_seconds": round(found - imported, 4),
        "model_load_seconds": round(built - found, 3),
        "health_check_seconds": round(checked - built, 4),
    }
print(json.dumps(summary), flush=True)
"""


def progress(text: str) -> None:
    print(f"[packages] {text}", file=sys.stderr, flush=True)


def parse_list(value: str, choices: tuple[str, ...] | None = None) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if choices is not None and n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices or ())}")
    return names


def parse_ranks(value: str) -> list[int]:
    try:
        ranks = [int(n) for n in parse_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must be integers, got {value!r}") from None
    if any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError("ranks must be >= 1")
    return ranks


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(run: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = run()
    return value, time.perf_counter() - started


# ---- one model and rank --------------------------------------------------------------------------


class Bench:
    """One model at one rank: its versions in a registry, its packages, and the device measurements."""

    def __init__(self, name: str, rank: int, examples: list[Example], scratch: Path, keys: Path) -> None:
        task, _ = MODELS[name]
        self.name, self.rank, self.scratch = name, rank, scratch
        self.spec = ModelSpec(
            name,
            task,  # type: ignore[arg-type]
            labels_of(examples) if task == "classify" else (),
            max_length=MAX_LENGTH,
            lora=LoraSettings(rank=rank),
        )
        self.key = read_private_key(keys / COORDINATOR_SIGNING_KEY, Ed25519PrivateKey)
        self.public = read_public_key(keys / COORDINATOR_SIGNING_PUB, Ed25519PublicKey)
        self.public_path = keys / COORDINATOR_SIGNING_PUB
        # cached_model is build_model behind a one-entry cache: apply_package (the device side) asks
        # for the model its package names and finds this one loaded, as on a running device.
        self.loaded, self.model_build_seconds = timed(lambda: cached_model(self.spec))
        manifest_spec = from_config(ModelSpec, to_config(self.spec, "model"), "model")
        self.model_warm = cached_model(manifest_spec) is self.loaded
        self.sample = random.Random(0).sample(examples, min(SAMPLE, len(examples)))

    def train_versions(self) -> dict[str, Any]:
        loaded = self.loaded
        load_trainable_state(loaded.model, loaded.initial_adapter)
        settings = TrainSettings(local_steps=LOCAL_STEPS, batch_size=BATCH_SIZE)
        first = train_locally(loaded, self.sample, settings, seed=1)
        self.a = trainable_state(loaded.model)
        second = train_locally(loaded, self.sample, settings, seed=2)
        self.b = trainable_state(loaded.model)
        self.delta = diff(self.b, self.a)
        return {
            "steps_per_version": LOCAL_STEPS,
            "batch_size": BATCH_SIZE,
            "learning_rate": settings.learning_rate,
            "loss_a": round(first.loss, 4),
            "loss_b": round(second.loss, 4),
            "seconds": round(first.seconds + second.seconds, 2),
            "delta_norm_share": round(relative_error(self.b, self.a), 4),  # ‖B − A‖ / ‖B‖
        }

    def store_versions(self) -> None:
        loaded = self.loaded
        self.storage = Storage.open(f"sqlite:///{self.scratch / 'coordinator.db'}")
        self.lineage = f"{self.name}-r{self.rank}"
        self.model_config = to_config(self.spec, "model")
        self.storage.versions.register_lineage(
            self.lineage, TENANT, self.model_config, loaded.base_sha256, loaded.base_bytes
        )
        versions = []
        for round_number, adapter in enumerate((loaded.initial_adapter, self.a, self.b)):
            versions.append(
                self.storage.versions.add(
                    NewVersion(
                        lineage=self.lineage,
                        parent_id=versions[-1].id if versions else None,
                        round=round_number,
                        base_model_sha256=loaded.base_sha256,
                        adapter=adapter,
                        participants={},
                        metrics={},
                    )
                )
            )
        self.v_a, self.v_b = versions[1].id, versions[2].id

    def codec_table(self) -> dict[str, list[dict[str, Any]]]:
        """Every codec on the full adapter B and on the delta B − A, as whole signed packages."""
        table: dict[str, list[dict[str, Any]]] = {}
        base_bytes = self.loaded.base_bytes
        for kind, payload_state, before, from_version in (
            ("full", self.b, None, None),
            ("delta", self.delta, self.a, self.v_a),
        ):
            rows = []
            for codec in LADDER:
                payload, seconds = timed(lambda c=codec, s=payload_state: encode(s, c))
                decoded = decode(payload, codec, max_bytes=inflated_bound(payload_state))
                rebuilt = apply_delta(before, decoded) if before is not None else decoded
                error = relative_error(self.b, rebuilt)
                package = sign(self._manifest(from_version, codec.name, payload, error), payload, self.key)
                size = len(package.to_bytes())
                rows.append(
                    {
                        "codec": codec.name,
                        "payload_bytes": len(payload),
                        "package_bytes": size,
                        "ratio": size / base_bytes,
                        "adapter_error": error,
                        "payload_error": relative_error(payload_state, decoded),
                        "encode_seconds": round(seconds, 4),
                    }
                )
            table[kind] = rows
        return table

    def _manifest(self, from_version: int | None, codec: str, payload: bytes, error: float) -> Manifest:
        """The manifest build_package would write for this payload (same fields, same sizes)."""
        created = utcnow()
        return Manifest(
            tenant=TENANT,
            lineage=self.lineage,
            model=self.model_config,
            base_sha256=self.loaded.base_sha256,
            base_bytes=self.loaded.base_bytes,
            from_version=from_version,
            to_version=self.v_b,
            sequence=self.v_b,
            created=utc_iso(created),
            expires=utc_iso(created + timedelta(days=7)),
            payload_sha256=sha256_hex(payload),
            payload_length=len(payload),
            codec=codec,
            reconstruction_error=error,
        )

    def builder_choices(self) -> dict[str, dict[str, Any]]:
        """What build_package picks, at the default cap and a tight one, for full and delta."""
        choices: dict[str, dict[str, Any]] = {}
        for cap in (MAX_CAP, TIGHT_CAP):
            entry: dict[str, Any] = {}
            for kind, from_version in (("full", None), ("delta", self.v_a)):
                try:
                    info, wall = timed(
                        lambda f=from_version, c=cap: build_package(
                            self.storage, self.v_b, f, self.key, PackagePolicy(cap=c)
                        )
                    )
                except PackageTooLarge as exc:
                    entry[kind] = {"refused": str(exc)}
                    continue
                entry[kind] = describe(info) | {"wall_seconds": round(wall, 4)}
                if cap == MAX_CAP:
                    self._write_package(f"{kind}-to-b.pkg", info)
            choices[f"cap {cap:g}"] = entry
        # The full package to A: what a new device receives before the delta A → B.
        self._write_package(
            "full-to-a.pkg", build_package(self.storage, self.v_a, None, self.key, PackagePolicy())
        )
        return choices

    def _write_package(self, name: str, info: PackageInfo) -> None:
        (self.scratch / name).write_bytes(self.storage.packages.blob(info.id))

    def device_apply(self, repeats: int) -> dict[str, Any]:
        """apply_package full A then delta A → B on fresh devices, against plain safetensors loads."""
        loaded = self.loaded
        files = {"a": self.scratch / "a.safetensors", "b": self.scratch / "b.safetensors"}
        files["a"].write_bytes(serialize(self.a))
        files["b"].write_bytes(serialize(self.b))
        times: dict[str, list[float]] = {k: [] for k in ("full", "delta", "base_a", "base_b", "health")}
        for repeat in range(repeats + 1):  # the first round warms caches and is dropped
            device = DeviceState(self.scratch / f"device-{repeat}")
            for kind, package in (("full", "full-to-a.pkg"), ("delta", "delta-to-b.pkg")):
                _, seconds = timed(lambda p=package, d=device: self._apply(p, d))
                times[kind].append(seconds)
            for version in ("a", "b"):
                _, seconds = timed(
                    lambda v=version: load_trainable_state(loaded.model, deserialize(files[v].read_bytes()))
                )
                times[f"base_{version}"].append(seconds)
            slots = UpdateSlots(device)
            active = slots.active()
            assert active is not None and active.version == self.v_b, "device did not end on version B"
            state = slots.load(active)
            path = slots.files.path(active.slot)
            _, seconds = timed(lambda s=state, a=active, p=path: health_check(loaded, s, a.adapter_sha256, p))
            times["health"].append(seconds)
        device_error = relative_error(self.b, state)
        result = {k: median(v[1:]) for k, v in times.items()}
        return {
            "repeats": repeats,
            "model_already_loaded": self.model_warm,
            "apply_full_seconds": round(result["full"], 4),
            "apply_delta_seconds": round(result["delta"], 4),
            "baseline_full_seconds": round(result["base_a"], 5),
            "baseline_delta_seconds": round(result["base_b"], 5),
            "full_over_baseline": round(result["full"] / result["base_a"], 1),
            "delta_over_baseline": round(result["delta"] / result["base_b"], 1),
            "health_check_seconds": round(result["health"], 4),
            # what verifying, decoding, writing (fsync) and switching cost beside the canary check
            "device_adapter_error": device_error,
            "baseline": "read the adapter's safetensors file, deserialize, load_trainable_state",
        }

    def _apply(self, package: str, device: DeviceState) -> None:
        with (self.scratch / package).open("rb") as stream:
            apply_package(stream, device, self.public, tenant=TENANT)

    def recovery(self) -> dict[str, Any]:
        """Kill an apply between fsync and rename, then time a restarted device coming back."""
        folder = self.scratch / "crash-device"
        device = DeviceState(folder)
        self._apply("full-to-a.pkg", device)
        env = dict(os.environ)
        killed = subprocess.run(
            [
                sys.executable,
                "-c",
                KILL_CHILD,
                str(folder),
                str(self.scratch / "delta-to-b.pkg"),
                str(self.public_path),
                TENANT,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        updates = folder / "updates"
        scratch_files = sorted(p.name for p in updates.glob(".*"))
        started = time.perf_counter()
        recovered = subprocess.run(
            [sys.executable, "-c", RECOVER_CHILD, str(folder)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        if recovered.returncode != 0:
            progress(f"recovery process failed:\n{recovered.stderr[-2000:]}")
        summary = json.loads(recovered.stdout.strip().splitlines()[-1]) if recovered.returncode == 0 else {}
        slots = UpdateSlots(device)
        active = slots.active()
        exact = (
            active is not None
            and active.version == self.v_a
            and all(torch.equal(slots.load(active)[n], self.a[n]) for n in self.a)
        )
        left = sorted(p.name for p in updates.glob(".*"))
        self._apply("delta-to-b.pkg", device)  # the device carries on: the same delta applies now
        after = slots.active()
        return {
            "killed_returncode": killed.returncode,
            "killed_at": killed.stdout.strip().splitlines()[-1] if killed.stdout.strip() else None,
            "killed_stderr_tail": killed.stderr.strip()[-300:] or None,
            "scratch_files_after_kill": scratch_files,
            "recovery_seconds": round(wall, 2),
            "recovery_returncode": recovered.returncode,
            "recovered": summary,
            "version_a": self.v_a,
            "version_b": self.v_b,
            "back_on_a_exactly": exact,
            "scratch_files_after_recovery": left,
            "delta_applies_after_recovery": after is not None and after.version == self.v_b,
            "target_seconds": RECOVERY_TARGET_SECONDS,
        }


def describe(info: PackageInfo) -> dict[str, Any]:
    return {
        "codec": info.codec,
        "package_bytes": info.package_bytes,
        "ratio": info.ratio,
        "reconstruction_error": info.reconstruction_error,
        "build_seconds": round(info.build_seconds, 4),
    }


def measure(name: str, rank: int, examples: list[Example], keys: Path, scratch: Path, args: Any) -> dict:
    progress(f"{name} r{rank}: building the model")
    bench = Bench(name, rank, examples, scratch, keys)
    loaded = bench.loaded
    progress(f"{name} r{rank}: {bench.model_build_seconds:.1f} s to build; training A and B")
    training = bench.train_versions()
    bench.store_versions()
    progress(f"{name} r{rank}: trained in {training['seconds']} s; encoding every codec")
    codecs = bench.codec_table()
    progress(f"{name} r{rank}: building packages")
    chosen = bench.builder_choices()
    progress(f"{name} r{rank}: applying packages on devices ({args.repeats} repeats)")
    apply = bench.device_apply(args.repeats)
    result: dict[str, Any] = {
        "model": name,
        "rank": rank,
        "task": bench.spec.task,
        "labels": len(bench.spec.labels),
        "base_bytes": loaded.base_bytes,
        "adapter_bytes": nbytes(bench.b),
        "adapter_ratio": nbytes(bench.b) / loaded.base_bytes,
        "trainable_params": loaded.trainable_params,
        "model_build_seconds": round(bench.model_build_seconds, 2),
        "training": training,
        "codecs": codecs,
        "chosen": chosen,
        "apply": apply,
    }
    if rank == max(args.ranks):
        progress(f"{name} r{rank}: kill mid-apply and time the recovery process")
        result["recovery"] = bench.recovery()
    return result


# ---- checks, tables, main ------------------------------------------------------------------------


def sanity(results: list[dict[str, Any]]) -> list[str]:
    """What in the numbers is not as it should be (empty: all checks hold)."""
    problems: list[str] = []
    for r in results:
        label = f"{r['model']} r{r['rank']}"
        for kind in ("full", "delta"):
            chosen = r["chosen"][f"cap {MAX_CAP:g}"][kind]
            if "refused" in chosen or chosen["ratio"] > MAX_CAP:
                problems.append(f"{label} {kind}: no package within {MAX_CAP:.0%} of the base model")
            rows = r["codecs"][kind]
            if rows[0]["adapter_error"] > (0 if kind == "full" else 1e-6):
                problems.append(f"{label} {kind}: fp32 error {rows[0]['adapter_error']:.2e} is not ~0")
            for upper, lower in itertools.pairwise(rows):
                if lower["payload_error"] < upper["payload_error"] * 0.999 - 1e-12:
                    problems.append(f"{label} {kind}: {lower['codec']} error below {upper['codec']}'s")
            same = [row for row in rows if row["codec"] == chosen.get("codec")]
            if same and abs(same[0]["package_bytes"] - chosen["package_bytes"]) > 32:
                problems.append(f"{label} {kind}: table and builder sizes differ for {chosen['codec']}")
        if r["apply"]["device_adapter_error"] > 1e-6:
            problems.append(f"{label}: the device's adapter differs from B")
        recovery = r.get("recovery")
        if recovery is not None:
            if recovery["killed_returncode"] != -9:
                problems.append(
                    f"{label}: the apply child was not SIGKILLed ({recovery['killed_returncode']})"
                )
            if (
                not recovery["back_on_a_exactly"]
                or recovery["recovered"].get("version") != recovery["version_a"]
            ):
                problems.append(f"{label}: the device did not come back on version A exactly")
            if recovery["recovery_seconds"] > RECOVERY_TARGET_SECONDS:
                problems.append(f"{label}: recovery took {recovery['recovery_seconds']} s")
    return problems


def show(results: list[dict[str, Any]]) -> None:
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 180)
    codecs = Table(title="package bytes / base-model bytes · relative L2 error of the rebuilt adapter")
    codecs.add_column("model", no_wrap=True)
    for codec in LADDER:
        codecs.add_column(codec.name.replace("+zstd", ""), justify="right")
    for r in results:
        for kind in ("full", "delta"):
            cells = [f"{row['ratio']:.3%} {row['adapter_error']:.0e}" for row in r["codecs"][kind]]
            codecs.add_row(f"{r['model']} r{r['rank']} {kind}", *cells)
    console.print(codecs)
    summary = Table(title="builder's choice, build, device apply and recovery")
    for column in (
        "model",
        f"cap {MAX_CAP:g} full",
        f"cap {MAX_CAP:g} delta",
        f"cap {TIGHT_CAP:g} full",
        f"cap {TIGHT_CAP:g} delta",
        "build s",
        "apply full / delta s",
        "baseline s",
        "apply/base",
        "recovery s",
    ):
        summary.add_column(column, justify="right")
    for r in results:
        cells = []
        for cap in (MAX_CAP, TIGHT_CAP):
            for kind in ("full", "delta"):
                c = r["chosen"][f"cap {cap:g}"][kind]
                cells.append(
                    "refused" if "refused" in c else f"{c['codec'].replace('+zstd', '')} {c['ratio']:.3%}"
                )
        default = r["chosen"][f"cap {MAX_CAP:g}"]
        builds = [default[k]["build_seconds"] for k in ("full", "delta") if "build_seconds" in default[k]]
        a = r["apply"]
        recovery = r.get("recovery")
        summary.add_row(
            f"{r['model']} r{r['rank']}",
            *cells,
            " / ".join(f"{b:.2f}" for b in builds),
            f"{a['apply_full_seconds']:.3f} / {a['apply_delta_seconds']:.3f}",
            f"{a['baseline_full_seconds']:.4f}",
            f"{a['full_over_baseline']:g}× / {a['delta_over_baseline']:g}×",
            f"{recovery['recovery_seconds']:.1f} (v{recovery['recovered'].get('version')})"
            if recovery
            else "",
        )
    console.print(summary)


def report(
    args: Any, results: list[dict[str, Any]], data: dict[str, str], load_before: float, wall: float
) -> dict:
    problems = sanity(results)
    first = results[0]  # the headline: the first model at its first rank
    recoveries = [r["recovery"]["recovery_seconds"] for r in results if "recovery" in r]
    return {
        "benchmark": "packages",
        "command": shlex.join(sys.orig_argv),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "headline": {
            "model": first["model"],
            "rank": first["rank"],
            "apply_delta_seconds": first["apply"]["apply_delta_seconds"],
            "baseline_delta_seconds": first["apply"]["baseline_delta_seconds"],
            "delta_over_baseline": first["apply"]["delta_over_baseline"],
            "recovery_seconds_worst": max(recoveries) if recoveries else None,
        },
        "setup": {
            "models": {
                "smollm2": "SmolLM2-135M-Instruct (causal LM), LoRA on its default targets (q_proj, v_proj)",
                "minilm": "all-MiniLM-L6-v2, LoRA on query,value, 77-class BANKING77 head (mean pooling)",
            },
            "data": data,
            "sample": SAMPLE,
            "local_steps_per_version": LOCAL_STEPS,
            "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH,
            "lora_alpha": LoraSettings().alpha,
            "caps": [MAX_CAP, TIGHT_CAP],
            "ladder": [c.name for c in LADDER],
            "tenant": TENANT,
        },
        "results": results,
        "sanity_problems": problems,
        "notes": (
            "ratio: the whole signed package (header, manifest, signature, payload) over the base "
            "model's bytes (fp32 weights, tied ones once). adapter_error: relative L2 of the adapter a "
            "device rebuilds (decoded payload, plus A for the delta) against the true B; payload_error: "
            "the same against the payload itself. Per-codec packages are signed with the same manifest "
            "fields as build_package; 'chosen' comes from build_package itself, whose "
            "build_seconds is the build time (encode + decode + sign per codec tried, store). Apply "
            "times are medians over fresh device folders with the model already loaded (a running "
            "device); they include reading the package file, signature and claim checks, decoding, "
            "writing the slot with fsync, the health check (read back, hash, load, one canary forward "
            "pass) and the pointer switch. Recovery is measured once per model at its largest rank: "
            "the wall time of a fresh Python process (start, imports, model load, health check)."
        ),
        "wall_seconds": round(wall, 1),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": {**machine(), "arch": platform.machine()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load_before_after(load_before),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=lambda v: parse_list(v, tuple(MODELS)),
        default=DEFAULT_MODELS,
        help="comma-separated (default smollm2,minilm; tiny for tests)",
    )
    parser.add_argument("--ranks", type=parse_ranks, default=list(RANKS), help="LoRA ranks (default 4,8,16)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh devices per apply timing (default 5)")
    parser.add_argument("--json", type=Path, help=f"JSON to write (default {RESULTS / 'packages.json'})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"{QUICK}; results/quick/packages.json")
    mode.add_argument("--smoke", action="store_true", help=f"{SMOKE}; nothing written")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else QUICK if args.quick else {}).items():
        setattr(args, name, value)
    if not args.smoke:
        args.json = args.json or default_path("packages", args.quick, RESULTS)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    started = time.perf_counter()
    load_before = load_average()
    results: list[dict[str, Any]] = []
    data: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fleetlora-packages-") as tmp:
        keys = Path(tmp) / "keys"
        init_keys(keys)
        for name in args.models:
            _, path = MODELS[name]
            source = str(path) if path.is_file() else "builtin"
            data[name] = source
            examples = load_examples(source)
            for rank in args.ranks:
                scratch = Path(tmp) / f"{name}-r{rank}"
                scratch.mkdir()
                results.append(measure(name, rank, examples, keys, scratch, args))
                result = report(args, results, data, load_before, time.perf_counter() - started)
                if args.json is not None:
                    write_json(result, args.json)
    show(results)
    for problem in result["sanity_problems"]:
        progress(f"CHECK FAILED: {problem}")
    progress(f"done in {result['wall_seconds']} s; wrote {args.json or 'nothing'}")
    emit(result)  # written after each measurement above
    return result


if __name__ == "__main__":
    main()
