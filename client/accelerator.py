"""Where a device trains: CUDA, Apple MPS, Intel XPU or the CPU, and whether in mixed precision.

``accelerator = "auto"`` takes the first of CUDA, MPS and XPU that torch can use, else the CPU. An
override naming one that is not there (a CPU-only torch build, no driver, a probe that fails) trains on
the CPU and logs a warning that says what was asked and why it is not there: a device must keep
training, more slowly, rather than stop. Every question put to torch goes through :class:`Probes`, so
tests can pretend a GPU exists, or that it fails.

Mixed precision is bf16 autocast, never fp16: fp16 needs gradient scaling, which local training does not
do. ``"auto"`` uses it on CUDA GPUs with native bf16 (compute capability 8 and up; older ones would
emulate it, more slowly than fp32) and on Intel XPUs that support it. Apple MPS trains in fp32: its bf16
support depends on the macOS version, and kernels such as scaled-dot-product attention refuse it on some
(pytorch/pytorch#141864, executorch-examples#115); there is no MPS machine here to prove it safe. The CPU
trains in fp32 too: bf16 autocast is slower than fp32 on CPUs without AMX. ``"on"`` asks for bf16 and
falls back to fp32 with a warning where it is not supported; ``"off"`` is fp32 throughout.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from fleetlora.common import records
from fleetlora.common.device_settings import DeviceSettings

log = logging.getLogger(__name__)

AUTO_ORDER = ("cuda", "mps", "xpu")  # tried in this order; the CPU is the fallback


@dataclass(frozen=True)
class Probe:
    """The questions asked of torch about one kind of accelerator (only once ``available`` says yes)."""

    available: Callable[[], bool]
    name: Callable[[], str]
    memory_bytes: Callable[[], int]
    bf16: Callable[[], bool]  # native bf16 autocast that training may use
    missing: Callable[[], str]  # why it is not available, for the warning


def _cuda_probe() -> Probe:
    def missing() -> str:
        if torch.version.cuda is None and torch.version.hip is None:
            return (
                f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"
            )
        return "torch sees no CUDA GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"

    return Probe(
        available=torch.cuda.is_available,
        name=lambda: torch.cuda.get_device_name(),
        memory_bytes=lambda: torch.cuda.get_device_properties().total_memory,
        bf16=lambda: torch.cuda.is_bf16_supported(including_emulation=False),
        missing=missing,
    )


def _mps_probe() -> Probe:
    def missing() -> str:
        if not torch.backends.mps.is_built():
            return f"this torch build ({torch.__version__}) has no MPS support: MPS is torch on macOS"
        return "MPS is not available: it needs macOS 12.3 or later on Apple silicon"

    return Probe(
        available=torch.backends.mps.is_available,
        name=lambda: "Apple GPU",
        memory_bytes=torch.mps.recommended_max_memory,  # its share of the unified memory
        bf16=lambda: False,  # see the module docstring
        missing=missing,
    )


def _xpu_probe() -> Probe:
    def missing() -> str:
        if not torch.xpu._is_compiled():
            return f"this torch build ({torch.__version__}) has no XPU support: install an XPU build of torch"
        return "torch sees no Intel XPU: check its GPU driver (Level Zero) and ZE_AFFINITY_MASK"

    return Probe(
        available=torch.xpu.is_available,
        name=lambda: torch.xpu.get_device_name(),
        memory_bytes=lambda: torch.xpu.get_device_properties().total_memory,
        bf16=lambda: torch.xpu.is_bf16_supported(including_emulation=False),
        missing=missing,
    )


def _cpu_name() -> str:
    """The CPU's model as the OS names it (Linux: /proc/cpuinfo), else its architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


@dataclass(frozen=True)
class Probes:
    """torch's answers by default; tests pass their own."""

    cuda: Probe = field(default_factory=_cuda_probe)
    mps: Probe = field(default_factory=_mps_probe)
    xpu: Probe = field(default_factory=_xpu_probe)
    cpu_name: Callable[[], str] = _cpu_name
    ram_bytes: Callable[[], int] = lambda: psutil.virtual_memory().total


@dataclass(frozen=True)
class Accelerator:
    """Where training runs and in which precision (see the module docstring)."""

    kind: str  # "cuda" | "mps" | "xpu" | "cpu"
    device: torch.device
    name: str  # the GPU's name, or the CPU's model
    memory_bytes: int  # the accelerator's total memory; the machine's RAM for the CPU
    autocast: torch.dtype | None  # bf16 autocast, or None: fp32 throughout


def select_accelerator(settings: DeviceSettings, probes: Probes | None = None) -> Accelerator:
    """The accelerator ``settings`` ask for where it works, else the CPU (with a warning); never raises
    for a missing or failing accelerator."""
    probes = probes or Probes()
    wanted = AUTO_ORDER if settings.accelerator == "auto" else (settings.accelerator,)
    for kind in wanted:
        if kind == "cpu":
            break
        found = _usable(kind, getattr(probes, kind), settings)
        if found is not None:
            return found
    return _cpu(probes, settings)


def _usable(kind: str, probe: Probe, settings: DeviceSettings) -> Accelerator | None:
    """``kind`` if torch can use it, else None; an asked-for one that is missing is logged."""
    asked = settings.accelerator == kind
    try:  # a broken driver raises from any of these (RuntimeError, AssertionError, OSError...)
        if not probe.available():
            if asked:
                log.warning(
                    'accelerator = "%s" was asked for, but %s: training on the CPU.', kind, probe.missing()
                )
            return None
        name, memory = probe.name(), int(probe.memory_bytes())
        bf16 = probe.bf16()
    except Exception as exc:
        log.warning(
            "%s reports a device that cannot be used (%s: %s): %s.",
            kind,
            type(exc).__name__,
            exc,
            "training on the CPU" if asked else "trying the next accelerator",
        )
        return None
    return Accelerator(kind, torch.device(kind), name, memory, _autocast(settings, kind, name, bf16))


def _cpu(probes: Probes, settings: DeviceSettings) -> Accelerator:
    name = probes.cpu_name()
    return Accelerator(
        "cpu", torch.device("cpu"), name, int(probes.ram_bytes()), _autocast(settings, "cpu", name, False)
    )


def _autocast(settings: DeviceSettings, kind: str, name: str, bf16: bool) -> torch.dtype | None:
    if settings.mixed_precision == "off":
        return None
    if bf16:
        return torch.bfloat16
    if settings.mixed_precision == "on":
        log.warning(
            'mixed-precision = "on" was asked for, but %s (%s) has no bf16 autocast that training uses: '
            "training in fp32.",
            name,
            kind,
        )
    return None


def capability(accelerator: Accelerator) -> dict[str, Any]:
    """What a device reports of where it trains (enrolment, ``device status``)."""
    return {
        records.ACCELERATOR: accelerator.kind,
        "name": accelerator.name,
        records.MEMORY_BYTES: accelerator.memory_bytes,
        "mixed-precision": "bf16" if accelerator.autocast is not None else "off",
    }


def describe(accelerator: Accelerator) -> str:
    """One line, e.g. ``accelerator: cuda (NVIDIA H100 80GB HBM3), 79.2 GiB memory, bf16 mixed precision``."""
    memory = "RAM" if accelerator.kind == "cpu" else "memory"
    precision = "bf16 mixed precision" if accelerator.autocast is not None else "fp32"
    return (
        f"accelerator: {accelerator.kind} ({accelerator.name}), "
        f"{accelerator.memory_bytes / 2**30:.1f} GiB {memory}, {precision}"
    )
