"""Turning examples into model inputs, and measuring a model on them.

Shared by the device (training, federated evaluation) and the coordinator (central evaluation),
so both score the same way: classification reports loss and accuracy, causal LM reports loss and
perplexity (exp of the mean token loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fleetlora.common.config import ModelSpec
from fleetlora.common.data import Example
from fleetlora.common.errors import ConfigError, DataError
from fleetlora.common.heads import MeanPoolingClassifier
from fleetlora.common.model import LoadedModel

Batch = dict[str, torch.Tensor]


def encode(loaded: LoadedModel, examples: Sequence[Example]) -> Batch:
    """Tokenize a batch; add ``labels`` (class ids, or next-token targets with padding ignored)."""
    batch = _tokenize(loaded, [e.text for e in examples])
    if loaded.spec.task == "classify":
        batch["labels"] = encode_labels(loaded, examples)
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def on_model_device(batch: Batch, model: torch.nn.Module) -> Batch:
    """``batch`` on the device ``model``'s weights are on (a trained device's accelerator, or the CPU)."""
    device = next(model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def encode_labels(loaded: LoadedModel, examples: Sequence[Example]) -> torch.Tensor:
    """The examples' class ids in the federation's label order."""
    index = {label: i for i, label in enumerate(loaded.spec.labels)}
    unknown = sorted({str(e.label) for e in examples if e.label not in index})
    if unknown:
        raise DataError(f"Labels {unknown[:3]} are not among the federation's {len(index)} labels.")
    return torch.tensor([index[str(e.label)] for e in examples], dtype=torch.long)


def _tokenize(loaded: LoadedModel, texts: list[str]) -> Batch:
    spec: ModelSpec = loaded.spec
    batch = dict(
        loaded.tokenizer(
            texts, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt"
        )
    )
    if spec.task == "causal-lm":
        batch.pop("token_type_ids", None)  # decoders take none
    return batch


FEATURE_CACHE_LIMIT = 100_000  # texts; about 150 MB of MiniLM features


@torch.no_grad()
def pooled_features(
    loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a mean-pooling head reads for each example (in order), and the class ids.

    In the head regime the encoder is frozen, so each text's features are computed once per process
    and kept in ``loaded.feature_cache``: later rounds and evaluations cost one matrix product.
    """
    base = loaded.model.get_base_model()
    if not isinstance(base, MeanPoolingClassifier):
        raise ConfigError("Features are read from a mean-pooling classifier (pooling mean, task classify).")
    cache = loaded.feature_cache if loaded.spec.regime == "head" else {}
    labels = encode_labels(loaded, examples)
    missing = sorted({e.text for e in examples if e.text not in cache}, key=len)  # pads less, as evaluate
    if len(cache) + len(missing) > FEATURE_CACHE_LIMIT:
        cache.clear()
    fresh: dict[str, torch.Tensor] = {}
    was_training = base.training
    base.eval()
    for start in range(0, len(missing), batch_size):
        texts = missing[start : start + batch_size]
        batch = on_model_device(_tokenize(loaded, texts), base)
        fresh.update(zip(texts, base.features(**batch).cpu(), strict=True))  # kept on the CPU
    base.train(was_training)
    cache.update(fresh)
    if not examples:
        return torch.empty(0, base.config.hidden_size), labels
    return torch.stack([cache[e.text] for e in examples]), labels


@torch.no_grad()
def evaluate(loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 64) -> dict[str, float]:
    """Mean loss over examples (classify) or tokens (causal LM), plus accuracy or perplexity."""
    if not examples:
        raise DataError("Nothing to evaluate: the evaluation set is empty.")
    if loaded.spec.regime == "head":  # the classifier on cached features: the same function, faster
        features, labels = pooled_features(loaded, examples)
        logits = loaded.model.get_base_model().classifier(features)
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        return {"loss": loss, "accuracy": int((logits.argmax(-1) == labels).sum()) / len(examples)}
    model = loaded.model
    model.eval()
    # Batching texts of similar length pads less (BANKING77 test set: 14 s instead of 25 s); every
    # example's score is independent of its batch, so the order changes nothing else.
    by_length = sorted(examples, key=lambda e: len(e.text))
    loss_sum, weight, correct = 0.0, 0, 0
    for start in range(0, len(by_length), batch_size):
        batch = encode(loaded, by_length[start : start + batch_size])
        output = model(**batch)
        if loaded.spec.task == "classify":
            n = len(batch["labels"])
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())  # tokens predicted after the shift
        loss_sum += float(output.loss) * n
        weight += n
    loss = loss_sum / max(weight, 1)
    if loaded.spec.task == "classify":
        return {"loss": loss, "accuracy": correct / len(examples)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
