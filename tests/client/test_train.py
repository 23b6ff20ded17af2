import pytest
import torch

from fleetlora.client.local_data import local_examples
from fleetlora.client.train import NoisePlan, draw_batches, train_locally
from fleetlora.common.batches import evaluate
from fleetlora.common.config import ModelSpec, TrainSettings
from fleetlora.common.data import load_examples
from fleetlora.common.errors import DataError
from fleetlora.common.model import build_model


def test_local_training_lowers_held_out_loss(tiny_spec: ModelSpec):
    loaded = build_model(tiny_spec)
    held_out = load_examples("builtin-test")[:200]
    before = evaluate(loaded, held_out)["loss"]
    result = train_locally(
        loaded, load_examples("builtin"), TrainSettings(local_steps=40, learning_rate=3e-3), seed=0
    )
    assert result.steps == 40 and result.examples == 2400 and result.seconds > 0
    assert evaluate(loaded, held_out)["loss"] < before


def test_causal_lm_training_lowers_loss():
    loaded = build_model(ModelSpec("tiny", "causal-lm", max_length=32))
    texts = load_examples("builtin")[:200]
    before = evaluate(loaded, texts)["loss"]
    # restricted_softmax is on by default and means nothing without classes: the plain loss is used.
    train_locally(loaded, texts, TrainSettings(local_steps=30, learning_rate=1e-2), seed=0)
    assert evaluate(loaded, texts)["loss"] < before


def test_no_examples_is_a_clear_error(tiny_spec: ModelSpec):
    with pytest.raises(DataError, match="nothing to learn"):
        train_locally(build_model(tiny_spec), [], TrainSettings(), seed=0)


def test_simulated_device_gets_its_partition_and_real_device_its_file(tmp_path):
    run = {"data": "builtin", "partition": "iid", "seed": 0}
    parts = [local_examples({"partition-id": i, "num-partitions": 3}, run) for i in range(3)]
    assert sum(len(p) for p in parts) == 2400 and not set(parts[0]) & set(parts[1])
    path = tmp_path / "mine.csv"
    path.write_text("text,label\nhello,a\n")
    assert len(local_examples({"data-path": str(path)}, {})) == 1
    with pytest.raises(DataError, match="data-path"):
        local_examples({}, {})


@pytest.mark.parametrize("restricted", [True, False])
def test_restricted_softmax_leaves_absent_classes_alone(tiny_spec: ModelSpec, restricted: bool):
    # A device holding two classes: with the restricted softmax the other classes' biases get no
    # push at all (they start at 0, and AdamW's decay of 0 is 0); without it they are pushed down.
    loaded = build_model(tiny_spec)
    mine = set(tiny_spec.labels[:2])
    examples = [e for e in load_examples("builtin") if e.label in mine][:64]
    settings = TrainSettings(local_steps=10, learning_rate=1e-2, restricted_softmax=restricted)
    train_locally(loaded, examples, settings, seed=0)
    bias = next(
        p for n, p in loaded.model.named_parameters() if "modules_to_save" in n and n.endswith("bias")
    )
    absent = bias[len(mine) :].detach()
    if restricted:
        assert torch.count_nonzero(absent) == 0
    else:
        assert bool((absent < 0).all())


def test_dp_batches_are_secret_while_plain_batches_follow_the_seed():
    noise = NoisePlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1)
    plain = [list(draw_batches(500, 16, 20, seed=7, noise=None)) for _ in range(2)]
    secret = [list(draw_batches(500, 16, 20, seed=7, noise=noise)) for _ in range(2)]
    assert plain[0] == plain[1]  # reproducible: pause/resume and repeated runs train the same batches
    assert secret[0] != secret[1]  # the run seed (which the coordinator knows) does not fix them
    sizes = [len(batch) for batch in secret[0] + secret[1]]
    assert 35 < sum(sizes) / len(sizes) < 65  # Poisson at q = 0.1 of 500: 50 expected
    assert all(0 <= i < 500 for batch in secret[0] for i in batch)
