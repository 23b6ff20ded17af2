"""The head regime: a frozen encoder's centred, unit features, a zero-shot start, the head trained alone."""

import dataclasses

import pytest
import torch

from fleetlora.client.train import NoisePlan, train_locally
from fleetlora.common import batches
from fleetlora.common.batches import evaluate, pooled_features
from fleetlora.common.config import REGIME_DEFAULTS, LoraSettings, ModelSpec, TrainSettings
from fleetlora.common.data import Example, load_examples
from fleetlora.common.delta import trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.heads import label_text
from fleetlora.common.model import build_model


@pytest.fixture(scope="module")
def head_spec(tiny_spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(tiny_spec, regime="head")


def test_only_the_head_is_trainable(head_spec: ModelSpec):
    loaded = build_model(head_spec)
    trainable = trainable_state(loaded.model)
    assert trainable and all("classifier" in name for name in trainable)
    assert loaded.trainable_params == len(head_spec.labels) * (32 + 1)  # tiny's hidden size is 32


def test_the_zero_shot_start_classifies_each_label_name_as_its_label(head_spec: ModelSpec):
    loaded = build_model(head_spec)
    names = [Example(label_text(label), label) for label in head_spec.labels]
    assert evaluate(loaded, names)["accuracy"] == 1.0
    # A plain (lora) head starts at chance instead.
    lora = build_model(dataclasses.replace(head_spec, regime="lora"))
    assert evaluate(lora, names)["accuracy"] < 0.5


def test_features_are_unit_length_and_do_not_depend_on_the_batch(head_spec: ModelSpec):
    loaded = build_model(head_spec)
    examples = load_examples("builtin")[:40]
    features, labels = pooled_features(loaded, examples)
    assert torch.allclose(features.norm(dim=-1), torch.ones(len(examples)), atol=1e-5)
    assert labels.tolist() == [head_spec.labels.index(e.label) for e in examples]
    loaded.feature_cache.clear()
    alone, _ = pooled_features(loaded, examples[:1])  # no padding from longer texts
    assert torch.allclose(alone[0], features[0], atol=1e-5)


def test_features_are_computed_once_then_read_from_the_cache(head_spec: ModelSpec, monkeypatch):
    loaded = build_model(head_spec)
    examples = load_examples("builtin")[:30]
    first, _ = pooled_features(loaded, examples)
    calls = []
    monkeypatch.setattr(batches, "_tokenize", lambda *a: calls.append(a) or pytest.fail("encoder ran again"))
    again, _ = pooled_features(loaded, examples)
    assert torch.equal(first, again) and not calls


def test_evaluation_on_cached_features_equals_the_full_forward_pass(head_spec: ModelSpec):
    loaded = build_model(head_spec)
    examples = load_examples("builtin")[:50]
    fast = evaluate(loaded, examples)
    batch = batches.encode(loaded, examples)
    with torch.no_grad():
        output = loaded.model(**batch)
    assert fast["loss"] == pytest.approx(float(output.loss), rel=1e-4)
    assert fast["accuracy"] == pytest.approx(
        (output.logits.argmax(-1) == batch["labels"]).float().mean().item()
    )


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_training_moves_the_head_alone_and_lowers_the_loss(head_spec: ModelSpec, private: bool):
    loaded = build_model(head_spec)
    examples = load_examples("builtin")
    encoder = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad}
    before = evaluate(loaded, examples)["loss"]
    defaults = REGIME_DEFAULTS["head"]
    settings = TrainSettings(
        batch_size=64,
        learning_rate=5.0,
        local_epochs=5.0,
        restricted_softmax=False,
    )
    noise = NoisePlan(0.5, defaults.max_grad_norm, sample_rate=0.1) if private else None
    train_locally(loaded, examples, settings, seed=0, noise=noise)
    assert evaluate(loaded, examples)["loss"] < before
    assert all(torch.equal(p, encoder[n]) for n, p in loaded.model.named_parameters() if n in encoder)
    assert not any(hasattr(p, "grad_sample") for p in loaded.model.parameters())  # Opacus' hooks are gone


def test_the_head_regime_is_refused_where_it_cannot_apply(tiny_spec: ModelSpec):
    with pytest.raises(ConfigError, match="task classify and pooling mean"):
        ModelSpec(name="tiny", task="causal-lm", regime="head")
    with pytest.raises(ConfigError, match="task classify and pooling mean"):
        dataclasses.replace(tiny_spec, pooling="transformers", regime="head")
    with pytest.raises(ConfigError, match="drop unfreeze"):
        dataclasses.replace(tiny_spec, regime="head", lora=LoraSettings(unfreeze=("layer.0",)))
    with pytest.raises(ConfigError, match="Regime must be one of"):
        dataclasses.replace(tiny_spec, regime="prompt")


def test_model_info_shows_what_each_regime_trains():
    import json

    from typer.testing import CliRunner

    from fleetlora.client.cli import app

    def info(*options: str) -> dict:
        result = CliRunner().invoke(app, ["model-info", "--model", "tiny", "--labels", "a,b,c", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{") :])

    head, lora = info(), info("--regime", "lora")
    assert head["regime"] == "head" and head["trainable_params"] == 3 * (32 + 1)
    assert lora["regime"] == "lora" and lora["trainable_params"] > head["trainable_params"]
