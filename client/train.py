"""One device's local training for one round: plain LoRA steps with AdamW.

Reads top to bottom: set up, loop over steps, report. The optimizer starts fresh every round, on
purpose: with a fraction of the fleet sampled per round a device trains every few rounds, and Adam
moments from an older global adapter point the wrong way for the one it was just sent; resetting
also keeps the device stateless between rounds, so a restarted device trains exactly as before.

With ``restricted_softmax`` a classifier's loss ignores the classes the device holds no example
of: their logits are masked out, so local training never pushes down classes it cannot see. Under
label skew that push is what makes averaged heads forget rare classes (FedRS, Li & Zhan, KDD
2021, scales those logits by alpha; masking is its alpha = 0). A causal LM has no classes and
trains on the plain loss.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fleetlora.common.batches import encode
from fleetlora.common.config import TrainSettings
from fleetlora.common.data import Example
from fleetlora.common.errors import DataError
from fleetlora.common.model import LoadedModel


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean training loss over the steps
    steps: int
    seconds: float
    examples: int  # size of the local training set: the device's weight in the average


def train_locally(
    loaded: LoadedModel, examples: Sequence[Example], settings: TrainSettings, *, seed: int
) -> TrainResult:
    """Run the round's optimizer steps (:meth:`TrainSettings.steps_for`) over shuffled passes."""
    if not examples:
        raise DataError("No local training examples: this device has nothing to learn from.")
    # ---- set up
    model = loaded.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    restricted = settings.restricted_softmax and loaded.spec.task == "classify"
    absent = _absent_label_mask(loaded, examples) if restricted else None
    rng = random.Random(seed)
    queue: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()

    # ---- train
    for _ in range(settings.steps_for(len(examples))):
        if len(queue) < min(settings.batch_size, len(examples)):
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            queue.extend(epoch)
        take, queue = queue[: settings.batch_size], queue[settings.batch_size :]
        batch = encode(loaded, [examples[i] for i in take])
        if absent is None:
            loss = model(**batch).loss
        else:
            labels = batch.pop("labels")
            logits = model(**batch).logits.masked_fill(absent, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    # ---- report
    return TrainResult(
        loss=sum(losses) / len(losses),
        steps=len(losses),
        seconds=time.perf_counter() - started,
        examples=len(examples),
    )


def _absent_label_mask(loaded: LoadedModel, examples: Sequence[Example]) -> torch.Tensor:
    """True for every class this device has no example of (restricted softmax, see module doc)."""
    present = {e.label for e in examples}
    return torch.tensor([label not in present for label in loaded.spec.labels])
