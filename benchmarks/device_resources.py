"""What training costs a device: peak memory with and without gradient checkpointing, loads (issue 17).

Each measurement runs in a fresh Python (this script's ``--worker``), so one arm's peak never hides in
another's high-water mark.

- **Training memory**, for ``minilm`` (all-MiniLM-L6-v2 classifying BANKING77's 77 intents) and ``smollm2``
  (SmolLM2-135M as a causal LM on the same text), both in the ``lora`` regime (r = 8): ``train_locally`` with
  the real model and settings, ``--batch-size`` sequences of exactly ``--max-length`` tokens (consecutive
  BANKING77 utterances joined until they fill it: one utterance averages 13 MiniLM tokens, so a batch of
  single ones would be mostly padding-free and far shorter than a device's ``max_length`` allows). The
  worker loads the model, takes one warm-up step (a ``train_locally`` of one step: the same code paths,
  allocations and lazily built kernels), returns freed heap to the OS (``malloc_trim``), resets the RSS
  high-water mark (``/proc/self/clear_refs``) and reads the RSS; then it trains ``--steps`` steps.
  ``training_mb`` is the high-water (``VmHWM``) during them less that RSS: gradients, optimizer state and
  activations, what checkpointing is meant to cut. ``memory_reduction`` = 1 − on / off; ``time_cost`` =
  step seconds on / off. ``estimate`` is :func:`fleetlora.client.memory.estimate_peak` for the same
  shape; ``estimate_training_mb`` (its parts less the weights) is what ``training_mb`` measures.
- **DP composes**: MiniLM under DP-SGD (Opacus, σ = 1, Poisson batches of expected ``--batch-size``) with
  checkpointing on and off: both run, with their peaks.
- **Adapter load**: a MiniLM r = 8 adapter and head (trained two steps), written into a device's update
  slot and pointer as ``apply_package`` leaves them, loaded into the running model by
  :func:`fleetlora.client.updates.load_active_adapter` (pointer recovery, slot hash check, read, copy):
  the median wall time of ``--repeats`` loads (target ≤ 200 ms), and the function's own figure.
- **Base-model cold load**: ``build_model(spec)`` in a fresh Python for each model (imports timed apart);
  the OS file cache is warm, as on a device that ran the model before.
- **Pause latency**: a MiniLM round of 10 steps at low priority (``nice`` 10, one thread) with the default
  gates on the real sensors (psutil); right after the pacer's look before step 2, one busy process per
  core starts, for 3 s. ``latency_steps`` is the step the round paused before less 2: 1 means it paused
  at the end of the step in progress (target: within one step); and when it resumed after the spike.
- **Foreground share**: one busy process per core for 10 s (the foreground) beside a process training
  MiniLM steps, at ``nice`` 0 and at ``nice`` 10 (:func:`fleetlora.client.pacing.low_priority`):
  ``taken`` is training's share of the CPU time the two got, from the kernel's accounting.

Run from the repository root (about 5 minutes on 2 cores, most of it SmolLM2's steps;
``--smoke``: the tiny model on the built-in corpus, seconds, nothing written; ``--quick``, what ``make
bench`` runs: MiniLM only, 2 steps, 5 adapter loads, 3 s of foreground, written to
benchmarks/results/quick/device_resources.json)::

    .venv/bin/python benchmarks/device_resources.py [--smoke] [--models minilm,smollm2] [--json PATH]
        [--batch-size 16] [--max-length 64] [--steps 3] [--repeats 20]

Data: ``../shared/data/banking77/train.csv`` (the built-in corpus without it, said in the result). Progress
goes to stderr; the JSON result (also written to ``--json``, and by a full run to
benchmarks/results/device_resources.json) is the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_io import default_path, emit, load_average, machine

REPO = Path(__file__).resolve().parents[1]
BANKING77 = REPO.parent / "shared" / "data" / "banking77" / "train.csv"
MODELS = ("minilm", "smollm2")
DP_MODEL = "minilm"
MEMORY_REDUCTION_TARGET = (0.30, 0.50)
ADAPTER_LOAD_TARGET_MS = 200.0
MIB = 2**20


def progress(message: str) -> None:
    print(f"[device_resources {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def in_process(*args: str) -> dict[str, Any]:
    """This script's ``--worker`` in a fresh Python: its JSON (the last line of its stdout)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the parent: one section after another, each measurement in a fresh process ---------------------


