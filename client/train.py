"""One device's local training for one round: LoRA steps with AdamW, or DP-SGD through Opacus.

In the ``head`` regime (:class:`~fleetlora.common.config.ModelSpec`) the encoder is frozen: the
features of the round's examples are computed once, under ``no_grad``, and the steps train the
classification head alone on them with plain SGD (the same loop, the same DP-SGD).

Reads top to bottom: set up, loop over steps, report. The optimizer starts fresh every round, on
purpose: with a fraction of the fleet sampled per round a device trains every few rounds, and Adam
moments from an older global adapter point the wrong way for the one it was just sent; resetting
also keeps the device stateless between rounds, so a restarted device trains exactly as before.

With ``restricted_softmax`` a classifier's loss ignores the classes the device holds no example
of: their logits are masked out, so local training never pushes down classes it cannot see. Under
label skew that push is what makes averaged heads forget rare classes (FedRS, Li & Zhan, KDD
2021, scales those logits by alpha; masking is its alpha = 0). A causal LM has no classes and
trains on the plain loss. Under DP the mask is not used: it is computed from the device's other
records, so one record's presence would change every other record's gradient, which the
per-example sensitivity bound of DP-SGD does not allow.

With a :class:`NoisePlan` the round is DP-SGD (Abadi et al. 2016) through Opacus: Poisson-sampled
batches, per-example gradients from Opacus' hooks-based ``GradSampleModule`` (hooks on the trainable
leaf layers only, here LoRA's ``nn.Linear`` pairs and the head; Opacus' ``grad_sample/README.md``),
each clipped to ``max_grad_norm``, Gaussian noise of ``noise_multiplier × max_grad_norm`` added to
their sum. An empty Poisson batch is still a step (noise only) and still counted by the accountant.

Batch membership is the one thing that differs in kind between the two. Without DP the shuffles
come from the run seed, so a paused or repeated run trains the same batches. Under DP they come
from the OS's entropy: amplification by subsampling, which the accountant assumes, holds only
while the sample is secret from whoever sees the output, and the coordinator knows the run seed.
With it (and the n, q and steps a device reports) it could rebuild every batch.

Where and how the steps run is the device's :class:`Runtime`: the accelerator (the model moves there
for the round and back to the CPU after it, so the caller always sees CPU tensors), mixed precision,
gradient checkpointing (:mod:`fleetlora.client.memory`), and the pause point the device's gates use
between steps (:mod:`fleetlora.client.pacing`), which may block until the foreground is quiet again or
give the round up.

Forgetting control (:mod:`fleetlora.client.forgetting`, ``settings.forgetting``) enters here in two
places: distillation changes each example's loss, using the teacher's logits of the round's examples
taken before the first step; EWC runs once each step's gradient is final (privatized under DP),
before the update, and returns its Fisher in :class:`TrainResult` for the caller to keep.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fleetlora.client.forgetting import OnlineEWC, Teacher, pool_logits
from fleetlora.client.memory import checkpointed
from fleetlora.common.batches import Batch, encode, on_model_device, pooled_features
from fleetlora.common.config import TrainSettings
from fleetlora.common.data import Example
from fleetlora.common.delta import State
from fleetlora.common.errors import ConfigError, DataError
from fleetlora.common.model import LoadedModel

# Opacus' per-example hooks fire on LoRA layers whose inputs need no gradient (the base is frozen);
# torch warns on every such backward pass, which says nothing a device operator can act on.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float  # mean training loss over the non-empty steps (0.0 if every batch was empty)
    steps: int
    seconds: float
    examples: int  # size of the local training set: the device's weight in the average
    fisher: State | None = None  # with EWC on: the updated Fisher, for the device to keep


@dataclass(frozen=True)
class NoisePlan:
    """DP-SGD for this round: Poisson batches at ``sample_rate``, per-example clipping, Gaussian noise."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float


