"""What training costs a device in memory, and gradient checkpointing to cut it.

Checkpointing keeps each transformer layer's input and recomputes the rest of its activations in the
backward pass: less memory for about one more forward pass of time. The reentrant form is the one used,
because it composes with Opacus: its first forward runs without autograd, so Opacus' hooks capture the
activations only in the recomputation, once per layer, and the per-example gradients come out the same.

:func:`estimate_peak` says, before a round, what its steps will hold; :func:`choose_checkpointing` turns
checkpointing on when that would not fit the device's budget (:func:`memory_budget`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import psutil
from peft import PeftModel
from transformers import PreTrainedModel

from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.heads import MeanPoolingClassifier
from fleetlora.common.model import LoadedModel

log = logging.getLogger(__name__)

MIB = 2**20
# Elements kept per token and layer, per unit of each dimension, fitted to the peaks measured on MiniLM and
# SmolLM2-135M (benchmarks/device_resources.py, 16 x 64 tokens): the estimate came within 2% of MiniLM's and
# 17% above SmolLM2's, erring high so that "auto" checkpoints rather than runs out of memory.
PER_HIDDEN = 16.4  # the layer's inputs and outputs, norms, dropout masks, LoRA's inputs
PER_INTERMEDIATE = 4.0  # the feed-forward's pre- and post-activation (two of each for a gated MLP)
PER_SCORE = 4.0  # per head and attended position: scores, softmax, its dropout mask and output
PER_CHECKPOINT = (
    8.0  # a checkpointed layer's kept input with the backward pass's own buffers, per hidden unit
)
PER_LOGIT = 2.0  # a causal LM's logits and their gradient, per vocabulary entry
PER_DP_SAMPLE = 2.0  # Opacus' per-example gradients and the clipping's work on them, per trainable parameter


def backbone_of(model: PeftModel) -> PreTrainedModel:
    """The transformer whose layers are checkpointed (under fleetlora's mean-pooling head, if any)."""
    base = model.get_base_model()
    return base.backbone if isinstance(base, MeanPoolingClassifier) else base


@contextlib.contextmanager
def checkpointed(model: PeftModel, on: bool) -> Iterator[None]:
    """Gradient checkpointing (reentrant) on ``model``'s layers while the block runs; off again after it,
    since the cached model also evaluates, where it would only cost time."""
    if not on:
        yield
        return
    backbone = backbone_of(model)
    if not supports_checkpointing(model):
        raise ConfigError(
            f"{type(backbone).__name__} does not support gradient checkpointing: "
            'set gradient-checkpointing = "off" for this device.'
        )
    # It also makes the embeddings' output require grad: the base is frozen, and without an input that
    # requires grad a reentrant checkpoint would cut the graph (no gradient for the LoRA layers inside).
    backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    try:
        yield
    finally:
        backbone.activation_checkpointing_disable()
        backbone.disable_input_require_grads()  # transformers leaves it to PEFT's own integration


def supports_checkpointing(model: PeftModel) -> bool:
    """Whether transformers can checkpoint the backbone's layers (a local model folder may not)."""
    return bool(getattr(backbone_of(model), "supports_gradient_checkpointing", False))


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes a round's training holds at its peak, by part (see :func:`estimate_peak`)."""

    weights: int  # every parameter, frozen or not
    training_state: int  # the trainable parameters' gradients and optimizer state
    activations: int  # what the forward pass keeps for the backward pass, at its peak
    dp_grads: int  # Opacus' per-example gradients (0 without DP)

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations + self.dp_grads

    def mib(self) -> dict[str, float]:
        """The parts and the total in MiB, for people."""
        return {k: round(v / MIB, 1) for k, v in {**asdict(self), "total": self.total}.items()}


def estimate_peak(
    loaded: LoadedModel, *, batch_size: int, seq_len: int, dp: bool, checkpointing: bool
) -> MemoryEstimate:
    """The memory one training step of ``batch_size`` sequences of ``seq_len`` tokens peaks at.

    Activations follow the backbone's config: each layer keeps, per token, elements in proportion to the
    hidden and intermediate sizes and, per head, to the attended length; with checkpointing only each
    layer's input is kept, plus one layer's activations while it is recomputed. A causal LM adds its
    logits over the vocabulary, which checkpointing does not cut. The constants were fitted to measured
    peaks (benchmarks/device_resources.py). Not counted: the interpreter and libraries (a few hundred
    MiB of RSS before any model) and the allocator's slack.
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}.")
    model = loaded.model
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    width = next(iter(unique)).element_size()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    moments = 0 if loaded.spec.regime == "head" else 2  # plain SGD keeps none, AdamW two
    return MemoryEstimate(
        weights=sum(p.numel() * p.element_size() for p in unique),
        training_state=trainable * width * (1 + moments),
        activations=int(_activation_elements(loaded, batch_size, seq_len, checkpointing) * width),
        dp_grads=int(PER_DP_SAMPLE * batch_size * trainable * width) if dp else 0,
    )


def _activation_elements(loaded: LoadedModel, batch_size: int, seq_len: int, checkpointing: bool) -> float:
    config = backbone_of(loaded.model).config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = batch_size * seq_len
    layer = tokens * (
        PER_HIDDEN * hidden
        + PER_INTERMEDIATE * intermediate
        + PER_SCORE * config.num_attention_heads * seq_len
    )
    if loaded.spec.regime == "head":  # the encoder runs once, without autograd: one layer at a time
        return layer
    kept = layers * tokens * hidden * PER_CHECKPOINT + layer if checkpointing else layers * layer
    logits = tokens * config.vocab_size * PER_LOGIT if loaded.spec.task == "causal-lm" else 0
    return kept + logits


def memory_budget(settings: DeviceSettings, total_bytes: int | None = None) -> int:
    """The bytes training may use: ``memory-budget-mb``, or (0) half of ``total_bytes`` (where training
    runs: an accelerator's memory), by default half of the machine's RAM."""
    if settings.memory_budget_mb:
        return settings.memory_budget_mb * MIB
    return (total_bytes if total_bytes is not None else psutil.virtual_memory().total) // 2


def choose_checkpointing(
    estimate_without: Callable[[], MemoryEstimate], setting: str, budget_bytes: int, *, supported: bool = True
) -> bool:
    """Whether to checkpoint: ``setting`` "on" or "off" as told; "auto" when the peak estimated without
    checkpointing (``estimate_without``, only called then) exceeds ``budget_bytes`` and the model
    ``supported`` it (else it trains without, and says so: "on" for such a model is an error later)."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f'gradient-checkpointing must be "auto", "on" or "off"; got {setting!r}.')
    if setting != "auto":
        return setting == "on"
    peak = estimate_without().total
    if peak <= budget_bytes:
        return False
    if not supported:
        log.warning(
            "Estimated training peak %.0f MiB exceeds the memory budget of %.0f MiB, but this model does "
            "not support gradient checkpointing: training without it.",
            peak / MIB,
            budget_bytes / MIB,
        )
        return False
    log.info(
        "Estimated training peak %.0f MiB exceeds the memory budget of %.0f MiB: gradient checkpointing on.",
        peak / MIB,
        budget_bytes / MIB,
    )
    return True
