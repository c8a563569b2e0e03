"""Model FLOPs of a training step and the share of the GPU's bf16 peak they reach (MFU), as nanoGPT and
torchtune report it.

Counted per token the decoder runs (the shared prefix once per micro-batch, padding not counted): the
frozen base's matrices 2N forward + 2N backward (gradients for the activations only), the LoRA matrices
2n + 4n (their weights get gradients too), and attention 12 x layers x width x context, nanoGPT's term.
The vocabulary projection runs only at the label slots. Recomputation under activation checkpointing is
not counted: MFU measures useful work.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .batching import Batch

# Dense bf16 peak of common training GPUs, in FLOP/s (vendors' datasheets, SXM parts without sparsity);
# TREC_ACCEL_PEAK_TFLOPS overrides it for another GPU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("TREC_ACCEL_PEAK_TFLOPS"):
        return float(os.environ["TREC_ACCEL_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _features(m: nn.Module) -> int:
    return getattr(m, "in_features", 0) * getattr(m, "out_features", 0)


class ModelFlops:
    """FLOPs of one micro-batch's forward and backward, from the model's linear layers and config."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        base = lora = 0
        for name, m in decoder.named_modules():
            if isinstance(m, nn.Linear):  # bitsandbytes' 4-bit layers are nn.Linear too
                if "lora_" in name:
                    lora += _features(m)
                else:
                    base += _features(m)
        head_lora = sum(_features(m) for n, m in lm_head.named_modules() if "lora_" in n and isinstance(m, nn.Linear))
        head = lm_head.get_base_layer() if hasattr(lm_head, "get_base_layer") else lm_head
        c = decoder.config
        self.per_token = 4 * base + 6 * lora
        self.attention = 12 * c.num_hidden_layers * c.hidden_size   # x context length
        self.per_label_slot = 4 * _features(head) + 6 * head_lora

    def of(self, batch: Batch) -> float:
        tokens = batch.attention_mask.sum(1).double()
        p = batch.prefix_length
        context = p + tokens  # each token attends to about this much (nanoGPT counts the full context)
        run = float(tokens.sum()) + p
        return (self.per_token * run + self.attention * float((tokens * context).sum())
                + self.attention * p * p + self.per_label_slot * float(batch.label_targets.numel()))
