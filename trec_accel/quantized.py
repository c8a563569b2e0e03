"""The frozen 4-bit base projections in checkpointed layers: each weight dequantized twice a step, not three times.

bitsandbytes' 4-bit product dequantizes its weight in the forward pass and again in the backward pass; with
activation checkpointing the forward pass runs twice, so every weight was dequantized three times a step (6.5% of a
7B step's GPU time, BENCHMARKS.md session 11). Inside a checkpointed layer `base_output` (called by the fused
LoRA groups, `lora_groups`: one process or DDP; FSDP and ZeRO-3 run peft's layers) saves the dequantized
weight for the backward pass instead: checkpointing drops what the first forward pass saves and keeps what the
recomputation saves only until that layer's backward, so this holds one layer's weights at a time (0.4 GiB at 7B).
Elsewhere (the prefix pass, a model without checkpointing) it would hold every layer's, so bitsandbytes' product
runs there, as it does without gradients. The arithmetic is bitsandbytes' own for more than a few rows: the weight
dequantized to the input's dtype, then one product forward and one backward. Measured on one H200 (BENCHMARKS.md
session 12): the 7B coarse step once captured 3% faster (367-375 against 356-365 sequences/s, alternating runs),
peak memory 11.3 against 10.9 GiB.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .forward import in_checkpointed_layer


class _DequantizedOnce(torch.autograd.Function):
    """x W^T + bias for a frozen 4-bit W, the dequantized W saved for the backward pass."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        from bitsandbytes.functional import dequantize_4bit
        w = dequantize_4bit(packed, quant_state).to(x.dtype)
        ctx.save_for_backward(w)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w, None, None, None


def base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a LoRA layer's base projection; see the module's docstring."""
    bnb = sys.modules.get("bitsandbytes")  # a 4-bit layer means bitsandbytes is loaded already
    if (bnb is None or not isinstance(layer, bnb.nn.Linear4bit) or layer.weight.quant_state is None
            or not (torch.is_grad_enabled() and x.requires_grad and in_checkpointed_layer())
            or (layer.bias is not None and layer.bias.requires_grad)):
        return layer(x)
    dtype = layer.compute_dtype or x.dtype   # as Linear4bit.forward: the input in the compute dtype, out in its own
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return _DequantizedOnce.apply(x.to(dtype), layer.weight, layer.weight.quant_state, bias).to(x.dtype)