def training_memory(models: list[str], shape: dict[str, Any]) -> dict[str, Any]:
    """Per model: the training peak and step time without and with checkpointing, and the estimate's."""
    found: dict[str, Any] = {}
    for model in models:
        arms = {}
        for on in (False, True):
            progress(f"{model}: training, checkpointing {'on' if on else 'off'} (a fresh process)")
            arms["on" if on else "off"] = in_process("train", model, str(int(on)), "0", json.dumps(shape))
        off, on_ = arms["off"], arms["on"]
        found[model] = {
            "without_checkpointing": off,
            "with_checkpointing": on_,
            "memory_reduction": round(1 - on_["training_mb"] / off["training_mb"], 3),
            "peak_rss_reduction": round(1 - on_["peak_mb"] / off["peak_mb"], 3),
            "time_cost": round(on_["step_seconds"] / off["step_seconds"], 3),
        }
    return found


def dp_composes(model: str, shape: dict[str, Any]) -> dict[str, Any]:
    """DP-SGD (Opacus) with checkpointing on and off: that both run, and their peaks."""
    arms = {}
    for on in (False, True):
        progress(f"{model}: DP-SGD, checkpointing {'on' if on else 'off'} (a fresh process)")
        arms["on" if on else "off"] = in_process("train", model, str(int(on)), "1", json.dumps(shape))
    return {
        "model": model,
        "without_checkpointing": arms["off"],
        "with_checkpointing": arms["on"],
        "ran": all(a["steps"] == shape["steps"] for a in arms.values()),
        "memory_reduction": round(1 - arms["on"]["training_mb"] / arms["off"]["training_mb"], 3),
    }


def adapter_load(model: str, shape: dict[str, Any], repeats: int) -> dict[str, Any]:
    progress(f"{model}: adapter load from the device's active slot, {repeats} times (a fresh process)")
    return in_process("adapter", model, str(repeats), json.dumps(shape))


def cold_load(models: list[str], shape: dict[str, Any]) -> dict[str, Any]:
    found = {}
    for model in models:
        progress(f"{model}: base model cold load (a fresh process)")
        clock = time.perf_counter()
        found[model] = in_process("cold", model, json.dumps(shape))
        found[model]["process_seconds"] = round(time.perf_counter() - clock, 2)
    return found


def pause_latency(model: str, shape: dict[str, Any], steps: int, sensors: str) -> dict[str, Any]:
    progress(f"{model}: pause after a foreground spike, {sensors} sensors (a fresh process)")
    return in_process("pause", model, str(steps), sensors, json.dumps(shape))


def foreground_share(model: str, shape: dict[str, Any], seconds: float) -> dict[str, Any]:
    """How much CPU training takes from a CPU-bound foreground, at normal and at low priority.

    The foreground is one busy process per core: the machine saturated, as a device in use. ``taken`` is
    training's share of the CPU time the two got in the window, read from the kernel's accounting (the
    trainer's by psutil, the foreground's by its own ``process_time``): unlike loop counts against an
    earlier "alone" window, it does not move with the time a virtual machine's host steals.
    ``foreground_work`` (loop iterations) against ``alone`` is shown beside it.
    """
    import psutil

    cores = os.cpu_count() or 1
    progress(f"foreground alone: {cores} busy processes, {seconds:g} s")
    alone = _foreground_work(cores, seconds)
    found: dict[str, Any] = {"foreground_processes": cores, "seconds": seconds, "alone": alone["iterations"]}
    for nice in (0, 10):
        progress(f"{model}: training at nice {nice} beside the foreground (a fresh process)")
        trainer = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "trainer", model, str(nice),
             str(seconds + 30), json.dumps(shape)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert trainer.stdout is not None
        ready = trainer.stdout.readline().strip()  # printed once the model is loaded and warm
        if ready != "ready":
            trainer.kill()
            raise RuntimeError(f"the trainer did not start: {ready!r}")
        before = sum(psutil.Process(trainer.pid).cpu_times()[:2])  # user + system, every thread
        work = _foreground_work(cores, seconds)
        training_cpu = sum(psutil.Process(trainer.pid).cpu_times()[:2]) - before
        trainer.terminate()
        trainer.wait()
        found[f"nice_{nice}"] = {
            "training_cpu_seconds": round(training_cpu, 2),
            "foreground_cpu_seconds": round(work["cpu_seconds"], 2),
            "taken": round(training_cpu / (training_cpu + work["cpu_seconds"]), 3),
            "foreground_work": work["iterations"],
            "work_vs_alone": round(work["iterations"] / alone["iterations"], 3),
        }
    found["taken_low_vs_normal"] = round(found["nice_10"]["taken"] / max(found["nice_0"]["taken"], 1e-9), 3)
    return found


