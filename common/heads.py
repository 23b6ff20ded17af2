"""Classification heads: how a sequence of hidden states becomes class logits.

``mean`` (the default) averages the encoder's last hidden states over real tokens and applies one
linear layer. Sentence-transformers trained all-MiniLM-L6-v2 for exactly that pooling (its
``1_Pooling`` config). ``transformers`` keeps the architecture's own sequence-classification
head: for BERT a tanh pooler over [CLS] that the sentence-embedding training never tuned.

Measured on BANKING77 (frozen MiniLM, a linear probe trained one epoch with AdamW at lr 1e-3), the
probe reached 87.0% on mean-pooled states and 49.2% on BERT's pooler output. LoRA and a few
federated rounds cannot close a gap that large, so the head choice matters more than any
federated option.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingClassifier(torch.nn.Module):
    """A backbone, the masked mean of its last hidden states, and a linear classifier.

    It accepts what PEFT's sequence-classification wrapper passes (``labels``, ``return_dict`` and
    friends) and returns a transformers output, so training and evaluation code treat it like any
    ``AutoModelForSequenceClassification``. The layer is named ``classifier`` so PEFT trains and
    saves it as the head.
    """

    def __init__(self, backbone: PreTrainedModel, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # PEFT reads the model type and defaults from here
        self.classifier = torch.nn.Linear(backbone.config.hidden_size, num_labels)
        # Start at chance (loss ln C) like a pretrained model's fresh head.
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        passthrough = {k: v for k, v in kwargs.items() if k == "token_type_ids" and v is not None}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **passthrough)
        mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
