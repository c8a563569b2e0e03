"""The model's forward pass, with the shared instruction run once per batch.

Every prompt of a task starts with the same instruction. `SharedPrefix` runs it once (batch 1); the
per-question tokens then attend to its keys and values as a past. Gradients flow back into the prefix
pass, so LoRA gets exactly the gradients of the full-sequence computation (tests/test_forward.py checks
this).

Under SDPA the model runs `prefix_attention` (registered with Transformers' attention interface by
`register_prefix_attention`): the prefix is joined before every row, and the query heads that share a key/value
head run as the rows of one head in PyTorch's SDPA kernel, where Transformers' SDPA would repeat the keys and values
for each of them (`model.prefix_attention=grouped`: the rows read the prefix's one copy by grouped matrix products).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# True while the prefix pass writes its cache: checkpointed layers then run plainly, since a recomputation
# in the backward pass would write the cache a second time.
_writing_cache = contextvars.ContextVar("trec_accel_writing_cache", default=False)


@contextlib.contextmanager
def _flagged(flag: contextvars.ContextVar):
    """`flag` True for the duration (and restored after, however the block ends)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


# True while a checkpointed layer runs its forward pass (the first time or recomputing): what is saved for the
# backward pass there is dropped after the first time and kept from the recomputation until the layer's backward,
# so it costs one layer's memory, not every layer's (`quantized.base_output` saves dequantized weights there).
_checkpointed = contextvars.ContextVar("trec_accel_checkpointed", default=False)


def in_checkpointed_layer() -> bool:
    return _checkpointed.get()


def _marked_checkpointed(forward, *args, **kwargs):
    with _flagged(_checkpointed):
        return forward(*args, **kwargs)


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
    """The prefix's keys and values, computed once (batch 1), for any batch.

    Its cache's `update` returns the prefix joined with the new states and stores nothing, so one prefix
    serves any number of forward passes over different continuations: every training step computes its
    own (the gradients flow back into it), evaluation computes one for all its batches.

    Under trec-accel's SDPA (`prefix_attention`) the attention reads `states` itself. Other attention (eager,
    FlashAttention-2) reads the cache, which uses three parts of Transformers' cache beyond the model's public
    forward: `cache.layers`, each layer's `keys` / `values`, and `update(key_states, value_states, layer_idx, ...)`
    as the attention layers call it; `tests/test_forward.py::test_cache_interface` names them, so a release that
    moves them fails there.
    """

    def __init__(self, decoder: nn.Module, prefix_ids: torch.Tensor):
        self.length = prefix_ids.shape[1]
        from transformers import DynamicCache
        # A cache of plain layers, not the one the model would make from its config: a sliding-window layer
        # copies a CPU tensor to the GPU when it starts, which a CUDA graph cannot capture, and the prefix is
        # far shorter than any window.
        with _flagged(_writing_cache):
            _, self.cache = run_decoder(decoder, DynamicCache(), input_ids=prefix_ids, use_cache=True)
        layers = self.cache.layers
        self.states = [(layer.keys, layer.values) for layer in layers]

        def read_only_update(key_states, value_states, layer_idx, *args, **kwargs):
            layer = layers[layer_idx]
            return joined(layer.keys, layer.values, key_states, value_states)

        self.cache.update = read_only_update


def joined(prefix_keys, prefix_values, keys, values):
    """The (1, H_kv, P, D) prefix keys and values joined before every row's: (B, H_kv, P + S, D).

    Called inside each layer: expanded there, the per-row gradient of the prefix is summed as soon as that
    layer's backward ends. Expanded once before the layers, autograd summed it only after every layer's
    backward and held all of them until then (4.4 GiB at 7B for 256 coarse rows; BENCHMARKS.md session 9)."""
    b = keys.shape[0]
    return (torch.cat([prefix_keys.expand(b, -1, -1, -1), keys], dim=-2),
            torch.cat([prefix_values.expand(b, -1, -1, -1), values], dim=-2))


PREFIX_ATTENTION = "sdpa_prefix_"  # + the mode: the names `register_prefix_attention` registers


def register_prefix_attention(mode: str) -> str:
    """Register `prefix_attention` for `model.prefix_attention=mode` with Transformers' attention (and mask)
    interface; returns the name to load the model with (`attn_implementation=`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    name = PREFIX_ATTENTION + mode
    # Transformers' SDPA is looked up once here, not in every layer's call.
    AttentionInterface.register(name, functools.partial(prefix_attention, mode=mode,
                                                        sdpa=AttentionInterface()["sdpa"]))
    AttentionMaskInterface.register(name, sdpa_mask)  # masks other than ours (a plain forward) as SDPA takes them
    return name


def set_prefix_attention(model: nn.Module, mode: str) -> None:
    """Switch a loaded model (with or without PEFT around it) to `model.prefix_attention=mode`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(register_prefix_attention(mode))