def _foreground_work(processes: int, seconds: float) -> dict[str, float]:
    """What ``processes`` busy Pythons (this script's ``burn`` worker) got done in ``seconds``: loop
    iterations and CPU seconds, summed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "burn", "-", str(seconds)]
    burners = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    done = [json.loads(b.communicate()[0].strip().splitlines()[-1]) for b in burners]
    return {key: sum(d[key] for d in done) for key in ("iterations", "cpu_seconds")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="Tiny model, built-in corpus; nothing written.")
    mode.add_argument("--quick", action="store_true", help="MiniLM only, 2 steps, 5 loads; results/quick/.")
    parser.add_argument("--models", default=",".join(MODELS), help="Comma-separated, from minilm, smollm2.")
    parser.add_argument("--batch-size", type=int, default=16, help="Sequences per training step.")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per sequence (each is filled).")
    parser.add_argument("--steps", type=int, default=3, help="Measured training steps per arm.")
    parser.add_argument("--repeats", type=int, default=20, help="Adapter loads timed.")
    parser.add_argument("--json", type=Path, help="Also write the result here (a full run: results/).")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    if min(args.batch_size, args.steps, args.repeats) < 1 or not 8 <= args.max_length <= 4096:
        parser.error("--batch-size, --steps and --repeats must be >= 1, --max-length in [8, 4096].")
    if args.quick:
        args.models, args.steps, args.repeats = "minilm", 2, 5
    models = ["tiny"] if args.smoke else args.models.split(",")
    if unknown := set(models) - {"tiny", *MODELS}:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    data = "builtin" if args.smoke or not BANKING77.is_file() else str(BANKING77)
    shape = {"batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps, "data": data}
    if args.smoke:
        shape.update(batch_size=4, max_length=32, steps=2)
        args.repeats = 5
    json_path = args.json or (None if args.smoke else default_path("device_resources", args.quick))
    result: dict[str, Any] = {
        "benchmark": "device_resources",
        "command": shlex.join(
            ["python", "benchmarks/device_resources.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {**machine(), "load_average_before": load_average()},
        "shape": shape | {"regime": "lora", "lora_rank": 8},
    }
    adapter_model = "tiny" if args.smoke else "minilm"
    dp_model = "tiny" if args.smoke else DP_MODEL
    memory = training_memory(models, shape)
    result["training_memory"] = memory
    result["dp_with_checkpointing"] = dp_composes(dp_model, shape)
    result["adapter_load"] = adapter_load(adapter_model, shape, args.repeats)
    result["cold_load"] = cold_load(models, shape)
    # The smoke run's spike is a sensor file: on a machine busy with other tests the real foreground
    # load could keep the gate closed, and the smoke checks the plumbing, not the machine.
    result["pause"] = pause_latency(
        adapter_model, shape, 300 if args.smoke else 10, "file" if args.smoke else "psutil"
    )
    result["foreground_share"] = foreground_share(
        adapter_model, shape, 1.5 if args.smoke else 3.0 if args.quick else 10.0
    )
    reductions = {m: r["memory_reduction"] for m, r in memory.items()}
    load_ms = result["adapter_load"]["median_ms"]
    result["targets"] = {
        "memory_reduction": list(MEMORY_REDUCTION_TARGET),
        "adapter_load_ms": ADAPTER_LOAD_TARGET_MS,
        "pause_latency_steps": 1,
    }
    result["met"] = {
        "memory_reduction": all(r >= MEMORY_REDUCTION_TARGET[0] for r in reductions.values()),
        "adapter_load_ms": load_ms <= ADAPTER_LOAD_TARGET_MS,
        "dp_with_checkpointing_ran": result["dp_with_checkpointing"]["ran"],
        "pause_within_one_step": result["pause"]["latency_steps"] <= 1,
        "low_priority_takes_less": result["foreground_share"]["taken_low_vs_normal"] < 1,
    }
    result["memory_reduction"] = reductions
    result["adapter_load_ms"] = load_ms
    result["pause_latency_steps"] = result["pause"]["latency_steps"]
    result["foreground_taken"] = {k: result["foreground_share"][k]["taken"] for k in ("nice_0", "nice_10")}
    result["machine"]["load_average_after"] = load_average()
    emit(result, json_path)
    return result


# ---- the worker: one measurement in a fresh Python ---------------------------------------------------


def worker(argv: list[str]) -> dict[str, Any]:
    what, model, *rest = argv
    if what == "train":
        on, dp, shape = rest
        measured = _train_arm(model, on == "1", dp == "1", json.loads(shape))
    elif what == "adapter":
        repeats, shape = rest
        measured = _adapter_arm(model, int(repeats), json.loads(shape))
    elif what == "pause":
        steps, sensors, shape = rest
        measured = _pause_arm(model, int(steps), sensors, json.loads(shape))
    elif what == "trainer":
        nice, seconds, shape = rest
        measured = _trainer(model, int(nice), float(seconds), json.loads(shape))
    elif what == "burn":
        measured = _burn(float(rest[0]))
    else:
        measured = _cold_arm(model, json.loads(rest[0]))
    print(json.dumps(measured))
    return measured


def _memory_mb() -> dict[str, float]:
    """This process's RSS and its high-water mark (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def _settle_and_reset() -> float:
    """Return freed heap to the OS, reset the high-water mark to the RSS, and return that RSS (MiB)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed small blocks otherwise
    Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := VmRSS
    return _memory_mb()["VmRSS"]


def _spec(model: str, shape: dict[str, Any], examples: list[Any]) -> Any:
    from fleetlora.common.config import ModelSpec
    from fleetlora.common.data.examples import labels_of

    if model == "smollm2":
        return ModelSpec(name=model, task="causal-lm", max_length=shape["max_length"], regime="lora")
    return ModelSpec(
        name=model, task="classify", labels=labels_of(examples), max_length=shape["max_length"], regime="lora"
    )


def _filled(loaded: Any, examples: list[Any], count: int) -> list[Any]:
    """``count`` texts of at least ``max_length`` tokens: consecutive utterances joined, the first's label."""
    from fleetlora.common.data import Example

    lengths = [
        len(ids)
        for ids in loaded.tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
    ]
    filled: list[Any] = []
    texts: list[str] = []
    tokens = 0
    for example, length in itertools.cycle(zip(examples, lengths, strict=True)):
        if not texts:
            label = example.label if loaded.spec.task == "classify" else None
        texts.append(example.text)
        tokens += length
        if tokens >= loaded.spec.max_length:
            filled.append(Example(text=" ".join(texts), label=label))
            if len(filled) == count:
                return filled
            texts, tokens = [], 0
    raise AssertionError("unreachable: itertools.cycle never ends")