@dataclass(frozen=True)
class Runtime:
    """Where and how this device runs its steps (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None  # mixed precision: autocast to this dtype; None: fp32 throughout
    checkpointing: bool = False  # recompute activations in backward instead of keeping them
    # Called with the number of steps taken before each step: may block (a pause), or raise to give up.
    between_steps: Callable[[int], None] | None = None


def train_locally(
    loaded: LoadedModel,
    examples: Sequence[Example],
    settings: TrainSettings,
    *,
    seed: int,
    noise: NoisePlan | None = None,
    fisher: State | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Run the round's optimizer steps (:meth:`TrainSettings.steps_for`); DP-SGD when ``noise`` is set.

    ``fisher`` is the device's EWC Fisher from earlier rounds (None: none yet), used when
    ``settings.forgetting.ewc_lambda`` is set; the result then carries the updated one.
    ``runtime`` (default: the CPU, fp32, no checkpointing, no pauses) says where the steps run.
    """
    if not examples:
        raise DataError("No local training examples: this device has nothing to learn from.")
    controls = settings.forgetting
    if controls.distill_weight and loaded.spec.task != "classify":
        raise ConfigError("distill-weight distils a classifier's outputs; set it to 0 for a causal LM.")
    runtime = runtime or Runtime()
    with _on_device(loaded, runtime.device), checkpointed(loaded.model, runtime.checkpointing):
        return _train(loaded, examples, settings, seed=seed, noise=noise, fisher=fisher, runtime=runtime)


@contextlib.contextmanager
def _on_device(loaded: LoadedModel, device: torch.device) -> Iterator[None]:
    """The model on ``device`` for the round, back on the CPU after it (whatever happened)."""
    if device.type == "cpu":
        yield
        return
    loaded.model.to(device)
    try:
        yield
    finally:
        loaded.model.to("cpu")


def _train(
    loaded: LoadedModel,
    examples: Sequence[Example],
    settings: TrainSettings,
    *,
    seed: int,
    noise: NoisePlan | None,
    fisher: State | None,
    runtime: Runtime,
) -> TrainResult:
    device = runtime.device
    controls = settings.forgetting
    # ---- set up
    loaded.model.train()
    # The mask depends on which classes the other records hold: not a per-example function under DP.
    restricted = settings.restricted_softmax and loaded.spec.task == "classify" and noise is None
    absent = _absent_label_mask(loaded, examples).to(device) if restricted else None
    learner = _HeadLearner(loaded, examples, absent, device) if loaded.spec.regime == "head" else None
    module = learner.head if learner else loaded.model
    trainable = [p for p in module.parameters() if p.requires_grad]
    teacher = None
    # The teacher is the weights the round starts from (the adapter the device received). Under DP this is
    # honest: record i's teacher logits enter record i's per-example loss only, whose gradient Opacus clips
    # and noises with the rest of it.
    if controls.distill_weight:
        with torch.no_grad():
            logits = learner.head(learner.features) if learner else pool_logits(loaded, examples)
        teacher = Teacher(logits, controls.distill_weight, controls.distill_temperature)
    ewc = None
    if controls.ewc_lambda:
        named = {n: p for n, p in loaded.model.named_parameters() if any(p is t for t in trainable)}
        on_device = {k: v.to(device) for k, v in fisher.items()} if fisher is not None else None
        ewc = OnlineEWC(named, on_device, controls.ewc_lambda)
    rate = settings.rate_for(noise.noise_multiplier if noise else None)
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(trainable, lr=rate) if learner else torch.optim.AdamW(trainable, lr=rate)
    )
    steps = settings.steps_for(len(examples))
    batches = draw_batches(len(examples), settings.batch_size, steps, seed=seed, noise=noise)
    if noise is None:
        forward: torch.nn.Module = module
    else:
        forward = GradSampleModule(module, batch_first=True, loss_reduction="mean")
        private = DPOptimizer(
            optimizer,
            noise_multiplier=noise.noise_multiplier,
            max_grad_norm=noise.max_grad_norm,
            expected_batch_size=settings.batch_size,
            loss_reduction="mean",
            # Noise from OS entropy: a generator seeded from the run seed would let anyone who knows
            # the seed subtract the noise again.
            generator=torch.Generator().manual_seed(secrets.randbits(63)),
        )
        if ewc:  # after clipping and noise: the penalty and the Fisher see privatized gradients only
            private.attach_step_hook(ewc.dp_step_hook)
        optimizer = private
    losses: list[float] = []
    started = time.perf_counter()

    autocast = torch.autocast(device.type, dtype=runtime.autocast, enabled=runtime.autocast is not None)

    # ---- train
    try:
        for taken, take in enumerate(batches):
            if runtime.between_steps:
                runtime.between_steps(taken)
            if take:
                with autocast:
                    if learner:
                        loss = learner.loss(forward, take, teacher)
                    else:
                        batch = on_model_device(encode(loaded, [examples[i] for i in take]), module)
                        loss = _loss(forward, batch, take, absent, teacher)
                loss.backward()
                losses.append(loss.item())
            else:  # an empty Poisson batch is still a DP step: noise only, and it is accounted
                for param in trainable:
                    param.grad_sample = torch.zeros(0, *param.shape, device=device)  # type: ignore[union-attr]
            if ewc and noise is None:  # under DP the optimizer's step hook calls it
                ewc.on_gradient(len(take))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        if isinstance(forward, GradSampleModule):
            forward.to_standard_module()  # the cached model must leave without Opacus' hooks

    # ---- report
    return TrainResult(
        loss=sum(losses) / len(losses) if losses else 0.0,
        steps=steps,
        seconds=time.perf_counter() - started,
        examples=len(examples),
        fisher={k: v.cpu() for k, v in ewc.updated_fisher().items()} if ewc else None,
    )