def uses_prefix_attention(decoder: nn.Module) -> bool:
    return getattr(decoder.config, "_attn_implementation", "").startswith(PREFIX_ATTENTION)


# `model.prefix_attention=auto` joins the prefix to every row: measured faster than grouping at every shape. The
# joined path runs PyTorch's memory-efficient SDPA kernel with the query heads of a key/value head folded into its
# rows (`folded_heads_sdpa`); one 7B-shape layer (32 query / 8 key-value heads of 128, 256 rows, forward and
# backward) took 1.67 / 2.01 / 2.22 ms at widths 16 / 24 / 32 with the coarse prefix (140 tokens) against 2.10 /
# 3.10 / 4.06 ms grouped, and 3.57 / 3.82 ms at 24 / 32 with the fine one (317) against 5.65 / 7.46 ms; whole 7B
# epochs at batch 256 ran 4-7% (coarse) and 8-10% (fine) faster once captured on two hosts, with 0.3-0.5 GiB less
# peak memory (BENCHMARKS.md session 17). Without gradients the 7B scoring pass was 1.52-1.58 s joined against
# 1.90-1.96 s grouped (fine; sessions 9-10). Sessions 9-12 had measured grouping faster in training against
# Transformers' SDPA, which repeats every key/value head for each of its query heads. `grouped` stays a setting.
def prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     shared_prefix: SharedPrefix | None = None, *, mode: str, sdpa, **kwargs):
    """`sdpa` (Transformers' SDPA attention), attending first to `shared_prefix` where one is given (keys and values
    of the prefix not in `key` / `value`): by `grouped_prefix_attention` under `mode=grouped`, else joined to
    every row. Under a boolean mask with fewer key/value heads than query heads, `folded_heads_sdpa` instead of
    Transformers' SDPA, which would copy the keys and values for each query head."""
    if shared_prefix is not None:
        prefix_keys, prefix_values = shared_prefix.states[module.layer_idx]
        if mode == "grouped":
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            return grouped_prefix_attention(query, key, value, prefix_keys, prefix_values, attention_mask, scaling,
                                            dropout), None
        key, value = joined(prefix_keys, prefix_values, key, value)
    if attention_mask is not None and attention_mask.dtype == torch.bool and key.shape[1] < query.shape[1]:
        return folded_heads_sdpa(query, key, value, attention_mask, dropout, scaling), None
    return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def folded_heads_sdpa(query, key, value, allow, dropout: float, scaling: float | None):
    """PyTorch's SDPA of (B, H, S, D) queries against (B, H_kv, K, D) keys and values under the (B, 1, S, K)
    boolean `allow`, the H / H_kv query heads that share a key/value head run as the rows of one head; returns
    (B, S, H, D) as Transformers' SDPA does.

    Under a mask Transformers' SDPA repeats every key/value head for each of its query heads (PyTorch's fused
    kernels take grouped heads only without a mask): 4 copies of every row's keys and values in each layer for the
    7B shape, the joined prefix included. Here only the mask is repeated, one boolean per query and key.
    """
    b, h, s, d = query.shape
    h_kv, k = key.shape[1], key.shape[2]
    g = h // h_kv
    mask = allow.expand(b, 1, s, k)[:, :, None].expand(b, 1, g, s, k).reshape(b, 1, g * s, k)
    out = F.scaled_dot_product_attention(query.reshape(b, h_kv, g * s, d), key, value, attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)
    # reshape: the memory-efficient kernel may return its rows strided, which a view cannot regroup
    return out.reshape(b, h, s, d).transpose(1, 2).contiguous()