def _loaded(model: str, shape: dict[str, Any]) -> tuple[Any, list[Any]]:
    from fleetlora.common.data import load_examples
    from fleetlora.common.model import build_model

    examples = load_examples(shape["data"])
    return build_model(_spec(model, shape, examples)), examples


def _train_arm(model: str, checkpointing: bool, dp: bool, shape: dict[str, Any]) -> dict[str, Any]:
    from fleetlora.client.memory import MIB, estimate_peak
    from fleetlora.client.train import NoisePlan, Runtime, train_locally
    from fleetlora.common.batches import encode
    from fleetlora.common.config import TrainSettings

    before_model = _memory_mb()["VmRSS"]
    loaded, examples = _loaded(model, shape)
    model_mb = _memory_mb()["VmRSS"] - before_model
    batch, steps = shape["batch_size"], shape["steps"]
    pool = _filled(loaded, examples, 8 * batch)  # a DP round samples 1 in 8 of them a step
    noise = NoisePlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / 8) if dp else None
    runtime = Runtime(checkpointing=checkpointing)

    def train(local_steps: int) -> Any:
        settings = TrainSettings(local_steps=local_steps, batch_size=batch)
        return train_locally(loaded, pool, settings, seed=1, noise=noise, runtime=runtime)

    train(1)  # the warm-up step
    baseline = _settle_and_reset()
    done = train(steps)
    peak = _memory_mb()["VmHWM"]
    estimate = estimate_peak(
        loaded, batch_size=batch, seq_len=loaded.spec.max_length, dp=dp, checkpointing=checkpointing
    )
    seq_len = encode(loaded, pool[:batch])["input_ids"].shape[1]  # every batch is this long
    return {
        "checkpointing": checkpointing,
        "dp": dp,
        "steps": done.steps,
        "seq_len": seq_len,
        "step_seconds": round(done.seconds / done.steps, 3),
        "loss": round(done.loss, 4),
        "model_rss_mb": round(model_mb, 1),
        "rss_before_steps_mb": round(baseline, 1),
        "peak_mb": round(peak, 1),
        "training_mb": round(peak - baseline, 1),
        "estimate": estimate.mib(),
        "estimate_training_mb": round((estimate.total - estimate.weights) / MIB, 1),
    }


