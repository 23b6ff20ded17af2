"""Classification heads: how a sequence of hidden states becomes class logits.

``mean`` (the default) averages the encoder's last hidden states over real tokens and applies one
linear layer. Sentence-transformers trained all-MiniLM-L6-v2 for exactly that pooling (its
``1_Pooling`` config). ``transformers`` keeps the architecture's own sequence-classification
head: for BERT a tanh pooler over [CLS] that the sentence-embedding training never tuned.

Measured on BANKING77 (frozen MiniLM, a linear probe trained one epoch with AdamW at lr 1e-3), the
probe reached 87.0% on mean-pooled states and 49.2% on BERT's pooler output. LoRA and a few
federated rounds cannot close a gap that large, so the head choice matters more than any
federated option.

``centred`` (the ``head`` regime, :class:`~fleetlora.common.config.ModelSpec`) changes two things,
both from public configuration and never from data. The pooled feature is centred on the mean
feature of the label names and scaled to unit length, so every example's gradient on the head is
bounded (norm at most 2) whatever its text, which per-example clipping under DP then barely cuts.
And the head starts *zero-shot*: row c is the centred, unit feature of label c's name
(``card_arrival`` → "card arrival") times :data:`ZERO_SHOT_SCALE`, a nearest-label-name classifier
that the fleet then refines. On BANKING77 with MiniLM that start alone scores about 61% before any
training (docs/research.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

ZERO_SHOT_SCALE = 10.0  # logit scale of the label-name start: unit features give cosines in [-1, 1]


def label_text(label: str) -> str:
    """A label as words for the zero-shot start: ``card_arrival`` → ``card arrival``."""
    return label.replace("_", " ").replace("-", " ").strip()


class MeanPoolingClassifier(torch.nn.Module):
    """A backbone, the masked mean of its last hidden states, and a linear classifier.

    It accepts what PEFT's sequence-classification wrapper passes (``labels``, ``return_dict`` and
    friends) and returns a transformers output, so training and evaluation code treat it like any
    ``AutoModelForSequenceClassification``. The layer is named ``classifier`` so PEFT trains and
    saves it as the head.
    """

    centre: torch.Tensor

    def __init__(self, backbone: PreTrainedModel, num_labels: int, *, centred: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # PEFT reads the model type and defaults from here
        self.classifier = torch.nn.Linear(backbone.config.hidden_size, num_labels)
        # Start at chance (loss ln C) like a pretrained model's fresh head.
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        torch.nn.init.zeros_(self.classifier.bias)
        self.centred = centred
        # Not in the state dict: it follows from the label names, and is rebuilt with them.
        self.register_buffer("centre", torch.zeros(backbone.config.hidden_size), persistent=False)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """What the classifier reads: the masked mean of the last hidden states (centred, unit if set)."""
        passthrough = {k: v for k, v in kwargs.items() if k == "token_type_ids" and v is not None}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **passthrough)
        mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.centred:
            return torch.nn.functional.normalize(pooled - self.centre, dim=-1)
        return pooled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        logits = self.classifier(self.features(input_ids, attention_mask, **kwargs))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def start_from_label_names(
        self, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str], max_length: int
    ) -> None:
        """Centre on the label names' mean feature and set the head to their zero-shot classifier."""
        was_training = self.training
        self.eval()
        batch = tokenizer(
            [label_text(label) for label in labels],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.centre.zero_()
        centred, self.centred = self.centred, False
        names = self.features(**batch)
        self.centred = centred
        self.centre.copy_(names.mean(0))
        self.classifier.weight.copy_(
            ZERO_SHOT_SCALE * torch.nn.functional.normalize(names - self.centre, dim=-1)
        )
        self.classifier.bias.zero_()
        self.train(was_training)
