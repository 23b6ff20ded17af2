"""A base model wrapped with PEFT LoRA (plus optional selective unfreezing), ready to train.

Both sides build the same :class:`LoadedModel` from a :class:`ModelSpec`: the device to train, the
coordinator to create the initial adapter and to evaluate. ``base_sha256`` identifies the base
weights so a device never applies an adapter trained on a different base.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedTokenizerBase

from fleetlora.common.config import ModelSpec
from fleetlora.common.delta import State, trainable_state
from fleetlora.common.errors import ConfigError
from fleetlora.common.heads import MeanPoolingClassifier
from fleetlora.common.model_zoo import build_base

# PEFT 0.21 still calls a transformers 5 property deprecated for v6; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class LoadedModel:
    """The wrapped model with what both sides need to know about it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    base_sha256: str
    base_bytes: int
    total_params: int
    trainable_params: int
    initial_adapter: State  # the seeded starting adapter, kept apart from the live weights
    # The head regime's encoder never changes, so a text's features are computed once per process
    # (common.batches.pooled_features); bounded, emptied when full.
    feature_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        """Trainable parameters / all parameters (LoRA alone is well under 1%)."""
        return self.trainable_params / self.total_params


def build_model(spec: ModelSpec) -> LoadedModel:
    """Build base + LoRA from scratch (seconds for MiniLM, ~2 s for cached SmolLM2)."""
    base, tokenizer = build_base(spec)
    base_sha256, base_bytes = _hash_weights(base)  # before the zero-shot start: its floats vary by CPU
    if spec.regime == "head" and isinstance(base, MeanPoolingClassifier):  # ModelSpec ensures the type
        base.start_from_label_names(tokenizer, spec.labels, spec.max_length)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS if spec.task == "classify" else TaskType.CAUSAL_LM,
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules) or None,
    )
    torch.manual_seed(spec.seed + 1)  # LoRA A initialisation, identical on every side
    try:
        model = get_peft_model(base, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA cannot wrap {spec.name!r}: {exc}") from exc
    _unfreeze(model, spec.lora.unfreeze)
    frozen = "lora_" if spec.regime == "head" else "lora_A" if spec.lora.ffa else None
    if frozen:  # the head regime trains the head alone; FFA-LoRA keeps every A at its shared init
        for name, param in model.named_parameters():
            if frozen in name:
                param.requires_grad_(False)
    params = list(model.parameters())
    initial_adapter = trainable_state(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        base_sha256=base_sha256,
        base_bytes=base_bytes,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        initial_adapter=initial_adapter,
    )


@lru_cache(maxsize=1)
def cached_model(spec: ModelSpec) -> LoadedModel:
    """One model per process, reused across rounds.

    The trainable weights are whatever the last user left: load an adapter state before use.
    """
    return build_model(spec)


CANARY_TEXT = "fleetlora canary: is this adapter healthy?"


def canary_is_finite(loaded: LoadedModel) -> bool:
    """Whether the model, with the adapter it holds now, gives finite outputs on a fixed input.

    The last check of an adapter before it is trusted: the coordinator's before it stores a new global
    version, a device's before it switches to an update.
    """
    batch = loaded.tokenizer([CANARY_TEXT], return_tensors="pt", truncation=True, max_length=32)
    loaded.model.eval()
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    return bool(torch.isfinite(logits).all())


def _unfreeze(model: PeftModel, module_names: tuple[str, ...]) -> None:
    """Make every parameter under each named base module trainable."""
    for module_name in module_names:
        needle = f".{module_name.strip('.')}."
        matched = [p for n, p in model.named_parameters() if needle in f".{n}."]
        if not matched:
            examples = sorted({n.split(".weight")[0] for n, _ in model.named_parameters()})[:3]
            raise ConfigError(f"--unfreeze {module_name!r} matches no parameter; names look like {examples}.")
        for param in matched:
            param.requires_grad_(True)


def _hash_weights(model: torch.nn.Module) -> tuple[str, int]:
    """sha256 over (name, dtype, shape, bytes) of every base tensor, and their total bytes.

    Tied tensors (SmolLM2's embedding and output head) appear under two names in the state dict;
    they are hashed under both but counted once in the size.
    """
    digest = hashlib.sha256()
    total, seen = 0, set()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += data.numel() * data.element_size()
    return digest.hexdigest(), total
