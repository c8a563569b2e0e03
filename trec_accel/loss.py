"""Where the loss is taken: token cross-entropy on the label tokens only.

`LabelLoss` wraps the causal LM so that DDP, FSDP and DeepSpeed wrap the whole forward pass, loss
included, and see every parameter used inside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batching import IGNORE, Batch
from .forward import hidden_states, label_logits, parts


class LabelLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                label_positions: torch.Tensor | None = None, label_targets: torch.Tensor | None = None,
                prefix_ids: torch.Tensor | None = None, call=None):
        """(sum of label-token losses, number of label tokens), both tensors. The caller normalises, so the
        loss of a global batch can be divided by its token count across micro-batches and processes.

        `call(model)` instead runs any other computation inside this forward, where FSDP and ZeRO-3 have
        gathered the parameters (validation scoring during training uses it).
        """
        if call is not None:
            return call(self.model)
        decoder, lm_head = parts(self.model)
        hidden = hidden_states(decoder, input_ids, attention_mask, prefix_ids)
        logits = label_logits(lm_head, hidden, label_positions)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), label_targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        return loss_sum, (label_targets != IGNORE).sum()


def batch_loss(loss_model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return loss_model(batch.input_ids, batch.attention_mask, batch.label_positions, batch.label_targets,
                      batch.prefix_ids)
