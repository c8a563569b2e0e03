"""The model's forward pass, with the shared instruction run once per batch.

Every prompt of a task starts with the same instruction. `SharedPrefix` runs it once (batch 1) and
broadcasts its keys and values over the batch without copying; the per-question tokens then attend to
it as a past. Gradients flow back through the broadcast into the prefix pass, so LoRA gets exactly the
gradients of the full-sequence computation (tests/test_forward.py checks this).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack, lm_head) of a causal LM, with or without PEFT around it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class SharedPrefix:
    """The prefix's keys and values, computed once, broadcast over any batch without copying.

    Its cache's `update` returns the prefix joined with the new states and stores nothing, so one prefix
    serves any number of forward passes over different continuations: every training step computes its
    own (the gradients flow back into it), evaluation computes one for all its batches.
    """

    def __init__(self, decoder: nn.Module, prefix_ids: torch.Tensor):
        self.length = prefix_ids.shape[1]
        self.cache = decoder(input_ids=prefix_ids, use_cache=True).past_key_values
        layers = self.cache.layers
        self.states = [(layer.keys, layer.values) for layer in layers]

        def read_only_update(key_states, value_states, layer_idx, *args, **kwargs):
            layer = layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        self.cache.update = read_only_update
        self.cache.read_only = True

    def broadcast(self, batch_size: int):
        """The cache, its keys and values expanded (not copied) to `batch_size` rows."""
        for layer, (k, v) in zip(self.cache.layers, self.states):
            layer.keys, layer.values = k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)
        return self.cache


def hidden_states(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prefix: torch.Tensor | SharedPrefix | None = None, position_ids: torch.Tensor | None = None,
                  mask_4d: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states of `input_ids`, after the prefix when given (its token ids, or already run).

    `mask_4d` (B, 1, S, P+S), additive, replaces the causal mask: evaluation uses it to score every
    candidate label of a question side by side in one row.
    """
    b, s = input_ids.shape
    if isinstance(prefix, torch.Tensor):
        prefix = SharedPrefix(decoder, prefix)
    p = 0 if prefix is None else prefix.length
    if position_ids is None:
        position_ids = torch.arange(p, p + s, device=input_ids.device).expand(b, s)
    if prefix is None:
        mask = attention_mask if mask_4d is None else mask_4d
        return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
    cache = prefix.broadcast(b)
    if mask_4d is None:
        ones = torch.ones((b, p), dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
    else:
        mask = mask_4d
    return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True).last_hidden_state


def next_token_logits(lm_head: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float logits at the selected (B, S) positions only: the vocabulary projection is the costliest
    matrix of a short sequence, so it is never taken where no loss or score needs it."""
    return lm_head(hidden[positions]).float()


def checkpoint_layers(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer.

    Our own rather than Transformers' `gradient_checkpointing_enable`, which drops the key/value cache
    inside checkpointed layers. The prefix cache is read-only, so the recomputation in the backward pass
    sees exactly what the forward pass saw (dropout masks too: the RNG state is replayed). The prefix
    pass itself writes its cache, so it is not checkpointed; at batch size 1 it holds little memory.
    """
    decoder, _ = parts(model)
    for layer in decoder.layers:
        def forward(*args, _forward=layer.forward, **kwargs):
            cache = kwargs.get("past_key_values")
            if not torch.is_grad_enabled() or (cache is not None and not getattr(cache, "read_only", False)):
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = forward