class _HeadLearner:
    """The head regime: the frozen encoder's features, computed once, and the head trained on them.

    Each step then costs one small matrix product instead of a pass through the encoder, and under
    DP Opacus clips the head's per-example gradients alone (its ``nn.Linear`` rule, an einsum).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        examples: Sequence[Example],
        absent: torch.Tensor | None,
        device: torch.device,
    ) -> None:
        features, labels = pooled_features(loaded, examples)
        self.features, self.labels = features.to(device), labels.to(device)
        self.absent = absent
        heads = [
            m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
        ]
        if len(heads) != 1:
            raise ConfigError(
                f"The head regime trains one linear head; this model has {len(heads)} trainable."
            )
        self.head = heads[0]

    def loss(self, forward: torch.nn.Module, take: list[int], teacher: Teacher | None) -> torch.Tensor:
        return _objective(forward(self.features[take]), self.labels[take], take, self.absent, teacher)


def _loss(
    forward: torch.nn.Module,
    batch: Batch,
    take: list[int],
    absent: torch.Tensor | None,
    teacher: Teacher | None,
) -> torch.Tensor:
    if absent is None and teacher is None:  # the model's own loss: a causal LM's, or the plain CE
        return forward(**batch).loss
    labels = batch.pop("labels")
    return _objective(forward(**batch).logits, labels, take, absent, teacher)


def _objective(
    logits: torch.Tensor,
    labels: torch.Tensor,
    take: list[int],
    absent: torch.Tensor | None,
    teacher: Teacher | None,
) -> torch.Tensor:
    """The classifier's loss on a batch: CE over the unmasked classes, mixed with distillation if set."""
    if teacher is not None:
        return teacher.loss(logits, labels, take, absent)
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, labels)


def draw_batches(
    num_examples: int, batch_size: int, steps: int, *, seed: int, noise: NoisePlan | None
) -> Iterator[list[int]]:
    """The round's batches, as indices into the examples: seeded shuffles without DP (reproducible from
    ``seed``), secret Poisson draws at ``noise.sample_rate`` under DP (``seed`` is not used)."""
    if noise is None:
        return _shuffled_batches(num_examples, batch_size, steps, random.Random(seed))
    return _secret_poisson_batches(num_examples, noise.sample_rate, steps)


def _shuffled_batches(n: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    """``steps`` batches from consecutive shuffled passes over ``n`` examples."""
    queue: list[int] = []
    for _ in range(steps):
        if len(queue) < min(batch_size, n):
            epoch = list(range(n))
            rng.shuffle(epoch)
            queue.extend(epoch)
        take, queue = queue[:batch_size], queue[batch_size:]
        yield take


def _secret_poisson_batches(n: int, sample_rate: float, steps: int) -> Iterator[list[int]]:
    """Each example joins each batch independently with probability ``sample_rate`` (DP-SGD's sampling),
    drawn from ``os.urandom``: no seed, so nobody outside this process can replay the draws."""
    threshold = sample_rate * 2.0**53
    for _ in range(steps):
        draws = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)  # uniform on [0, 2**53)
        yield np.flatnonzero(draws < threshold).tolist()


def _absent_label_mask(loaded: LoadedModel, examples: Sequence[Example]) -> torch.Tensor:
    """True for every class this device has no example of (restricted softmax, see module doc)."""
    present = {e.label for e in examples}
    return torch.tensor([label not in present for label in loaded.spec.labels])