def _adapter_arm(model: str, repeats: int, shape: dict[str, Any]) -> dict[str, Any]:
    from fleetlora.client.device_state import DeviceState
    from fleetlora.client.train import train_locally
    from fleetlora.client.updates import ActiveAdapter, UpdateSlots, load_active_adapter
    from fleetlora.common.config import TrainSettings, to_config
    from fleetlora.common.delta import load_trainable_state, nbytes, serialize, sha256_hex, trainable_state

    loaded, examples = _loaded(model, shape)
    train_locally(loaded, examples[:64], TrainSettings(local_steps=2, batch_size=8), seed=1)
    adapter = trainable_state(loaded.model)
    with tempfile.TemporaryDirectory(prefix="fleetlora-device-") as scratch:
        device = DeviceState(Path(scratch) / "device")
        slots = UpdateSlots(device)
        sha = slots.write_slot("slot-a", adapter)
        slots.switch(
            ActiveAdapter(
                generation=1,
                slot="slot-a",
                version=1,
                sequence=1,
                adapter_sha256=sha,
                base_sha256=loaded.base_sha256,
                tenant="bench",
                lineage="bench",
                model=to_config(loaded.spec, "model"),
                codec="fp32",
                reconstruction_error=0.0,
                applied_at="2026-01-01T00:00:00+00:00",
            )
        )
        walls, own = [], []
        for _ in range(repeats):
            load_trainable_state(loaded.model, loaded.initial_adapter)  # another adapter in the model first
            clock = time.perf_counter()
            own.append(load_active_adapter(device, loaded))
            walls.append(time.perf_counter() - clock)
        loaded_right = sha256_hex(serialize(trainable_state(loaded.model))) == sha256_hex(serialize(adapter))
        slot_bytes = slots.files.path("slot-a").stat().st_size
    return {
        "model": model,
        "adapter_bytes": nbytes(adapter),
        "slot_file_bytes": slot_bytes,
        "repeats": repeats,
        "median_ms": round(1000 * statistics.median(walls), 3),
        "max_ms": round(1000 * max(walls), 3),
        "read_and_copy_median_ms": round(1000 * statistics.median(own), 3),
        "measured": "load_active_adapter(device, loaded): pointer recovery, slot hash check, read, copy",
        "adapter_loaded": loaded_right,
    }


def _cold_arm(model: str, shape: dict[str, Any]) -> dict[str, Any]:
    clock = time.perf_counter()
    from fleetlora.common.data import load_examples
    from fleetlora.common.model import build_model

    imports = time.perf_counter() - clock
    spec = _spec(model, shape, load_examples(shape["data"]))
    clock = time.perf_counter()
    loaded = build_model(spec)
    return {
        "build_model_seconds": round(time.perf_counter() - clock, 3),
        "import_seconds": round(imports, 3),
        "base_model_bytes": loaded.base_bytes,
        "rss_mb": round(_memory_mb()["VmRSS"], 1),
    }


