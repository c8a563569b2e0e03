"""The model's forward pass, with the shared instruction run once per batch.

Every prompt of a task starts with the same instruction. `SharedPrefix` runs it once (batch 1) and
broadcasts its keys and values over the batch without copying; the per-question tokens then attend to
it as a past. Gradients flow back through the broadcast into the prefix pass, so LoRA gets exactly the
gradients of the full-sequence computation (tests/test_forward.py checks this).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# True while the prefix pass writes its cache: checkpointed layers then run plainly, since a recomputation
# in the backward pass would write the cache a second time.
_writing_cache = contextvars.ContextVar("trec_accel_writing_cache", default=False)


@contextlib.contextmanager
def _cache_writing():
    token = _writing_cache.set(True)
    try:
        yield
    finally:
        _writing_cache.reset(token)


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack, lm_head) of a causal LM, with or without PEFT around it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_type: type) -> str:
    """The decoder's keyword for a key/value cache: `cache` since Transformers 5.24, `past_key_values` before
    (the old name still works there, with a deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def run_decoder(decoder: nn.Module, cache=None, **kwargs):
    """The decoder's output, given `cache` under the keyword its version of Transformers takes; the cache it
    returns is the output's field of the same name."""
    name = _cache_keyword(type(decoder))
    out = decoder(**kwargs, **({name: cache} if cache is not None else {}))
    return out.last_hidden_state, getattr(out, name, None)


class SharedPrefix:
    """The prefix's keys and values, computed once, broadcast over any batch without copying.

    Its cache's `update` returns the prefix joined with the new states and stores nothing, so one prefix
    serves any number of forward passes over different continuations: every training step computes its
    own (the gradients flow back into it), evaluation computes one for all its batches.

    It uses three parts of Transformers' cache beyond the model's public forward: `cache.layers`, each
    layer's `keys` / `values`, and `update(key_states, value_states, layer_idx, ...)` as the attention layers
    call it; `tests/test_forward.py::test_cache_interface` names them, so a release that moves them fails there.
    """

    def __init__(self, decoder: nn.Module, prefix_ids: torch.Tensor):
        self.length = prefix_ids.shape[1]
        from transformers import DynamicCache
        # A cache of plain layers, not the one the model would make from its config: a sliding-window layer
        # copies a CPU tensor to the GPU when it starts, which a CUDA graph cannot capture, and the prefix is
        # far shorter than any window.
        with _cache_writing():
            _, self.cache = run_decoder(decoder, DynamicCache(), input_ids=prefix_ids, use_cache=True)
        layers = self.cache.layers
        self.states = [(layer.keys, layer.values) for layer in layers]

        def read_only_update(key_states, value_states, layer_idx, *args, **kwargs):
            layer = layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        self.cache.update = read_only_update

    def broadcast(self, batch_size: int):
        """The cache, its keys and values expanded (not copied) to `batch_size` rows."""
        for layer, (k, v) in zip(self.cache.layers, self.states):
            layer.keys, layer.values = k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)
        return self.cache


def hidden_states(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prefix: torch.Tensor | SharedPrefix | None = None, position_ids: torch.Tensor | None = None,
                  allow: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states of `input_ids`, after the prefix when given (its token ids, or already run).

    The attention mask goes to the model as a boolean (B, 1, S, P+S) `allow` matrix, causal over the real
    tokens by default: the model then runs no data-dependent checks on it (which would wait for the GPU and
    cannot be captured in a CUDA graph). Evaluation passes its own `allow` to score every candidate label of
    a question side by side in one row.
    """
    b, s = input_ids.shape
    if isinstance(prefix, torch.Tensor):
        prefix = SharedPrefix(decoder, prefix)
    p = 0 if prefix is None else prefix.length
    if position_ids is None:
        position_ids = torch.arange(p, p + s, device=input_ids.device).expand(b, s)
    if allow is None:
        allow = causal_allow(attention_mask, p)
    mask = model_mask(decoder, allow, attention_mask, p)
    cache = None if prefix is None else prefix.broadcast(b)
    return run_decoder(decoder, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=cache is not None)[0]


def causal_allow(attention_mask: torch.Tensor, p: int = 0) -> torch.Tensor:
    """(B, 1, S, P+S) bool: token i sees the P prefix tokens and the real tokens j <= i. A padding row sees
    the real tokens before it, so no row is empty (an empty row would give NaN in SDPA)."""
    b, s = attention_mask.shape
    r = torch.arange(s, device=attention_mask.device)
    allow = (r[None, :, None] >= r[None, None, :]) & attention_mask.bool()[:, None, :]
    if p:
        allow = torch.cat([allow.new_ones((b, s, p)), allow], 2)
    return allow[:, None]


def model_mask(decoder: nn.Module, allow: torch.Tensor, attention_mask: torch.Tensor, p: int) -> torch.Tensor:
    """The mask in the form the decoder's attention takes: SDPA the boolean matrix, eager an additive one;
    FlashAttention-2 takes only the (B, P+S) padding mask, and so only causal masks."""
    kind = getattr(decoder.config, "_attn_implementation", "sdpa")
    if kind == "flash_attention_2":
        return torch.cat([attention_mask.new_ones((attention_mask.shape[0], p)), attention_mask], 1)
    if kind == "eager":
        return torch.zeros(allow.shape, device=allow.device).masked_fill(~allow, torch.finfo(torch.float32).min)
    return allow


def label_logits(lm_head: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float logits (B, K, V) at the (B, K) `positions` only: the vocabulary projection is the costliest matrix
    of a short sequence, so it is never taken where no loss or score needs it. A gather, not a boolean mask:
    its shape does not depend on the data."""
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])
    return lm_head(hidden.gather(1, index)).float()


def checkpoint_layers(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer.

    Our own rather than Transformers' `gradient_checkpointing_enable`, which drops the key/value cache
    inside checkpointed layers. The prefix cache is read-only, so the recomputation in the backward pass
    sees exactly what the forward pass saw (dropout masks too: the RNG state is replayed). The prefix
    pass itself writes its cache, so it is not checkpointed (`SharedPrefix` marks it; the layers' keyword
    for the cache changed name in Transformers 5.24, so it is not looked for); at batch 1 it holds little.
    """
    decoder, _ = parts(model)
    for layer in decoder.layers:
        def forward(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled() or _writing_cache.get():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = forward
