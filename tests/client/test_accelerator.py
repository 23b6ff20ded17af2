"""Accelerator selection: the order, the fallback to the CPU, mixed precision, and what is reported.

A GPU the tests pretend exists comes through :class:`Probes`; the CPU, and an accelerator this torch
build lacks, are the real ones. Training on a GPU is not run here (there is none).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.client.accelerator import Probe, Probes, capability, describe, select_accelerator
from fleetlora.common.device_settings import DeviceSettings

GPU_MEMORY = 80 * 2**30


def _gpu(name: str = "Fake GPU", *, bf16: bool = True, fails: Callable[[], str] | None = None) -> Probe:
    """An accelerator that is there; ``fails`` stands in for its name query (a broken driver raises)."""
    return Probe(
        available=lambda: True,
        name=fails or (lambda: name),
        memory_bytes=lambda: GPU_MEMORY,
        bf16=lambda: bf16,
        missing=lambda: "",
    )


def _absent(why: str) -> Probe:
    def never() -> str:
        raise AssertionError("an absent accelerator is asked nothing but whether it is there")

    return Probe(
        available=lambda: False, name=never, memory_bytes=lambda: 0, bf16=lambda: False, missing=lambda: why
    )


NO_GPU = Probes(cuda=_absent("no CUDA here"), mps=_absent("no MPS here"), xpu=_absent("no XPU here"))


def _broken_driver() -> str:
    raise RuntimeError("CUDA driver initialization failed")


def test_auto_takes_cuda_first_when_torch_has_it():
    probes = Probes(cuda=_gpu("NVIDIA Fake"), mps=_gpu("Apple GPU"), xpu=_gpu("Intel Fake"))
    chosen = select_accelerator(DeviceSettings(), probes)
    assert (chosen.kind, chosen.device, chosen.name) == ("cuda", torch.device("cuda"), "NVIDIA Fake")
    assert chosen.device.type == "cuda" and chosen.memory_bytes == GPU_MEMORY
    assert chosen.autocast == torch.bfloat16


@pytest.mark.parametrize(("present", "expected"), [("mps", "mps"), ("xpu", "xpu")])
def test_auto_goes_on_in_order_to_mps_then_xpu(present: str, expected: str):
    probes = Probes(
        cuda=_absent("no CUDA here"),
        mps=_gpu() if present == "mps" else _absent("no MPS here"),
        xpu=_gpu(),
    )
    assert select_accelerator(DeviceSettings(), probes).kind == expected


def test_auto_without_an_accelerator_trains_on_the_cpu_quietly(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        chosen = select_accelerator(DeviceSettings(), NO_GPU)
    assert (chosen.kind, chosen.device, chosen.autocast) == ("cpu", torch.device("cpu"), None)
    assert caplog.records == []  # no accelerator is the usual case for a device, not a problem


def test_an_override_that_is_not_there_falls_back_to_the_cpu_and_says_why(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        chosen = select_accelerator(DeviceSettings(accelerator="cuda"), NO_GPU)
    assert chosen.kind == "cpu"
    assert 'accelerator = "cuda" was asked for, but no CUDA here: training on the CPU' in caplog.text


@pytest.mark.skipif(sys.platform == "darwin", reason="MPS may be real on macOS")
def test_this_torch_build_names_what_it_lacks(caplog: pytest.LogCaptureFixture):
    """The real probes: MPS is never there on Linux, and the warning says why, without a crash."""
    with caplog.at_level(logging.WARNING):
        chosen = select_accelerator(DeviceSettings(accelerator="mps"))
    assert chosen.kind == "cpu" and chosen.device == torch.device("cpu")
    assert 'accelerator = "mps" was asked for, but' in caplog.text and "MPS" in caplog.text


@pytest.mark.parametrize("asked", ["auto", "cuda"])
def test_a_gpu_whose_driver_fails_is_passed_over(asked: str, caplog: pytest.LogCaptureFixture):
    probes = Probes(cuda=_gpu(fails=_broken_driver), mps=_absent("no MPS here"), xpu=_absent("no XPU here"))
    with caplog.at_level(logging.WARNING):
        chosen = select_accelerator(DeviceSettings(accelerator=asked), probes)
    assert chosen.kind == "cpu"
    assert "cuda reports a device that cannot be used (RuntimeError: CUDA driver initialization failed)" in (
        caplog.text
    )


def test_the_cpu_reports_the_machines_ram_and_its_model():
    chosen = select_accelerator(DeviceSettings(accelerator="cpu"))  # real probes: no GPU is asked
    assert chosen.kind == "cpu" and chosen.name
    assert chosen.memory_bytes == psutil.virtual_memory().total
    assert chosen.autocast is None


@pytest.mark.parametrize(
    ("kind", "native_bf16", "switch", "expected"),
    [
        ("cuda", True, "auto", torch.bfloat16),
        ("cuda", False, "auto", None),  # an older GPU would emulate bf16: slower than fp32
        ("cuda", True, "off", None),
        ("cuda", True, "on", torch.bfloat16),
        ("xpu", True, "auto", torch.bfloat16),
    ],
)
def test_mixed_precision_is_bf16_where_the_accelerator_has_it(
    kind: str, native_bf16: bool, switch: str, expected: torch.dtype | None
):
    probes = Probes(**{**dict.fromkeys(("cuda", "mps", "xpu"), _absent("-")), kind: _gpu(bf16=native_bf16)})
    chosen = select_accelerator(DeviceSettings(mixed_precision=switch), probes)
    assert (chosen.kind, chosen.autocast) == (kind, expected)


@pytest.mark.parametrize(
    ("accelerator", "probes", "name"),
    [
        ("cpu", NO_GPU, None),
        ("cuda", Probes(cuda=_gpu("Old GPU", bf16=False), mps=_absent("-"), xpu=_absent("-")), "Old GPU"),
        ("mps", Probes(cuda=_absent("-"), mps=_gpu("Apple GPU", bf16=False), xpu=_absent("-")), "Apple GPU"),
    ],
)
def test_mixed_precision_on_where_it_is_not_supported_trains_in_fp32_with_a_warning(
    accelerator: str, probes: Probes, name: str | None, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING):
        chosen = select_accelerator(DeviceSettings(accelerator=accelerator, mixed_precision="on"), probes)
    assert chosen.kind == accelerator and chosen.autocast is None
    assert 'mixed-precision = "on" was asked for' in caplog.text and "training in fp32" in caplog.text
    assert (name or chosen.name) in caplog.text


def test_the_real_mps_probe_never_offers_bf16():
    """MPS trains in fp32 even when asked (see client/accelerator.py): its bf16 depends on the macOS."""
    assert Probes().mps.bf16() is False


def test_capability_is_what_status_replies_report():
    chosen = select_accelerator(
        DeviceSettings(), Probes(cuda=_gpu("NVIDIA Fake"), mps=_absent("-"), xpu=_absent("-"))
    )
    assert capability(chosen) == {
        "accelerator": "cuda",
        "name": "NVIDIA Fake",
        "memory-bytes": GPU_MEMORY,
        "mixed-precision": "bf16",
    }
    assert describe(chosen) == "accelerator: cuda (NVIDIA Fake), 80.0 GiB memory, bf16 mixed precision"
    cpu = select_accelerator(DeviceSettings(), NO_GPU)
    assert capability(cpu)["mixed-precision"] == "off"
    assert describe(cpu).startswith("accelerator: cpu (") and describe(cpu).endswith("GiB RAM, fp32")


def test_enrolment_and_status_show_where_the_device_would_train(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text('[device]\naccelerator = "cpu"\n')
    state = str(tmp_path / "device")
    runner = CliRunner()
    enrolled = runner.invoke(
        app, ["device", "enroll", "--state-dir", state, "--device-id", "d1", "--config", str(config)]
    )
    assert enrolled.exit_code == 0, enrolled.output
    assert enrolled.output.splitlines()[-1].startswith("accelerator: cpu (")

    shown = runner.invoke(
        app, ["device", "status", "--state-dir", state, "--capability", "--config", str(config)]
    )
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[-1].startswith("accelerator: cpu (")
    answer = runner.invoke(app, ["device", "status", "--state-dir", state, "--capability", "--json"])
    assert json.loads(answer.output)["capability"]["memory-bytes"] > 0
    plain = runner.invoke(app, ["device", "status", "--state-dir", state, "--json"])
    assert json.loads(plain.output) is None  # no adapter yet, and no capability unless asked
