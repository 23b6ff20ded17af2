"""Gradient checkpointing and the memory estimate that decides it (client/memory.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus import GradSampleModule

from fleetlora.client.memory import (
    MIB,
    MemoryEstimate,
    backbone_of,
    checkpointed,
    choose_checkpointing,
    estimate_peak,
    memory_budget,
)
from fleetlora.client.train import Runtime, train_locally
from fleetlora.common.batches import encode
from fleetlora.common.config import ModelSpec, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.delta import trainable_state
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.model import build_model


@pytest.fixture
def lora_spec(tiny_spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(tiny_spec, regime="lora")


def _trained(spec: ModelSpec, *, checkpointing: bool) -> dict[str, torch.Tensor]:
    loaded = build_model(spec)
    examples = load_examples("builtin")[:256]
    settings = TrainSettings(local_steps=4, batch_size=16)
    train_locally(loaded, examples, settings, seed=3, runtime=Runtime(checkpointing=checkpointing))
    assert not backbone_of(loaded.model).is_gradient_checkpointing  # off again for evaluation
    return trainable_state(loaded.model)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpointing_trains_the_same_adapter(lora_spec: ModelSpec):
    # Recomputing activations in the backward pass changes what is kept, never the gradients.
    _assert_same(_trained(lora_spec, checkpointing=False), _trained(lora_spec, checkpointing=True))


def test_checkpointing_composes_with_opacus(lora_spec: ModelSpec):
    # The reentrant form: its first forward runs without autograd, so Opacus' hooks capture each layer's
    # activations once, in the recomputation, and every per-example gradient (what DP-SGD clips) is the
    # same as without checkpointing.
    loaded = build_model(lora_spec)
    loaded.model.train()
    batch = encode(loaded, load_examples("builtin")[:8])
    labels = batch.pop("labels")

    def per_example_grads(on: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same dropout masks in both
        private = GradSampleModule(loaded.model, batch_first=True, loss_reduction="mean")
        try:
            with checkpointed(loaded.model, on):
                torch.nn.functional.cross_entropy(private(**batch).logits, labels).backward()
            trainable = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
            grads = {n: p.grad_sample.clone() for n, p in trainable}  # type: ignore[attr-defined]
            for _, param in trainable:
                param.grad, param.grad_sample = None, None  # type: ignore[attr-defined]
            return grads
        finally:
            private.to_standard_module()

    without, with_ = per_example_grads(False), per_example_grads(True)
    assert all(g.shape[0] == 8 for g in without.values())  # one gradient per example
    _assert_same(without, with_)


def test_the_checkpointed_forward_keeps_fewer_tensors_for_backward(lora_spec: ModelSpec):
    # What checkpointing is for, counted rather than timed: the bytes autograd keeps for the backward pass.
    loaded = build_model(lora_spec)
    batch = loaded.tokenizer(
        [e.text for e in load_examples("builtin")[:16]],
        padding="max_length",
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    loaded.model.train()

    def kept_bytes(on: bool) -> int:
        kept: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with checkpointed(loaded.model, on), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loaded.model(**batch).logits.sum()
        return sum(kept)

    assert kept_bytes(True) < 0.7 * kept_bytes(False)


def test_a_backbone_without_checkpointing_support_is_a_clear_error(lora_spec: ModelSpec, monkeypatch):
    loaded = build_model(lora_spec)
    monkeypatch.setattr(type(backbone_of(loaded.model)), "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match='gradient-checkpointing = "off"'), checkpointed(loaded.model, True):
        pass


@pytest.mark.parametrize("task", ["classify", "causal-lm"])
def test_the_estimate_grows_with_the_batch_and_checkpointing_cuts_activations(
    lora_spec: ModelSpec, task: str
):
    spec = lora_spec if task == "classify" else ModelSpec("tiny", "causal-lm", max_length=32, regime="lora")
    loaded = build_model(spec)

    def peak(batch: int, seq: int, *, on: bool = False, dp: bool = False) -> MemoryEstimate:
        return estimate_peak(loaded, batch_size=batch, seq_len=seq, dp=dp, checkpointing=on)

    small, large = peak(4, 32), peak(16, 32)
    assert 0 < small.activations < large.activations and small.weights == large.weights > 0
    assert peak(4, 64).activations > 2 * small.activations  # attention grows with the square of the length
    assert peak(16, 32, on=True).activations < large.activations
    assert large.training_state > 0 and large.dp_grads == 0 < peak(16, 32, dp=True).dp_grads
    assert large.total == large.weights + large.training_state + large.activations
    assert set(large.mib()) == {"weights", "training_state", "activations", "dp_grads", "total"}


def test_the_head_regime_estimates_one_layer_of_activations(tiny_spec: ModelSpec):
    loaded = build_model(dataclasses.replace(tiny_spec, regime="head"))
    estimate = estimate_peak(loaded, batch_size=16, seq_len=32, dp=False, checkpointing=False)
    lora = estimate_peak(
        build_model(dataclasses.replace(tiny_spec, regime="lora")),
        batch_size=16,
        seq_len=32,
        dp=False,
        checkpointing=False,
    )
    assert 0 < estimate.activations < lora.activations


@pytest.mark.parametrize(("batch", "seq"), [(0, 32), (4, 0), (-1, 8)])
def test_an_empty_shape_is_refused(lora_spec: ModelSpec, batch: int, seq: int):
    with pytest.raises(ConfigError, match="must be >= 1"):
        estimate_peak(build_model(lora_spec), batch_size=batch, seq_len=seq, dp=False, checkpointing=False)


def test_auto_checkpoints_only_when_the_estimate_exceeds_the_budget():
    asked: list[int] = []

    def estimate() -> MemoryEstimate:
        asked.append(1)
        return MemoryEstimate(weights=100 * MIB, training_state=0, activations=400 * MIB, dp_grads=0)

    assert choose_checkpointing(estimate, "auto", 400 * MIB) is True
    assert choose_checkpointing(estimate, "auto", 500 * MIB) is False
    assert choose_checkpointing(estimate, "on", 10**12) is True
    assert choose_checkpointing(estimate, "off", 1) is False
    assert len(asked) == 2  # "on" and "off" never estimate
    # A model transformers cannot checkpoint trains without it under "auto" rather than fail every round.
    assert choose_checkpointing(estimate, "auto", 400 * MIB, supported=False) is False
    with pytest.raises(ConfigError, match="gradient-checkpointing"):
        choose_checkpointing(estimate, "sometimes", 1)


def test_the_budget_is_the_setting_or_half_of_the_memory_training_runs_in():
    assert memory_budget(DeviceSettings(memory_budget_mb=300)) == 300 * MIB
    assert memory_budget(DeviceSettings(), total_bytes=8 * 2**30) == 4 * 2**30
    assert 0 < memory_budget(DeviceSettings()) < 2**50  # half of this machine's RAM
