from pathlib import Path

import pytest
import torch

from fleetlora.common.batches import encode
from fleetlora.common.config import LoraSettings, ModelSpec
from fleetlora.common.data import Example
from fleetlora.common.delta import load_trainable_state, trainable_state
from fleetlora.common.errors import ConfigError, IncompatibleStateError, ModelError
from fleetlora.common.model import build_model


def test_tiny_classifier_trains_only_lora_and_head(tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    names = set(trainable_state(loaded.model))
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert 0 < loaded.trainable_share < 0.01
    assert loaded.trainable_params == sum(t.numel() for t in trainable_state(loaded.model).values())


def test_mean_pooling_ignores_padding(tiny_spec: ModelSpec):
    # A short text scores the same alone and padded beside a long one in the same batch.
    loaded = build_model(tiny_spec)
    loaded.model.eval()
    short, long = (
        Example("card lost", tiny_spec.labels[0]),
        Example("where is my card " * 5, tiny_spec.labels[1]),
    )
    with torch.no_grad():
        alone = loaded.model(**encode(loaded, [short])).logits[0]
        padded = loaded.model(**encode(loaded, [short, long])).logits[0]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_transformers_pooling_keeps_the_architectures_own_head(tiny_spec: ModelSpec):
    loaded = build_model(ModelSpec(**{**tiny_spec.__dict__, "pooling": "transformers"}))
    assert type(loaded.model.base_model.model).__name__ == "BertForSequenceClassification"
    mean = build_model(tiny_spec)
    assert mean.base_sha256 != loaded.base_sha256  # a device can never mix the two


def test_same_spec_builds_identical_weights_on_every_side(tiny_spec: ModelSpec):
    first, second = build_model(tiny_spec), build_model(tiny_spec)
    assert first.base_sha256 == second.base_sha256
    a, b = trainable_state(first.model), trainable_state(second.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_unfreezing_a_layer_raises_the_trainable_share(tiny_spec: ModelSpec):
    plain = build_model(tiny_spec)
    spec = ModelSpec(**{**tiny_spec.__dict__, "lora": LoraSettings(unfreeze=("backbone.encoder.layer.1",))})
    unfrozen = build_model(spec)
    assert unfrozen.trainable_share > plain.trainable_share
    assert any("encoder.layer.1.output.dense.weight" in n for n in trainable_state(unfrozen.model))


@pytest.mark.parametrize("ffa", [True, False])
def test_ffa_lora_averages_the_product_exactly(tiny_spec: ModelSpec, ffa: bool):
    """With A shared and frozen, mean(B_i) @ A == mean(B_i @ A); when A trains too it is not."""
    loaded = build_model(ModelSpec(**{**tiny_spec.__dict__, "lora": LoraSettings(ffa=ffa)}))
    trainable = trainable_state(loaded.model)
    assert any("lora_A" in n for n in trainable) is not ffa
    params = dict(loaded.model.named_parameters())
    a_name = next(n for n in params if "lora_A" in n)
    a0, b0 = params[a_name].detach(), params[a_name.replace("lora_A", "lora_B")].detach()

    devices = []  # two devices' local results: trainable arrays move, frozen ones stay
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        a = a0 + torch.randn(a0.shape, generator=generator) if a_name in trainable else a0
        b = b0 + torch.randn(b0.shape, generator=generator)
        devices.append((a, b))

    mean_of_products = sum(b @ a for a, b in devices) / 2
    product_of_means = (sum(b for _, b in devices) / 2) @ (sum(a for a, _ in devices) / 2)
    assert torch.allclose(mean_of_products, product_of_means, atol=1e-5) is ffa


def test_unknown_unfreeze_name_is_refused(tiny_spec: ModelSpec):
    spec = ModelSpec(**{**tiny_spec.__dict__, "lora": LoraSettings(unfreeze=("backbone.encoder.layer.9",))})
    with pytest.raises(ConfigError, match="matches no parameter"):
        build_model(spec)


def test_tiny_causal_lm_builds_and_scores():
    loaded = build_model(ModelSpec("tiny", "causal-lm", max_length=32))
    assert loaded.spec.task == "causal-lm"
    assert all("lora_" in n for n in trainable_state(loaded.model))


def test_loading_a_state_of_another_layout_is_refused(tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    other = build_model(ModelSpec(**{**tiny_spec.__dict__, "lora": LoraSettings(rank=4)}))
    with pytest.raises(IncompatibleStateError):
        load_trainable_state(loaded.model, trainable_state(other.model))


def test_unknown_model_path_names_the_choices(tmp_path: Path):
    with pytest.raises(ModelError, match="minilm, smollm2, tiny"):
        build_model(ModelSpec(str(tmp_path / "missing"), "causal-lm"))


def test_local_folder_model_loads(tmp_path: Path, tiny_spec: ModelSpec):
    # A user's own Hugging Face folder: save the tiny model and load it back by path.
    loaded = build_model(tiny_spec)
    base = loaded.model.unload().backbone  # mean pooling: the head is built anew, seeded
    base.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    from_folder = build_model(ModelSpec(**{**tiny_spec.__dict__, "name": str(tmp_path)}))
    assert from_folder.base_sha256 == loaded.base_sha256


@pytest.mark.slow
def test_packaged_minilm_classifier():
    loaded = build_model(ModelSpec("minilm", "classify", ("a", "b", "c")))
    assert 22_000_000 < loaded.total_params < 23_000_000
    assert loaded.trainable_share < 0.01


@pytest.mark.slow
def test_packaged_smollm2_is_converted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path))
    loaded = build_model(ModelSpec("smollm2", "causal-lm"))
    assert 134_000_000 < loaded.total_params < 136_000_000
    cached = list(tmp_path.glob("smollm2-*/model.safetensors"))
    assert len(cached) == 1
    again = build_model(ModelSpec("smollm2", "causal-lm"))
    assert again.base_sha256 == loaded.base_sha256