def grouped_prefix_attention(query, key, value, prefix_keys, prefix_values, allow, scaling: float, dropout: float):
    """Attention of (B, H, S, D) queries to a (1, H_kv, P, D) prefix and to their own (B, H_kv, S, D) keys and
    values, under the (B, 1, S, P + S) boolean `allow`; returns (B, S, H, D) as Transformers' SDPA does.

    The H / H_kv query heads that share a key/value head are stacked as rows of one product, and with the prefix
    every row's queries too, so neither the prefix nor a key/value head is copied. The scores and the softmax
    are at least fp32, as inside SDPA's kernels (scores rounded to bf16 doubled the error against an fp32 reference).
    """
    b, h, s, d = query.shape
    h_kv, p = key.shape[1], prefix_keys.shape[2]
    g = h // h_kv
    fp = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        q = query.to(fp).reshape(b, h_kv, g * s, d)
        q_rows = q.transpose(0, 1).reshape(h_kv, b * g * s, d)
        on_prefix = ScaledProduct.apply(q_rows, prefix_keys[0].to(fp).transpose(1, 2), scaling)
        own = ScaledProduct.apply(q.view(b * h_kv, g * s, d), key.to(fp).reshape(b * h_kv, s, d).transpose(1, 2),
                                  scaling)
        scores = torch.cat([on_prefix.view(h_kv, b, g * s, p).transpose(0, 1), own.view(b, h_kv, g * s, s)], -1)
        scores = scores.view(b, h_kv, g, s, p + s)
    scores = scores.masked_fill(~allow[:, :, None], float("-inf"))
    weights = torch.softmax(scores, -1).to(value.dtype).view(b, h_kv, g * s, p + s)
    if dropout:
        weights = F.dropout(weights, dropout, training=True)
    w_prefix, w_own = weights.split([p, s], -1)
    from_prefix = w_prefix.transpose(0, 1).reshape(h_kv, b * g * s, p) @ prefix_values[0]
    out = from_prefix.view(h_kv, b, g * s, d).transpose(0, 1) + w_own @ value
    return out.reshape(b, h, s, d).transpose(1, 2).contiguous()


class ScaledProduct(torch.autograd.Function):
    """`alpha * (a @ b)` for batches of fp32 matrices that hold bf16 values, on a GPU's TF32 tensor cores.

    TF32 keeps 10 bits of mantissa, bf16 7: the forward products are exact, as in fp32 (the scale is applied
    to the fp32 sums, not to the queries), at several times fp32's speed (these products were 5.6% of a 7B
    step's GPU time in fp32). The backward products round the fp32 gradient of the scores to TF32, finer than
    the bf16 that SDPA's fused kernels round it to. Elsewhere (CPU, fp64) the products are as precise as the
    inputs.
    """
    @staticmethod
    def forward(ctx, a, b, alpha: float):
        ctx.save_for_backward(a, b)
        ctx.alpha = alpha
        return _scaled_bmm(a, b, alpha)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _scaled_bmm(grad, b.transpose(1, 2), ctx.alpha), _scaled_bmm(a.transpose(1, 2), grad, ctx.alpha), None


def _scaled_bmm(a, b, alpha: float):
    # beta=0: the input is never read, so a stride-0 scalar serves; alpha scales the fp32 sums inside the GEMM.
    unread = a.new_empty(()).expand(a.shape[0], a.shape[1], b.shape[2])
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if a.is_cuda else was)
    try:
        return torch.baddbmm(unread, a, b, beta=0, alpha=alpha)
    finally:
        torch.set_float32_matmul_precision(was)


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
    # prefix_attention reads the prefix itself (the decoder passes the keyword down to it); other attention, the cache.
    reads_prefix = prefix is not None and uses_prefix_attention(decoder)
    cache = None if prefix is None or reads_prefix else prefix.cache
    return run_decoder(decoder, cache, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=cache is not None, **({"shared_prefix": prefix} if reads_prefix else {}))[0]


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


def checkpoint_layers(model: nn.Module, unchecked: int = 0) -> None:
    """Non-reentrant activation checkpointing of every decoder layer but the last `unchecked`.

    Our own rather than Transformers' `gradient_checkpointing_enable`, which drops the key/value cache
    inside checkpointed layers. The prefix cache is read-only, so the recomputation in the backward pass
    sees exactly what the forward pass saw (dropout masks too: the RNG state is replayed). The prefix
    pass itself writes its cache, so it is not checkpointed (`SharedPrefix` marks it; the layers' keyword
    for the cache changed name in Transformers 5.24, so it is not looked for); at batch 1 it holds little.

    The layers left out are the last ones: their backward passes run first, so their activations are freed
    before any checkpointed layer recomputes its own.
    """
    decoder, _ = parts(model)
    layers = list(decoder.layers)
    for layer in layers[:len(layers) - unchecked]:
        def forward(*args, _forward=layer.forward, **kwargs):
            if not torch.is_grad_enabled() or _writing_cache.get():
                return _forward(*args, **kwargs)
            return checkpoint(_marked_checkpointed, _forward, *args, use_reentrant=False, **kwargs)
        layer.forward = forward