def _pause_arm(model: str, steps: int, sensors: str, shape: dict[str, Any]) -> dict[str, Any]:
    """A round at low priority under the default gates; before step 2 the foreground spikes for 3 s: the
    step the pacer paused before, and when. ``sensors``: "psutil", the real ones against one busy
    process per core; "file", a sensor file that says so (the smoke run). Given up after 2 minutes."""
    import threading

    from fleetlora.client.gates import FileSensors, Gates, PsutilSensors
    from fleetlora.client.pacing import Pacer, RoundAbandoned, low_priority
    from fleetlora.client.train import Runtime, train_locally
    from fleetlora.common.config import TrainSettings
    from fleetlora.common.device_settings import DeviceSettings

    spike_at, spike_seconds = 2, 3.0
    loaded, examples = _loaded(model, shape)
    pool = _filled(loaded, examples, 4 * shape["batch_size"])
    settings = DeviceSettings()
    scratch = Path(tempfile.mkdtemp(prefix="fleetlora-sensors-")) / "sensors.json"
    scratch.write_text('{"foreground_load": 0.0}')
    source = FileSensors(scratch) if sensors == "file" else PsutilSensors()
    pacer = Pacer(Gates(settings, source), steps=steps, deadline=time.time() + 120)
    spike: dict[str, Any] = {}
    looked: dict[int, float] = {}
    step_started: dict[int, float] = {}

    def start() -> list[subprocess.Popen[bytes]]:
        if sensors == "file":
            scratch.write_text('{"foreground_load": 0.9}')
            return []
        return [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)
        ]

    def stop(burners: list[subprocess.Popen[bytes]]) -> None:
        scratch.write_text('{"foreground_load": 0.0}')
        for b in burners:
            b.kill()
            b.wait()
        spike["stopped"] = time.perf_counter()

    def between_steps(taken: int) -> None:
        looked[taken] = time.perf_counter()  # a pause before this step begins here
        pacer(taken)  # the look first: the spike starts right after it, the worst case
        step_started[taken] = time.perf_counter()
        if taken == spike_at:
            burners = start()
            spike["started"] = time.perf_counter()
            threading.Timer(spike_seconds, stop, args=(burners,)).start()

    try:
        with low_priority(settings) as threads:
            done = train_locally(
                loaded,
                pool,
                TrainSettings(local_steps=steps, batch_size=shape["batch_size"]),
                seed=1,
                runtime=Runtime(between_steps=between_steps),
            )
    except RoundAbandoned as exc:  # the machine stayed busy: said, not hidden
        return {"steps": exc.steps_taken, "paused": bool(pacer.paused_at), "latency_steps": steps,
                "given_up": str(exc), "spike_before_step": spike_at}  # fmt: skip
    after_spike = [taken for taken in pacer.paused_at if taken > spike_at]  # not a pause the machine caused
    if not after_spike:
        return {"steps": done.steps, "paused": False, "latency_steps": steps, "spike_before_step": spike_at}
    paused_before = after_spike[0]
    resumed = step_started[paused_before]
    return {
        "steps": done.steps,
        "paused": True,
        "train_threads": threads,
        "nice": settings.nice,
        "step_seconds": round(done.seconds / max(done.steps, 1), 3),
        "spike_before_step": spike_at,
        "paused_before_step": paused_before,
        "latency_steps": paused_before - spike_at,
        "spike_to_pause_seconds": round(looked[paused_before] - spike["started"], 3),
        "paused_seconds": round(pacer.paused_seconds, 2),
        "resumed_after_foreground_stopped_seconds": round(resumed - spike["stopped"], 2),
        "pauses": pacer.pauses,
        "sensors": sensors,
    }


def _trainer(model: str, nice: int, seconds: float, shape: dict[str, Any]) -> dict[str, Any]:
    """Train one-step rounds at ``nice`` for up to ``seconds`` (the parent stops it sooner); "ready" first."""
    from fleetlora.client.pacing import low_priority
    from fleetlora.client.train import train_locally
    from fleetlora.common.config import TrainSettings
    from fleetlora.common.device_settings import DeviceSettings

    loaded, examples = _loaded(model, shape)
    pool = _filled(loaded, examples, 4 * shape["batch_size"])
    settings = TrainSettings(local_steps=1, batch_size=shape["batch_size"])
    train_locally(loaded, pool, settings, seed=1)  # warm
    steps = 0
    with low_priority(DeviceSettings(nice=nice)):
        print("ready", flush=True)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            steps += train_locally(loaded, pool, settings, seed=steps).steps
    return {"steps": steps}


def _burn(seconds: float) -> dict[str, Any]:
    """A busy loop for ``seconds``: the iterations it got done (a foreground's work) and its CPU time."""
    iterations = 0
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10_000):
            pass
        iterations += 10_000
    return {"iterations": iterations, "cpu_seconds": time.process_time() - cpu}


if __name__ == "__main__":
    main()
